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

/* ------------------------------------------------------------------ opts */

/*
 * Options that grow (opts.c). o/dst/src point to an oq_*_opts struct, whose
 * first field is size_t size; known is the library's sizeof of it.
 * oq__opts_init: zeroes the caller's size bytes, copies the defaults the
 * caller's struct has room for, and sets o->size = size.
 * oq__opts_copy: copies the fields the caller's src->size covers over dst
 * (which holds the defaults), and sets dst->size = known. OQ_EINVAL when
 * src->size is 0, or covers non-zero bytes past known (an option from a
 * newer header that this library does not have).
 */
void oq__opts_init(void *o, size_t size, const void *defaults, size_t known);
int oq__opts_copy(void *dst, size_t known, const void *src);

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

/* ------------------------------------------------------------ json.c */

/* A growable byte buffer. */
typedef struct oq__buf {
    char *data;
    size_t len, cap;
} oq__buf;
int oq__buf_reserve(oq__buf *b, size_t more);
int oq__buf_add(oq__buf *b, const void *p, size_t n);
void oq__buf_free(oq__buf *b);

/* The strict JSON scanner (see json.c): one token per value and per
 * object key, in document order. */
enum {
    OQ__J_OBJ = 1, OQ__J_ARR, OQ__J_STR, OQ__J_NUM, OQ__J_TRUE, OQ__J_FALSE,
    OQ__J_NULL
};
#define OQ__JSON_MAX_DEPTH 1000

typedef struct oq__jtok {
    uint32_t start;  /* byte offset: a string's first byte after the quote;
                        anything else's first byte */
    uint32_t len;    /* bytes: a string's escaped form between the quotes;
                        a number's or literal's text; a container's text
                        through its closing bracket */
    uint32_t end;    /* index of the token after this value's subtree */
    uint8_t type;    /* OQ__J_* */
    uint8_t esc;     /* a string with backslash escapes */
} oq__jtok;

typedef struct oq__jtape {
    oq__jtok *tok;
    uint32_t n, cap;
} oq__jtape;

typedef struct oq__jdoc {
    const char *text;
    size_t len;
    const oq__jtok *tok;  /* tok[0] is the top-level value */
    uint32_t ntok;
} oq__jdoc;

/* Scans the JSON text s[0..len) (valid UTF-8 without NUL: check that
 * first) onto t (reused; grown as needed). 0; -1 for a text that is not
 * strict JSON (*err_at: byte offset, *why: what is wrong); OQ_ENOMEM. */
int oq__json_scan(const char *s, size_t len, oq__jtape *t, size_t *err_at,
                  const char **why);
void oq__jtape_free(oq__jtape *t);
/* 1 if s[0..len) is one strict JSON text in valid UTF-8 without NUL. */
int oq__json_valid(const char *s, size_t len);
/* String token i's bytes: a pointer into the text when it has no escapes,
 * else decoded into buf (at least tok[i].len bytes); *len is set. */
const char *oq__jstr(const oq__jdoc *d, uint32_t i, char *buf, size_t *len);
bool oq__jstr_eq(const oq__jdoc *d, uint32_t i, const char *s, size_t n);
/* The value of member key in object obj, or 0 when absent (0 is the root,
 * never a member). */
uint32_t oq__jget(const oq__jdoc *d, uint32_t obj, const char *key,
                  size_t keylen);
/* The value a field names from the root: a member name, or a JSON pointer
 * (RFC 6901) when it starts with '/'. 0 when absent. */
uint32_t oq__jpointer(const oq__jdoc *d, const char *field);
/* A number token written without fraction or exponent. */
bool oq__jnum_is_integer(const oq__jdoc *d, uint32_t i);
/* Appends value i as compact JSON (strings re-escaped canonically, numbers
 * as written). */
int oq__jcompact(const oq__jdoc *d, uint32_t i, oq__buf *b);
/* Appends s[0..n) as a JSON string; invalid UTF-8 bytes become U+FFFD,
 * control characters and DEL \u escapes. */
