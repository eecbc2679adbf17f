/*
 * onceq run: exactly-once batch processing of JSON-lines files.
 *
 * DESIGN
 * ------
 * Threads:
 *   - the reader thread splits the inputs into lines (no JSON parsing) and
 *     sends them to the queue in batches, with a cheap scan for a plain id
 *     so the producer dedup window can work; bad lines it can see (too
 *     large) are rejected straight to the dead letters;
 *   - N pool workers decode (parse JSON, find the id), claim, run the
 *     handler and commit: parsing scales with the pool;
 *   - the main thread waits for signals (sigtimedwait; SIGINT/SIGTERM are
 *     blocked in every thread) and draws the progress line.
 * Results go to a run sink (counters in an oq_memsink, records with their
 * input position) and are written once, at the end, in a stable order.
 *
 * Accounting: every line ends as exactly one of processed, duplicate
 * (refused by the dedup window, or its id already DONE), dead-lettered, or
 * blank; the run checks lines = processed + duplicates + dead + blank
 * before it exits.
 */
#include "oq_cli.h"

#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>


/* ------------------------------------------------------------- options */

/*
 * One option table for every mode of `onceq run`: in memory, durable
 * (--state) and Redis (--redis). Each option says in which modes it means
 * something; one given in a mode where it would be ignored is refused
 * (exit 2), never silently dropped.
 */
enum {
    O_ID_FIELD = 256, O_VT, O_MAX_ATTEMPTS, O_BACKOFF, O_TTL, O_DEDUP,
    O_HANDLER, O_DLQ, O_STATS, O_PROGRESS, O_NO_PROGRESS, O_MAX_LINE,
    O_BATCH, O_EMIT, O_KILL_GRACE, O_SEED, O_STATE, O_SYNC, O_COMMIT_BATCH,
    O_COMMIT_INTERVAL, O_FORCE, O_REDIS, O_STREAM, O_GROUP, O_CONSUMER,
    O_DRAIN, O_TIMEOUT, O_METRICS, O_METRICS_INTERVAL, O_METRICS_LISTEN,
    O_REPLIES, O_RETENTION, O_REDIS_PWFILE, O_REPLICAS, O_REPLY_TTL,
    O_JOIN_REQUESTS, O_PARTITIONS,
    O__END
};

/* The modes an option works in. */
/* The modes of a run: in memory, durable (--state), Redis (--redis). */
enum { M_MEM = 1, M_STATE = 4, M_LOCAL = M_MEM | M_STATE, M_REDIS = 2,
       M_ALL = M_LOCAL | M_REDIS };

/* Limits and defaults shared by every mode. */
#define WORKERS_MAX 4096
/* Redis's Lua scripts unpack a batch's ids and acks into one call's
 * arguments, and Lua 5.1 unpacks at most ~8000 values. */
#define BATCH_MAX 1024
#define VT_MIN_MS 10
/* The one default that differs by mode: a Redis batch costs round trips
 * (read, claim, commit), an in-process one only a lock. */
#define BATCH_LOCAL 16
#define BATCH_REDIS 128
#define STR(x) #x
#define XSTR(x) STR(x)

