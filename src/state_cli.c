/*
 * The durable state's subcommands: onceq dlq|export|stats|checkpoint|restore
 * --state PATH (docs/STATE.md). With --redis, dlq and export hand over to
 * redis.c.
 *
 * Each subcommand (and each dlq action) is one short function found in a
 * table; options are parsed by one shared getopt loop into struct opts, and
 * each function checks that it got only what it accepts.
 */
#include "oq_cli.h"

#include <errno.h>
#include <fnmatch.h>
#include <getopt.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* What the command line said. */
typedef struct opts {
    const char *cmd;         /* "dlq", "export", ... for messages */
    const char *state;       /* --state PATH */
    const char *out;         /* -o FILE */
    const char *reason;      /* --reason R */
    const char *id_glob;     /* --id GLOB */
    int64_t since_ms, until_ms; /* --since/--until: Unix ms */
    bool has_since, has_until;
    bool dry_run, reset_attempts, filters;
    char **args;             /* positional arguments */
    int nargs;
} opts;

enum { O_STATE = 256, O_REASON, O_ID, O_SINCE, O_UNTIL, O_DRY_RUN, O_RESET };

static const struct option long_opts[] = {
    { "state", required_argument, NULL, O_STATE },
    { "out", required_argument, NULL, 'o' },
    { "reason", required_argument, NULL, O_REASON },
    { "id", required_argument, NULL, O_ID },
    { "since", required_argument, NULL, O_SINCE },
    { "until", required_argument, NULL, O_UNTIL },
    { "dry-run", no_argument, NULL, O_DRY_RUN },
    { "reset-attempts", no_argument, NULL, O_RESET },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
};

static int usage_error(const opts *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* One line on stderr. Returns the exit status for bad usage, 2. */
static int usage_error(const opts *o, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "onceq %s: %s (try 'onceq %s --help')\n", o->cmd, msg,
            o->cmd);
    return 2;
}

static int64_t now_unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A time: 2026-11-24T10:00:00Z (or with a space, or a date alone, UTC),
 * @UNIX_SECONDS, or a duration meaning that long ago (10m, 2h). */
static int parse_time(const char *s, int64_t *ms)
{
    static const char *const fmts[] = { "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S",
                                        "%Y-%m-%dT%H:%M", "%Y-%m-%d" };
    struct tm tm;
    int64_t d;
    char *end;

    if (s[0] == '@') {
        uint64_t v;
        if (oq__parse_count(s + 1, 0, INT64_MAX / 1000, &v) != 0)
            return OQ_EINVAL;
        *ms = (int64_t)v * 1000;
        return 0;
    }
    for (size_t i = 0; i < sizeof(fmts) / sizeof(fmts[0]); i++) {
        memset(&tm, 0, sizeof(tm));
        int64_t frac = 0;
        end = strptime(s, fmts[i], &tm);
        /* Milliseconds after the seconds (.598, as `dlq list` writes
         * times): 1 to 3 digits. */
        if (end && i == 0 && end[0] == '.' && end[1] >= '0' &&
            end[1] <= '9') {
            int k = 0;
            for (end++; k < 3 && *end >= '0' && *end <= '9'; k++, end++)
                frac = frac * 10 + (*end - '0');
            for (; k < 3; k++)
                frac *= 10;
        }
        if (end && (*end == '\0' || strcmp(end, "Z") == 0)) {
            *ms = (int64_t)timegm(&tm) * 1000 + frac;
            return 0;
        }
    }
    if (oq__parse_duration(s, &d) == 0) {
        *ms = now_unix_ms() - d;
        return 0;
    }
    return OQ_EINVAL;
}

static bool known_reason(const char *r)
{
    for (int i = 0; i < OQ_DLQ__COUNT; i++)
        if (strcmp(r, oq_dlq_reason_name((oq_dlq_reason)i)) == 0)
            return true;
    return false;
}

