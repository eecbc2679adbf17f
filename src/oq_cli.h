/*
 * The private declarations of onceq's CLI and its engine library
 * (build/libonceq-cli.a: reader, handlers, runner, request-reply, SQLite
 * store, Redis, metrics, option parsing and reports), on top of the
 * library's (oq_internal.h). Not installed; libonceq never includes it.
 */
#ifndef OQ_CLI_H
#define OQ_CLI_H

#include "oq_internal.h"

#include <limits.h>

/* -------------------------------------------------------------- metrics.c */


/* What a run counts, as the metrics show it (docs/METRICS.md). */
typedef struct oq__metrics_snap {
    uint64_t processed, duplicates, dead, retried;
    uint64_t dead_by[OQ_DLQ__COUNT];
    uint64_t ready, in_flight;
    double oldest_ready_age_s;
    uint64_t lease_extensions, fenced;
    uint64_t hist[OQ__HIST_BUCKETS]; /* calls per bucket (not cumulative) */
    uint64_t hist_count;             /* all calls, +Inf included */
    double hist_sum_s;
} oq__metrics_snap;

/* Fills a snapshot; called from the metrics threads (thread-safe). */
typedef void (*oq__metrics_fn)(oq__metrics_snap *out, void *arg);

typedef struct oq__metrics_opts {
    const char *path;       /* NULL: no file */
    int64_t interval_ms;    /* file rewrites; default 10000 */
    const char *listen;     /* HOST:PORT for GET /metrics, or NULL */
    oq__metrics_fn fn;
    void *arg;
} oq__metrics_opts;

typedef struct oq__metrics oq__metrics;
/* The Prometheus text exposition of s into b (b->len reset). */
int oq__metrics_text(oq__buf *b, const oq__metrics_snap *s);
/* Writes the file once (refusing an unwritable path), then every interval
 * from a thread; serves HTTP. 0, or an error with err filled. */
int oq__metrics_start(oq__metrics **out, const oq__metrics_opts *o,
                      char *err, size_t errlen);
/* Stops the threads and writes the file a last time: 0 or an errno. */
int oq__metrics_stop(oq__metrics *m);

/* ------------------------------------------------------------ source.c */

/*
 * Reading JSON-lines input. The reader only splits lines (memchr over big
 * blocks); JSON parsing happens in the workers (oq__json_decode, used as the
 * pool's decode hook), so parsing scales with the pool.
 */

/* What the reader found on one line. */
typedef enum oq__line_kind {
    OQ__LINE_EVENT,    /* a non-blank line to send */
    OQ__LINE_BLANK,    /* empty or only whitespace: counted and skipped */
    OQ__LINE_TOO_LARGE /* longer than max_line: data holds the first 4 KiB */
} oq__line_kind;

typedef struct oq__line {
    oq__line_kind kind;
    const char *data;  /* without the newline and without a trailing CR */
    size_t len;        /* TOO_LARGE: bytes kept (<= 4096) */
    size_t full_len;   /* the line's real length (without newline/CR) */
    unsigned file;     /* index into the reader's inputs */
    uint64_t lineno;   /* 1-based, per file */
    uint64_t offset;   /* byte offset of the line's start in its file */
    uint64_t end;      /* byte offset just past its newline (the next
                          line); a last line without a newline: its start,
                          so a resumed run reads it again */
} oq__line;

typedef struct oq__reader oq__reader;

/* paths: n inputs; "-" is stdin. max_line: bytes (e.g. 1 MiB). On failure
 * returns a negative errno code and writes a one-line message (naming the
 * file) to err. Every input is opened here, so an unreadable FILE is
 * reported before anything is processed. */
int oq__reader_open(oq__reader **out, const char *const *paths, unsigned n,
                    size_t max_line, char *err, size_t errlen);
/* The next line: 1 and *line filled (valid until the next call), 0 at the
 * end of all inputs, or a negative errno code (read error; err filled). */
int oq__reader_next(oq__reader *r, oq__line *line, char *err, size_t errlen);
/* Bytes read so far and the total size of the inputs (0 when unknown, e.g.
 * a pipe), for progress. */
void oq__reader_progress(const oq__reader *r, uint64_t *done, uint64_t *total);
const char *oq__reader_path(const oq__reader *r, unsigned file);
/* About how many lines the inputs hold, from their total size and the
 * line length in the first 64 KiB; 0 when unknown (a pipe). At most 2^20.
 * For sizing the processed set: it does not read past the sample. */
uint64_t oq__reader_estimate_lines(const oq__reader *r);
void oq__reader_close(oq__reader *r);
/* fn(arg) is called from oq__reader_next when it is about to wait for a
 * pipe or terminal that has no data ready (to flush what the caller holds:
 * lines read so far must not wait for lines that may never come). */
void oq__reader_set_idle(oq__reader *r, void (*fn)(void *arg), void *arg);
/* Makes a reader blocked in oq__reader_next on a pipe or terminal return
 * -ECANCELED now (any thread; the reader itself is not thread-safe). */
void oq__reader_cancel(oq__reader *r);
/* Resume: file (a regular file not read yet) starts at byte offset, which
 * is the start of line lineno + 1; the bytes before it are never read.
 * 0, OQ_EINVAL (not a regular file, or already read), or -errno. */
