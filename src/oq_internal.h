/*
 * Private declarations shared between onceq's modules. Not installed.
 * Internal names are oq__*; static names carry no prefix.
 */
#ifndef OQ_INTERNAL_H
#define OQ_INTERNAL_H

#include "onceq.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define OQ__UNUSED(x) ((void)(x))
#define OQ__MIN(a, b) ((a) < (b) ? (a) : (b))
#define OQ__MAX(a, b) ((a) > (b) ? (a) : (b))

/* ------------------------------------------------------------- allocation */

/*
 * Every allocation of the library goes through these, so tests can inject
 * failures (beanstalkd's allocator seam). oq__alloc_fail_after: when >= 0,
 * that many more allocations succeed and the next ones fail.
 */
void *oq__malloc(size_t n);
void *oq__calloc(size_t n, size_t size);
void *oq__realloc(void *p, size_t n);
void oq__free(void *p);
void oq__alloc_fail_after(long n); /* -1: never fail (the default) */

/* Writes a one-line message into err[errlen] (if err is not NULL). */
void oq__set_err(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ------------------------------------------------------------------ clock */

/* Absolute CLOCK_MONOTONIC timespec for "now + ms" (for timed waits). */
struct timespec oq__abstime_after(int64_t ms);
/* pthread_cond_t that waits on CLOCK_MONOTONIC. */
int oq__cond_init_monotonic(pthread_cond_t *c);
/* A mutex for short critical sections: it spins a little before sleeping
 * (glibc's adaptive mutex), which matters when two workers contend for the
 * queue lock for a few hundred ns at a time. */
int oq__mutex_init(pthread_mutex_t *m);

/* ------------------------------------------------------------------- heap */

/*
 * A binary min-heap of pointers to items that carry their own key and heap
 * position (so removal and key changes are O(log n) without a search).
 * key_off and pos_off are offsetof() the int64_t key and the size_t
 * position inside the item.
 */
typedef struct oq__heap {
    void **items;
    size_t len, cap;
    size_t key_off, pos_off;
} oq__heap;

void oq__heap_init(oq__heap *h, size_t key_off, size_t pos_off);
void oq__heap_destroy(oq__heap *h);
int oq__heap_push(oq__heap *h, void *item);
void *oq__heap_peek(const oq__heap *h);
void *oq__heap_pop(oq__heap *h);
void oq__heap_remove(oq__heap *h, void *item);
/* Call after the item's key changed. */
void oq__heap_update(oq__heap *h, void *item);

/* -------------------------------------------------------------------- txn */

oq_txn *oq__txn_new(void);
void oq__txn_reset(oq_txn *t); /* keeps its buffers */
void oq__txn_free(oq_txn *t);

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
    uint64_t end;      /* byte offset just past its newline (next line) */
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
 * with OQ_DLQ_PARSE_ERROR: invalid JSON, not an object, invalid UTF-8, NUL
 * bytes; with OQ_DLQ_BAD_ID: missing id, id neither string nor integer,
 * empty, or longer than OQ__MAX_ID_LEN. Integer ids are used as their
 * decimal text. out->parsed is an oq__json_free-able wrapper; handlers get
 * the parsed object with oq__event_json(ev).
 */
int oq__json_decode(const oq_event *ev, oq_decoded *out, void *arg);
void oq__json_free(void *parsed, void *arg);
/* The event's parsed JSON object (a cJSON *), or NULL. */
struct cJSON *oq__event_json(const oq_event *ev);
/* Installs onceq's cJSON allocation hooks (per-thread arenas for parsed
 * events; see source.c). Every cJSON user calls it before using cJSON. */
void oq__json_hooks_install(void);
/* 1 if s[0..len) is valid UTF-8 with no NUL byte. */
int oq__utf8_valid(const char *s, size_t len);

/* ---------------------------------------------------------- handlers.c */

/* A handler made from a --handler SPEC. */
typedef struct oq__handler {
    oq_handler_fn fn;
    void *arg;
    void (*cleanup)(void *arg);
    const char *name;        /* "wordcount", "count", "noop", "exec", "plugin" */
    int output;              /* OQ__OUT_COUNTS or OQ__OUT_RECORDS */
    const char *count_key;   /* OQ__OUT_COUNTS: "word" or the FIELD name */
} oq__handler;

enum { OQ__OUT_COUNTS = 0, OQ__OUT_RECORDS = 1 };

typedef struct oq__handler_opts {
    int64_t kill_grace_ms;   /* exec: SIGTERM -> SIGKILL grace; default 2000 */
    bool emit;               /* noop: record each unique event's line */
} oq__handler_opts;

/* Builds the handler for spec ("wordcount", "count:FIELD", "noop",
 * "exec:COMMAND", "plugin:PATH.so"). 0, or a negative code with a one-line
 * message in err. */
int oq__handler_from_spec(const char *spec, const oq__handler_opts *o,
                          oq__handler *out, char *err, size_t errlen);
void oq__handler_free(oq__handler *h);
/* Stops every running exec command (SIGTERM, then SIGKILL after the grace)
 * and makes later calls return OQ_RETRY without starting one: used when
 * onceq is stopping, so no command outlives it. Thread-safe. */
void oq__handler_cancel(oq__handler *h);

/* ------------------------------------------------------------ runner.c */

/* Everything `onceq run` was asked to do (run.c fills it from argv). */
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
    unsigned batch;
    int64_t kill_grace_ms;
    uint64_t seed;              /* jitter; 0: from the clock */
    bool quiet, verbose;
} oq__run_config;

void oq__run_config_defaults(oq__run_config *c);
/* Runs the whole job; returns the process exit status. */
int oq__run(const oq__run_config *c);
int oq__parse_duration(const char *s, int64_t *ms);
/* Writes s[0..n) as a JSON string; invalid UTF-8 bytes become U+FFFD. */
void oq__json_write_string(FILE *f, const char *s, size_t n);

/* -------------------------------------------------------- CLI subcommands */

/* Each subcommand of the onceq binary: argv[0] is the subcommand's name.
 * Returns the process exit status. */
int oq__cmd_node(int argc, char **argv);
int oq__cmd_run(int argc, char **argv);
int oq__cmd_gen(int argc, char **argv);
/* state_cli.c: the durable state's subcommands (--state PATH); with
 * --redis they hand over to redis.c's oq__redis_dlq / oq__redis_export. */
int oq__cmd_dlq(int argc, char **argv);
int oq__cmd_export(int argc, char **argv);
int oq__cmd_stats(int argc, char **argv);
int oq__cmd_checkpoint(int argc, char **argv);
int oq__cmd_restore(int argc, char **argv);
/* redis.c: Redis Streams. `onceq run` hands over to oq__redis_run when its
 * arguments hold --redis (argv as given to oq__cmd_run). */
int oq__cmd_send(int argc, char **argv);
int oq__redis_run(int argc, char **argv);
int oq__redis_dlq(int argc, char **argv);
int oq__redis_export(int argc, char **argv);
/* 1 if argv[1..argc) holds the option name (exactly, or as "name=..."). */
int oq__has_option(int argc, char **argv, const char *name);

/* ------------------------------------------------------------------- misc */

/* splitmix64: a small, good PRNG step for jitter and tests. */
static inline uint64_t oq__splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#endif /* OQ_INTERNAL_H */
