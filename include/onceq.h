/*
 * onceq: exactly-once event processing with a pool of competing workers.
 *
 * This is the only public header. Conventions (libuv style):
 *   - functions that can fail return 0 or a negative errno-style code
 *     (OQ_E*); oq_strerror() turns it into text;
 *   - every time value is in milliseconds and is named *_ms; times are read
 *     from an oq_clock, which tests replace to make time-based behaviour
 *     deterministic;
 *   - option structs can grow: each starts with size_t size, and is set up
 *     by its *_defaults(&opts) macro, which passes the caller's sizeof to
 *     *_opts_init(): the library zeroes that many bytes, fills in the
 *     defaults and sets size. Later versions add fields only at the end, and
 *     a new field's zero value keeps the old behaviour. The library reads
 *     the fields the caller's size covers; the others keep their defaults.
 *     size 0 (a struct not set up by *_defaults) is OQ_EINVAL; a size
 *     larger than the library knows (a newer header) is accepted only when
 *     the fields it does not know are zero, OQ_EINVAL otherwise. See
 *     docs/ABI.md.
 */
#ifndef ONCEQ_H
#define ONCEQ_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(OQ_BUILDING) && defined(__GNUC__)
#define OQ_API __attribute__((visibility("default")))
#else
#define OQ_API
#endif

/* The version: this is the one place it is written (the Makefile reads it
 * from here for the soname and onceq.pc). */
#define OQ_VERSION_MAJOR 0
#define OQ_VERSION_MINOR 1
#define OQ_VERSION_PATCH 0
#define OQ__STR2(x) #x
#define OQ__STR(x) OQ__STR2(x)
#define OQ_VERSION_STRING OQ__STR(OQ_VERSION_MAJOR) "." \
    OQ__STR(OQ_VERSION_MINOR) "." OQ__STR(OQ_VERSION_PATCH)

OQ_API const char *oq_version(void);

/* ------------------------------------------------------------------ errors */

#define OQ_ENOMEM (-ENOMEM)
#define OQ_EINVAL (-EINVAL)
#define OQ_ESTALE (-ESTALE)   /* receipt or fencing token is no longer current */
#define OQ_EEXIST (-EEXIST)   /* id rejected by the producer dedup window */
#define OQ_ECLOSED (-EPIPE)   /* send on a closed queue */
#define OQ_ENOENT (-ENOENT)
#define OQ_EBUSY (-EBUSY)
#define OQ_EIO (-EIO)
#define OQ_ENOSPC (-ENOSPC)
#define OQ_EOF (-4095)        /* queue closed and drained */

/* Text for an OQ_E* code (or any negative errno). Never NULL. */
OQ_API const char *oq_strerror(int err);

/* ------------------------------------------------------------------- clock */

/*
 * A source of monotonic milliseconds. The default reads CLOCK_MONOTONIC.
 * Tests use oq_testclock, whose time moves only when the test says so.
 * now_ms must be callable from any thread, must not block, and must not
 * take a lock: the queue reads it with its own lock held.
 */
typedef struct oq_clock {
    int64_t (*now_ms)(void *ctx);
    void *ctx;
} oq_clock;

OQ_API const oq_clock *oq_clock_monotonic(void);
OQ_API int64_t oq_clock_now(const oq_clock *c); /* c == NULL: monotonic */

/* A manual clock for tests: starts at start_ms and moves on advance/set. */
typedef struct oq_testclock oq_testclock;
OQ_API oq_testclock *oq_testclock_new(int64_t start_ms);
OQ_API void oq_testclock_free(oq_testclock *tc);
OQ_API const oq_clock *oq_testclock_clock(oq_testclock *tc);
OQ_API void oq_testclock_advance(oq_testclock *tc, int64_t delta_ms);
OQ_API void oq_testclock_set(oq_testclock *tc, int64_t now_ms);

/* ------------------------------------------------------------------- queue */

