/*
 * The command lines of the Redis commands: `onceq send`, `onceq request`,
 * and `onceq dlq` and `onceq export` with --redis: their options, checked
 * as they come, their help, and the arguments; then redis.c does the work
 * (oq__redis_send, oq__redis_request, oq__redis_dlq, oq__redis_export).
 * `onceq run --redis` parses its options in run.c, like every run.
 */
#include "oq_cli.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------ send, request */

static void send_usage(FILE *f)
{
    fprintf(f,
"usage: onceq send --redis URL --stream NAME [OPTIONS] [FILE...]\n"
"\n"
"Loads JSON-lines events from FILEs (or stdin) into a Redis stream, for\n"
"`onceq run --redis` consumers. An event whose id was sent within the\n"
"dedup window is rejected as a duplicate (SET NX PX in the same Lua script\n"
"as the XADD). Lines that are not JSON or have no usable id are sent\n"
"anyway: the consumers dead-letter them with reason parse_error or bad_id.\n"
"Blank lines are skipped; a line over --max-line is sent cut to 4 KiB and\n"
"dead-lettered by the consumers as too_large.\n"
"\n"
"  --redis URL            redis://[user:password@]host[:port][/db]; without\n"
"                         a password there, $REDISCLI_AUTH's is used;\n"
"                         several, comma-separated: a primary and its\n"
"                         replicas (a failover is followed)\n"
"  --redis-password-file PATH  the password from a file (one line)\n"
"  --replicas N           report events sent only once N replicas have\n"
"                         them (WAIT; default 0)\n"
"  --stream NAME          the stream (keys NAME, NAME:*)\n"
"  --partitions P         the stream's partitions (1 to 256; needed on a\n"
"                         Redis Cluster): fixed at its first use; without\n"
"                         it, the stream's. Each event goes to the\n"
"                         partition of its id (docs/REDIS.md, Partitions)\n"
"  --dedup-window D       producer dedup window (default 5m; a bare number\n"
"                         is milliseconds; 0 = off)\n"
"  --id-field NAME        the id field (default id, or event_id)\n"
"  --batch N              events per Lua call (default 256)\n"
"  --max-line BYTES       (default 1M; K, M, G suffixes)\n"
"  --reply-to R           send requests: each JSON object is stamped with\n"
"                         \"reply_to\":R and a \"correlation_id\" (its own,\n"
"                         else a random one), and its context is kept in\n"
"                         R:rq:<correlation_id> for `onceq run --redis\n"
"                         --stream R --join-requests` (docs/REQUEST-REPLY.md)\n"
"  --request-ttl D        how long a request's context is kept (default 24h)\n"
"  --reply-timeout D      the requests' deadline (in their context): a reply\n"
"                         that comes later is late for --join-requests\n"
"  -q, --quiet            no summary\n"
"\n"
"Prints: sent N, rejected M duplicates. Exit status: 0 success, 1 some\n"
"requests refused (--reply-to: their correlation_id is another request's),\n"
"2 bad usage, unreadable input, Redis unreachable or refused (an evicting\n"
"maxmemory-policy, a key of the stream with another type), 3 Redis\n"
"failed mid-way or lost the stream's data.\n");
}

static void req_usage(FILE *f)
{
    fprintf(f,
"usage: onceq request --redis URL --stream NAME [OPTIONS] [FILE...]\n"
"\n"
"Sends each JSON-lines event of FILEs (or stdin) to the stream as a request\n"
"(stamped with \"reply_to\" and a \"correlation_id\", as `onceq send\n"
"--reply-to` does), waits for the replies of `onceq run --redis` responders,\n"
"and writes one line per request, in input order: its reply\n"
"({\"correlation_id\",\"id\",\"status\":\"ok\"|\"failed\"|\"dead\",...}), or\n"
"{\"correlation_id\",\"id\",\"status\":\"timeout\"} when none came in time, or\n"
"{\"correlation_id\":null,\"status\":\"rejected\",\"error\"} for a line that is\n"
"not a JSON object (not sent). docs/REQUEST-REPLY.md\n"
"\n"
"  --redis URL            redis://[user:password@]host[:port][/db]; without\n"
"                         a password there, $REDISCLI_AUTH's is used;\n"
"                         several, comma-separated: a primary and its\n"
"                         replicas (a failover is followed)\n"
"  --redis-password-file PATH  the password from a file (one line)\n"
"  --stream NAME          the responders' stream\n"
"  --reply-timeout D      how long to wait for the replies after the last\n"
"                         request was sent (default 30s)\n"
"  --reply-stream R       where the replies go (default NAME:replies:<random>,\n"
"                         deleted at the end)\n"
"  --request-ttl D        how long a request's context is kept (default 24h)\n"
"  --id-field NAME        the id field (default id, or event_id)\n"
"  --max-line BYTES       (default 1M; K, M, G suffixes)\n"
"  -q, --quiet            no summary\n"
"\n"
"Exit status: 0 every request got an ok reply, 1 some failed, died, timed\n"
"out or were rejected, 2 bad usage, unreadable input, Redis unreachable or\n"
"refused, 3 Redis failed mid-way.\n");
}