static const struct option long_opts[] = {
    { "workers", required_argument, NULL, 'w' },
    { "id-field", required_argument, NULL, O_ID_FIELD },
    { "visibility-timeout", required_argument, NULL, O_VT },
    { "max-attempts", required_argument, NULL, O_MAX_ATTEMPTS },
    { "backoff", required_argument, NULL, O_BACKOFF },
    { "ttl", required_argument, NULL, O_TTL },
    { "dedup-window", required_argument, NULL, O_DEDUP },
    { "handler", required_argument, NULL, O_HANDLER },
    { "emit", no_argument, NULL, O_EMIT },
    { "out", required_argument, NULL, 'o' },
    { "dlq", required_argument, NULL, O_DLQ },
    { "stats", required_argument, NULL, O_STATS },
    { "progress", no_argument, NULL, O_PROGRESS },
    { "no-progress", no_argument, NULL, O_NO_PROGRESS },
    { "max-line", required_argument, NULL, O_MAX_LINE },
    { "batch", required_argument, NULL, O_BATCH },
    { "kill-grace", required_argument, NULL, O_KILL_GRACE },
    { "seed", required_argument, NULL, O_SEED },
    { "state", required_argument, NULL, O_STATE },
    { "sync", required_argument, NULL, O_SYNC },
    { "commit-batch", required_argument, NULL, O_COMMIT_BATCH },
    { "commit-interval", required_argument, NULL, O_COMMIT_INTERVAL },
    { "force", no_argument, NULL, O_FORCE },
    { "redis", required_argument, NULL, O_REDIS },
    { "stream", required_argument, NULL, O_STREAM },
    { "group", required_argument, NULL, O_GROUP },
    { "consumer", required_argument, NULL, O_CONSUMER },
    { "drain", no_argument, NULL, O_DRAIN },
    { "timeout", required_argument, NULL, O_TIMEOUT },
    { "metrics", required_argument, NULL, O_METRICS },
    { "metrics-interval", required_argument, NULL, O_METRICS_INTERVAL },
    { "metrics-listen", required_argument, NULL, O_METRICS_LISTEN },
    { "replies", required_argument, NULL, O_REPLIES },
    { "retention", required_argument, NULL, O_RETENTION },
    { "redis-password-file", required_argument, NULL, O_REDIS_PWFILE },
    { "replicas", required_argument, NULL, O_REPLICAS },
    { "reply-ttl", required_argument, NULL, O_REPLY_TTL },
    { "join-requests", no_argument, NULL, O_JOIN_REQUESTS },
    { "partitions", required_argument, NULL, O_PARTITIONS },
    { "quiet", no_argument, NULL, 'q' },
    { "verbose", no_argument, NULL, 'v' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
};

/* The options that do not work in every mode, and why not with --redis.
 * Every other option works in every mode. */
static const struct {
    int id;
    unsigned modes;
    const char *why;
} mode_opts[] = {
    { O_TTL, M_LOCAL, "the Redis engine has no TTL" },
    { O_DEDUP, M_LOCAL, "`onceq send --dedup-window` applies it" },
    { O_MAX_LINE, M_LOCAL, "`onceq send --max-line` applies it" },
    { O_EMIT, M_LOCAL, "records go to NAME:results" },
    { O_REPLIES, M_LOCAL, "each reply goes to its request's reply_to "
                          "stream" },
    { O_DLQ, M_LOCAL, "dead letters go to NAME:dlq (see `onceq dlq "
                      "--redis`)" },
    { O_STATE, M_LOCAL, "Redis holds the state" },
    { O_SYNC, M_STATE, "Redis holds the state" },
    { O_COMMIT_BATCH, M_STATE, "Redis holds the state" },
    { O_COMMIT_INTERVAL, M_STATE, "Redis holds the state" },
    { O_FORCE, M_STATE, "Redis holds the state" },
    { O_STREAM, M_REDIS, NULL },
    { O_GROUP, M_REDIS, NULL },
    { O_CONSUMER, M_REDIS, NULL },
    { O_DRAIN, M_REDIS, NULL },
    { O_RETENTION, M_REDIS, NULL },
    { O_REDIS_PWFILE, M_REDIS, NULL },
    { O_REPLICAS, M_REDIS, NULL },
    { O_REPLY_TTL, M_REDIS, NULL },
    { O_JOIN_REQUESTS, M_REDIS, NULL },
    { O_PARTITIONS, M_REDIS, NULL },
};

static void run_usage(FILE *f)
{
    fprintf(f,
"usage: onceq run [OPTIONS] [FILE...]\n"
"       onceq run --redis URL --stream NAME --group G [OPTIONS]\n"
"\n"
"Reads newline-delimited JSON events from FILEs (or stdin when there is no\n"
"FILE or FILE is -), or with --redis from a Redis stream shared with other\n"
"onceq processes, and applies each event's effect exactly once with a\n"
"pool of worker threads: duplicates (same id) are skipped, transient\n"
"failures retried with backoff, and events that cannot be processed are\n"
"dead-lettered with their reason. Options marked [local] work only\n"
"without --redis, [state] only with --state, [redis] only with --redis;\n"
"the others work in every mode, with the same limits.\n"
"\n"
"Workers and ids:\n"
"  -w, --workers N             worker threads, 1 to 4096 (default: number\n"
"                              of CPUs); with --redis one connection each\n"
"      --id-field NAME         the id field (default: id, or event_id when id\n"
"                              is absent); /a/b is a JSON pointer\n"
"Delivery and retries:\n"
"      --visibility-timeout D  lease per delivery, at least 10ms (default 30s);\n"
"                              a running handler's lease is extended every\n"
"                              third of it (heartbeats), so a handler may\n"
"                              run longer\n"
"      --timeout D             the longest one attempt may run\n"
"                              (default: no limit): exec:, coproc: SIGTERM,\n"
"                              SIGKILL after --kill-grace; then retried\n"
"      --max-attempts N        deliveries before dead-lettering (default 5)\n"
"      --backoff BASE[,CAP]    retry delay, exponential, full jitter\n"
"                              (default 100ms,30s)\n"
"      --batch N               messages per worker receive, 1 to 1024\n"
"                              (default 16; 128 with --redis, where a batch\n"
"                              costs round trips; fewer for slow handlers)\n"
"      --seed N                retry jitter seed (default: random)\n"
"      --ttl D                 [local] dead-letter events older than D\n"
"                              (default: none)\n"
"      --dedup-window N        [local] producer-side window of recent ids\n"
"                              (default 10000; 0 = off). Duplicates beyond\n"
"                              it are still caught by the processed set.\n"
"      --max-line BYTES        [local] longer lines are dead-lettered\n"
"                              (default 1MiB)\n"
"Handler:\n"
"      --handler SPEC          wordcount (default), count:FIELD, noop,\n"
"                              exec:COMMAND (a process per event),\n"
"                              coproc:COMMAND (one long-running process per\n"
"                              worker, JSON lines in and out), plugin:PATH.so\n"
"      --emit                  [local] with noop: write each unique event\n"
"                              once, in input order\n"
"      --replies DIR           [local] request-reply: an event with\n"
"                              \"reply_to\" is a request; its reply (ok,\n"
"                              failed or dead) is appended to\n"
"                              DIR/<reply_to>.jsonl once, with its commit\n"
"                              (docs/REQUEST-REPLY.md; not with --state)\n"
"      --kill-grace D          exec:, coproc: SIGTERM to SIGKILL grace\n"
"                              (default 2s; 0: SIGKILL at once)\n"
"Durable state (exactly once across crashes and reruns; docs/STATE.md):\n"
"      --state PATH            [local] keep processed ids, results, dead\n"
"                              letters and input progress in an SQLite file;\n"
"                              a rerun resumes where the last one stopped\n"
"      --sync full|normal|off  [state] SQLite synchronous mode (default full:\n"
"                              a committed batch survives power loss)\n"
"      --commit-batch N        [state] pending events that start a\n"
"                              transaction (default 256; it takes all that\n"
"                              is pending, up to 16 N)\n"
"      --commit-interval D     [state] or the oldest pending event waited D\n"
"                              (5ms)\n"
"      --force                 [state] resume even if an input file changed\n"
"                              (it is read again from its start)\n"
"Redis (many processes on many machines, one stream; docs/REDIS.md):\n"
"      --redis URL[,URL...]    redis://[user:password@]host[:port][/db]: take\n"
"                              events from the stream, not from FILEs (load\n"
"                              them with `onceq send`); claims, the processed\n"
"                              set, outputs (NAME:counts, NAME:results) and\n"
"                              dead letters (NAME:dlq) live in Redis. Several\n"
"                              URLs: a primary and its replicas, a failover\n"
"                              is followed (docs/REDIS.md)\n"
"      --redis-password-file PATH  [redis] the password from a file (one\n"
"                              line; not in ps, unlike one in the URL)\n"
"      --stream NAME           [redis] the stream (keys NAME and NAME:*);\n"
"                              required\n"
"      --group G               [redis] the consumer group (created at the\n"
"                              start of the stream if needed); required\n"
"      --consumer NAME         [redis] this consumer's name (default host:pid)\n"
"      --drain                 [redis] exit once the group has nothing new,\n"
"                              nothing pending with any consumer and nothing\n"
"                              delayed; without it, run until SIGINT/SIGTERM\n"
"      --replicas N            [redis] a batch is done only once N replicas\n"
"                              have its commit (WAIT; default 0)\n"
"      --reply-ttl D           [redis] how long a settled request's reply is\n"
"                              kept for its duplicates (default 24h)\n"
"      --join-requests         [redis] the stream holds replies (`onceq send\n"
"                              --reply-to`): the id is the correlation_id,\n"
"                              and the handler gets each reply with its\n"
"                              request (\"request\"); a reply without one is\n"
"                              dead-lettered (late). docs/REQUEST-REPLY.md\n"
"      --retention D           [redis] forget done-marks older than D (at\n"
"                              least 1s; default: never): an id seen again\n"
"                              after that runs again. Fixed at the stream's\n"
"                              first run\n"
"      --partitions P          [redis] the stream's partitions (1 to 256;\n"
"                              needed on a Redis Cluster): fixed at its\n"
"                              first use (by send or run); without it, the\n"
"                              stream's. docs/REDIS.md, Partitions\n"
"Outputs:\n"
"  -o, --out PATH              results (default: stdout); with --redis, the\n"
"                              stream's results (all consumers') at the end\n"
"      --dlq PATH              [local] dead letters as JSONL (default\n"
"                              onceq-dlq.jsonl; written only when there are\n"
"                              any)\n"
"      --stats PATH|-          final stats as JSON (with --redis: this\n"
"                              consumer's, and the stream's totals)\n"
"      --metrics PATH          Prometheus text metrics, rewritten\n"
"                              (temp file + rename) every --metrics-interval\n"
"                              (default 10s) and at the end (docs/METRICS.md)\n"
"      --metrics-interval D    see --metrics\n"
"      --metrics-listen HOST:PORT\n"
"                              serve GET /metrics over HTTP\n"
"      --progress, --no-progress\n"
"                              progress line on stderr (default: on if a TTY)\n"
"  -q, --quiet                 no summary\n"
"  -v, --verbose               more detail in the summary\n"
"  -h, --help                  this help\n"
"\n"
"Durations take ms, s, m or h suffixes (250ms, 1.5s, 3m, 1h); a bare number\n"
"is seconds; at most 876000h (100 years). Counts and sizes are decimal;\n"
"sizes take K, M or G (binary: 64K, 1M).\n"
"\n"
"Exit status: 0 every event processed or a duplicate; 1 some events were\n"
"dead-lettered (with --redis: by this consumer); 2 bad usage, unreadable\n"
"input, an output that cannot be written, a bad Redis URL, Redis\n"
"unreachable or refusing us (nothing processed); 3 an I/O error once the\n"
"run started (a write error on an output; Redis lost for good after 60 s\n"
"of reconnecting); 130/143 stopped by SIGINT/SIGTERM.\n"
"\n"
"Examples:\n"
"  onceq run events.jsonl                       word counts to stdout\n"
"  onceq run -w 4 --handler count:country -o by-country.jsonl a.jsonl b.jsonl\n"
"  onceq run --handler noop --emit < dupes.jsonl > unique.jsonl\n"
"  onceq run --handler 'exec:./deliver.sh' --visibility-timeout 10s \\\n"
"            --max-attempts 3 --dlq failed.jsonl events.jsonl\n"
"  onceq gen --events 100000 --duplicates 0.1 | onceq run --stats -\n"
"  onceq run --state run.db -o counts.jsonl events.jsonl  (kill it, rerun it)\n"
"  onceq run --redis redis://:pass@10.0.0.5 --stream orders --group g -w 8\n");
}

/* ------------------------------------------------------------- numbers */

/*
 * The one set of number parsers behind every option (declared in
 * oq_internal.h). strtod and strtoull are not used: they take leading
 * whitespace, a sign (strtoull negates "-1" into 2^64 - 1), hex, exponents,
 * nan and inf, and the values they give on overflow are easy to miss.
 */

/* Reads the decimal digits at *p (at least one) into *v and moves *p past
 * them; false when there is no digit or the value passes max. */
static bool scan_digits(const char **p, uint64_t max, uint64_t *v)
{
    const char *s = *p;
    uint64_t x = 0;

    if (*s < '0' || *s > '9')
        return false;
    for (; *s >= '0' && *s <= '9'; s++) {
        uint64_t d = (uint64_t)(*s - '0');
        if (d > max || x > (max - d) / 10)
            return false;
        x = x * 10 + d;
    }
    *p = s;
    *v = x;
    return true;
}

int oq__parse_count(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    uint64_t v;

    if (s == NULL || !scan_digits(&s, max, &v) || *s != '\0' || v < min)
        return OQ_EINVAL;
    *out = v;
    return 0;
}

int oq__parse_size(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    uint64_t v, mult = 1;

    if (s == NULL || !scan_digits(&s, UINT64_MAX, &v))
        return OQ_EINVAL;
    switch (*s) {
    case 'K': case 'k': mult = (uint64_t)1 << 10; break;
    case 'M': case 'm': mult = (uint64_t)1 << 20; break;
    case 'G': case 'g': mult = (uint64_t)1 << 30; break;
    }
    if (mult > 1) {
        s++;
        if (strcmp(s, "iB") == 0 || strcmp(s, "B") == 0)
            s += strlen(s);
    }
    if (*s != '\0' || v > max / mult || v * mult < min)
        return OQ_EINVAL;
    *out = v * mult;
    return 0;
}

int oq__parse_duration_bare(const char *s, int64_t bare_ms, int64_t *ms)
{
    /* Fraction digits past the ninth are checked but not counted: they are
     * worth less than a millisecond even in hours. */
    uint64_t whole, num = 0, den = 1, mult, v;

    if (s == NULL || bare_ms <= 0 || !scan_digits(&s, UINT64_MAX, &whole))
        return OQ_EINVAL;
    if (*s == '.') {
        s++;
        if (*s < '0' || *s > '9')
            return OQ_EINVAL;
        for (; *s >= '0' && *s <= '9'; s++) {
            if (den < 1000000000) {
                num = num * 10 + (uint64_t)(*s - '0');
                den *= 10;
            }
        }
    }
    if (*s == '\0')
        mult = (uint64_t)bare_ms;
    else if (strcmp(s, "ms") == 0)
        mult = 1;
    else if (strcmp(s, "s") == 0)
        mult = 1000;
    else if (strcmp(s, "m") == 0)
        mult = 60 * 1000;
    else if (strcmp(s, "h") == 0)
        mult = 3600 * 1000;
    else
        return OQ_EINVAL;
    /* whole * mult, then the fraction (num * mult < 10^9 * 3.6 10^6: no
     * overflow), rounded to the nearest ms. */
    if (whole > (uint64_t)OQ__DURATION_MAX_MS / mult)
        return OQ_EINVAL;
    v = whole * mult + (num * mult + den / 2) / den;
    if (v > (uint64_t)OQ__DURATION_MAX_MS)
        return OQ_EINVAL;
    *ms = (int64_t)v;
    return 0;
}

/* Parses "250ms", "30s", "1.5s", "2m", "1h" or a bare number of seconds. */
int oq__parse_duration(const char *s, int64_t *ms)
{
    return oq__parse_duration_bare(s, 1000, ms);
}

int oq__parse_backoff(const char *arg, int64_t *base_ms, int64_t *cap_ms)
{
    char base[64];
    const char *comma = strchr(arg, ',');
    size_t n = comma ? (size_t)(comma - arg) : strlen(arg);
    int64_t b, c = *cap_ms;

    if (n >= sizeof(base))
        return OQ_EINVAL;
    memcpy(base, arg, n);
    base[n] = '\0';
    if (oq__parse_duration(base, &b) != 0 ||
        (comma && oq__parse_duration(comma + 1, &c) != 0) || c < b)
        return OQ_EINVAL;
    *base_ms = b;
    *cap_ms = c;
    return 0;
}

#define DURATION_WANTED \
    "a duration like 30s, 500ms, 1.5m or 1h, above 0, at most 876000h"

static int bad_option(const char *opt, const char *val, const char *want)
{
    fprintf(stderr, "onceq run: invalid %s '%s' (%s)\n", opt, val, want);
    return 2;
}

int oq__usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "onceq %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return 2;
}