/*
 * A visibility-timeout queue (SQS / beanstalkd TTR semantics) under one
 * mutex. Messages are sent with an id and a payload, received in batches,
 * and stay invisible for the visibility timeout until acked, nacked,
 * extended, or their deadline passes (then they become visible again).
 */
typedef struct oq_queue oq_queue;

/* Why a message went to the dead-letter list. */
typedef enum oq_dlq_reason {
    OQ_DLQ_MAX_ATTEMPTS = 0, /* receive count reached max_receives */
    OQ_DLQ_EXPIRED,          /* older than the TTL when it was due */
    OQ_DLQ_FAILED,           /* the handler reported a permanent failure */
    OQ_DLQ_REJECTED,         /* refused before processing (bad input) */
    OQ_DLQ_PARSE_ERROR,      /* not a JSON object, invalid UTF-8, NUL bytes */
    OQ_DLQ_BAD_ID,           /* missing, empty, too long or wrongly typed id */
    OQ_DLQ_TOO_LARGE,        /* longer than the maximum line length */
    OQ_DLQ__COUNT
} oq_dlq_reason;

OQ_API const char *oq_dlq_reason_name(oq_dlq_reason r);

typedef struct oq_queue_opts {
    size_t size;                   /* sizeof(oq_queue_opts) as the caller
                                      was compiled; set by *_defaults */
    int64_t visibility_timeout_ms; /* default 30000 */
    uint32_t max_receives;         /* 0 = unlimited; default 0 */
    int64_t ttl_ms;                /* 0 = no TTL; age counted from send */
    size_t dedup_count;            /* producer dedup window, ids; default 10000; 0 = off */
    int64_t dedup_age_ms;          /* and/or by age; 0 = no age limit */
    const oq_clock *clock;         /* NULL = monotonic */
    int deliver_dying;             /* 0: a message that reached max_receives
                                      or its TTL goes to the dead letters at
                                      delivery time. 1: it is delivered once
                                      more with oq_delivery.dying set, for a
                                      consumer with a processed set (the
                                      pool) to settle it: one outcome per id */
} oq_queue_opts;

/* Fills the size bytes at o with the defaults and sets o->size = size.
 * Call it as oq_queue_opts_defaults(&o), which passes sizeof(o). */
OQ_API void oq_queue_opts_init(oq_queue_opts *o, size_t size);
#define oq_queue_opts_defaults(o) oq_queue_opts_init((o), sizeof(*(o)))

/* One message for oq_queue_send_batch. */
typedef struct oq_message {
    const char *id;
    size_t id_len;      /* 0: no id, not subject to the dedup window */
    const void *payload;
    size_t payload_len;
    int64_t delay_ms;   /* invisible until now + delay_ms */
    uint64_t tag;       /* opaque to the queue; returned on delivery */
} oq_message;

/*
 * One delivery of a message. It holds a reference to the message, so id and
 * payload stay valid (and unchanged) until the delivery is released with
 * oq_queue_release() or an oq_queue_settle() op that names it, whatever
 * happens to the message in the meantime.
 */
typedef struct oq_delivery {
    const char *id;
    size_t id_len;
    const void *payload;
    size_t payload_len;
    uint64_t tag;
    uint64_t receipt;          /* unique per delivery; never 0 */
    uint32_t receive_count;    /* 1 on the first delivery */
    int64_t sent_ms;           /* when the message was sent */
    int64_t first_receive_ms;  /* when it was first delivered */
    int64_t deadline_ms;       /* when it becomes visible again */
    int dying;                 /* with oq_queue_opts.deliver_dying: the
                                  message is due for the dead letters
                                  (dying_reason); the consumer settles it
                                  without running it: ACK when its id is
                                  already processed, DEAD otherwise (or
                                  RETURN). Not counted as a receive. */
    oq_dlq_reason dying_reason; /* OQ_DLQ_MAX_ATTEMPTS or OQ_DLQ_EXPIRED */
    const char *last_error;    /* the last nack's error text, or NULL;
                                  valid until the delivery is settled */
    void *msg_;                /* private */
} oq_delivery;