int oq__json_quote(oq__buf *b, const char *s, size_t n);
/* The same escaping, without the quotes, into out[0..cap): escapes whole
 * input sequences while 6 bytes of room are left; *used: bytes of s done.
 * Returns the bytes written. */
size_t oq__json_escape(char *out, size_t cap, const char *s, size_t n,
                       size_t *used);

/* --------------------------------------------------------------- idset.c */

/* An id's 128-bit XXH3 digest: what the processed set keys it by. The _d
 * variants of the oq_idset calls take it precomputed, so a caller that
 * claims, prepares and commits one id hashes it once. */
typedef struct oq__digest {
    uint64_t lo, hi;
} oq__digest;
oq__digest oq__idset_digest(const char *id, size_t len);
int oq__idset_claim_d(oq_idset *s, const char *id, size_t len, oq__digest d,
                      int64_t lease_deadline_ms, oq_claim *out);
int oq__idset_commit_d(oq_idset *s, const char *id, size_t len, oq__digest d,
                       uint64_t token);
int oq__idset_prepare_d(oq_idset *s, const char *id, size_t len,
                        oq__digest d, uint64_t token);
int oq__idset_release_d(oq_idset *s, const char *id, size_t len,
                        oq__digest d, uint64_t token);
/* A heartbeat: moves the claim's lease to lease_deadline_ms (never
 * earlier) while token is current. 0 or OQ_ESTALE. */
int oq__idset_extend_d(oq_idset *s, const char *id, size_t len, oq__digest d,
                       uint64_t token, int64_t lease_deadline_ms);

/* --------------------------------------------------------------- engine.c */

/*
 * The engine (src/engine.c) is the only worker loop. It talks to a queue
 * backend and a ledger through the two method tables below, in the style of
 * SQLite's sqlite3_io_methods: a version first, methods after ("the methods
 * below are valid for version 1"); a later version may only add methods at
 * the end. Each thread of the engine (every worker, the heartbeat thread,
 * and the thread that completes asynchronous commits) attaches its own
 * context to each, because a backend's connection may not be thread-safe
 * (a hiredis context is not).
 *
 * Implementations: the in-memory visibility-timeout queue and the memory
 * ledger (the processed set plus an oq_sink) in src/membackend.c; the SQLite
 * ledger (group commit) in src/store.c; the Redis stream queue and the
 * Redis ledger in src/redis.c.
 */

/*
 * A queue backend. Deliveries and settle ops are oq_delivery and oq_settle,
 * with the meaning oq_queue_receive and oq_queue_settle give them; a
 * backend keeps what it needs behind oq_delivery.msg_.
 */
typedef struct oq__queue_methods {
    int version;                           /* 1 */
    const char *name;
    int (*attach)(void *backend, void **ctx);
    void (*detach)(void *ctx);
    /* Up to max deliveries, waiting up to wait_ms for the first one: the
     * number received, 0, or OQ_EOF once no more will come. */
    int (*receive)(void *ctx, oq_delivery *out, size_t max, int64_t wait_ms);
    /* Carries out ops[0..n) (PIN, ACK, NACK, RETURN, DEAD, EXTEND, NONE)
     * and sets each result. */
    void (*settle)(void *ctx, oq_settle *ops, size_t n);
    /* Makes every blocked receive return now. Any thread. */
    void (*wake)(void *backend);
} oq__queue_methods;

/* One id to claim, and the answer. */
typedef struct oq__lclaim {
    const char *id;               /* in: the event id (bytes) */
    size_t id_len;
    oq__digest dg;                /* in: oq__idset_digest(id) */
    const oq_delivery *d;         /* in: its delivery; the lease ends at
                                     d->deadline_ms (engine clock) */
    int status;                   /* out: OQ_CLAIMED, OQ_DONE, OQ_BUSY, or
                                     a negative error (OQ_EINVAL: an id
                                     the ledger cannot take; else
                                     transient) */
    uint64_t token;               /* out: CLAIMED: the fencing token */
    int64_t holder_deadline_ms;   /* out: BUSY: when the holder's lease
                                     ends, engine clock (a guess is fine) */
} oq__lclaim;