int oq__getopt_error(const char *cmd, int opt, char **argv)
{
    if (opt == ':')
        return oq__usage_error(cmd, "option '%s' needs a value",
                               argv[optind - 1]);
    if (optopt)
        return oq__usage_error(cmd, "unknown option '-%c' (try 'onceq %s "
                               "--help')", optopt, cmd);
    return oq__usage_error(cmd, "unknown option '%s' (try 'onceq %s "
                           "--help')", argv[optind - 1], cmd);
}

const char *oq__id_field_bad(const char *arg)
{
    if (*arg == '\0')
        return "a field name or /pointer";
    /* In a JSON pointer (RFC 6901) '~' is only ever ~0 or ~1. */
    for (const char *t = arg; *arg == '/' && *t; t++)
        if (*t == '~' && t[1] != '0' && t[1] != '1')
            return "a JSON pointer whose '~' are ~0 (~) or ~1 (/)";
    return NULL;
}

void oq__run_config_defaults(oq__run_config *c)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    memset(c, 0, sizeof(*c));
    c->workers = ncpu > 0 ? (unsigned)ncpu : 1;
    c->id_field = "id";
    c->vt_ms = 30000;
    c->max_attempts = 5;
    c->backoff_base_ms = 100;
    c->backoff_cap_ms = 30000;
    c->dedup_window = 10000;
    c->handler_spec = "wordcount";
    c->dlq_path = "onceq-dlq.jsonl";
    c->progress = isatty(STDERR_FILENO) ? 1 : 0;
    c->max_line = 1024 * 1024;
    c->batch = BATCH_LOCAL; /* parse_args: BATCH_REDIS with --redis */
    c->kill_grace_ms = 2000;
    c->metrics_interval_ms = 10000;
    c->sync = OQ__SYNC_FULL;
    c->commit_batch = 256;
    c->commit_interval_ms = 5;
    c->reply_ttl_ms = 24 * 3600 * 1000;
}