int oq__reader_start_at(oq__reader *r, unsigned file, uint64_t offset,
                        uint64_t lineno);
/* The open descriptor of input file (-1 once it was read), for fstat and
 * pread; and the number of inputs. */
int oq__reader_fd(const oq__reader *r, unsigned file);
unsigned oq__reader_count(const oq__reader *r);
/* Test hook: the reader's block size in bytes (0: the default, 1 MiB). */
void oq__reader_set_block_size(size_t bytes);

/* How oq__json_decode finds the id. */
typedef struct oq__idspec {
    const char *field;   /* "id" by default; "/a/b" is a JSON pointer */
    bool fallback;       /* also accept "event_id" when field is absent
                            (only when field is the default "id") */
} oq__idspec;

#define OQ__MAX_ID_LEN 1024

/*
 * The pool's decode hook for JSON lines (arg: const oq__idspec *). Rejects
 * with OQ_DLQ_PARSE_ERROR: not strict JSON (json.c), not an object, invalid
 * UTF-8, NUL bytes; with OQ_DLQ_BAD_ID: missing id, id neither a string nor
 * an integer (a number with a fraction or exponent is not), empty, or
 * longer than OQ__MAX_ID_LEN. A string id is its bytes (an escaped NUL
 * included), an integer id its decimal text as written. out->parsed is an
 * oq__json_free-able tape; handlers read it with oq__event_doc(ev).
 */
int oq__json_decode(const oq_event *ev, oq_decoded *out, void *arg);
void oq__json_free(void *parsed, void *arg);
/* The event as a scanned JSON document: the decode hook's, or (no decode
 * hook ran) scanned now, in which case *own is set and must be freed with
 * oq__json_free. NULL (err filled) if the payload is not a strict JSON
 * object. */
const oq__jdoc *oq__event_doc(const oq_event *ev, void **own,
                              char *err, size_t errlen);

/* ---------------------------------------------------------- handlers.c */

/* A handler made from a --handler SPEC. */
typedef struct oq__handler {
    oq_handler_fn fn;
    void *arg;
    void (*cleanup)(void *arg);
    const char *name;        /* "wordcount", "count", "noop", "exec", "coproc",
                                "plugin" */
    int output;              /* OQ__OUT_COUNTS or OQ__OUT_RECORDS */
    const char *count_key;   /* OQ__OUT_COUNTS: "word" or the FIELD name */
    bool never_blocks;       /* computes only: see oq_pool_opts */
} oq__handler;

enum { OQ__OUT_COUNTS = 0, OQ__OUT_RECORDS = 1 };

typedef struct oq__handler_opts {
    int64_t kill_grace_ms;   /* exec: SIGTERM -> SIGKILL grace; default 2000 */
    bool emit;               /* noop: record each unique event's line */
} oq__handler_opts;

/* Builds the handler for spec ("wordcount", "count:FIELD", "noop",
 * "exec:COMMAND", "coproc:COMMAND", "plugin:PATH.so"). 0, or a negative
 * code with a one-line message in err. */
int oq__handler_from_spec(const char *spec, const oq__handler_opts *o,
                          oq__handler *out, char *err, size_t errlen);
void oq__handler_free(oq__handler *h);
/* Stops every running exec command and coproc child (SIGTERM, then
 * SIGKILL after the grace) and makes later calls return OQ_RETRY without
 * starting one: used when onceq is stopping, so no command outlives it.
 * Thread-safe. */
void oq__handler_cancel(oq__handler *h);

/* ----------------------------------------------------------- replies.c */

typedef struct oq__replies oq__replies;
/* dir must be an existing directory. */
int oq__replies_open(oq__replies **out, const char *dir, char *err,
                     size_t errlen);
/* Flushes and closes the reply files: 0, or OQ_EIO (err filled) when a
 * reply could not be written. */
int oq__replies_close(oq__replies *r, char *err, size_t errlen);
/* oq__json_decode, and a request whose reply_to or correlation_id is
 * unusable (reply_to not a valid name, a field not a string; with stream,
 * the Redis stream it came from, a reply_to oq__reply_to_reserved refuses)
 * is refused with reason rejected ("bad request: ..."), before its id is
 * claimed: -1. Else 1 for a request (it has a reply_to), 0 for another
 * event. */
int oq__request_decode(const oq_event *ev, oq_decoded *out, void *idspec,
                       const char *stream);
/* Why a Redis reply stream name may not be used by requests to stream, or
 * NULL when it may. */
const char *oq__reply_to_reserved(const char *to, const char *stream);
/* The longest reply_to name (a stream's, or a file's before ".jsonl"). */
#define OQ__REPLY_TO_MAX 200
/* Whether s[0..n) is a usable reply_to: 1 to OQ__REPLY_TO_MAX letters,
 * digits, '.', '_', '-', ':', not starting with '.' (a file name too). */
bool oq__reply_to_ok(const char *s, size_t n);
/* Whether ev is a (valid) request: 1, with its reply_to name in to
 * (OQ__REPLY_TO_MAX + 1 bytes, NUL-terminated) and, when head is not NULL,
 * the head of its reply appended to head: {"correlation_id":C,"id":I, .
 * 0 when it is not one; OQ_ENOMEM. */