/* What a commit entry asks of the ledger. */
typedef enum oq__lcommit_kind {
    OQ__LC_COMMIT,  /* fenced: the id becomes processed with txn's outputs */
    OQ__LC_DEAD,    /* fenced: the id settles as dead (no outputs) */
    /* Only for a ledger with OQ__LEDGER_SETTLES, which is given every op
     * of the batch but RETURN and NONE: */
    OQ__LC_ACK,     /* a duplicate: only the queue op (ACK) */
    OQ__LC_RETRY,   /* release the claim, then the queue op (NACK) */
    OQ__LC_REJECT   /* no id to settle: only the queue op (DEAD) */
} oq__lcommit_kind;

typedef struct oq__lcommit {
    oq__lcommit_kind kind;
    oq__lclaim *claim;            /* COMMIT, DEAD, RETRY: the claim */
    const oq_event *ev;           /* the decoded event */
    const oq_txn *txn;            /* COMMIT: outputs; DEAD, REJECT,
                                     RETRY: oq_txn_error_text() */
    oq_settle *op;                /* the queue op that follows a done
                                     entry: ACK, DEAD (reason, error) or
                                     NACK (delay); a SETTLES ledger
                                     carries it out and sets its result */
    int result;                   /* out: 0 done; OQ_ESTALE fenced (the
                                     lease was lost: nothing written);
                                     OQ__PENDING: the ledger took the
                                     delivery and calls done() later;
                                     other negative: failed, nothing
                                     written, the claim given back */
} oq__lcommit;

#define OQ__PENDING 1

/* The ledger's commit also carries out the queue ops (one round trip per
 * batch: the Redis commit script XACKs). */
#define OQ__LEDGER_SETTLES 1u

/* How an asynchronous ledger hands deliveries back: ops[0..n) are the queue
 * ops to carry out (each op's d a copy the ledger kept), all with one
 * result: 0 (committed) or a failure (nothing written, claims given back).
 * Called on the ledger's own thread, one call at a time. */
typedef void (*oq__ledger_done_fn)(void *engine, oq_settle *ops, size_t n,
                                   int result);

typedef struct oq__ledger_methods {
    int version;                           /* 1 */
    const char *name;
    unsigned flags;                        /* OQ__LEDGER_* */
    int (*attach)(void *ledger, void **ctx);
    void (*detach)(void *ctx);
    /* Claims c[0..n) (each with its delivery's deadline as its lease).
     * 0, or a negative error for the whole call (then no claim is held). */
    int (*claim)(void *ctx, oq__lclaim *c, size_t n);
    /* Gives up claims that will not be committed (stop, RETRY). */
    void (*release)(void *ctx, oq__lclaim *c, size_t n);
    /* A heartbeat: the claim's lease (and, for a SETTLES ledger, its
     * delivery) now ends at deadline_ms. 0 or OQ_ESTALE. */
    int (*extend)(void *ctx, const oq__lclaim *c, int64_t deadline_ms);
    /* Commits c[0..n) and sets each result. */
    void (*commit)(void *ctx, oq__lcommit *c, size_t n);
    /* Optional (NULL: commits are never pending): where to hand back
     * deliveries whose commit was OQ__PENDING. */
    void (*set_done)(void *ledger, oq__ledger_done_fn fn, void *engine);
} oq__ledger_methods;

/* Starts the engine on a queue backend and a ledger (both outlive it).
 * opts as oq_pool_start's; opts->sink is the memory ledger's business. */
int oq__engine_start(oq_pool **out, const oq__queue_methods *qm, void *qb,
                     const oq__ledger_methods *lm, void *lb,
                     const oq_pool_opts *opts);

/* Request-reply (src/replies.c): the status of a settled request. */
typedef enum oq__reply_status {
    OQ__REPLY_OK,      /* processed: the handler's records are the result */
    OQ__REPLY_FAILED,  /* the handler failed for good */
    OQ__REPLY_DEAD     /* out of attempts, or older than its TTL */
} oq__reply_status;