/* Parses argv[1..]; returns -1 to go on, or an exit status (help: 0). */
static int parse(opts *o, int argc, char **argv, void (*help)(void))
{
    int opt;

    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":o:h", long_opts, NULL)) != -1) {
        switch (opt) {
        case 'h': help(); return 0;
        case O_STATE: o->state = optarg; break;
        case 'o': o->out = optarg; break;
        case O_REASON:
            if (!known_reason(optarg))
                return usage_error(o, "unknown --reason '%s'", optarg);
            o->reason = optarg;
            o->filters = true;
            break;
        case O_ID: o->id_glob = optarg; o->filters = true; break;
        case O_SINCE:
        case O_UNTIL:
            if (parse_time(optarg, opt == O_SINCE ? &o->since_ms
                                                  : &o->until_ms) != 0)
                return usage_error(o, "invalid time '%s' (2026-11-24T10:00:00Z"
                                   ", @UNIX_SECONDS, or a duration ago like "
                                   "10m)", optarg);
            o->has_since |= opt == O_SINCE;
            o->has_until |= opt == O_UNTIL;
            o->filters = true;
            break;
        case O_DRY_RUN: o->dry_run = true; break;
        case O_RESET: o->reset_attempts = true; break;
        case ':':
            return usage_error(o, "option '%s' needs a value",
                               argv[optind - 1]);
        default:
            return usage_error(o, "unknown option '%s'", argv[optind - 1]);
        }
    }
    o->args = argv + optind;
    o->nargs = argc - optind;
    if (o->state == NULL)
        return usage_error(o, "%s", "--state PATH is required");
    return -1;
}

/* lock: take the run lock (commands that write the state refuse while a
 * run holds it). */
static oq__store *open_state(const opts *o, bool lock)
{
    oq__store *st;
    char err[600];

    if (oq__store_open(&st, o->state, lock ? OQ__STORE_LOCK : 0,
                       OQ__SYNC_FULL, err,
                       sizeof(err)) != 0) {
        fprintf(stderr, "onceq %s: %s\n", o->cmd, err);
        return NULL;
    }
    return st;
}

/* Exit status 2 for the checks below: options a subcommand does not take. */
static int refuse(const opts *o, bool filters, bool out, bool flags, int nargs)
{
    if (!filters && o->filters)
        return usage_error(o, "%s", "filters (--reason, --id, --since, "
                           "--until) do not apply here");
    if (!out && o->out)
        return usage_error(o, "%s", "-o does not apply here");
    if (!flags && (o->dry_run || o->reset_attempts))
        return usage_error(o, "%s", "--dry-run/--reset-attempts do not "
                           "apply here");
    if (o->nargs != nargs)
        return usage_error(o, "%s", nargs ? "wrong number of arguments"
                                          : "unexpected argument");
    return -1;
}

/* ----------------------------------------------------------------- dlq */

/* The dead letters the filters choose, as a list of seqs. */
typedef struct chosen {
    const opts *o;
    int64_t *seq;
    size_t n, cap;
    FILE *list;   /* also write each one here (list), or NULL */
    int rc;
} chosen;

static bool matches(const opts *o, const oq__dead_row *d)
{
    char id[OQ__MAX_ID_LEN + 1];

    if (o->reason && strcmp(d->reason, o->reason) != 0)
        return false;
    if (o->has_since && d->dead_ms < o->since_ms)
        return false;
    if (o->has_until && d->dead_ms >= o->until_ms)
        return false;
    if (o->id_glob) {
        if (d->id == NULL || d->id_len > OQ__MAX_ID_LEN)
            return false;
        memcpy(id, d->id, d->id_len);
        id[d->id_len] = '\0';
        if (fnmatch(o->id_glob, id, 0) != 0)
            return false;
    }
    return true;
}

static void choose(const oq__dead_row *d, void *arg)
{
    chosen *c = arg;

    if (c->rc != 0 || !matches(c->o, d))
        return;
    if (c->list)
        oq__write_dead_row(c->list, d, true);
    if (c->n == c->cap) {
        size_t ncap = c->cap ? c->cap * 2 : 64;
        int64_t *np = realloc(c->seq, ncap * sizeof(*np));
        if (np == NULL) {
            c->rc = OQ_ENOMEM;
            return;
        }
        c->seq = np;
        c->cap = ncap;
    }
    c->seq[c->n++] = d->seq;
}