int oq__reply_head(const oq_event *ev, char *to, size_t *to_len,
                   oq__buf *head);
/* Appends the rest of a reply after its head: "status":S, then
 * "result":[txn's records] (OK) or "error":error, "attempts":N, "}\n". */
int oq__reply_body(oq__buf *b, oq__reply_status st, const oq_txn *txn,
                   const char *error, unsigned attempts);
/* The engine's reply hook (arg: unused): stages the reply's body in the
 * txn (oq__txn_set_reply); the ledger adds each copy's head. */
int oq__replies_stage(const oq_event *ev, oq_txn *txn, oq__reply_status st,
                      void *arg);
/* The memory ledger's reply sink (arg: the replies). */
void *oq__replies_prepare(const oq_event *ev, const oq_txn *txn, void *arg);
void oq__replies_publish(void *prepared, void *arg);
void oq__replies_abort(void *prepared, void *arg);
/* A duplicate of a settled request: its cached reply once more. */
void oq__replies_duplicate(const oq_event *ev, void *arg);
void oq__replies_stats(oq__replies *r, uint64_t *requests, uint64_t *replies,
                       uint64_t *duplicates);
/* A reply could not be written (the run stops; oq__replies_close says
 * why). */
bool oq__replies_failed(oq__replies *r);

/* ----------------------------------------------------------- reorder.c */

/* The reorder buffer of record outputs (see reorder.c's comment). Lines
 * are numbered from 1 in the order read; each settles exactly once. */
typedef struct oq__reorder oq__reorder;
#define OQ__REORDER_WINDOW (1u << 18)
int oq__reorder_new(oq__reorder **out, unsigned nfiles, uint64_t window);
void oq__reorder_free(oq__reorder *ro);
/* Input file's first line read is line seq, its line number lineno. */
void oq__reorder_input(oq__reorder *ro, unsigned file, uint64_t seq,
                       uint64_t lineno);
/* A line settled with no records (blank, dead-lettered). */
void oq__reorder_settle(oq__reorder *ro, uint64_t tag);
/* A duplicate of ev settled (its id's records may move to its line). */
void oq__reorder_dup(oq__reorder *ro, const oq_event *ev);
/* ev committed with txn's records. 0 or OQ_ENOMEM (nothing kept). */
int oq__reorder_add(oq__reorder *ro, const oq_event *ev, const oq_txn *txn);
/* Something could not be placed: reported at the end. */
void oq__reorder_note_failed(oq__reorder *ro, int rc);
/* Writes (and flushes) the records the watermark passed / all the rest. */
void oq__reorder_write_ready(oq__reorder *ro, FILE *f);
void oq__reorder_write_rest(oq__reorder *ro, FILE *f);
/* The reader must wait: the window past the watermark is full. */
bool oq__reorder_full(oq__reorder *ro, uint64_t lines_read);
/* 0, or why a line could not be placed. */
int oq__reorder_error(oq__reorder *ro);

/* ------------------------------------------------------------ runner.c */

/* Everything `onceq run` was asked to do, in every mode (in memory,
 * --state, --redis): run.c fills it from argv with one option table, the
 * same limits and the same defaults, and refuses options that make no
 * sense in the chosen mode, so neither engine parses anything. */
/* --partitions' limit (redis.c: one connection a partition a thread on a
 * Redis Cluster). */
#define OQ__PARTITIONS_MAX 256

typedef struct oq__run_config {
    const char *const *inputs;  /* ninputs paths; none: stdin */
    unsigned ninputs;
    unsigned workers;
    const char *id_field;
    int64_t vt_ms;
    uint32_t max_attempts;
    int64_t backoff_base_ms, backoff_cap_ms;
    int64_t ttl_ms;             /* 0: none */
    size_t dedup_window;
    const char *handler_spec;
    bool emit;
    const char *out_path;       /* NULL: stdout */
    const char *dlq_path;
    const char *stats_path;     /* NULL: none; "-": stdout */
    int progress;               /* 1: draw the progress line */
    size_t max_line;
    unsigned batch;             /* 16 in memory, 128 with --redis */
    int64_t kill_grace_ms;
    uint64_t seed;              /* jitter; 0: from the clock */
    bool quiet, verbose;
    /* Durable mode (--state): see docs/STATE.md. */
    const char *state_path;     /* NULL: in memory */
    int sync;                   /* oq__store_sync */
    size_t commit_batch;        /* events per transaction; default 256 */
    int64_t commit_interval_ms; /* longest wait for a batch; default 5 */
    bool force;                 /* read a changed input from its start */
    /* Redis mode (--redis): see docs/REDIS.md. */
    const char *redis_url;      /* NULL: not Redis */
    const char *stream, *group; /* both required with --redis */
    const char *consumer;       /* NULL: host:pid */
    bool drain;                 /* exit once the group has nothing left */
    int64_t timeout_ms;         /* --timeout: one attempt's limit; 0: none */
    const char *metrics_path;   /* --metrics FILE, or NULL */
    int64_t metrics_interval_ms; /* --metrics-interval; default 10 s */
    const char *metrics_listen; /* --metrics-listen HOST:PORT, or NULL */
    const char *replies_dir;    /* --replies DIR, or NULL */
    int64_t retention_ms;       /* --retention: done-marks kept; 0: not
                                   given (the stream's, or forever) */
    const char *redis_password_file; /* NULL: the URL's, or REDISCLI_AUTH */
    unsigned replicas;          /* --replicas: WAIT for them after commits */
    int64_t reply_ttl_ms;       /* --reply-ttl: replies kept for duplicates */
    bool join_requests;         /* --join-requests: a stream of replies */
    unsigned partitions;        /* --partitions: 0 not given (the stream's) */
} oq__run_config;