/* One option; returns 0 or an exit status. */
static int set_option(oq__run_config *c, int opt, const char *arg)
{
    const char *why;
    uint64_t u;
    int64_t ms;

    switch (opt) {
    case 'w':
        if (oq__parse_count(arg, 1, WORKERS_MAX, &u) != 0)
            return bad_option("--workers", arg, "an integer from 1 to "
                              XSTR(WORKERS_MAX));
        c->workers = (unsigned)u;
        return 0;
    case O_ID_FIELD:
        if ((why = oq__id_field_bad(arg)) != NULL)
            return bad_option("--id-field", arg, why);
        c->id_field = arg;
        return 0;
    case O_VT:
        if (oq__parse_duration(arg, &ms) != 0 || ms < VT_MIN_MS)
            return bad_option("--visibility-timeout", arg, "a duration like "
                              "30s or 500ms, from 10ms to 876000h");
        c->vt_ms = ms;
        return 0;
    case O_MAX_ATTEMPTS:
        if (oq__parse_count(arg, 1, 1000000, &u) != 0)
            return bad_option("--max-attempts", arg,
                              "an integer from 1 to 1000000");
        c->max_attempts = (uint32_t)u;
        return 0;
    case O_BACKOFF:
        if (oq__parse_backoff(arg, &c->backoff_base_ms,
                              &c->backoff_cap_ms) != 0)
            return bad_option("--backoff", arg, "BASE[,CAP] durations like "
                              "100ms,30s, CAP >= BASE, at most 876000h");
        return 0;
    case O_TTL:
        if (oq__parse_duration(arg, &ms) != 0 || ms <= 0)
            return bad_option("--ttl", arg, DURATION_WANTED);
        c->ttl_ms = ms;
        return 0;
    case O_DEDUP:
        if (oq__parse_count(arg, 0, (uint64_t)1 << 32, &u) != 0)
            return bad_option("--dedup-window", arg,
                              "a number of ids from 0 to 4294967296");
        c->dedup_window = (size_t)u;
        return 0;
    case O_HANDLER:
        c->handler_spec = arg;
        return 0;
    case O_EMIT:
        c->emit = true;
        return 0;
    case 'o':
        if (*arg == '\0')
            return bad_option("-o", arg, "a path, or - for stdout");
        c->out_path = arg;
        return 0;
    case O_DLQ:
        if (*arg == '\0')
            return bad_option("--dlq", arg, "a path");
        c->dlq_path = arg;
        return 0;
    case O_STATS:
        if (*arg == '\0')
            return bad_option("--stats", arg, "a path, or - for stdout");
        c->stats_path = arg;
        return 0;
    case O_PROGRESS:
        c->progress = 1;
        return 0;
    case O_NO_PROGRESS:
        c->progress = 0;
        return 0;
    case O_MAX_LINE:
        if (oq__parse_size(arg, 16, (uint64_t)1 << 31, &u) != 0)
            return bad_option("--max-line", arg,
                              "bytes from 16 to 2G, like 1M or 64K");
        c->max_line = (size_t)u;
        return 0;
    case O_BATCH:
        if (oq__parse_count(arg, 1, BATCH_MAX, &u) != 0)
            return bad_option("--batch", arg, "an integer from 1 to "
                              XSTR(BATCH_MAX));
        c->batch = (unsigned)u;
        return 0;
    case O_KILL_GRACE:
        /* 0 is passed on as it is: SIGKILL at once. */
        if (oq__parse_duration(arg, &ms) != 0)
            return bad_option("--kill-grace", arg, "a duration like 2s or "
                              "500ms, at most 876000h; 0: SIGKILL at once");
        c->kill_grace_ms = ms;
        return 0;
    case O_REPLICAS:
        if (oq__parse_count(arg, 0, 64, &u) != 0)
            return bad_option("--replicas", arg, "an integer from 0 to 64");
        c->replicas = (unsigned)u;
        return 0;
    case O_REDIS_PWFILE:
        if (*arg == '\0')
            return bad_option("--redis-password-file", arg, "a path");
        c->redis_password_file = arg;
        return 0;
    case O_PARTITIONS:
        if (oq__parse_count(arg, 1, OQ__PARTITIONS_MAX, &u) != 0)
            return bad_option("--partitions", arg, "an integer from 1 to "
                              XSTR(OQ__PARTITIONS_MAX));
        c->partitions = (unsigned)u;
        return 0;
    case O_RETENTION:
        if (oq__parse_duration(arg, &ms) != 0 || ms < 1000)
            return bad_option("--retention", arg, "a duration like 24h or "
                              "90m, at least 1s, at most 876000h");
        c->retention_ms = ms;
        return 0;
    case O_TIMEOUT:
        if (oq__parse_duration(arg, &ms) != 0 || ms <= 0)
            return bad_option("--timeout", arg, "a duration like 30s or 5m, "
                              "above 0, at most 876000h");
        c->timeout_ms = ms;
        return 0;
    case O_METRICS:
        if (*arg == '\0')
            return bad_option("--metrics", arg, "a path");
        c->metrics_path = arg;
        return 0;
    case O_METRICS_INTERVAL:
        if (oq__parse_duration(arg, &ms) != 0 || ms < 100)
            return bad_option("--metrics-interval", arg, "a duration of at "
                              "least 100ms, at most 876000h");
        c->metrics_interval_ms = ms;
        return 0;
    case O_METRICS_LISTEN:
        c->metrics_listen = arg;
        return 0;
    case O_REPLIES:
        if (*arg == '\0')
            return bad_option("--replies", arg, "a directory");
        c->replies_dir = arg;
        return 0;
    case O_SEED:
        if (oq__parse_count(arg, 0, UINT64_MAX, &u) != 0)
            return bad_option("--seed", arg,
                              "an integer from 0 to 18446744073709551615");
        c->seed = u;
        return 0;
    case O_STATE:
        if (*arg == '\0')
            return bad_option("--state", arg, "a path");
        c->state_path = arg;
        return 0;
    case O_SYNC:
        if (strcmp(arg, "full") == 0)
            c->sync = OQ__SYNC_FULL;
        else if (strcmp(arg, "normal") == 0)
            c->sync = OQ__SYNC_NORMAL;
        else if (strcmp(arg, "off") == 0)
            c->sync = OQ__SYNC_OFF;
        else
            return bad_option("--sync", arg, "full, normal or off");
        return 0;
    case O_COMMIT_BATCH:
        if (oq__parse_count(arg, 1, 1000000, &u) != 0)
            return bad_option("--commit-batch", arg,
                              "an integer from 1 to 1000000");
        c->commit_batch = (size_t)u;
        return 0;
    case O_COMMIT_INTERVAL:
        if (oq__parse_duration(arg, &ms) != 0 || ms <= 0 || ms > 60000)
            return bad_option("--commit-interval", arg,
                              "a duration from 1ms to 60s");
        c->commit_interval_ms = ms;
        return 0;
    case O_FORCE:
        c->force = true;
        return 0;
    case O_REDIS:
        c->redis_url = arg;
        return 0;
    case O_STREAM:
        if (*arg == '\0')
            return bad_option("--stream", arg, "a stream name");
        c->stream = arg;
        return 0;
    case O_GROUP:
        if (*arg == '\0')
            return bad_option("--group", arg, "a group name");
        c->group = arg;
        return 0;
    case O_CONSUMER:
        if (*arg == '\0')
            return bad_option("--consumer", arg, "a consumer name");
        c->consumer = arg;
        return 0;
    case O_DRAIN:
        c->drain = true;
        return 0;
    case O_REPLY_TTL:
        if (oq__parse_duration(arg, &ms) != 0 || ms < 1000)
            return bad_option("--reply-ttl", arg, "a duration like 24h or "
                              "90m, at least 1s, at most 876000h");
        c->reply_ttl_ms = ms;
        return 0;
    case O_JOIN_REQUESTS:
        c->join_requests = true;
        return 0;
    case 'q':
        c->quiet = true;
        return 0;
    case 'v':
        c->verbose = true;
        return 0;
    }
    return 2;
}