static int dlq_list(oq__store *st, const opts *o)
{
    chosen c = { o, NULL, 0, 0, stdout, 0 };
    int rc = refuse(o, true, false, false, 0);

    if (rc >= 0)
        return rc;
    rc = oq__store_foreach_dead(st, choose, &c);
    free(c.seq);
    if (rc != 0 || c.rc != 0) {
        fprintf(stderr, "onceq dlq: %s\n", rc ? oq__store_error(st)
                                               : oq_strerror(c.rc));
        return 3;
    }
    /* A write error (a full disk) is an error, not a shorter list. */
    return oq__out_close(stdout, NULL, "onceq dlq");
}

/* dlq show ID: by seq (a number from `dlq list`) or by event id. */
static int dlq_show(oq__store *st, const opts *o)
{
    sqlite3_stmt *s;
    oq__dead_row d;
    int rc = refuse(o, false, false, false, 1), found = 0;

    if (rc >= 0)
        return rc;
    if (sqlite3_prepare_v2(oq__store_db(st),
                           "SELECT seq, tag, source, id, reason, error, "
                           "attempts, first_seen_ms, dead_ms, event, history "
                           "FROM dead_letters WHERE id = ?1 OR "
                           "(CAST(seq AS TEXT) = ?1) ORDER BY tag", -1, &s,
                           NULL) != SQLITE_OK) {
        fprintf(stderr, "onceq dlq: %s\n", sqlite3_errmsg(oq__store_db(st)));
        return 3;
    }
    sqlite3_bind_text(s, 1, o->args[0], -1, SQLITE_STATIC);
    while (sqlite3_step(s) == SQLITE_ROW) {
        oq__store_dead_from_row(s, &d);
        oq__write_dead_row(stdout, &d, true);
        found++;
    }
    sqlite3_finalize(s);
    if (!found) {
        fprintf(stderr, "onceq dlq: no dead letter '%s' in '%s'\n",
                o->args[0], o->state);
        return 1;
    }
    return oq__out_close(stdout, NULL, "onceq dlq");
}

/* Runs sql (with ?1 = seq, ?2 = reset) for each chosen dead letter, in one
 * transaction. */
static int for_chosen(oq__store *st, const chosen *c, const char *const *sql,
                      size_t nsql, bool reset)
{
    sqlite3 *db = oq__store_db(st);
    sqlite3_stmt *s[4] = { NULL };
    int rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL);

    for (size_t i = 0; i < nsql && rc == SQLITE_OK; i++)
        rc = sqlite3_prepare_v2(db, sql[i], -1, &s[i], NULL);
    for (size_t k = 0; k < c->n && rc == SQLITE_OK; k++) {
        for (size_t i = 0; i < nsql && rc == SQLITE_OK; i++) {
            sqlite3_bind_int64(s[i], 1, c->seq[k]);
            if (sqlite3_bind_parameter_count(s[i]) >= 2)
                sqlite3_bind_int(s[i], 2, reset);
            rc = sqlite3_step(s[i]);
            rc = rc == SQLITE_DONE ? SQLITE_OK : rc;
            sqlite3_reset(s[i]);
        }
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        fprintf(stderr, "onceq dlq: %s\n", sqlite3_errmsg(db));
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    }
    for (size_t i = 0; i < nsql; i++)
        sqlite3_finalize(s[i]);
    return rc == SQLITE_OK ? 0 : 3;
}

/*
 * Redrive: each chosen dead letter moves to the redrive table (which the
 * next `onceq run --state` sends first) and out of dead_letters, and its id
 * loses a 'dead' processed mark, all in one transaction, so it is redriven
 * once however often this runs. The death goes into its history.
 */