/* The defaults of every mode (batch: the in-memory one; run.c's parser
 * sets Redis's when --redis is given without --batch). */
void oq__run_config_defaults(oq__run_config *c);
/* NULL when arg is a valid --id-field (a field name or a JSON pointer),
 * else what one looks like. */
const char *oq__id_field_bad(const char *arg);
/* Runs the whole job in memory or with --state; returns the process exit
 * status. */
int oq__run(const oq__run_config *c);

/* What every mode's --stats and summary report, with the same names and
 * the same meaning: lines = processed + duplicates + dead + blank (+
 * unfinished after a signal). run.c writes them; each engine adds its own
 * fields after them. */
typedef struct oq__run_counts {
    uint64_t lines, processed, duplicates, dead, blank, unfinished;
    uint64_t dead_by[OQ_DLQ__COUNT];
    uint64_t retried, redelivered, fenced;
    uint64_t lease_extensions;  /* heartbeats that extended a lease */
    unsigned workers;
    const char *handler;        /* the handler's name */
    double elapsed_s;
} oq__run_counts;
/* Writes --stats's shared fields: "{" up to events_per_s, not closed. */
void oq__write_stats_head(FILE *f, const oq__run_counts *n);
/* The summary on stderr (nothing when quiet): who (NULL, or e.g.
 * "consumer NAME") before the counts, the dead letters by reason and where
 * they are (dlq_where), and with verbose the retry counters. */
void oq__write_summary(const oq__run_counts *n, const char *who,
                       const char *dlq_where, bool quiet, bool verbose);
/* Draws the progress line on stderr (\r, cleared to the end); tail is
 * the engine's own part (may be ""). */
void oq__draw_progress(const oq__run_counts *n, const char *tail);
/*
 * The number parsers of every option (run, run --redis, send, gen, the
 * state tools). Strict: decimal digits only -- no sign, no whitespace, no
 * hex, no exponent, no nan/inf -- and a value out of range is refused, never
 * wrapped. Each returns 0, or OQ_EINVAL with *out unchanged.
 */
/* The longest duration any option takes: 100 years of 365 days (876000h),
 * in ms. Small enough that now + it can never overflow an int64_t. */
#define OQ__DURATION_MAX_MS ((int64_t)100 * 365 * 24 * 3600 * 1000)
/* A duration: DIGITS[.DIGITS] then ms, s, m or h; a bare number is seconds.
 * Rounded to the nearest ms; at most OQ__DURATION_MAX_MS. */
int oq__parse_duration(const char *s, int64_t *ms);
/* The same, where a bare number counts bare_ms milliseconds (1: ms). */
int oq__parse_duration_bare(const char *s, int64_t bare_ms, int64_t *ms);
/* A count: DIGITS, from min to max. */
int oq__parse_count(const char *s, uint64_t min, uint64_t max, uint64_t *out);
/* A size in bytes: DIGITS with an optional K, M or G (binary; either case,
 * then an optional iB or B: 64K, 1M, 1MiB, 2GB), from min to max. */
int oq__parse_size(const char *s, uint64_t min, uint64_t max, uint64_t *out);
/* Parses --backoff BASE[,CAP] (durations, CAP >= BASE); *cap_ms keeps its
 * value when CAP is not given. 0 or OQ_EINVAL (nothing changed). */
int oq__parse_backoff(const char *arg, int64_t *base_ms, int64_t *cap_ms);
/* Writes one result line of a counting handler, {"FIELD":"key","count":N},
 * to arg (an oq__count_out); an oq_txn_count_fn. */
typedef struct oq__count_out {
    FILE *f;
    const char *key;  /* FIELD */
} oq__count_out;
void oq__write_count(const char *key, size_t len, int64_t v, void *arg);
/* Output files of the CLI. oq__out_whole writes one whole output: path
 * (NULL or "-": stdout) opened as an oq__outfile (a regular file through
 * a temporary file renamed over it at the end), fn(f, arg) writes it, and
 * it is committed; when fn returns non-zero the file at path stays as it
 * was. Returns 0, fn's status, or 3 (cannot write, a write error: the
 * message written with prefix). oq__out_close flushes stdout or closes f,
 * and returns 0, or 3 (the exit status) after printing "PREFIX: write
 * error on 'PATH': reason" if anything written to f was lost. */
int oq__out_whole(const char *path, const char *prefix, const char *what,
                  int (*fn)(FILE *f, void *arg), void *arg);
int oq__out_close(FILE *f, const char *path, const char *prefix);
/* Writes a Unix time in ms as a JSON ISO-8601 string (UTC, ms). */
void oq__json_write_time(FILE *f, int64_t unix_ms);
struct oq__dead_row;
/* Writes a stored dead letter as one JSON line, as `onceq run --dlq` does
 * (with_seq: its "seq" first, for `onceq dlq`). */