/* The options of `onceq send` (request false) and `onceq request`: one
 * table; an option of the other command is refused. Returns -1 to go on,
 * or an exit status. */
static int send_parse(oq__send_cfg *c, int argc, char **argv, bool request)
{
    enum { O_REDIS = 256, O_STREAM, O_WINDOW, O_ID, O_BATCH, O_MAXLINE,
           O_PWFILE, O_REPLICAS, O_REPLY_TO, O_REQUEST_TTL, O_TIMEOUT,
           O_RSTREAM, O_PARTITIONS };
    static const struct option lo[] = {
        { "redis", required_argument, NULL, O_REDIS },
        { "redis-password-file", required_argument, NULL, O_PWFILE },
        { "replicas", required_argument, NULL, O_REPLICAS },
        { "stream", required_argument, NULL, O_STREAM },
        { "dedup-window", required_argument, NULL, O_WINDOW },
        { "id-field", required_argument, NULL, O_ID },
        { "batch", required_argument, NULL, O_BATCH },
        { "max-line", required_argument, NULL, O_MAXLINE },
        { "reply-to", required_argument, NULL, O_REPLY_TO },
        { "request-ttl", required_argument, NULL, O_REQUEST_TTL },
        { "reply-timeout", required_argument, NULL, O_TIMEOUT },
        { "reply-stream", required_argument, NULL, O_RSTREAM },
        { "partitions", required_argument, NULL, O_PARTITIONS },
        { "quiet", no_argument, NULL, 'q' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *cmd = request ? "request" : "send", *why;
    int opt;
    uint64_t u;
    int64_t ms;

    memset(c, 0, sizeof(*c));
    c->request_ttl_ms = 24 * 3600 * 1000;
    c->id_field = "id";
    c->window_ms = request ? 0 : 300000; /* a request sent twice is two */
    c->batch = OQ__SEND_BATCH;
    c->max_line = 1024 * 1024;
    c->timeout_ms = 30000;
    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":qh", lo, NULL)) != -1) {
        bool req_only = opt == O_RSTREAM;
        bool send_only = opt == O_WINDOW || opt == O_REPLICAS ||
                         opt == O_BATCH || opt == O_REPLY_TO;
        if ((request && send_only) || (!request && req_only)) {
            const struct option *o = lo;
            while (o->val != opt)
                o++;
            return oq__usage_error(cmd, "--%s is an option of `onceq %s`, not "
                               "of `onceq %s`", o->name,
                               request ? "send" : "request", cmd);
        }
        switch (opt) {
        case 'h':
            if (request)
                req_usage(stdout);
            else
                send_usage(stdout);
            return 0;
        case O_REDIS: c->url = optarg; break;
        case O_PWFILE: c->pwfile = optarg; break;
        case O_STREAM: c->stream = optarg; break;
        case O_ID:
            if (oq__id_field_bad(optarg) != NULL)
                return oq__usage_error(cmd, "invalid --id-field '%s' (%s)",
                                   optarg, oq__id_field_bad(optarg));
            c->id_field = optarg;
            break;
        case 'q': c->quiet = true; break;
        case O_WINDOW:
            /* A bare number is milliseconds here (documented). */
            if (oq__parse_duration_bare(optarg, 1, &c->window_ms) != 0)
                return oq__usage_error(cmd, "invalid --dedup-window '%s' (a "
                                   "duration like 5m, or milliseconds; at "
                                   "most 876000h; 0 = off)", optarg);
            break;
        case O_REPLICAS:
            if (oq__parse_count(optarg, 0, 64, &u) != 0)
                return oq__usage_error(cmd, "invalid --replicas '%s' (an "
                                   "integer from 0 to 64)", optarg);
            c->replicas = (int)u;
            break;
        case O_REPLY_TO:
        case O_RSTREAM:
            if (!oq__reply_to_ok(optarg, strlen(optarg)))
                return oq__usage_error(cmd, "invalid %s '%s' (a stream name: 1 "
                                   "to %d letters, digits, '.', '_', '-' or "
                                   "':', not starting with '.')",
                                   opt == O_RSTREAM ? "--reply-stream"
                                                    : "--reply-to",
                                   optarg, OQ__REPLY_TO_MAX);
            if (opt == O_RSTREAM)
                c->reply_stream = optarg;
            else
                c->reply_to = optarg;
            break;
        case O_REQUEST_TTL:
            if (oq__parse_duration(optarg, &ms) != 0 || ms < 1000)
                return oq__usage_error(cmd, "invalid --request-ttl '%s' (a "
                                   "duration like 24h or 90m, at least 1s, "
                                   "at most 876000h)", optarg);
            c->request_ttl_ms = ms;
            break;
        case O_TIMEOUT:
            if (oq__parse_duration(optarg, &ms) != 0 || ms <= 0)
                return oq__usage_error(cmd, "invalid --reply-timeout '%s' (a "
                                   "duration like 30s or 500ms, above 0, at "
                                   "most 876000h)", optarg);
            c->timeout_ms = ms;
            c->reply_timeout_given = true;
            break;
        case O_BATCH:
            if (oq__parse_count(optarg, 1, 4096, &u) != 0)
                return oq__usage_error(cmd, "invalid --batch '%s' (an integer "
                                   "from 1 to 4096)", optarg);
            c->batch = (unsigned)u;
            break;
        case O_PARTITIONS:
            if (oq__parse_count(optarg, 1, OQ__PARTITIONS_MAX, &u) != 0)
                return oq__usage_error(cmd, "invalid --partitions '%s' (an "
                                   "integer from 1 to %d)", optarg,
                                   OQ__PARTITIONS_MAX);
            c->partitions = (unsigned)u;
            break;
        case O_MAXLINE:
            if (oq__parse_size(optarg, 16, (uint64_t)1 << 31, &u) != 0)
                return oq__usage_error(cmd, "invalid --max-line '%s' (bytes "
                                   "from 16 to 2G, like 1M or 64K)", optarg);
            c->max_line = (size_t)u;
            break;
        default:
            return oq__getopt_error(cmd, opt, argv);
        }
    }
    if (c->url == NULL)
        return oq__usage_error(cmd, "--redis URL is required (try 'onceq %s "
                           "--help')", cmd);
    if (!request && c->reply_timeout_given && c->reply_to == NULL)
        return oq__usage_error(cmd, "--reply-timeout is for requests: give "
                           "--reply-to too");
    if (c->reply_to && c->stream &&
        (why = oq__reply_to_reserved(c->reply_to, c->stream)) != NULL)
        return oq__usage_error(cmd, "invalid --reply-to '%s': it %s",
                           c->reply_to, why);
    return -1;
}