static const char *const redrive_sql[] = {
    ("INSERT INTO redrive(tag, source, id, event, attempts, history) "
     "SELECT tag, source, id, event, CASE WHEN ?2 THEN 0 ELSE attempts END, "
     "json_insert(history, '$[#]', json_object('reason', reason, 'error', "
     "error, 'attempts', attempts, 'dead_ms', dead_ms)) "
     "FROM dead_letters WHERE seq = ?1"),
    ("DELETE FROM processed WHERE status = 1 AND id = (SELECT id FROM "
     "dead_letters WHERE seq = ?1)"),
    "DELETE FROM dead_letters WHERE seq = ?1",
};

/* A purged dead letter's line was settled all the same: the lifetime
 * totals keep it (meta's purged, part of `onceq stats`' lines). */
static const char *const purge_sql[] = {
    ("INSERT INTO meta(key, value) SELECT 'purged', 1 FROM dead_letters "
     "WHERE seq = ?1 ON CONFLICT(key) DO UPDATE SET "
     "value = CAST(value AS INTEGER) + 1"),
    "DELETE FROM dead_letters WHERE seq = ?1",
};

static int dlq_move(oq__store *st, const opts *o, bool redrive)
{
    chosen c = { o, NULL, 0, 0, NULL, 0 };
    int rc = refuse(o, true, false, true, 0);

    if (rc >= 0)
        return rc;
    if (!redrive && o->reset_attempts)
        return usage_error(o, "%s", "--reset-attempts applies to redrive");
    rc = oq__store_foreach_dead(st, choose, &c);
    if (rc != 0 || c.rc != 0) {
        fprintf(stderr, "onceq dlq: %s\n", rc ? oq__store_error(st)
                                               : oq_strerror(c.rc));
        free(c.seq);
        return 3;
    }
    if (!o->dry_run && c.n > 0)
        rc = redrive ? for_chosen(st, &c, redrive_sql, 3, o->reset_attempts)
                     : for_chosen(st, &c, purge_sql, 2, false);
    if (rc == 0)
        printf("%s %zu dead letter%s%s\n",
               o->dry_run ? (redrive ? "would redrive" : "would purge")
                          : (redrive ? "redrove" : "purged"),
               c.n, c.n == 1 ? "" : "s",
               redrive && !o->dry_run && c.n
                   ? " (the next 'onceq run --state' processes them)" : "");
    free(c.seq);
    return rc;
}

static int dlq_redrive(oq__store *st, const opts *o)
{
    return dlq_move(st, o, true);
}

static int dlq_purge(oq__store *st, const opts *o)
{
    return dlq_move(st, o, false);
}

static void dlq_help(void)
{
    printf(
"usage: onceq dlq ACTION --state PATH [OPTIONS]\n"
"\n"
"The dead letters of a durable run (onceq run --state PATH).\n"
"\n"
"Actions:\n"
"  list                 each dead letter as a JSON line (with its seq)\n"
"  show ID              the dead letter with this seq or event id\n"
"  redrive              move dead letters back into processing: the next\n"
"                       'onceq run --state PATH' processes each of them once\n"
"  purge                delete dead letters\n"
"\n"
"Filters (list, redrive, purge; all must match):\n"
"  --reason R           max_attempts, expired, failed, parse_error, bad_id,\n"
"                       too_large, rejected\n"
"  --id GLOB            event id matches the shell pattern GLOB\n"
"  --since T, --until T dead-lettered at or after T / before T: an ISO time\n"
"                       (2026-11-24T10:00:00Z, UTC), @UNIX_SECONDS, or a\n"
"                       duration meaning that long ago (10m, 2h); not with\n"
"                       --redis\n"
"Options:\n"
"  --dry-run            redrive/purge: only say how many would be\n"
"  --reset-attempts     redrive: count attempts from zero again (not with\n"
"                       --redis)\n"
"  --redis URL ...      the dead letters of a Redis stream instead (see\n"
"                       'onceq dlq --redis x --help')\n"
"\n"
"Examples:\n"
"  onceq dlq list --state run.db --reason failed\n"
"  onceq dlq redrive --state run.db --id 'evt-1*' --since 1h --dry-run\n"
"\n"
"Exit status: 0 success, 1 show found nothing, 2 bad usage or not a state\n"
"file, 3 a database error.\n");
}