void oq__write_dead_row(FILE *f, const struct oq__dead_row *d, bool with_seq);

/* ----------------------------------------------------------- outputs.c */

/* An output of `onceq run` (-o, --dlq, --stats), opened before the run
 * (see outputs.c). */
typedef struct oq__outfile {
    const char *path;   /* NULL: not asked for */
    const char *what;   /* "results", "dead letters", "stats" */
    FILE *f;            /* open from the start to the end */
    char tmp[PATH_MAX + 32]; /* the temporary file, or "" (in place) */
} oq__outfile;
/* Opens path ("-": stdout, NULL: not asked for) for what; 0, or OQ_EIO
 * with err filled (the run is refused). */
int oq__out_begin(oq__outfile *o, const char *path, const char *what,
                  char *err, size_t errlen);
/* Finishes the output (fsync and rename a temporary file): 0 or an exit
 * status, the message written with prefix. */
int oq__out_commit(oq__outfile *o, const char *prefix);
/* Drops an output not finished (remove: also its temporary file). */
void oq__out_discard(oq__outfile *o, bool remove);
/* Refuses (OQ_EINVAL, err filled) an output path, given as option opt,
 * that is the state file or one of its side files. */
int oq__check_state_output(const char *opt, const char *path,
                           const char *state, char *err, size_t errlen);
/* Refuses an output over the state, its side files, an input, or another
 * output (compared by device and inode). 0, or an error with err. */
int oq__check_outputs(const oq__run_config *c, char *err, size_t errlen);

/* -------------------------------------------------------- CLI subcommands */

/* Each subcommand of the onceq binary: argv[0] is the subcommand's name.
 * Returns the process exit status. */
int oq__cmd_node(int argc, char **argv);
int oq__cmd_run(int argc, char **argv);
int oq__cmd_gen(int argc, char **argv);
/* state_cli.c: the durable state's subcommands (--state PATH); with
 * --redis, dlq and export hand over to stream_cli.c's. */
int oq__cmd_dlq(int argc, char **argv);
int oq__cmd_export(int argc, char **argv);
int oq__cmd_stats(int argc, char **argv);
int oq__cmd_checkpoint(int argc, char **argv);
int oq__cmd_restore(int argc, char **argv);
/* stream_cli.c: the command lines of the Redis commands (send, request,
 * dlq --redis, export --redis); redis.c does the work. */
int oq__cmd_send(int argc, char **argv);
int oq__cmd_request(int argc, char **argv);
int oq__cmd_dlq_redis(int argc, char **argv);
int oq__cmd_export_redis(int argc, char **argv);

/* The options of `onceq send` and `onceq request` (stream_cli.c). */
typedef struct oq__send_cfg {
    const char *url, *pwfile, *stream, *id_field;
    const char *reply_to;       /* --reply-to: send requests; NULL: not */
    int64_t request_ttl_ms;     /* --request-ttl: their contexts' life */
    int64_t timeout_ms;         /* --reply-timeout: requests' deadline */
    bool reply_timeout_given;
    /* onceq request: */
    const char *reply_stream;   /* --reply-stream, or NULL: its own */
    int64_t window_ms;
    unsigned batch;             /* events per SEND call */
    size_t max_line;
    int replicas;
    unsigned partitions;        /* --partitions: 0 not given */
    bool quiet;
} oq__send_cfg;
#define OQ__SEND_BATCH 256      /* send's --batch by default */
/* The options of `onceq dlq --redis` and `onceq export --redis`. */
typedef struct oq__tool_cfg {
    const char *url, *pwfile, *stream, *out_path, *reason, *id_glob;
    bool dry_run;
} oq__tool_cfg;
enum { OQ__DLQ_LIST, OQ__DLQ_SHOW, OQ__DLQ_REDRIVE, OQ__DLQ_PURGE };

/* redis.c: Redis Streams. Each returns the exit status. `onceq run`
 * hands its parsed options over to oq__redis_run when they hold --redis
 * (c->redis_url). inputs: files (none: stdin). */
int oq__redis_send(const oq__send_cfg *c, char **inputs, unsigned ninputs);
int oq__redis_request(const oq__send_cfg *c, char **inputs, unsigned ninputs);
int oq__redis_run(const oq__run_config *c);
/* action: OQ__DLQ_*; show: OQ__DLQ_SHOW's ID. */
int oq__redis_dlq(const oq__tool_cfg *c, int action, const char *show);
int oq__redis_export(const oq__tool_cfg *c);

/* run.c: one line "onceq CMD: message" on stderr; returns 2 (bad usage). */
int oq__usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* getopt_long's ':' (a value missing) and '?' (an unknown option) as
 * oq__usage_error lines; returns 2. */
int oq__getopt_error(const char *cmd, int opt, char **argv);
/* 1 if argv[1..argc) holds the option name (exactly, or as "name=..."). */
int oq__has_option(int argc, char **argv, const char *name);

/* -------------------------------------------------------------- store.c */

/*
 * Durable state in one SQLite file (docs/STATE.md). An oq__store is one
 * connection, used by one thread at a time (no lock of its own). Errors are
 * OQ_E* codes with a one-line message in oq__store_error().
 */