/* A dead letter, as handed to oq_queue_dead_letters(). */
typedef struct oq_dead_letter {
    const char *id;
    size_t id_len;
    const void *payload;
    size_t payload_len;
    uint64_t tag;
    oq_dlq_reason reason;
    const char *error;        /* last error text; "" when none */
    uint32_t attempts;        /* receive count at the time */
    int64_t sent_ms;
    int64_t first_receive_ms; /* 0 if never delivered */
    int64_t dead_ms;
} oq_dead_letter;

typedef struct oq_queue_stats {
    uint64_t sent;                /* accepted by send */
    uint64_t duplicates_rejected; /* refused by the dedup window */
    uint64_t received;            /* deliveries */
    uint64_t acked;
    uint64_t redelivered;         /* visibility timeouts */
    uint64_t nacked;
    uint64_t dead_lettered[OQ_DLQ__COUNT];
    uint64_t ready;
    uint64_t delayed;
    uint64_t in_flight;
    int64_t oldest_ready_age_ms;  /* 0 when nothing is ready */
} oq_queue_stats;

OQ_API int oq_queue_new(oq_queue **out, const oq_queue_opts *opts);
/* Frees the queue. No call may be in progress; outstanding deliveries die. */
OQ_API void oq_queue_free(oq_queue *q);

/* 0, OQ_EEXIST (dedup window), OQ_ECLOSED, OQ_ENOMEM, OQ_EINVAL. */
OQ_API int oq_queue_send(oq_queue *q, const char *id, size_t id_len,
                         const void *payload, size_t payload_len,
                         int64_t delay_ms);
/* Sends n messages under one lock hold; results[i] as for oq_queue_send
 * (results may be NULL). Returns the number accepted, or OQ_ECLOSED. */
OQ_API int oq_queue_send_batch(oq_queue *q, const oq_message *msgs, size_t n,
                               int *results);

/*
 * Receives up to max messages, blocking up to wait_ms (0: do not block,
 * negative: forever). Returns the number received (0 on timeout), OQ_EOF once
 * the queue is closed and holds nothing (ready, delayed or in flight), or a
 * negative error. Each delivery must be released.
 */
OQ_API int oq_queue_receive(oq_queue *q, oq_delivery *out, size_t max,
                            int64_t wait_ms);

/* Puts a message straight on the dead-letter list, never delivered (bad
 * input found by a producer). It counts as sent and as dead-lettered. */
OQ_API int oq_queue_reject(oq_queue *q, const oq_message *m,
                           oq_dlq_reason reason, const char *error);

/* Single operations by receipt; OQ_ESTALE when the receipt is not current. */
OQ_API int oq_queue_ack(oq_queue *q, uint64_t receipt);
OQ_API int oq_queue_nack(oq_queue *q, uint64_t receipt, int64_t delay_ms);
OQ_API int oq_queue_extend(oq_queue *q, uint64_t receipt, int64_t ms);
OQ_API int oq_queue_dead_letter(oq_queue *q, uint64_t receipt,
                                oq_dlq_reason reason, const char *error);

/* What an oq_settle entry does. */
typedef enum oq_settle_op {
    OQ_SETTLE_NONE = 0,  /* only release the delivery */
    OQ_SETTLE_ACK,       /* delete the message */
    OQ_SETTLE_NACK,      /* visible again after delay_ms */
    OQ_SETTLE_RETURN,    /* like NACK, but the delivery is not counted as a
                            receive (the consumer could not start it) */
    OQ_SETTLE_EXTEND,    /* deadline = now + delay_ms */
    OQ_SETTLE_PIN,       /* never time out until settled (commit in progress) */
    OQ_SETTLE_DEAD       /* move to the dead-letter list */
} oq_settle_op;