typedef struct action {
    const char *name;
    int (*fn)(oq__store *st, const opts *o);
} action;

static const action dlq_actions[] = {
    { "list", dlq_list },
    { "show", dlq_show },
    { "redrive", dlq_redrive },
    { "purge", dlq_purge },
};

int oq__cmd_dlq(int argc, char **argv)
{
    opts o = { .cmd = "dlq" };
    const action *a = NULL;
    oq__store *st;
    int rc;

    if (oq__has_option(argc, argv, "--redis"))
        return oq__cmd_dlq_redis(argc, argv);
    if (argc >= 2 && argv[1][0] != '-') {
        for (size_t i = 0; i < sizeof(dlq_actions) / sizeof(*dlq_actions); i++)
            if (strcmp(argv[1], dlq_actions[i].name) == 0)
                a = &dlq_actions[i];
        if (a == NULL)
            return usage_error(&o, "unknown action '%s'", argv[1]);
        argc--;
        argv++;
    }
    if ((rc = parse(&o, argc, argv, dlq_help)) >= 0)
        return rc;
    if (a == NULL)
        return usage_error(&o, "%s", "which action: list, show, redrive or "
                           "purge?");
    if ((st = open_state(&o, (a->fn == dlq_redrive || a->fn == dlq_purge) &&
                                 !o.dry_run)) == NULL)
        return 2;
    rc = a->fn(st, &o);
    oq__store_close(st);
    return rc;
}

/* -------------------------------------------------------------- export */


static void put_record(const void *data, size_t len, void *arg)
{
    fwrite(data, 1, len, arg);
    putc('\n', arg);
}

static void export_help(void)
{
    printf(
"usage: onceq export --state PATH [-o FILE]\n"
"\n"
"Writes the results of a durable run as JSON lines, exactly as\n"
"'onceq run --state PATH' writes them: counts sorted by key, or records in\n"
"input order.\n"
"\n"
"  -o, --out FILE   write to FILE (default: stdout)\n"
"  --redis URL ...  the results kept in Redis instead\n"
"\n"
"Exit status: 0 success, 2 bad usage or not a state file, 3 write error.\n");
}

typedef struct export_arg {
    oq__store *st;
    const char *output, *key;
} export_arg;

static int export_to(FILE *f, void *arg)
{
    const export_arg *x = arg;
    int rc;

    if (strcmp(x->output, "records") == 0) {
        rc = oq__store_foreach_record(x->st, put_record, f);
    } else {
        oq__count_out c = { f, x->key };
        rc = oq__store_foreach_count(x->st, oq__write_count, &c);
    }
    if (rc == 0)
        return 0;
    fprintf(stderr, "onceq export: %s\n", oq__store_error(x->st));
    return 3;
}

int oq__cmd_export(int argc, char **argv)
{
    opts o = { .cmd = "export" };
    char output[32] = "counts", key[256] = "key", err[512];
    export_arg x = { NULL, output, key };
    int rc;

    if (oq__has_option(argc, argv, "--redis"))
        return oq__cmd_export_redis(argc, argv);
    if ((rc = parse(&o, argc, argv, export_help)) >= 0 ||
        (rc = refuse(&o, false, true, false, 0)) >= 0)
        return rc;
    /* -o over the state would empty it: the next run would apply every
     * event again. */
    if (oq__check_state_output("-o", o.out, o.state, err, sizeof(err)) != 0)
        return usage_error(&o, "%s", err);
    if ((x.st = open_state(&o, false)) == NULL)
        return 2;
    oq__store_meta_get(x.st, "output", output, sizeof(output));
    oq__store_meta_get(x.st, "count_key", key, sizeof(key));
    rc = oq__out_whole(o.out, "onceq export", "results", export_to, &x);
    oq__store_close(x.st);
    return rc;
}