typedef struct oq__engine_hooks {
    /* Optional: called after a handler call that settles the event (OK,
     * FAIL) and for a dying delivery, before the commit: stages the
     * event's reply in txn (oq__txn_set_reply) if it is a request, for
     * the ledger to commit with the id. 0, or an error: the message is
     * retried later. */
    int (*reply)(const oq_event *ev, oq_txn *txn, oq__reply_status st,
                 void *arg);
    void *arg;
} oq__engine_hooks;

/* oq__engine_start with hooks (NULL: none). */
int oq__engine_start_hooks(oq_pool **out, const oq__queue_methods *qm,
                           void *qb, const oq__ledger_methods *lm, void *lb,
                           const oq_pool_opts *opts,
                           const oq__engine_hooks *hooks);

/* What a worker finishes in a quarter of a lease, as last measured (how
 * much a backend may take over for one idle worker). */
size_t oq__engine_fit(oq_pool *p);

/* attach and detach for a backend whose context is the backend itself
 * (a thread-safe one). */
int oq__ctx_self(void *backend, void **ctx);
void oq__ctx_none(void *ctx);

/* The memory backends (membackend.c): the queue backend is an oq_queue
 * itself; the memory ledger is an oq_idset and an oq_sink. */
extern const oq__queue_methods oq__mem_queue_methods;
extern const oq__ledger_methods oq__mem_ledger_methods;
/* Where the memory ledger commits a txn's reply (oq__txn_reply), with
 * the id: prepare (may fail: NULL), then publish or abort. */
typedef struct oq__reply_sink {
    void *(*prepare)(const oq_event *ev, const oq_txn *txn, void *arg);
    void (*publish)(void *prepared, void *arg);
    void (*abort)(void *prepared, void *arg);
    void *arg;
} oq__reply_sink;

typedef struct oq__mem_ledger {
    oq_idset *s;
    oq_sink sink;
    oq__reply_sink replies;   /* prepare NULL: replies are not kept */
} oq__mem_ledger;

/* The Redis backends (redis.c): the stream as a queue backend and the
 * claim keys and COMMIT script as a ledger (OQ__LEDGER_SETTLES), both over
 * one backends object. */
extern const oq__queue_methods oq__redis_queue_methods;
extern const oq__ledger_methods oq__redis_ledger_methods;
/* Opens the backends outside `onceq run` (for tests): connects to url,
 * creates group on stream unless it exists, and starts the housekeeper
 * (retries coming due, XAUTOCLAIM of entries idle longer than vt_ms). The
 * strings must outlive the backends. 0 or a negative error (a message on
 * stderr). Close after the engine on them has stopped. */
int oq__redis_backends_open(void **out, const char *url, const char *stream,
                            const char *group, int64_t vt_ms,
                            unsigned max_attempts, unsigned workers,
                            unsigned batch);
void oq__redis_backends_close(void *backends);

/* ----------------------------------------------------------------- pool.c */

/* Heartbeats that extended a lease so far (not in oq_pool_stats: a stats
 * struct the library fills cannot grow without breaking older callers). */
uint64_t oq__pool_lease_extensions(oq_pool *p);
/* The time per message in the workers (decode, claim, handler), as the
 * metrics' histogram: calls per bucket of oq__metrics_buckets (the last
 * bucket, above them all, is only in count), their count and sum. */
void oq__pool_histogram(oq_pool *p, uint64_t *buckets, uint64_t *count,
                        double *sum_s);

/* -------------------------------------------------------------- metrics.c */

/* Handler durations: upper bounds of the histogram's buckets, seconds. */
#define OQ__HIST_BUCKETS 11
extern const double oq__metrics_buckets[OQ__HIST_BUCKETS];

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

/* -------------------------------------------------------------- memsink.c */

/* Moves from's counters (summed) and records (appended) into into; from is
 * left empty. OQ_ENOMEM if some counter could not be added (it is lost:
 * the caller reports the run as failed). Takes one lock at a time. */