/* Refuses an option given in a mode where it means nothing; seen holds
 * the options given (bit id - 256). 0 or 2. */
static int check_mode(oq__run_config *c, uint64_t seen)
{
    unsigned mode = c->redis_url ? M_REDIS : c->state_path ? M_STATE : M_MEM;

    for (size_t i = 0; i < sizeof(mode_opts) / sizeof(mode_opts[0]); i++) {
        const char *name = NULL;
        if (!(seen >> (mode_opts[i].id - 256) & 1) ||
            (mode_opts[i].modes & mode))
            continue;
        for (const struct option *o = long_opts; o->name; o++)
            if (o->val == mode_opts[i].id)
                name = o->name;
        if (mode == M_REDIS)
            fprintf(stderr, "onceq run: --%s cannot be used with --redis: "
                    "%s\n", name, mode_opts[i].why);
        else if (mode_opts[i].modes == M_STATE)
            fprintf(stderr, "onceq run: --%s needs --state PATH (it is an "
                    "option of durable runs)\n", name);
        else
            fprintf(stderr, "onceq run: --%s needs --redis URL (it is an "
                    "option of Redis runs)\n", name);
        return 2;
    }
    if (mode == M_REDIS) {
        if (c->ninputs > 0) {
            fprintf(stderr, "onceq run: with --redis, events come from the "
                    "stream, not from files ('%s'); load them with `onceq "
                    "send`\n", c->inputs[0]);
            return 2;
        }
        if (c->join_requests && (seen >> (O_ID_FIELD - 256) & 1)) {
            fprintf(stderr, "onceq run: --join-requests takes each reply's "
                    "correlation_id as its id: --id-field cannot be used "
                    "with it\n");
            return 2;
        }
        if (c->join_requests)
            c->id_field = "correlation_id";
        if (c->stream == NULL || c->group == NULL) {
            fprintf(stderr, "onceq run: --redis URL, --stream NAME and "
                    "--group G are all required (try 'onceq run --help')\n");
            return 2;
        }
    }
    if ((seen >> (O_METRICS_INTERVAL - 256) & 1) && c->metrics_path == NULL) {
        fprintf(stderr, "onceq run: --metrics-interval is how often "
                "--metrics FILE is written: give --metrics too\n");
        return 2;
    }
    return 0;
}