struct sqlite3;
struct sqlite3_stmt;
typedef struct oq__store oq__store;

#define OQ__STORE_APP_ID 1869505393  /* PRAGMA application_id: "oncq" */
#define OQ__STORE_VERSION 1          /* PRAGMA user_version */

typedef enum oq__store_sync {
    OQ__SYNC_FULL = 0, OQ__SYNC_NORMAL, OQ__SYNC_OFF
} oq__store_sync;

/* oq__store_open flags. OQ__STORE_LOCK takes the run lock (an exclusive
 * flock on PATH.lock) for the store's life, or fails with OQ_EBUSY and
 * "state 'PATH' is in use by another onceq run". */
enum { OQ__STORE_CREATE = 1, OQ__STORE_LOCK = 2 };

/* An input position (tag) is file << 40 | line (1-based); file index
 * OQ__TAG_REDRIVE marks a redriven event, whose line is its redrive seq. */
#define OQ__TAG(file, line) (((uint64_t)(file) << 40) | (uint64_t)(line))
#define OQ__TAG_FILE(tag) ((unsigned)((tag) >> 40))
#define OQ__TAG_LINE(tag) ((tag) & ((1ULL << 40) - 1))
#define OQ__TAG_REDRIVE 0xffffffu
/* A dead letter of an earlier generation of an input (stdin or a pipe,
 * which is new at every run, or a file read again from its start) is moved
 * out of the way to OQ__TAG(OQ__TAG_RETIRED, its seq): dead_letters.tag is
 * unique, and a line of this run at the same position is another event. */
#define OQ__TAG_RETIRED 0xfffffeu

typedef struct oq__dead_row {
    int64_t seq;              /* rowid (when read) */
    uint64_t tag;             /* the input position */
    const char *source;       /* "path:line" */
    const char *id;           /* NULL when unknown */
    size_t id_len;
    const char *reason;       /* oq_dlq_reason_name() */
    const char *error;
    uint32_t attempts;        /* deliveries, over all redrives unless reset */
    int64_t first_seen_ms;    /* Unix time, ms */
    int64_t dead_ms;          /* Unix time, ms */
    const void *event;        /* the line's bytes */
    size_t event_len;
    const char *history;      /* JSON array of earlier deaths; NULL: "[]" */
    const char *dlq_id;       /* Redis: the dead letter's stream entry, or
                                 NULL */
} oq__dead_row;

typedef struct oq__source_row {
    unsigned file;            /* index among the run's inputs */
    const char *path;
    uint64_t dev, ino, size;  /* identity when last seen; size in bytes */
    uint64_t head_len;        /* bytes hashed at the start (<= 4096) */
    uint64_t head_hash;       /* XXH3-64 of those bytes */
    uint64_t offset;          /* bytes below which every line is settled */
    uint64_t line;            /* lines below offset */
    uint64_t blank;           /* of which blank */
} oq__source_row;

typedef void (*oq__store_id_fn)(const char *id, size_t len, void *arg);
typedef void (*oq__store_dead_fn)(const oq__dead_row *d, void *arg);
typedef struct oq__store_visit {
    oq__store_id_fn id;
    oq_txn_count_fn count;
    oq_txn_record_fn record;
    oq__store_dead_fn dead;
    void *arg;
} oq__store_visit;

int oq__store_open(oq__store **out, const char *path, int flags,
                   oq__store_sync sync, char *err, size_t errlen);
void oq__store_close(oq__store *st);
const char *oq__store_error(const oq__store *st);
struct sqlite3 *oq__store_db(oq__store *st);
/* Fault injection: when n >= 0, n more commits succeed, then every commit
 * fails (rolled back, OQ_ENOSPC) as if the disk were full. -1: never. */
void oq__store_fail_after(long n);

/* A batch: begin, puts, commit (a failed commit rolls back). */
int oq__store_begin(oq__store *st);
int oq__store_commit(oq__store *st);
void oq__store_rollback(oq__store *st);
uint64_t oq__store_commits(const oq__store *st);
/* status: 0 processed, 1 dead (handler FAIL). */
int oq__store_put_processed(oq__store *st, const char *id, size_t len,
                            int status, uint64_t tag);
typedef struct oq__processed {
    const char *id;
    size_t len;
    int status;               /* 0 processed, 1 dead */
    uint64_t tag;             /* first-seen input position */
} oq__processed;
/* Many rows, in multi-row statements. */
int oq__store_put_processed_many(oq__store *st, const oq__processed *rows,
                                 size_t n);
int oq__store_put_output(oq__store *st, const char *id, size_t len,
                         unsigned seq, const void *data, size_t n);
int oq__store_add_count(oq__store *st, const char *key, size_t len,
                        int64_t delta);
/* Lowers a processed id's first-seen tag to tag (a duplicate seen earlier
 * in the input). */
int oq__store_min_tag(oq__store *st, const char *id, size_t len,
                      uint64_t tag);
int oq__store_put_dead(oq__store *st, const oq__dead_row *d);
int oq__store_del_redrive(oq__store *st, int64_t seq);
/* Retires the dead letters of input file (see OQ__TAG_RETIRED). */
int oq__store_retire_dead(oq__store *st, unsigned file);
/* Deletes the dead letter of input position tag, if any. */
int oq__store_del_dead(oq__store *st, uint64_t tag);
/* *line: the highest line of input file's dead letters above line `above`
 * (0 if none). */
