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
#include "oq_internal.h"

#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>


/* ------------------------------------------------------------- options */

enum {
    O_ID_FIELD = 256, O_VT, O_MAX_ATTEMPTS, O_BACKOFF, O_TTL, O_DEDUP,
    O_HANDLER, O_DLQ, O_STATS, O_PROGRESS, O_NO_PROGRESS, O_MAX_LINE,
    O_BATCH, O_EMIT, O_KILL_GRACE, O_SEED, O_STATE, O_SYNC, O_COMMIT_BATCH,
    O_COMMIT_INTERVAL, O_FORCE
};

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
    { "quiet", no_argument, NULL, 'q' },
    { "verbose", no_argument, NULL, 'v' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
};

static void run_usage(FILE *f)
{
    fprintf(f,
"usage: onceq run [OPTIONS] [FILE...]\n"
"\n"
"Reads newline-delimited JSON events from FILEs (or stdin when there is no\n"
"FILE or FILE is -), and applies each event's effect exactly once with a\n"
"pool of worker threads: duplicates (same id) are skipped, transient\n"
"failures retried with backoff, and events that cannot be processed go to\n"
"the dead-letter file with their reason.\n"
"\n"
"Workers and ids:\n"
"  -w, --workers N             worker threads (default: number of CPUs)\n"
"      --id-field NAME         the id field (default: id, or event_id when id\n"
"                              is absent); /a/b is a JSON pointer\n"
"Delivery and retries:\n"
"      --visibility-timeout D  lease per delivery (default 30s)\n"
"      --max-attempts N        deliveries before dead-lettering (default 5)\n"
"      --backoff BASE[,CAP]    retry delay, exponential, full jitter\n"
"                              (default 100ms,30s)\n"
"      --ttl D                 dead-letter events older than D (default: none)\n"
"      --dedup-window N        producer-side window of recent ids (default\n"
"                              10000; 0 = off). Duplicates beyond it are still\n"
"                              caught by the processed set.\n"
"      --max-line BYTES        longer lines are dead-lettered (default 1MiB)\n"
"      --batch N               messages per worker receive (default 16)\n"
"Handler:\n"
"      --handler SPEC          wordcount (default), count:FIELD, noop,\n"
"                              exec:COMMAND (a process per event),\n"
"                              coproc:COMMAND (one long-running process per\n"
"                              worker, JSON lines in and out), plugin:PATH.so\n"
"      --emit                  with noop: write each unique event once, in\n"
"                              input order\n"
"      --kill-grace D          exec:, coproc: SIGTERM to SIGKILL grace\n"
"                              (default 2s; 0: SIGKILL at once)\n"
"Durable state (exactly once across crashes and reruns; docs/STATE.md):\n"
"      --state PATH            keep processed ids, results, dead letters and\n"
"                              input progress in an SQLite file; a rerun\n"
"                              resumes where the last one stopped\n"
"      --sync full|normal|off  SQLite synchronous mode (default full: a\n"
"                              committed batch survives power loss)\n"
"      --commit-batch N        pending events that start a transaction\n"
"                              (default 256; it takes all that is pending,\n"
"                              up to 16 N)\n"
"      --commit-interval D     or the oldest pending event waited D (5ms)\n"
"      --force                 resume even if an input file changed (it is\n"
"                              read again from its start)\n"
"Outputs:\n"
"  -o, --out PATH              results (default: stdout)\n"
"      --dlq PATH              dead letters as JSONL (default onceq-dlq.jsonl;\n"
"                              written only when there are any)\n"
"      --stats PATH|-          final stats as JSON\n"
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
"dead-lettered; 2 bad usage or unreadable input (nothing processed); 3 a\n"
"write error on an output; 130/143 stopped by SIGINT/SIGTERM.\n"
"\n"
"Examples:\n"
"  onceq run events.jsonl                       word counts to stdout\n"
"  onceq run -w 4 --handler count:country -o by-country.jsonl a.jsonl b.jsonl\n"
"  onceq run --handler noop --emit < dupes.jsonl > unique.jsonl\n"
"  onceq run --handler 'exec:./deliver.sh' --visibility-timeout 10s \\\n"
"            --max-attempts 3 --dlq failed.jsonl events.jsonl\n"
"  onceq gen --events 100000 --duplicates 0.1 | onceq run --stats -\n"
"  onceq run --state run.db -o counts.jsonl events.jsonl  (kill it, rerun it)\n");
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
    c->batch = 16;
    c->kill_grace_ms = 2000;
    c->sync = OQ__SYNC_FULL;
    c->commit_batch = 256;
    c->commit_interval_ms = 5;
}

/* One option; returns 0 or an exit status. */
static int set_option(oq__run_config *c, int opt, const char *arg)
{
    uint64_t u;
    int64_t ms;

    switch (opt) {
    case 'w':
        if (oq__parse_count(arg, 1, 4096, &u) != 0)
            return bad_option("--workers", arg, "an integer from 1 to 4096");
        c->workers = (unsigned)u;
        return 0;
    case O_ID_FIELD:
        if (*arg == '\0')
            return bad_option("--id-field", arg, "a field name or /pointer");
        c->id_field = arg;
        return 0;
    case O_VT:
        if (oq__parse_duration(arg, &ms) != 0 || ms <= 0)
            return bad_option("--visibility-timeout", arg, DURATION_WANTED);
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
        c->out_path = arg;
        return 0;
    case O_DLQ:
        if (*arg == '\0')
            return bad_option("--dlq", arg, "a path");
        c->dlq_path = arg;
        return 0;
    case O_STATS:
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
        if (oq__parse_count(arg, 1, 4096, &u) != 0)
            return bad_option("--batch", arg, "an integer from 1 to 4096");
        c->batch = (unsigned)u;
        return 0;
    case O_KILL_GRACE:
        /* 0 is passed on as it is: SIGKILL at once. */
        if (oq__parse_duration(arg, &ms) != 0)
            return bad_option("--kill-grace", arg, "a duration like 2s or "
                              "500ms, at most 876000h; 0: SIGKILL at once");
        c->kill_grace_ms = ms;
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
    case 'q':
        c->quiet = true;
        return 0;
    case 'v':
        c->verbose = true;
        return 0;
    }
    return 2;
}

/* Fills c from argv; returns -1 to go on, or an exit status. */
static int parse_args(oq__run_config *c, int argc, char **argv)
{
    int opt;

    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":w:o:qvh", long_opts, NULL)) != -1) {
        int rc;
        if (opt == 'h') {
            run_usage(stdout);
            return 0;
        }
        if (opt == '?') {
            if (optopt)
                fprintf(stderr, "onceq run: unknown option '-%c' (try "
                                "'onceq run --help')\n", optopt);
            else
                fprintf(stderr, "onceq run: unknown option '%s' (try "
                                "'onceq run --help')\n", argv[optind - 1]);
            return 2;
        }
        if (opt == ':') {
            fprintf(stderr, "onceq run: option '%s' needs a value\n",
                    argv[optind - 1]);
            return 2;
        }
        rc = set_option(c, opt, optarg);
        if (rc != 0)
            return rc;
    }
    c->inputs = (const char *const *)(argv + optind);
    c->ninputs = (unsigned)(argc - optind);
    return -1;
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

    if (oq__has_option(argc, argv, "--redis"))
        return oq__redis_run(argc, argv);

    oq__run_config_defaults(&c);
    rc = parse_args(&c, argc, argv);
    if (rc >= 0)
        return rc;
    return oq__run(&c);
}