/* Fills c from argv: every value is checked as it comes (a bad one is
 * reported first, whatever else is wrong), then the options against the
 * mode. Returns -1 to go on, or an exit status. */
static int parse_args(oq__run_config *c, int argc, char **argv)
{
    _Static_assert(O__END - 256 <= 64, "seen is a 64-bit mask");
    uint64_t seen = 0;
    int opt, rc;

    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":w:o:qvh", long_opts, NULL)) != -1) {
        if (opt == 'h') {
            run_usage(stdout);
            return 0;
        }
        if (opt == '?' || opt == ':')
            return oq__getopt_error("run", opt, argv);
        rc = set_option(c, opt, optarg);
        if (rc != 0)
            return rc;
        if (opt >= 256)
            seen |= (uint64_t)1 << (opt - 256);
    }
    c->inputs = (const char *const *)(argv + optind);
    c->ninputs = (unsigned)(argc - optind);
    if (c->redis_url && !(seen >> (O_BATCH - 256) & 1))
        c->batch = BATCH_REDIS;
    rc = check_mode(c, seen);
    return rc ? rc : -1;
}

/* ------------------------------------------- stats, summary, progress */

/* Events settled a second: processed, duplicates and dead (a run of
 * redriven events alone reads no line; an interrupted one leaves some
 * unfinished). */