int oq__store_max_dead_line(oq__store *st, unsigned file, uint64_t above,
                            uint64_t *line);
int oq__store_put_source(oq__store *st, const oq__source_row *r);

int oq__store_meta_get(oq__store *st, const char *key, char *buf, size_t len);
int oq__store_meta_set(oq__store *st, const char *key, const char *value);
int oq__store_foreach_processed(oq__store *st, oq__store_id_fn fn, void *arg);
/* Counts sorted by key (bytewise); records by first-seen tag, then seq. */
int oq__store_foreach_count(oq__store *st, oq_txn_count_fn fn, void *arg);
int oq__store_foreach_record(oq__store *st, oq_txn_record_fn fn, void *arg);
/* Dead letters by tag; redriven events by seq (reason "redrive"). */
int oq__store_foreach_dead(oq__store *st, oq__store_dead_fn fn, void *arg);
int oq__store_foreach_redrive(oq__store *st, oq__store_dead_fn fn, void *arg);
/* Fills d from a row of "SELECT seq, tag, source, id, reason, error,
 * attempts, first_seen_ms, dead_ms, event, history" (valid until the next
 * step of s). */
void oq__store_dead_from_row(struct sqlite3_stmt *s, oq__dead_row *d);
/* 0 (r filled; r->path points into path), OQ_ENOENT, or an error. */
int oq__store_get_source(oq__store *st, unsigned file, oq__source_row *r,
                         char *path, size_t pathlen);
/* Online backup of the whole database to file, or (restore) from it. */
int oq__store_snapshot(oq__store *st, const char *file, bool restore);

/* Source progress (store.c): lines read and not yet below the watermark,
 * per tracked file. Thread-safe (a leaf lock). */
typedef struct oq__tracker oq__tracker;
int oq__tracker_new(oq__tracker **out, unsigned nfiles);
void oq__tracker_free(oq__tracker *t);
/* Tracks row->file from its saved watermark (row is copied). */
int oq__tracker_track(oq__tracker *t, const oq__source_row *row);
/* The reader read line (lines come in order); blank lines are settled. */
int oq__tracker_add(oq__tracker *t, unsigned file, uint64_t line,
                    uint64_t end, bool blank);
void oq__tracker_settle(oq__tracker *t, const uint64_t *tags, size_t n);
/* Up to max rows whose watermark moved since the last call. */
size_t oq__tracker_collect(oq__tracker *t, oq__source_row *rows, size_t max);

/* The committer thread (store.c): group commit of the pool's handoffs. */
typedef struct oq__committer oq__committer;
typedef struct oq__committer_opts {
    oq__store *store;        /* used only by the committer thread */
    oq_queue *q;
    oq_idset *s;
    oq__tracker *tracker;    /* NULL: no source progress */
    size_t batch;            /* this many pending events start a
                                transaction; default 256 */
    int64_t interval_ms;     /* or the oldest has waited this long (ms);
                                default 5 */
    size_t max_batch;        /* a transaction takes all that is pending, up
                                to this; default max(16 * batch, 4096) */
    size_t max_pending;      /* submitters wait beyond this many items;
                                default 2 * max_batch */
    bool keep_first;         /* duplicates lower the first-seen position */
    /* Completes a dead letter: source text, id when row->id is NULL,
     * wall-clock times (given as monotonic ms), and for a redriven event its
     * original tag, attempts and history. buf is scratch for the strings.
     * Called on the committer thread. */
    void (*describe)(oq__dead_row *row, char *buf, size_t buflen, void *arg);
    /* stale_dead[file] (file < nstale): the highest line of that input
     * with a dead letter above its watermark at the start (0: none). Such
     * a dead letter was committed before a crash; if its line is now
     * processed, the dead letter is deleted in the same transaction. */
    const uint64_t *stale_dead;
    unsigned nstale;
    /* The input position to record for tag (a redriven event's original). */
    uint64_t (*position)(uint64_t tag, void *arg);
    void *arg;
} oq__committer_opts;

typedef struct oq__committer_stats {
    uint64_t commits;        /* transactions */
    uint64_t events_total;   /* items over all transactions */
    uint64_t events_max;     /* items in the largest transaction */
    int64_t write_ms;        /* time spent writing batches (SQL), ms */
    int64_t finish_ms;       /* time marking DONE and settling, ms */
} oq__committer_stats;

int oq__committer_start(oq__committer **out, const oq__committer_opts *o);
/* The committer as the engine's ledger (the ledger is the committer). */
extern const oq__ledger_methods oq__sqlite_ledger_methods;
/* A duplicate acked by a worker: its line is settled with the next batch. */
void oq__committer_duplicate(oq__committer *c, const oq_event *ev);
/* Writes what is pending and joins the thread; OQ_EIO (err filled) if a
 * commit failed. Call after the pool has stopped. */
int oq__committer_stop(oq__committer *c, char *err, size_t errlen);
bool oq__committer_failed(oq__committer *c, char *err, size_t errlen);
void oq__committer_stats_get(oq__committer *c, oq__committer_stats *out);
void oq__committer_free(oq__committer *c);