typedef struct oq_settle {
    oq_delivery *d;        /* the delivery */
    oq_settle_op op;
    int release;           /* also release d (drop its reference), unless
                              the op failed with OQ_ENOMEM: then d keeps it,
                              so the op can be retried */
    int64_t delay_ms;      /* NACK/RETURN/EXTEND */
    oq_dlq_reason reason;  /* DEAD */
    const char *error;     /* DEAD: the dead letter's error (copied); NACK:
                              kept as the message's last error, reported if
                              it later reaches max_receives */
    int result;            /* out: 0, OQ_ESTALE, or OQ_ENOMEM (DEAD) */
} oq_settle;

/* Applies n ops under one lock hold. Returns how many ops succeeded. */
OQ_API int oq_queue_settle(oq_queue *q, oq_settle *ops, size_t n);
/* Drops the references held by n deliveries (one lock hold). */
OQ_API void oq_queue_release(oq_queue *q, oq_delivery *d, size_t n);

/* No more sends will come; receivers return OQ_EOF once all is settled. */
OQ_API void oq_queue_close(oq_queue *q);
/* Wakes every blocked receiver now: each returns what it has (maybe 0)
 * instead of waiting on, for example after a test clock moved, or when a
 * consumer is stopping. */
OQ_API void oq_queue_wake(oq_queue *q);

OQ_API void oq_queue_stats_get(oq_queue *q, oq_queue_stats *out);

/* Calls fn for each dead letter, oldest first. With take != 0 the list is
 * emptied first and fn runs without the queue lock held; with take == 0 fn
 * runs with the lock held and must not call into the queue. Returns the
 * number visited. */
typedef void (*oq_dead_fn)(const oq_dead_letter *dl, void *arg);
OQ_API size_t oq_queue_dead_letters(oq_queue *q, int take, oq_dead_fn fn,
                                    void *arg);

/* --------------------------------------------------------- processed set */

/*
 * The processed set: which event ids are done, and which are claimed by a
 * worker right now. 2^k shards, each under its own mutex. A claim is a lease
 * with a fencing token: only the current, unexpired holder can commit.
 * Claims and DONE ids are both kept by the id's 128-bit digest (two ids
 * are confused only if their 128-bit XXH3 digests are equal), DONE ids in
 * a compact table.
 */
typedef struct oq_idset oq_idset;

typedef struct oq_idset_opts {
    size_t size;              /* sizeof(oq_idset_opts) as the caller was
                                 compiled; set by *_defaults */
    unsigned shard_bits;      /* 2^shard_bits shards; default 6 */
    int64_t retention_ms;     /* 0: remember DONE ids forever. Otherwise an id
                                 is remembered at least this long and
                                 forgotten within twice this long. */
    size_t expected_ids;      /* sizing hint; 0 = grow on demand */
    const oq_clock *clock;    /* NULL = monotonic */
} oq_idset_opts;

/* As oq_queue_opts_init; call it as oq_idset_opts_defaults(&o). */
OQ_API void oq_idset_opts_init(oq_idset_opts *o, size_t size);
#define oq_idset_opts_defaults(o) oq_idset_opts_init((o), sizeof(*(o)))

typedef enum oq_claim_status {
    OQ_CLAIMED = 0, /* the caller holds the lease */
    OQ_DONE = 1,    /* the id was already committed */
    OQ_BUSY = 2     /* another holder has a live lease */
} oq_claim_status;

typedef struct oq_claim {
    uint64_t token;             /* fencing token (CLAIMED; the holder's if BUSY) */
    int64_t lease_deadline_ms;  /* CLAIMED: ours; BUSY: the holder's */
} oq_claim;

OQ_API int oq_idset_new(oq_idset **out, const oq_idset_opts *opts);
OQ_API void oq_idset_free(oq_idset *s);

/*
 * Claims id until lease_deadline_ms. Returns OQ_CLAIMED, OQ_DONE or OQ_BUSY
 * (all >= 0), or a negative error. An expired lease is taken over with a new
 * token, which makes the old holder's token stale.
 */