static double per_s(const oq__run_counts *n)
{
    return n->elapsed_s > 0
               ? (n->processed + n->duplicates + n->dead) / n->elapsed_s
               : 0;
}

void oq__write_stats_head(FILE *f, const oq__run_counts *n)
{
    fprintf(f, "{\"lines\":%" PRIu64 ",\"processed\":%" PRIu64
            ",\"duplicates\":%" PRIu64 ",\"dead\":%" PRIu64
            ",\"blank\":%" PRIu64 ",\"unfinished\":%" PRIu64
            ",\"dead_by_reason\":{",
            n->lines, n->processed, n->duplicates, n->dead, n->blank,
            n->unfinished);
    for (int i = 0; i < OQ_DLQ__COUNT; i++)
        fprintf(f, "%s\"%s\":%" PRIu64, i ? "," : "",
                oq_dlq_reason_name((oq_dlq_reason)i), n->dead_by[i]);
    fprintf(f, "},\"retried\":%" PRIu64 ",\"redelivered\":%" PRIu64
            ",\"fenced\":%" PRIu64 ",\"lease_extensions\":%" PRIu64
            ",\"workers\":%u,\"handler\":",
            n->retried, n->redelivered, n->fenced, n->lease_extensions,
            n->workers);
    oq__json_write_string(f, n->handler, strlen(n->handler));
    fprintf(f, ",\"elapsed_s\":%.3f,\"events_per_s\":%.0f", n->elapsed_s,
            per_s(n));
}

