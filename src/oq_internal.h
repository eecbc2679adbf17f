/*
 * The library's private declarations (libonceq: allocation, options,
 * clock, heap, JSON, processed set, engine and its backend interfaces,
 * memory sink, txn), shared between its modules. Not installed. The CLI's
 * own declarations are in oq_cli.h. Internal names are oq__*; static names
 * carry no prefix.
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
/* oq__json_scan is the fast path, then the full scan where the fast path
 * declines. The fast path alone: 0 and the tape the full scan would build,
 * or 1 (declined: not a flat object of plain strings, numbers and literals,
 * or not valid). Both exported for tests, which check they agree. */
int oq__json_scan_flat(const char *s, size_t len, oq__jtape *t);
int oq__json_scan_full(const char *s, size_t len, oq__jtape *t,
                       size_t *err_at, const char **why);
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

/* The one UTF-8 validator: the length of the well-formed sequence at s
 * (n > 0 bytes left; an ASCII byte is 1), 0 if none starts there. */
size_t oq__utf8_seq(const unsigned char *s, size_t n);
/* 1 if s[0..len) is valid UTF-8 with no NUL byte. */
int oq__utf8_valid(const char *s, size_t len);
/* Strict UTF-8 with no NUL: the offset of the first bad byte, or len;
 * *nul tells whether that byte is a NUL (json.c). */
size_t oq__utf8_check(const unsigned char *s, size_t len, bool *nul);
/* Writes s[0..n) as a JSON string; invalid UTF-8 bytes become U+FFFD. */
void oq__json_write_string(FILE *f, const char *s, size_t n);

/* --------------------------------------------------------------- idset.c */

/* An id's 128-bit XXH3 digest: what the processed set keys it by. The _d
 * variants of the oq_idset calls take it precomputed, so a caller that
 * claims, prepares and commits one id hashes it once. */
typedef struct oq__digest {
    uint64_t lo, hi;
} oq__digest;
oq__digest oq__idset_digest(const char *id, size_t len);
/* The set's clock, read for the calls below that take now: a caller
 * that claims or commits a batch reads it once for the batch (see "Time"
 * in idset.c). */
int64_t oq__idset_now(const oq_idset *s);
/* Starts loading the DONE-table line where d would be (no lock; a hint):
 * a batch prefetches all its ids before it claims them, so their cache
 * misses overlap instead of coming one after another. */
void oq__idset_prefetch(const oq_idset *s, oq__digest d);
int oq__idset_claim_d(oq_idset *s, oq__digest d, int64_t lease_deadline_ms,
                      int64_t now, oq_claim *out);
int oq__idset_commit_d(oq_idset *s, oq__digest d, uint64_t token,
                       int64_t now);
int oq__idset_prepare_d(oq_idset *s, oq__digest d, uint64_t token,
                        int64_t now);
int oq__idset_release_d(oq_idset *s, oq__digest d, uint64_t token);
/* A heartbeat: moves the claim's lease to lease_deadline_ms (never
 * earlier) while token is current. 0 or OQ_ESTALE. */
int oq__idset_extend_d(oq_idset *s, oq__digest d, uint64_t token,
                       int64_t lease_deadline_ms);

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
    bool not_an_attempt;          /* RETRY: the handler was cancelled
                                     (OQ__CANCELLED): this delivery does
                                     not count among the attempts */
    int result;                   /* out: 0 done; OQ_ESTALE fenced (the
                                     lease was lost: nothing written);
                                     OQ__PENDING: the ledger took the
                                     delivery and calls done() later;
                                     other negative: failed, nothing
                                     written, the claim given back */
} oq__lcommit;

#define OQ__PENDING 1

/* What a handler of the CLI's (exec:, coproc:) returns when it was
 * stopped because onceq is stopping (oq__handler_cancel): a RETRY that is
 * not an attempt (the handler did not fail; a signal stopped it), so the
 * event's last attempt is not used up by it. */
#define OQ__CANCELLED 3

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
    /* > 0: a handler's RETRY at the max_attempts-th delivery is the
     * event's last: the id settles as dead at once (reason max_attempts,
     * "no attempts left ...; last error: ..."), with no backoff and no
     * retry counted, whatever the backend. 0: the queue decides (the
     * memory queue delivers the message once more, as dying). */
    unsigned max_attempts;
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

/* ---------------------------------------------------- handler-time histogram */

/* Handler durations: upper bounds of the histogram's buckets, seconds (the
 * engine keeps the counts, the CLI's metrics module prints them). */
#define OQ__HIST_BUCKETS 11
extern const double oq__metrics_buckets[OQ__HIST_BUCKETS];

/* -------------------------------------------------------------- memsink.c */

/* Moves from's counters (summed) and records (appended) into into; from is
 * left empty. OQ_ENOMEM if some counter could not be added (it is lost:
 * the caller reports the run as failed). Takes one lock at a time. */
int oq__memsink_merge(oq_memsink *into, oq_memsink *from);
/* The sink's apply without its lock, for a memsink that one thread writes
 * while nothing else reads it (the run sink's per-worker parts: read
 * only once the workers are joined). */
int oq__memsink_apply_owned(oq_memsink *m, const oq_txn *txn);

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