/* ------------------------------------------------ runner.c and resume.c */

/* One `onceq run` in memory or with --state: the state shared by
 * runner.c (reader, sink, outputs, the run) and resume.c (durable
 * runs). */
typedef struct oq__run_sink {
    /* Records are written in input order, at each event's first line.
     * Immutable after setup. */
    bool track_first;
    oq__reorder *ro;         /* the records' buffer (memory mode), or NULL */
    oq__replies *replies; /* --replies: duplicates get their reply again */
    pthread_mutex_t mu;  /* guards parts (registration only); a leaf */
    struct part *parts;
    /* The merged result, written by merge_parts() only. */
    oq_memsink *counts;
    int rc;              /* an allocation failed in a callback or merge */
} oq__run_sink;

typedef struct oq__dl_item {
    uint64_t tag;
    oq_dlq_reason reason;
    uint32_t attempts;
    int64_t sent_ms, dead_ms;
    char *error;
    size_t len;
    char payload[];
} oq__dl_item;

typedef struct oq__dl_list {
    oq__dl_item **v;
    size_t n, cap;
    int rc;
} oq__dl_list;

/* An event redriven from the dead letters, sent again with the tag
 * OQ__TAG(OQ__TAG_REDRIVE, seq). */
typedef struct oq__redrive_ent {
    int64_t seq;
    uint64_t tag;        /* the original input position */
    uint32_t attempts;   /* before the redrive (0 after --reset-attempts) */
    char *source;
    char *history;
} oq__redrive_ent;

typedef struct oq__runner oq__runner;
struct oq__runner {
    const oq__run_config *c;
    oq_queue *q;
    oq_idset *s;
    oq_pool *p;
    oq__reader *reader;
    oq__handler h;
    oq__idspec idspec;
    oq__run_sink rs;
    oq__outfile out, dlq, stats; /* -o, --dlq, --stats: open from the start */
    oq__dl_list dead;            /* dead letters taken so far; main thread */

    /* Written by the reader thread, read by the main thread. */
    _Atomic uint64_t lines, blank;
    _Atomic int reader_done;
    _Atomic int stop;
    int reader_rc;              /* set once reader_done; read by main */
    char reader_err[512];
    /* The reader role: one thread at a time reads input lines and sends
     * them (a worker whose queue ran dry, or the reader thread). reader_mu
     * guards pb and the reader (oq__reader_next); taken with trylock by
     * workers, never held across anything but reading and sending. */
    pthread_mutex_t reader_mu;
    struct pending *pb;
    unsigned read_file;         /* the input of the last line read */
    oq__mem_ledger mem;         /* the memory ledger */
    oq__replies *replies;       /* --replies, or NULL */
    bool reader_thread;         /* a thread reads (fewer workers than
                                   cores), else the workers do */

    int64_t t0_ms;
    int64_t wall0_ms;           /* wall clock at t0, for dead-letter times */
    oq__metrics *metrics;       /* --metrics / --metrics-listen, or NULL */
    _Atomic int pool_up;        /* r->p is set (for the metrics threads) */

    /* Durable mode (--state); see the DURABLE section below. The store is
     * the committer thread's while it runs, the main thread's otherwise. */
    oq__store *store;
    oq__committer *cm;
    oq__tracker *tracker;       /* thread-safe */
    uint64_t *stale_dead;       /* per input: see oq__committer_opts */
    int load_rc;                /* loading the processed ids failed */
    struct oq__redrive_ent *redrive; /* read-only once the run starts */
    size_t nredrive;
    uint64_t skipped;           /* resumed_skipped_lines */
    uint64_t loaded_ids;        /* processed ids loaded at the start */
    int64_t load_ms;            /* time to load them, ms */
};

typedef struct oq__totals {
    uint64_t lines, blank, processed, duplicates, dead, unfinished;
    uint64_t dead_by[OQ_DLQ__COUNT];
    uint64_t retried, redelivered, fenced, bytes, lease_extensions;
    double elapsed_s;
    /* Durable mode. */
    uint64_t redriven, skipped, commits, commit_events, commit_max;
    uint64_t db_processed, db_dead, db_bytes;
    int64_t write_ms, finish_ms;
} oq__totals;

/* feed.c: the reader role */
int oq__send_all(oq__runner *r, oq_message *m, size_t n);
int oq__start_reading(oq__runner *r);
void *oq__reader_main(void *arg);
void oq__reading_free(oq__runner *r);
extern const oq__queue_methods oq__feed_methods;
/* runner.c */
void oq__write_stats_json(FILE *f, const oq__runner *r, const oq__totals *t);
/* resume.c */
int oq__open_state(oq__runner *r, char *err, size_t errlen);
void oq__close_state(oq__runner *r);
void oq__state_totals(oq__runner *r, oq__totals *t);
void oq__write_state_stats(FILE *f, const oq__runner *r, const oq__totals *t);
int oq__write_results_db(oq__runner *r);
int oq__write_dlq_db(oq__runner *r, uint64_t *count);
void oq__save_last_run(oq__runner *r, const oq__totals *t);
void oq__durable_dup(const oq_event *ev, void *arg);

#endif /* OQ_CLI_H */