OQ_API int oq_idset_claim(oq_idset *s, const char *id, size_t len,
                          int64_t lease_deadline_ms, oq_claim *out);
/* CLAIMED -> DONE, only while token is current and the lease unexpired (or
 * the claim is prepared); otherwise OQ_ESTALE and nothing changes. */
OQ_API int oq_idset_commit(oq_idset *s, const char *id, size_t len,
                           uint64_t token);
/*
 * Two-phase commit, for outputs that must be written somewhere that can fail
 * (a sink, a database) before the id is DONE: prepare locks the claim in
 * (only while token is current and the lease unexpired; afterwards it can't
 * be taken over even once the lease expires), then commit makes it DONE, or
 * release gives it up if the write failed. OQ_ESTALE if not current.
 */
OQ_API int oq_idset_prepare(oq_idset *s, const char *id, size_t len,
                            uint64_t token);
/* Gives the claim up (the id can be claimed again at once). OQ_ESTALE if
 * token is not current. */
OQ_API int oq_idset_release(oq_idset *s, const char *id, size_t len,
                            uint64_t token);
/* Marks id DONE without a claim (loading state from a store). 0 or
 * OQ_EEXIST if it already was. */
OQ_API int oq_idset_insert_done(oq_idset *s, const char *id, size_t len);
/* 1 if id is DONE, 0 if not. */
OQ_API int oq_idset_contains(oq_idset *s, const char *id, size_t len);

typedef struct oq_idset_stats {
    uint64_t done;        /* remembered DONE ids */
    uint64_t claims;      /* live claim entries */
    uint64_t takeovers;   /* expired leases taken over */
    uint64_t forgotten;   /* DONE ids dropped by the retention horizon */
    uint64_t table_bytes; /* bytes allocated for DONE slots */
} oq_idset_stats;

OQ_API void oq_idset_stats_get(oq_idset *s, oq_idset_stats *out);

/* ------------------------------------------------------------ transaction */

/*
 * What a handler stages: output records and counter deltas. Nothing in a txn
 * has any effect until the worker's fenced commit succeeds; a txn whose claim
 * was lost is discarded whole.
 */
typedef struct oq_txn oq_txn;

OQ_API int oq_txn_record(oq_txn *t, const void *data, size_t len);
OQ_API int oq_txn_count(oq_txn *t, const char *key, size_t key_len,
                        int64_t delta);