/* --------------------------------------------------------------- stats */

static int64_t one_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *s;
    int64_t v = 0;

    if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK) {
        if (sqlite3_step(s) == SQLITE_ROW)
            v = sqlite3_column_int64(s, 0);
        sqlite3_finalize(s);
    }
    return v;
}


/* The last run's stats as saved (JSON that run wrote), whatever its
 * length; null when there is none; a string if it is not JSON. */
static void write_last_run(sqlite3 *db)
{
    sqlite3_stmt *s;
    const char *v = NULL;
    size_t n = 0;

    if (sqlite3_prepare_v2(db, "SELECT value FROM meta WHERE key = "
                           "'last_run'", -1, &s, NULL) != SQLITE_OK) {
        fputs("null", stdout);
        return;
    }
    if (sqlite3_step(s) == SQLITE_ROW) {
        v = (const char *)sqlite3_column_text(s, 0);
        n = (size_t)sqlite3_column_bytes(s, 0);
    }
    if (v == NULL)
        fputs("null", stdout);
    else if (oq__json_valid(v, n))
        fwrite(v, 1, n, stdout);
    else
        oq__json_write_string(stdout, v, n);
    sqlite3_finalize(s);
}

static void stats_help(void)
{
    printf(
"usage: onceq stats --state PATH\n"
"\n"
"Prints the totals of a durable state as JSON, with the keys of\n"
"'onceq run --stats': lines (settled lines of the inputs), processed,\n"
"duplicates, dead, purged (dead letters removed by 'onceq dlq purge'),\n"
"blank, unfinished (redriven, not yet run again), dead_by_reason; and\n"
"last_run, the stats of the last run.\n"
"\n"
"Exit status: 0 success, 2 bad usage or not a state file.\n");
}

int oq__cmd_stats(int argc, char **argv)
{
    opts o = { .cmd = "stats" };
    oq__store *st;
    sqlite3 *db;
    int64_t lines, blank, processed, dead, dup, unfinished, purged;
    int rc;

    if ((rc = parse(&o, argc, argv, stats_help)) >= 0 ||
        (rc = refuse(&o, false, false, false, 0)) >= 0)
        return rc;
    if ((st = open_state(&o, false)) == NULL)
        return 2;
    db = oq__store_db(st);
    /* Every settled line is processed, a duplicate, dead, purged (a dead
     * letter removed), blank or (a redriven event) unfinished; the lines
     * are their sum. Duplicates and
     * the blank lines of untracked inputs (stdin, pipes) are counted by
     * the runs, in the transactions that settle them; a state made before
     * they were counted estimates its duplicates from the watermarks. */
    blank = one_int(db, "SELECT coalesce(sum(blank), 0) FROM sources") +
            one_int(db, "SELECT coalesce(sum(value), 0) FROM meta WHERE "
                        "key = 'blank_untracked'");
    processed = one_int(db, "SELECT count(*) FROM processed WHERE status = 0");
    dead = one_int(db, "SELECT count(*) FROM dead_letters");
    unfinished = one_int(db, "SELECT count(*) FROM redrive");
    purged = one_int(db, "SELECT coalesce(sum(value), 0) FROM meta WHERE "
                         "key = 'purged'");
    if (one_int(db, "SELECT count(*) FROM meta WHERE key = 'duplicates'"))
        dup = one_int(db, "SELECT value FROM meta WHERE key = 'duplicates'");
    else
        dup = one_int(db, "SELECT coalesce(sum(line), 0) FROM sources") -
              blank - processed - dead - purged - unfinished;
    dup = dup > 0 ? dup : 0;
    lines = processed + dup + dead + purged + blank + unfinished;
    printf("{\"lines\":%" PRId64 ",\"processed\":%" PRId64 ",\"duplicates\":%"
           PRId64 ",\"dead\":%" PRId64 ",\"purged\":%" PRId64
           ",\"blank\":%" PRId64 ",\"unfinished\":%" PRId64
           ",\"dead_by_reason\":{",
           lines, processed, dup, dead, purged, blank, unfinished);
    for (int i = 0; i < OQ_DLQ__COUNT; i++) {
        char sql[160];
        const char *name = oq_dlq_reason_name((oq_dlq_reason)i);
        snprintf(sql, sizeof(sql), "SELECT count(*) FROM dead_letters WHERE "
                 "reason = '%s'", name);
        printf("%s\"%s\":%" PRId64, i ? "," : "", name, one_int(db, sql));
    }
    printf("},\"aggregates\":%" PRId64 ",\"outputs\":%" PRId64
           ",\"last_run\":",
           one_int(db, "SELECT count(*) FROM aggregates"),
           one_int(db, "SELECT count(*) FROM outputs"));
    write_last_run(db);
    printf("}\n");
    oq__store_close(st);
    return fflush(stdout) ? 3 : 0;
}