int oq__memsink_merge(oq_memsink *into, oq_memsink *from);

/* -------------------------------------------------------------------- txn */

oq_txn *oq__txn_new(void);
void oq__txn_reset(oq_txn *t); /* keeps its buffers */
void oq__txn_free(oq_txn *t);
/* What oq_txn_heartbeat calls (the pool, around a handler with
 * heartbeats); fn NULL: none. */
void oq__txn_set_heartbeat(oq_txn *t, int64_t (*fn)(void *arg), void *arg);
/* The reply to a request (src/replies.c), staged by the engine's reply hook
 * and committed with the id by the ledger. reset clears it. */
int oq__txn_set_reply(oq_txn *t, const char *data, size_t len);
/* The staged reply, or NULL when there is none. */
const char *oq__txn_reply(const oq_txn *t, size_t *len);

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
/* 1 if s[0..len) is valid UTF-8 with no NUL byte. */
int oq__utf8_valid(const char *s, size_t len);
/* Strict UTF-8 with no NUL: the offset of the first bad byte, or len;
 * *nul tells whether that byte is a NUL (json.c). */
size_t oq__utf8_check(const unsigned char *s, size_t len, bool *nul);

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
/* 1 if the scanned event is a request, 0 if not, -1 if it is a bad one
 * (reply_to not a valid name, a field not a string: err filled). */
int oq__request_check(const oq__jdoc *d, char *err, size_t errlen);
/* The engine's reply hook (arg: the replies). */
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

/* ------------------------------------------------------------ runner.c */

/* Everything `onceq run` was asked to do, in every mode (in memory,
 * --state, --redis): run.c fills it from argv with one option table, the
 * same limits and the same defaults, and refuses options that make no
 * sense in the chosen mode, so neither engine parses anything. */
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
} oq__run_config;

/* The defaults of every mode (batch: the in-memory one; run.c's parser
 * sets Redis's when --redis is given without --batch). */
void oq__run_config_defaults(oq__run_config *c);
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
/* Output files of the CLI. oq__out_open opens path for writing (NULL or
 * "-": stdout); on failure it prints "PREFIX: cannot write WHAT to 'PATH':
 * reason" and returns NULL. oq__out_close flushes stdout or closes f, and
 * returns 0, or 3 (the exit status) after printing "PREFIX: write error on
 * 'PATH': reason" if anything written to f was lost. */
FILE *oq__out_open(const char *path, const char *prefix, const char *what);
int oq__out_close(FILE *f, const char *path, const char *prefix);
/* Writes s[0..n) as a JSON string; invalid UTF-8 bytes become U+FFFD. */
void oq__json_write_string(FILE *f, const char *s, size_t n);
/* Writes a Unix time in ms as a JSON ISO-8601 string (UTC, ms). */
void oq__json_write_time(FILE *f, int64_t unix_ms);
struct oq__dead_row;
/* Writes a stored dead letter as one JSON line, as `onceq run --dlq` does
 * (with_seq: its "seq" first, for `onceq dlq`). */
void oq__write_dead_row(FILE *f, const struct oq__dead_row *d, bool with_seq);

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
/* redis.c: Redis Streams. `onceq run` hands its parsed options over to
 * oq__redis_run when they hold --redis (c->redis_url). */
int oq__cmd_send(int argc, char **argv);
int oq__redis_run(const oq__run_config *c);
int oq__redis_dlq(int argc, char **argv);
int oq__redis_export(int argc, char **argv);
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
const char *oq__store_path(const oq__store *st);
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

/* ------------------------------------------------------------------- misc */

/* a + b for times in ms, saturating at INT64_MAX / INT64_MIN instead of
 * overflowing (a huge delay is "never", not "at once"). */
static inline int64_t oq__add_ms(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

/* splitmix64: a small, good PRNG step for jitter and tests. */
static inline uint64_t oq__splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#endif /* OQ_INTERNAL_H */