void oq__write_summary(const oq__run_counts *n, const char *who,
                       const char *dlq_where, bool quiet, bool verbose)
{
    if (quiet)
        return;
    fprintf(stderr, "onceq: %s%s%" PRIu64 " lines: %" PRIu64 " processed, %"
            PRIu64 " duplicates, %" PRIu64 " dead-lettered, %" PRIu64
            " blank", who ? who : "", who ? ": " : "", n->lines,
            n->processed, n->duplicates, n->dead, n->blank);
    if (n->unfinished)
        fprintf(stderr, ", %" PRIu64 " unfinished", n->unfinished);
    fprintf(stderr, " in %.2fs (%.0f events/s)\n", n->elapsed_s, per_s(n));
    if (n->dead > 0) {
        fprintf(stderr, "onceq: dead letters in %s:", dlq_where);
        for (int i = 0; i < OQ_DLQ__COUNT; i++)
            if (n->dead_by[i])
                fprintf(stderr, " %s %" PRIu64,
                        oq_dlq_reason_name((oq_dlq_reason)i), n->dead_by[i]);
        fputc('\n', stderr);
    }
    if (verbose)
        fprintf(stderr, "onceq: retried %" PRIu64 ", redelivered %" PRIu64
                ", fenced %" PRIu64 ", %u workers, handler %s\n",
                n->retried, n->redelivered, n->fenced, n->workers,
                n->handler);
}

void oq__draw_progress(const oq__run_counts *n, const char *tail)
{
    /* The rate of settled events: lines read are not done yet. */
    uint64_t done = n->processed + n->duplicates + n->dead;
    fprintf(stderr, "\r\033[K%.0f ev/s  done %" PRIu64 "  dup %" PRIu64
            "  dead %" PRIu64 "%s", n->elapsed_s > 0 ? done / n->elapsed_s
            : 0, n->processed, n->duplicates, n->dead, tail);
    fflush(stderr);
}

int oq__has_option(int argc, char **argv, const char *name)
{
    size_t n = strlen(name);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            return 0;
        if (strncmp(argv[i], name, n) == 0 &&
            (argv[i][n] == '\0' || argv[i][n] == '='))
            return 1;
    }
    return 0;
}

int oq__cmd_run(int argc, char **argv)
{
    oq__run_config c;
    int rc;

    oq__run_config_defaults(&c);
    rc = parse_args(&c, argc, argv);
    if (rc >= 0)
        return rc;
    return c.redis_url ? oq__redis_run(&c) : oq__run(&c);
}