/* ------------------------------------------------- checkpoint, restore */

/* A checkpoint's name: letters, digits, '.', '_', '-'; not "." or "..",
 * and not ending like SQLite's side files (PATH.checkpoint.x-wal would be
 * checkpoint x's WAL: the next checkpoint x destroyed it). */
static bool good_name(const char *s)
{
    static const char *const side[] = { "-wal", "-shm", "-journal" };
    size_t n = strlen(s);

    if (n == 0 || n > 128 || strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return false;
    for (size_t i = 0; i < sizeof(side) / sizeof(side[0]); i++)
        if (n >= strlen(side[i]) &&
            strcmp(s + n - strlen(side[i]), side[i]) == 0)
            return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
              (*s >= '0' && *s <= '9') || *s == '-' || *s == '_' ||
              *s == '.'))
            return false;
    return true;
}

static void snapshot_help(const char *cmd)
{
    printf(
"usage: onceq %s NAME --state PATH\n"
"\n"
"checkpoint saves a named snapshot of a durable state (processed ids,\n"
"aggregates, outputs, dead letters, input progress) in PATH.checkpoint.NAME,\n"
"with SQLite's online backup (a run may be going on). restore puts the\n"
"state back as it was at that checkpoint; the next run resumes from there.\n"
"NAME: letters, digits, '.', '_' and '-'.\n"
"\n"
"Exit status: 0 success, 2 bad usage, not a state file or no such\n"
"checkpoint, 3 a database error.\n", cmd);
}

static void checkpoint_help(void)
{
    snapshot_help("checkpoint");
}

static void restore_help(void)
{
    snapshot_help("restore");
}

static int snapshot(int argc, char **argv, bool restore)
{
    opts o = { .cmd = restore ? "restore" : "checkpoint" };
    char file[4400];
    oq__store *st;
    int rc;

    if ((rc = parse(&o, argc, argv, restore ? restore_help
                                            : checkpoint_help)) >= 0 ||
        (rc = refuse(&o, false, false, false, 1)) >= 0)
        return rc;
    if (!good_name(o.args[0]))
        return usage_error(&o, "bad checkpoint name '%s' (letters, digits, "
                           "'.', '_', '-'; not . or .., not ending in -wal, "
                           "-shm or -journal)", o.args[0]);
    snprintf(file, sizeof(file), "%s.checkpoint.%s", o.state, o.args[0]);
    if ((st = open_state(&o, restore)) == NULL)
        return 2;
    rc = oq__store_snapshot(st, file, restore);
    if (rc != 0)
        fprintf(stderr, "onceq %s: %s\n", o.cmd, oq__store_error(st));
    else
        printf("%s '%s' %s %s\n", restore ? "restored" : "checkpoint",
               o.args[0], restore ? "from" : "saved in", file);
    oq__store_close(st);
    return rc == 0 ? 0 : rc == OQ_ENOENT || rc == OQ_EINVAL ? 2 : 3;
}

int oq__cmd_checkpoint(int argc, char **argv)
{
    return snapshot(argc, argv, false);
}

int oq__cmd_restore(int argc, char **argv)
{
    return snapshot(argc, argv, true);
}