/* The handler's error text, kept for RETRY and FAIL (copied, truncated). */
OQ_API void oq_txn_error(oq_txn *t, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/*
 * A handler that runs longer than the pool's attempt timeout on purpose
 * (oq_pool_opts.timeout_ms) calls this now and then: the attempt's end
 * moves to now + the timeout, and the heartbeats that keep the lease go on
 * until then. Returns the new end (ms on the event's clock; INT64_MAX when
 * there is no timeout), OQ_ENOENT when the call runs without heartbeats
 * (oq_pool_opts.lease_ms is 0, or another engine), OQ_EINVAL for NULL.
 * Only from the handler, during its call.
 */
OQ_API int64_t oq_txn_heartbeat(oq_txn *t);

/* For sinks and tests: what a txn holds. */
typedef void (*oq_txn_record_fn)(const void *data, size_t len, void *arg);
typedef void (*oq_txn_count_fn)(const char *key, size_t key_len,
                                int64_t delta, void *arg);
OQ_API size_t oq_txn_nrecords(const oq_txn *t);
OQ_API size_t oq_txn_ncounts(const oq_txn *t);
OQ_API void oq_txn_foreach(const oq_txn *t, oq_txn_record_fn rec,
                           oq_txn_count_fn cnt, void *arg);
OQ_API const char *oq_txn_error_text(const oq_txn *t);

/* ---------------------------------------------------------------- handler */

/* What a handler returns. */
enum {
    OQ_OK = 0,    /* done: commit the staged txn, then ack */
    OQ_RETRY = 1, /* transient: release the claim, nack with backoff */
    OQ_FAIL = 2   /* permanent: release the claim, dead-letter */
};

/* What a handler is told about the event it is handed. */
typedef struct oq_event {
    const char *id;
    size_t id_len;
    const void *payload;
    size_t payload_len;
    uint64_t tag;
    uint64_t receipt;
    uint32_t attempt;          /* 1 on the first delivery */
    int64_t deadline_ms;       /* the lease ends here */
    const oq_clock *clock;
    void *parsed;              /* what the pool's decode hook produced */
} oq_event;

/*
 * The handler function type, shared by the built-in handlers and plugins.
 * Called with no lock held, possibly from several threads at once. It must
 * stage every effect in txn and return OQ_OK, OQ_RETRY or OQ_FAIL.
 */
typedef int (*oq_handler_fn)(const oq_event *ev, oq_txn *txn, void *arg);

/*
 * Optional decode hook: runs in the worker, before the claim, with no lock
 * held, so parsing is spread over the workers. It finds the event's id
 * (for messages sent without one) and may keep a parsed form for the
 * handler (ev->parsed). Return 0 with out->id/out->id_len set (they may
 * point into the payload or into out->parsed), or a negative value with
 * out->reason and out->error set: the message is dead-lettered with them
 * (and with out->id, when the message has no id of its own and the hook
 * set out->id and out->parsed before it refused the event). The hook gets
 * out with id, id_len, parsed and reason zero and error an empty string
 * (the rest of error[] is not cleared: write a NUL-terminated message).
 */
typedef struct oq_decoded {
    const char *id;
    size_t id_len;
    void *parsed;            /* freed with the pool's free_parsed */
    oq_dlq_reason reason;    /* on failure */
    char error[256];         /* on failure */
} oq_decoded;

typedef int (*oq_decode_fn)(const oq_event *ev, oq_decoded *out, void *arg);

/* Plugins export a function with this name and type. */
#define OQ_PLUGIN_SYMBOL "oq_plugin_handle"

/* -------------------------------------------------------------------- sink */

/*
 * Where committed txns go. apply is called after the fenced commit
 * succeeded, once per committed event, from worker threads (concurrently;
 * the sink locks what it needs).
 */
typedef struct oq_sink {
    int (*apply)(const oq_event *ev, const oq_txn *txn, void *arg);
    void *arg;
    /* Optional: called after a message whose id was already DONE has been
     * acked as a duplicate (for example to keep the earliest input
     * position of an event). May run before the apply of the copy that
     * committed, on another thread. */
    void (*duplicate)(const oq_event *ev, void *arg);
} oq_sink;

/* A thread-safe in-memory sink: counters summed by key, records in commit
 * order. */
typedef struct oq_memsink oq_memsink;
OQ_API int oq_memsink_new(oq_memsink **out);
OQ_API void oq_memsink_free(oq_memsink *m);
OQ_API oq_sink oq_memsink_sink(oq_memsink *m);
/* 0 and *value if key has a counter, OQ_ENOENT otherwise. */
OQ_API int oq_memsink_get(oq_memsink *m, const char *key, size_t key_len,
                          int64_t *value);
OQ_API size_t oq_memsink_nkeys(oq_memsink *m);
OQ_API size_t oq_memsink_nrecords(oq_memsink *m);
/* Visits counters sorted by key (bytewise), then nothing else. */
OQ_API void oq_memsink_foreach_count(oq_memsink *m, oq_txn_count_fn fn,
                                     void *arg);
OQ_API void oq_memsink_foreach_record(oq_memsink *m, oq_txn_record_fn fn,
                                      void *arg);

/* -------------------------------------------------------------------- pool */

typedef struct oq_pool oq_pool;

typedef struct oq_pool_opts {
    size_t size;               /* sizeof(oq_pool_opts) as the caller was
                                  compiled; set by *_defaults */
    unsigned workers;          /* default 2 */
    unsigned batch;            /* messages per receive; default 16 */
    int64_t backoff_base_ms;   /* default 100 */
    int64_t backoff_cap_ms;    /* default 30000 */
    int64_t busy_retry_ms;     /* delay for an id another worker holds; default 10 */
    int64_t poll_ms;           /* receive long-poll slice; default 100 */
    uint64_t seed;             /* jitter PRNG seed; 0 = from the clock */
    oq_handler_fn handler;
    void *handler_arg;
    oq_sink sink;              /* where committed txns go; apply may be NULL */
    const oq_clock *clock;     /* the queue's and idset's clock; NULL = monotonic */
    oq_decode_fn decode;       /* NULL: the message id is the event id */
    void (*free_parsed)(void *parsed, void *arg);
    void *decode_arg;
    void *reserved_[2];        /* zero (0.1's committer hook: durable
                                  stores are engine ledgers now) */
    int handler_never_blocks;  /* the handler only computes (no I/O, no
                                  waits), so it cannot outlast a lease: the
                                  finished messages of a batch need not be
                                  pinned before each next handler call.
                                  Default 0: they are. */
    int64_t lease_ms;          /* > 0: heartbeats. While a handler runs, its
                                  message's visibility and claim are
                                  extended by lease_ms every third of it
                                  (the queue's visibility timeout is the
                                  natural value), and the handler's
                                  deadline is the attempt's end (below),
                                  not the delivery's. 0 (default): no
                                  heartbeats; the deadline is the lease's. */
    int64_t timeout_ms;        /* with lease_ms: the longest one attempt
                                  may run; heartbeats stop then, and the
                                  message is delivered again one lease
                                  later. 0 (default): no limit. */
} oq_pool_opts;

/* As oq_queue_opts_init; call it as oq_pool_opts_defaults(&o). */
OQ_API void oq_pool_opts_init(oq_pool_opts *o, size_t size);
#define oq_pool_opts_defaults(o) oq_pool_opts_init((o), sizeof(*(o)))

typedef struct oq_pool_stats {
    uint64_t processed;    /* committed and acked: one effect each */
    uint64_t duplicates;   /* id already DONE at claim: acked, no effect */
    uint64_t dead;         /* dead-lettered by a worker: handler FAIL, or a
                              dying delivery whose id was not processed */
    uint64_t rejected;     /* dead-lettered by the decode hook */
    uint64_t retried;      /* handler RETRY: nacked with backoff */
    uint64_t busy;         /* id held by another worker: returned */
    uint64_t fenced;       /* commit or ack refused: lease or receipt lost */
    uint64_t handler_calls;
    uint64_t batches;
} oq_pool_stats;

/* Starts the workers on q and s. q and s must outlive the pool. */
OQ_API int oq_pool_start(oq_pool **out, oq_queue *q, oq_idset *s,
                         const oq_pool_opts *opts);
/* Waits until the queue is closed and drained, then joins the workers. */
OQ_API int oq_pool_wait(oq_pool *p);
/*
 * Stops the workers: no new batch starts; running handlers get grace_ms to
 * finish. Whatever is not settled then stays in the queue for redelivery
 * (nothing is acked that was not committed). Returns 0, or OQ_EBUSY if some
 * handler was still running after the grace period (its worker is detached
 * from the pool's accounting, and its late commit will be fenced).
 */
OQ_API int oq_pool_stop(oq_pool *p, int64_t grace_ms);
OQ_API void oq_pool_stats_get(oq_pool *p, oq_pool_stats *out);
OQ_API void oq_pool_free(oq_pool *p);

/*
 * Exponential backoff with full jitter: a uniform draw in
 * [0, min(cap, base * 2^(attempt-1))]. rng is a caller-owned PRNG state.
 */
OQ_API int64_t oq_backoff_ms(int64_t base_ms, int64_t cap_ms, uint32_t attempt,
                             uint64_t *rng);

#ifdef __cplusplus
}
#endif
#endif /* ONCEQ_H */