int oq__cmd_send(int argc, char **argv)
{
    oq__send_cfg c;
    int rc = send_parse(&c, argc, argv, false);

    if (rc >= 0)
        return rc;
    return oq__redis_send(&c, argv + optind, (unsigned)(argc - optind));
}

int oq__cmd_request(int argc, char **argv)
{
    oq__send_cfg c;
    int rc = send_parse(&c, argc, argv, true);

    if (rc >= 0)
        return rc;
    return oq__redis_request(&c, argv + optind, (unsigned)(argc - optind));
}

/* -------------------------------------------------------- export, dlq */

/* Options shared by export and dlq. Returns -1 to go on, or a status. */
static int tool_parse(oq__tool_cfg *c, int argc, char **argv, const char *cmd,
                      void (*usage)(FILE *))
{
    enum { O_REDIS = 256, O_STREAM, O_REASON, O_ID, O_DRY, O_PWFILE };
    static const struct option lo[] = {
        { "redis", required_argument, NULL, O_REDIS },
        { "redis-password-file", required_argument, NULL, O_PWFILE },
        { "stream", required_argument, NULL, O_STREAM },
        { "reason", required_argument, NULL, O_REASON },
        { "id", required_argument, NULL, O_ID },
        { "dry-run", no_argument, NULL, O_DRY },
        { "out", required_argument, NULL, 'o' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int opt;

    memset(c, 0, sizeof(*c));
    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":o:h", lo, NULL)) != -1) {
        switch (opt) {
        case 'h':
            usage(stdout);
            return 0;
        case O_REDIS: c->url = optarg; break;
        case O_PWFILE: c->pwfile = optarg; break;
        case O_STREAM: c->stream = optarg; break;
        case O_REASON: c->reason = optarg; break;
        case O_ID: c->id_glob = optarg; break;
        case O_DRY: c->dry_run = true; break;
        case 'o': c->out_path = optarg; break;
        default:
            return oq__getopt_error(cmd, opt, argv);
        }
    }
    if (c->url == NULL || c->stream == NULL)
        return oq__usage_error(cmd, "--redis URL and --stream NAME are required");
    if (c->reason) {
        int ok = 0;
        for (int i = 0; i < OQ_DLQ__COUNT; i++)
            ok |= strcmp(c->reason, oq_dlq_reason_name((oq_dlq_reason)i)) == 0;
        if (!ok)
            return oq__usage_error(cmd, "unknown --reason '%s' (max_attempts, "
                               "expired, failed, rejected, parse_error, "
                               "bad_id, too_large)", c->reason);
    }
    return -1;
}

static void export_usage(FILE *f)
{
    fprintf(f,
"usage: onceq export --redis URL --stream NAME [-o FILE]\n"
"                    [--redis-password-file PATH]\n"
"\n"
"Writes the results of the Redis stream's consumers as JSON lines: counts\n"
"sorted by key ({\"word\":\"w1\",\"count\":3}), or records in commit order.\n");
}

int oq__cmd_export_redis(int argc, char **argv)
{
    oq__tool_cfg c;
    int st = tool_parse(&c, argc, argv, "export", export_usage);

    if (st >= 0)
        return st;
    if (optind < argc)
        return oq__usage_error("export", "unexpected argument '%s'",
                               argv[optind]);
    if (c.reason || c.id_glob || c.dry_run)
        return oq__usage_error("export", "--reason, --id and --dry-run are "
                               "options of `onceq dlq`");
    return oq__redis_export(&c);
}

static void dlq_usage(FILE *f)
{
    fprintf(f,
"usage: onceq dlq list|show ID|redrive|purge --redis URL --stream NAME\n"
"                 [--reason R] [--id GLOB] [--dry-run]\n"
"                 [--redis-password-file PATH]\n"
"\n"
"  list      every dead letter as a JSON line (id, source, reason, error,\n"
"            attempts, first_seen, last_seen, event, dlq_id)\n"
"  show ID   the dead letters of event id ID (or dead-letter entry ID)\n"
"  redrive   sends matching dead letters back into the stream (a handler\n"
"            failure's id is unsettled first) and removes them\n"
"  purge     removes matching dead letters\n"
"  --reason R, --id GLOB select; --dry-run only says what would happen.\n"
"\n"
"Exit status: 0 success, 1 show found nothing, 2 bad usage or Redis\n"
"unreachable, 3 Redis failed.\n");
}

int oq__cmd_dlq_redis(int argc, char **argv)
{
    static const char *const names[] = { "list", "show", "redrive", "purge" };
    oq__tool_cfg c;
    const char *show = NULL;
    int action = -1;
    int st = tool_parse(&c, argc, argv, "dlq", dlq_usage);

    if (st >= 0)
        return st;
    if (optind < argc)
        for (int i = 0; i < 4; i++)
            if (strcmp(argv[optind], names[i]) == 0)
                action = i;
    if (action < 0)
        return oq__usage_error("dlq", "say list, show ID, redrive or purge "
                               "(try 'onceq dlq --help')");
    if (action == OQ__DLQ_SHOW) {
        if (optind + 1 >= argc)
            return oq__usage_error("dlq", "show needs an ID");
        show = argv[optind + 1];
    }
    if (optind + 1 + (show != NULL) < argc)
        return oq__usage_error("dlq", "unexpected argument '%s'",
                               argv[optind + 1 + (show != NULL)]);
    if (c.out_path)
        return oq__usage_error("dlq", "dead letters are written to stdout: "
                               "-o is an option of `onceq export`");
    return oq__redis_dlq(&c, action, show);
}
