/*
 * The engine: the one worker loop of onceq, for every backend.
 *
 * DESIGN
 * ------
 * N worker threads receive batches from a queue backend and claim, run and
 * commit their events in a ledger (the method tables in oq_internal.h:
 * memory queue and ledger in membackend.c, SQLite ledger in store.c, Redis
 * queue and ledger in redis.c). Each worker loops:
 *
 *   receive a batch (queue backend)
 *   A. decode every message (the decode hook finds the id; a message it
 *      refuses is dead-lettered with its reason). A second message of an
 *      id already in the batch is not claimed: it is redone after the
 *      batch settles (it then finds the id DONE, or claims it if the
 *      first was retried).
 *   B. claim the batch's ids with one ledger call, each with the rest of
 *      its delivery as its lease (the lease deadline is the delivery
 *      deadline):
 *        DONE    -> ack as a duplicate
 *        BUSY    -> another holder: return it (not counted as an attempt)
 *                   after min(busy_retry, the holder's lease left)
 *        CLAIMED -> in order, call the handler, no lock held
 *                     OK    -> stage for commit
 *                     RETRY -> give the claim up; nack with backoff
 *                     FAIL  -> stage like OK, with no outputs: the id
 *                              settles as dead (a later duplicate of a
 *                              poison event is a duplicate, not a second
 *                              dead letter)
 *      A dying delivery (max receives, TTL) is not run: claimed, it is
 *      staged like a FAIL with the queue's reason.
 *   C. settle a range of the batch:
 *        pin the staged messages (queue backend): a pinned message cannot
 *        time out, so the ack after a successful commit cannot be refused;
 *        one already delivered again is dropped with its outputs;
 *        commit them (ledger), fenced by token and lease: a refused commit
 *        (lease lost) discards the outputs, the message is delivered again;
 *        then the queue ops: acks, nacks, returns, dead letters. A ledger
 *        with OQ__LEDGER_SETTLES carries out the queue ops in its commit
 *        (one round trip: Redis); an asynchronous ledger (SQLite's group
 *        commit) takes the pinned delivery and hands it back to
 *        engine_done() when the commit is durable.
 *      A range is settled when the batch ends, before each next handler
 *      call that may block (so a finished message never waits behind a
 *      hanging batch-mate until its lease is gone), and once half of the
 *      batch's lease has passed.
 *
 * Outcomes are counted only when the backend accepted them, so each
 * message is counted once.
 *
 * Threads and contexts: every worker attaches its own queue and ledger
 * context (a backend's connection may not be thread-safe); the heartbeat
 * thread has its own, and so does the thread that completes asynchronous
 * commits (one done context, used by one ledger thread at a time).
 *
 * Locks: the engine takes no lock around a backend call. p->mu guards
 * only p->running (for stop's timed wait); each worker's hb.mu (a leaf)
 * what its running handler holds, for the heartbeat thread: the heartbeat
 * thread marks a beat in progress under it, lets go, extends, and marks
 * the end; the worker's beat_stop waits for a beat in progress, so the
 * slot a beat reads stays valid. No lock is held across a handler call.
 *
 * Stop: oq_pool_stop sets p->stopping; a worker finishes the message its
 * handler is running, returns the rest of its batch unprocessed (RETURN,
 * delay 0, claims given up), settles, and exits. Nothing un-acked is lost.
 */
#include "oq_internal.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

enum outcome {
    O_NONE,      /* nothing to count (stale, stopped, redo) */
    O_RUN,       /* claimed: the handler is to run */
    O_PROCESSED, /* committed; ack */
    O_DUPLICATE, /* DONE at claim; ack */
    O_RETRY,     /* nack with backoff */
    O_BUSY,      /* returned: another worker holds the id */
    O_DEAD,      /* dead-lettered: handler FAIL, or dying */
    O_COMMIT,    /* staged: handler OK, to be pinned and committed */
    O_REJECTED,  /* dead-lettered: decode failed */
    O_FAILING,   /* staged: to be pinned, committed as dead, and
                    dead-lettered (a later duplicate is a duplicate) */
    O_REDO,      /* its id is in the batch already: redo after the batch */
    O_HANDED     /* taken by an asynchronous ledger, which hands it back */
};

typedef struct slot {
    oq_delivery d;
    oq_event ev;      /* the decoded event (id, parsed) */
    bool decoded;     /* ev is set (kept across a redo) */
    bool by_ledger;   /* its queue op was carried out by the ledger */
    bool fenced;      /* counted as fenced already (a delivery counts once) */
    bool cancelled;   /* O_RETRY: the handler was cancelled (not an attempt) */
    oq_dlq_reason dead_reason; /* O_FAILING: FAILED, or a dying delivery's */
    oq_txn *txn;
    oq__lclaim claim;
    enum outcome outcome;
} slot;

/*
 * What a worker's running handler holds, for the heartbeat thread: set by
 * the worker before and after each handler call that may block, under mu
 * (a leaf). beating: the heartbeat thread is extending s's lease now (with
 * mu let go); beat_stop waits for it to end before the slot can change.
 */
typedef struct heartbeat {
    pthread_mutex_t mu;
    pthread_cond_t cv;        /* beating went false */
    bool active;              /* a handler is running on s */
    bool beating;
    struct slot *s;
    int64_t extended_ms;      /* when its lease was last set (engine clock) */
    int64_t attempt_end_ms;   /* opts.timeout_ms after the start, or max */
} heartbeat;

/* Per-worker counters: written by one thread, read by stats_get. */
typedef struct counters {
    _Atomic uint64_t processed, duplicates, dead, rejected, retried, busy,
        fenced, handler_calls, batches;
} counters;

typedef struct worker {
    struct oq_pool *p;
    pthread_t thread;
    void *qctx, *lctx;  /* this worker's backend contexts */
    uint64_t rng;       /* jitter PRNG state; this worker's only */
    oq_delivery *d;     /* opts.batch of them: receive buffer */
    slot *slots;        /* opts.batch of them */
    oq_settle *ops;     /* opts.batch of them: the queue op of each slot */
    oq_settle *pins;    /* opts.batch of them */
    oq__lclaim *claims; /* opts.batch of them: one ledger claim call */
    oq__lcommit *lcs;   /* opts.batch of them: one ledger commit call */
    size_t *order;      /* opts.batch of them: slot of each claim/commit */
    double avg_ms;      /* moving average of a message's time, ms */
    heartbeat hb;
    counters c;
    /* Time per message (decode, claim, handler), by bucket of
     * oq__metrics_buckets (the last: above them all), and its sum. */
    _Atomic uint64_t hist[OQ__HIST_BUCKETS + 1];
    _Atomic uint64_t hist_ns;
} worker;

struct oq_pool {
    const oq__queue_methods *qm;
    void *qb;
    const oq__ledger_methods *lm;
    void *lb;
    oq__mem_ledger mem;  /* oq_pool_start's ledger */
    oq__engine_hooks hooks; /* immutable after start */
    oq_pool_opts opts;   /* immutable after start */
    worker *w;           /* opts.workers of them */
    _Atomic int stopping;
    bool joined;

    pthread_mutex_t mu;
    pthread_cond_t cv;   /* a worker exited */
    unsigned running;    /* guarded by mu */

    /* Heartbeats (opts.lease_ms > 0): one thread extends the lease of
     * every running handler's message a third of a lease at a time. */
    pthread_t hb_thread;
    bool hb_started, hb_joined;
    void *hb_qctx, *hb_lctx;
    _Atomic uint64_t lease_extensions;
    _Atomic size_t fit;  /* a worker's last fit(): for oq__engine_fit */

    /* Asynchronous commits handed back (engine_done), on the ledger's
     * thread with these contexts. */
    void *done_qctx;
    counters done;
};

void oq_pool_opts_init(oq_pool_opts *o, size_t size)
{
    oq_pool_opts d = { .size = sizeof(d) };

    d.workers = 2;
    d.batch = 16;
    d.backoff_base_ms = 100;
    d.backoff_cap_ms = 30000;
    d.busy_retry_ms = 10;
    d.poll_ms = 100;
    oq__opts_init(o, size, &d, sizeof(d));
}

int64_t oq_backoff_ms(int64_t base_ms, int64_t cap_ms, uint32_t attempt,
                      uint64_t *rng)
{
    int64_t ceil = base_ms;

    if (base_ms <= 0 || cap_ms <= 0)
        return 0;
    /* base * 2^(attempt-1), saturating at cap. */
    for (uint32_t i = 1; i < attempt && ceil < cap_ms; i++)
        ceil = ceil > INT64_MAX / 2 ? INT64_MAX : ceil * 2;
    ceil = OQ__MIN(ceil, cap_ms);
    return (int64_t)(oq__splitmix64(rng) % ((uint64_t)ceil + 1));
}

#define INC(c, field) atomic_fetch_add_explicit(&(c)->field, 1, \
                                                memory_order_relaxed)

static bool staged(enum outcome o)
{
    return o == O_COMMIT || o == O_FAILING;
}

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

static int64_t backoff(worker *w, const slot *s)
{
    const oq_pool_opts *o = &w->p->opts;
    return oq_backoff_ms(o->backoff_base_ms, o->backoff_cap_ms,
                         s->d.receive_count, &w->rng);
}

/* The op that dead-letters s with reason and its txn's error text. */
static void set_dead(slot *s, oq_settle *op, oq_dlq_reason reason)
{
    op->op = OQ_SETTLE_DEAD;
    op->reason = reason;
    op->error = oq_txn_error_text(s->txn);
}

static void reject(slot *s, oq_settle *op, oq_dlq_reason reason,
                   const char *error)
{
    oq__txn_reset(s->txn);
    oq_txn_error(s->txn, "%s", error);
    s->outcome = O_REJECTED;
    set_dead(s, op, reason);
}

/* Finds the event id, through the decode hook if there is one. Returns
 * false if the message is to be dead-lettered (op is set up for it). */
static bool decode(worker *w, slot *s, oq_settle *op)
{
    oq_pool *p = w->p;
    oq_event *ev = &s->ev;
    oq_decoded dec;

    if (s->decoded)
        return true;
    memset(ev, 0, sizeof(*ev));
    ev->id = s->d.id;
    ev->id_len = s->d.id_len;
    ev->payload = s->d.payload;
    ev->payload_len = s->d.payload_len;
    ev->tag = s->d.tag;
    ev->receipt = s->d.receipt;
    ev->attempt = s->d.receive_count;
    ev->deadline_ms = s->d.deadline_ms;
    ev->clock = p->opts.clock;
    if (p->opts.decode == NULL) {
        s->decoded = true;
        if (ev->id_len > 0)
            return true;
        /* Without a decode hook the message id is the event id; an id-less
         * message would collide with every other one. */
        reject(s, op, OQ_DLQ_BAD_ID, "message has no id (and the pool has "
                                     "no decode hook)");
        return false;
    }
    /* Not a memset: error[] is 256 bytes, a tenth of a fast event's
     * engine work; an empty string reads the same. */
    dec.id = NULL;
    dec.id_len = 0;
    dec.parsed = NULL;
    dec.reason = (oq_dlq_reason)0;
    dec.error[0] = '\0';
    if (p->opts.decode(ev, &dec, p->opts.decode_arg) != 0) {
        dec.error[sizeof(dec.error) - 1] = '\0';
        if (dec.parsed && dec.id_len > 0 && ev->id_len == 0) {
            /* The hook found the id before it refused the event (a bad
             * request): it names the dead letter, and what was parsed is
             * freed with the slot. */
            ev->id = dec.id;
            ev->id_len = dec.id_len;
            ev->parsed = dec.parsed;
        } else if (dec.parsed && p->opts.free_parsed) {
            p->opts.free_parsed(dec.parsed, p->opts.decode_arg);
        }
        reject(s, op, (unsigned)dec.reason < OQ_DLQ__COUNT ? dec.reason
                                                           : OQ_DLQ_REJECTED,
               dec.error);
        return false;
    }
    ev->id = dec.id;
    ev->id_len = dec.id_len;
    ev->parsed = dec.parsed;
    s->decoded = true;
    return true;
}

/* Is the id of slot i already in slots [0, i) to be claimed or run? */
static bool earlier_in_batch(const worker *w, size_t i)
{
    const slot *s = &w->slots[i];

    for (size_t j = 0; j < i; j++) {
        const slot *t = &w->slots[j];
        if (t->outcome == O_RUN && t->claim.dg.lo == s->claim.dg.lo &&
            t->claim.dg.hi == s->claim.dg.hi &&
            t->ev.id_len == s->ev.id_len &&
            memcmp(t->ev.id, s->ev.id, s->ev.id_len) == 0)
            return true;
    }
    return false;
}

/* ------------------------------------------------------------ heartbeats */

/* The handler of s starts: the heartbeat thread keeps its lease until it
 * returns (or its attempt's timeout passes). Returns the handler's
 * deadline: the end of the attempt. */
static int64_t beat_start(worker *w, slot *s, int64_t now)
{
    oq_pool *p = w->p;
    heartbeat *hb = &w->hb;
    int64_t end = p->opts.timeout_ms > 0 ? oq__add_ms(now, p->opts.timeout_ms)
                                         : INT64_MAX;

    pthread_mutex_lock(&hb->mu);
    hb->active = true;
    hb->s = s;
    /* When its lease was last set: the delivery (a message that waited in
     * its batch is due for a heartbeat sooner, maybe at once). */
    hb->extended_ms = s->d.deadline_ms - p->opts.lease_ms;
    hb->attempt_end_ms = end;
    pthread_mutex_unlock(&hb->mu);
    return end;
}

/* oq_txn_heartbeat of the running handler: the attempt ends a timeout
 * from now. Returns the new end. */
static int64_t beat_more(void *arg)
{
    worker *w = arg;
    oq_pool *p = w->p;
    int64_t now = oq_clock_now(p->opts.clock), end;

    end = p->opts.timeout_ms > 0 ? oq__add_ms(now, p->opts.timeout_ms)
                                 : INT64_MAX;
    pthread_mutex_lock(&w->hb.mu);
    w->hb.attempt_end_ms = end;
    pthread_mutex_unlock(&w->hb.mu);
    return end;
}

static void beat_stop(worker *w)
{
    pthread_mutex_lock(&w->hb.mu);
    w->hb.active = false;
    while (w->hb.beating)
        pthread_cond_wait(&w->hb.cv, &w->hb.mu);
    w->hb.s = NULL;
    pthread_mutex_unlock(&w->hb.mu);
}

/* One heartbeat for worker w: extends its running message's delivery and
 * claim by a lease once a third of the lease has passed since the last
 * time, until the attempt's end. */
static void beat(oq_pool *p, worker *w, int64_t now)
{
    heartbeat *hb = &w->hb;
    int64_t lease = p->opts.lease_ms;
    slot *s;
    oq_settle op;

    pthread_mutex_lock(&hb->mu);
    if (!hb->active || now - hb->extended_ms < lease / 3 ||
        now >= hb->attempt_end_ms) {
        pthread_mutex_unlock(&hb->mu);
        return;
    }
    hb->extended_ms = now;
    hb->beating = true;
    s = hb->s;
    pthread_mutex_unlock(&hb->mu);
    /* The queue first: a message delivered again since cannot be
     * extended, and then its claim is not either. The worker waits in
     * beat_stop while we read s. */
    op = (oq_settle){ .d = &s->d, .op = OQ_SETTLE_EXTEND,
                      .delay_ms = lease };
    p->qm->settle(p->hb_qctx, &op, 1);
    if (op.result == 0 &&
        p->lm->extend(p->hb_lctx, &s->claim, oq__add_ms(now, lease)) == 0)
        atomic_fetch_add_explicit(&p->lease_extensions, 1,
                                  memory_order_relaxed);
    pthread_mutex_lock(&hb->mu);
    hb->beating = false;
    pthread_cond_broadcast(&hb->cv);
    pthread_mutex_unlock(&hb->mu);
}

/* How often the heartbeat thread looks, in real ms (it reads the engine
 * clock each time, so a test clock works too). */
#define BEAT_SLICE_MS 5

static void *heartbeat_main(void *arg)
{
    oq_pool *p = arg;

    while (!atomic_load(&p->stopping)) {
        int64_t now = oq_clock_now(p->opts.clock);
        for (unsigned i = 0; i < p->opts.workers; i++)
            beat(p, &p->w[i], now);
        nap_ms(BEAT_SLICE_MS);
    }
    return NULL;
}

/* ------------------------------------------------------------- phase A, B */

/* Decodes slots [0, n) and claims their ids with one ledger call. */
static void claim_batch(worker *w, size_t n)
{
    oq_pool *p = w->p;
    int64_t now = oq_clock_now(p->opts.clock);
    size_t k = 0;
    /* A filter of the digests claimed so far in this batch: only an id
     * whose bit is set can be a same-batch duplicate (no pairwise scan
     * for the others). */
    uint64_t seen[4] = { 0, 0, 0, 0 };
    int rc;

    for (size_t i = 0; i < n; i++) {
        slot *s = &w->slots[i];
        oq_settle *op = &w->ops[i];
        unsigned bit;
        memset(op, 0, sizeof(*op));
        op->d = &s->d;
        op->release = 1;
        s->outcome = O_NONE;
        s->by_ledger = false;
        s->fenced = false;
        s->cancelled = false;
        if (now >= s->d.deadline_ms) {
            /* Its delivery ended while it waited (a slow batch-mate): it
             * is delivered again or will be; do not run it for nothing. */
            INC(&w->c, fenced);
            continue;
        }
        if (!decode(w, s, op))
            continue;
        s->claim = (oq__lclaim){ .id = s->ev.id, .id_len = s->ev.id_len,
                                 .dg = oq__idset_digest(s->ev.id,
                                                        s->ev.id_len),
                                 .d = &s->d };
        bit = (unsigned)(s->claim.dg.lo & 255);
        if ((seen[bit / 64] >> (bit % 64) & 1) && earlier_in_batch(w, i)) {
            s->outcome = O_REDO;
            op->op = OQ_SETTLE_NONE;
            op->release = 0;
            continue;
        }
        seen[bit / 64] |= 1ULL << (bit % 64);
        s->outcome = O_RUN;
        w->claims[k] = s->claim;
        w->order[k++] = i;
    }
    if (k == 0)
        return;
    rc = p->lm->claim(w->lctx, w->claims, k);
    for (size_t j = 0; j < k; j++) {
        slot *s = &w->slots[w->order[j]];
        oq_settle *op = &w->ops[w->order[j]];
        if (rc != 0)
            w->claims[j].status = rc;
        s->claim = w->claims[j];
        switch (s->claim.status) {
        case OQ_CLAIMED:
            break;
        case OQ_DONE:
            s->outcome = O_DUPLICATE;
            op->op = OQ_SETTLE_ACK;
            break;
        case OQ_BUSY: {
            /* Another worker holds it: try again soon, not as an attempt. */
            int64_t left = s->claim.holder_deadline_ms - now;
            s->outcome = O_BUSY;
            op->op = OQ_SETTLE_RETURN;
            op->delay_ms = OQ__MAX(OQ__MIN(p->opts.busy_retry_ms, left), 1);
            break;
        }
        case OQ_EINVAL:
            /* An id the ledger cannot take (from a decode hook). */
            reject(s, op, OQ_DLQ_BAD_ID, "invalid id");
            break;
        default:
            /* Out of memory, or the ledger failed: a real attempt, retried
             * with backoff, so a lasting failure ends in the dead letters
             * instead of spinning. */
            s->outcome = O_RETRY;
            op->op = OQ_SETTLE_NACK;
            op->error = "cannot claim the id";
            op->delay_ms = backoff(w, s);
            break;
        }
    }
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The claim is given up and the message nacked with backoff (an
 * attempt). */
static void retry_later(worker *w, slot *s, oq_settle *op, const char *error)
{
    oq_pool *p = w->p;

    s->outcome = O_RETRY;
    op->op = OQ_SETTLE_NACK;
    op->error = error;
    op->delay_ms = backoff(w, s);
    /* A ledger that settles the queue releases it with the nack. */
    if (!(p->lm->flags & OQ__LEDGER_SETTLES))
        p->lm->release(w->lctx, &s->claim, 1);
}

/* The reply hook, if there is one: the event's reply (a request's) goes
 * into its txn, to be committed with the id. */
static int stage_reply(worker *w, slot *s, oq__reply_status st)
{
    oq_pool *p = w->p;
    oq_event ev = s->ev;

    if (p->hooks.reply == NULL)
        return 0;
    ev.attempt = s->d.receive_count;
    return p->hooks.reply(&ev, s->txn, st, p->hooks.arg);
}

/* The error of a dead letter for want of attempts. */
static void no_attempts_left(oq_txn *txn, const char *last_error)
{
    oq_txn_error(txn, "no attempts left (the maximum number of deliveries "
                 "was reached)%s%s", last_error ? "; last error: " : "",
                 last_error ? last_error : "");
}

/* Stages the claimed slot s as dead (reason): its id settles as dead,
 * fenced like a commit, so every other copy is a duplicate. */
static void settle_dead(worker *w, slot *s, oq_settle *op,
                        oq_dlq_reason reason)
{
    s->dead_reason = reason;
    s->outcome = O_FAILING;
    if (stage_reply(w, s, OQ__REPLY_DEAD) != 0)
        retry_later(w, s, op, "cannot stage the reply");
}

/* Runs the handler of a claimed slot and decides its op. now is the
 * engine clock's time. */
static void run_one(worker *w, slot *s, oq_settle *op, int64_t now)
{
    oq_pool *p = w->p;
    oq_event ev = s->ev;
    bool beats;
    int rc;

    oq__txn_reset(s->txn);
    if (s->d.dying) {
        /* Due for the dead letters (max receives, TTL), and not processed:
         * settle the id as dead, like a handler FAIL, so that every other
         * copy of the event is a duplicate. It does not run again. */
        if (s->d.dying_reason == OQ_DLQ_EXPIRED)
            oq_txn_error(s->txn, "message older than its TTL%s%s",
                         s->d.last_error ? "; last error: " : "",
                         s->d.last_error ? s->d.last_error : "");
        else if (s->d.dying_reason == OQ_DLQ_MAX_ATTEMPTS)
            no_attempts_left(s->txn, s->d.last_error);
        else /* a backend's own reason (a late reply): its error says */
            oq_txn_error(s->txn, "%s", s->d.last_error ? s->d.last_error
                                                       : "dead on arrival");
        settle_dead(w, s, op, s->d.dying_reason);
        return;
    }
    INC(&w->c, handler_calls);
    /* A handler that only computes cannot outlast its lease: no
     * heartbeats for it. */
    beats = p->opts.lease_ms > 0 && !p->opts.handler_never_blocks;
    if (beats) {
        ev.deadline_ms = beat_start(w, s, now);
        oq__txn_set_heartbeat(s->txn, beat_more, w);
    }
    rc = p->opts.handler ? p->opts.handler(&ev, s->txn, p->opts.handler_arg)
                         : OQ_OK;
    /* Stopped by onceq's stop (a signal), not failed: retried, and not
     * an attempt. */
    if ((s->cancelled = rc == OQ__CANCELLED))
        rc = OQ_RETRY;
    if (beats) {
        oq__txn_set_heartbeat(s->txn, NULL, NULL);
        beat_stop(w);
    }
    if (rc == OQ_OK || rc != OQ_RETRY) {
        if (rc != OQ_OK && rc != OQ_FAIL)
            oq_txn_error(s->txn, "handler returned %d", rc);
        if (stage_reply(w, s, rc == OQ_OK ? OQ__REPLY_OK
                                          : OQ__REPLY_FAILED) != 0) {
            retry_later(w, s, op, "cannot stage the reply");
            return;
        }
    }
    switch (rc) {
    case OQ_OK:
        s->outcome = O_COMMIT;
        return;
    case OQ_RETRY:
        if (p->hooks.max_attempts && !s->cancelled &&
            s->d.receive_count >= p->hooks.max_attempts) {
            /* Its last attempt: dead now, in every backend alike. */
            char err[1024];
            snprintf(err, sizeof(err), "%s", oq_txn_error_text(s->txn));
            oq__txn_reset(s->txn);
            no_attempts_left(s->txn, err[0] ? err : NULL);
            settle_dead(w, s, op, OQ_DLQ_MAX_ATTEMPTS);
            return;
        }
        retry_later(w, s, op, oq_txn_error_text(s->txn));
        return;
    default:
        /* A permanent failure settles the id too, fenced like a commit:
         * the event's outcome is "dead-lettered", decided once. */
        s->dead_reason = OQ_DLQ_FAILED;
        s->outcome = O_FAILING;
        return;
    }
}

/* ---------------------------------------------------------------- phase C */

static void count(counters *c, enum outcome o)
{
    switch (o) {
    case O_PROCESSED: INC(c, processed); break;
    case O_DUPLICATE: INC(c, duplicates); break;
    case O_RETRY: INC(c, retried); break;
    case O_BUSY: INC(c, busy); break;
    case O_DEAD: INC(c, dead); break;
    case O_REJECTED: INC(c, rejected); break;
    default: break;
    }
}

/* Pins the staged messages of [lo, hi) (one queue call); a message
 * delivered again since is dropped with its outputs. */
static void pin_staged(worker *w, size_t lo, size_t hi)
{
    oq_pool *p = w->p;
    size_t k = 0;

    for (size_t i = lo; i < hi; i++)
        if (staged(w->slots[i].outcome))
            w->pins[k++] = (oq_settle){ .d = &w->slots[i].d,
                                        .op = OQ_SETTLE_PIN };
    if (k == 0)
        return;
    p->qm->settle(w->qctx, w->pins, k);
    k = 0;
    for (size_t i = lo; i < hi; i++) {
        slot *s = &w->slots[i];
        if (!staged(s->outcome) || w->pins[k++].result == 0)
            continue;
        /* Redelivered already: the new holder owns it. */
        p->lm->release(w->lctx, &s->claim, 1);
        s->outcome = O_NONE;
        w->ops[i].op = OQ_SETTLE_NONE;
        INC(&w->c, fenced);
    }
}

/* The ledger commit entry of slot s, or false if it has none. */
static bool commit_entry(const oq_pool *p, slot *s, oq_settle *op,
                         oq__lcommit *e)
{
    bool settles = p->lm->flags & OQ__LEDGER_SETTLES;

    *e = (oq__lcommit){ .claim = &s->claim, .ev = &s->ev, .txn = s->txn,
                        .op = op };
    switch (s->outcome) {
    case O_COMMIT:
        e->kind = OQ__LC_COMMIT;
        op->op = OQ_SETTLE_ACK;
        return true;
    case O_FAILING:
        e->kind = OQ__LC_DEAD;
        set_dead(s, op, s->dead_reason);
        return true;
    case O_DUPLICATE:
        e->kind = OQ__LC_ACK;
        return settles;
    case O_RETRY:
        e->kind = OQ__LC_RETRY;
        e->not_an_attempt = s->cancelled;
        return settles;
    case O_REJECTED:
        e->kind = OQ__LC_REJECT;
        e->claim = NULL;
        return settles;
    default:
        return false;
    }
}

/* After the ledger's commit of s's entry. */
static void committed(worker *w, slot *s, oq_settle *op, int result)
{
    oq_pool *p = w->p;
    bool settles = p->lm->flags & OQ__LEDGER_SETTLES;

    if (!staged(s->outcome)) {
        /* A queue op a SETTLES ledger carried out. */
        s->by_ledger = true;
        op->result = result;
        return;
    }
    if (result == OQ__PENDING) {
        /* The ledger holds the pinned delivery now. */
        s->outcome = O_HANDED;
        op->op = OQ_SETTLE_NONE;
        op->release = 0;
        s->d.msg_ = NULL;
        return;
    }
    if (result == OQ_ESTALE) {
        /* Lease lost: the outputs are discarded; it will be redone. */
        s->outcome = O_NONE;
        op->op = OQ_SETTLE_NACK;
        op->delay_ms = 0;
        s->fenced = true;
        INC(&w->c, fenced);
        if (settles)
            s->by_ledger = true, op->result = 0;
        return;
    }
    if (result != 0) {
        /* Nothing written, the claim given back: retry it later. */
        s->outcome = O_RETRY;
        op->op = OQ_SETTLE_NACK;
        op->error = "cannot commit the event";
        op->delay_ms = backoff(w, s);
        return;
    }
    s->outcome = s->outcome == O_FAILING ? O_DEAD : O_PROCESSED;
    if (settles) {
        s->by_ledger = true;
        op->result = 0;
    }
}

/* Counts a settled slot (each once: only what the backend accepted) and
 * frees what decode parsed. */
static void count_settled(worker *w, slot *s, const oq_settle *op)
{
    oq_pool *p = w->p;

    if (op->op != OQ_SETTLE_NONE && op->result != 0 && !s->fenced)
        INC(&w->c, fenced); /* the receipt went stale under us */
    else if (s->outcome == O_DUPLICATE && p->opts.sink.duplicate)
        p->opts.sink.duplicate(&s->ev, p->opts.sink.arg);
    if (op->op == OQ_SETTLE_NONE || op->result == 0)
        count(&w->c, s->outcome);
    if (s->ev.parsed && p->opts.free_parsed)
        p->opts.free_parsed(s->ev.parsed, p->opts.decode_arg);
    s->ev.parsed = NULL;
}

/* Phase C for slots [lo, hi): pin, commit, settle, count. */
static void settle_range(worker *w, size_t lo, size_t hi)
{
    oq_pool *p = w->p;
    size_t k = 0;

    pin_staged(w, lo, hi);
    for (size_t i = lo; i < hi; i++)
        if (commit_entry(p, &w->slots[i], &w->ops[i], &w->lcs[k]))
            w->order[k++] = i;
    if (k > 0) {
        p->lm->commit(w->lctx, w->lcs, k);
        for (size_t j = 0; j < k; j++) {
            size_t i = w->order[j];
            committed(w, &w->slots[i], &w->ops[i], w->lcs[j].result);
        }
    }
    /* The duplicate hook reads the event (its id and payload live in the
     * delivery's message): its deliveries are released after it runs. */
    if (p->opts.sink.duplicate)
        for (size_t i = lo; i < hi; i++)
            if (w->slots[i].outcome == O_DUPLICATE)
                w->ops[i].release = 0;
    /* The queue ops the ledger did not carry out, and the release of
     * every delivery: in place when the range has no redo and the ledger
     * carried out none, else through a copy. */
    for (k = lo; k < hi; k++)
        if (w->slots[k].outcome == O_REDO || w->slots[k].by_ledger)
            break;
    if (k == hi) {
        p->qm->settle(w->qctx, w->ops + lo, hi - lo);
        for (size_t i = lo; i < hi; i++)
            count_settled(w, &w->slots[i], &w->ops[i]);
    } else {
        k = 0;
        for (size_t i = lo; i < hi; i++) {
            slot *s = &w->slots[i];
            if (s->outcome == O_REDO)
                continue;
            w->pins[k] = w->ops[i];
            if (s->by_ledger)
                w->pins[k].op = OQ_SETTLE_NONE;
            k++;
        }
        if (k > 0)
            p->qm->settle(w->qctx, w->pins, k);
        k = 0;
        for (size_t i = lo; i < hi; i++) {
            slot *s = &w->slots[i];
            if (s->outcome == O_REDO)
                continue;
            if (!s->by_ledger)
                w->ops[i].result = w->pins[k].result;
            k++;
            count_settled(w, s, &w->ops[i]);
        }
    }
    k = 0;
    for (size_t i = lo; i < hi; i++)
        if (w->slots[i].outcome == O_DUPLICATE && !w->ops[i].release)
            w->pins[k++] = (oq_settle){ .d = &w->slots[i].d,
                                        .op = OQ_SETTLE_NONE, .release = 1 };
    if (k > 0)
        p->qm->settle(w->qctx, w->pins, k);
}

/* ------------------------------------------------------------ the loop */

/* Handlers slower than this (ms, moving average) are received and
 * committed one by one: a fast message must not wait in a batch behind a
 * slow one, or it may outlive its lease. Faster ones go per batch. */
#define SLOW_HANDLER_MS 1.0
/* With fast handlers that never block, run_batch reads the clock once
 * every this many events. */
#define CLOCK_EVERY 8

/* The histogram's bucket bounds, seconds (the library keeps the counts,
 * the CLI's metrics module prints them). */
const double oq__metrics_buckets[OQ__HIST_BUCKETS] = {
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60,
};

/* n handler calls of ns each (on average) into the worker's histogram. */
static void observe(worker *w, int64_t ns, uint64_t n)
{
    double s = (double)ns / 1e9;
    int b = 0;

    while (b < OQ__HIST_BUCKETS && s > oq__metrics_buckets[b])
        b++;
    atomic_fetch_add_explicit(&w->hist[b], n, memory_order_relaxed);
    atomic_fetch_add_explicit(&w->hist_ns, (uint64_t)ns * n,
                              memory_order_relaxed);
}

static void note_duration(worker *w, int64_t ns, uint64_t n)
{
    w->avg_ms = 0.8 * w->avg_ms + 0.2 * ((double)ns / 1e6);
    observe(w, ns, n);
}

/* Gives up the claims of the slots that will not run (stop). */
static void return_unstarted(worker *w, slot *s, oq_settle *op)
{
    oq_pool *p = w->p;

    if (s->outcome == O_RUN)
        p->lm->release(w->lctx, &s->claim, 1);
    s->outcome = O_NONE;
    op->op = OQ_SETTLE_RETURN;
    op->delay_ms = 0;
}

/* Runs phases A-C over slots[0..n); returns how many were left to redo
 * (moved to the front of slots). */
static size_t run_batch(worker *w, size_t n)
{
    oq_pool *p = w->p;
    size_t redo = 0, lo = 0;
    bool fast = w->avg_ms < SLOW_HANDLER_MS;
    /* Fast handlers that only compute read the clock every CLOCK_EVERY
     * events (a read costs 25-50 ns, about 4% of such an event); "now" is
     * then up to CLOCK_EVERY - 1 handler calls old (under a millisecond
     * each on average in fast mode, one slow call can be longer), which
     * only delays the checks below by as much: it is never ahead, and the
     * ledger's commit checks the lease with its own reading, so a handler
     * run after its lease ended is fenced at commit as before. */
    bool every = fast && p->opts.handler_never_blocks;
    int64_t t0 = mono_ns();
    int64_t start = oq_clock_now(p->opts.clock), now = start;
    size_t runs = 0, ran = 0;

    claim_batch(w, n);
    for (size_t i = 0; i < n; i++) {
        slot *s = &w->slots[i];
        oq_settle *op = &w->ops[i];

        if (s->outcome == O_RUN) {
            if (!every || runs++ % CLOCK_EVERY == 0)
                now = oq_clock_now(p->opts.clock);
            /* What is decided is committed before a handler that may
             * block, and once half the batch's lease is gone. */
            if (i > lo && (!p->opts.handler_never_blocks ||
                           now - start >= (w->slots[lo].d.deadline_ms -
                                           start) / 2)) {
                settle_range(w, lo, i);
                lo = i;
                now = oq_clock_now(p->opts.clock);
            }
            if (atomic_load(&p->stopping)) {
                return_unstarted(w, s, op);
            } else if (now >= s->d.deadline_ms) {
                /* Its lease ended before its turn (a slow batch-mate):
                 * it is delivered again; do not run it for nothing. */
                s->outcome = O_NONE;
                INC(&w->c, fenced);
            } else if (!fast) {
                int64_t t1 = mono_ns();
                run_one(w, s, op, now);
                note_duration(w, mono_ns() - t1, 1);
            } else {
                run_one(w, s, op, now);
                ran++;
            }
        }
        if (i + 1 == n || !fast) {
            settle_range(w, lo, i + 1);
            lo = i + 1;
        }
    }
    if (fast && ran > 0) {
        /* Fast mode: one time reading per batch, spread over the handler
         * calls (duplicates and the like made none) (a slow call here
         * switches to slow mode for the next batch). */
        note_duration(w, (mono_ns() - t0) / (int64_t)ran, ran);
    }
    for (size_t i = 0; i < n; i++) {
        slot *s = &w->slots[i];
        if (s->outcome == O_REDO) {
            /* Keep the delivery and what decode found; swap the txn
             * pointers so none is lost. */
            slot keep = *s;
            oq_txn *t = w->slots[redo].txn;
            w->slots[redo] = keep;
            w->slots[i].txn = t;
            redo++;
        }
    }
    return redo;
}

/* What the handler finishes in a quarter of a lease (at most opts.batch):
 * a batch never outlives its leases. */
static size_t fit(const worker *w)
{
    const oq_pool_opts *o = &w->p->opts;
    double f;

    if (o->lease_ms <= 0 || w->avg_ms <= 0)
        return o->batch;
    f = (double)o->lease_ms / 4 / w->avg_ms;
    return f < 1 ? 1 : f > o->batch ? o->batch : (size_t)f;
}

/* How many messages to take: what fits, and one at a time for slow
 * handlers (a batch would hold messages other workers could start). */
static size_t want(worker *w)
{
    size_t f = fit(w);

    atomic_store_explicit(&w->p->fit, f, memory_order_relaxed);
    return w->avg_ms >= SLOW_HANDLER_MS ? 1 : f;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    oq_pool *p = w->p;

    while (!atomic_load(&p->stopping)) {
        int n = p->qm->receive(w->qctx, w->d, want(w), p->opts.poll_ms);
        if (n == OQ_EOF)
            break;
        if (n <= 0)
            continue;
        INC(&w->c, batches);
        for (int i = 0; i < n; i++) {
            w->slots[i].d = w->d[i];
            w->slots[i].decoded = false;
            w->slots[i].ev.parsed = NULL;
        }
        for (size_t left = (size_t)n; left > 0;)
            left = run_batch(w, left);
    }
    pthread_mutex_lock(&p->mu);
    p->running--;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* --------------------------------------------------- asynchronous commits */

/* Deliveries an asynchronous ledger hands back (its thread): settle them
 * as their ops say when the commit is durable, or return them when it
 * failed (the ledger gave the claims back). */
static void engine_done(void *arg, oq_settle *ops, size_t n, int result)
{
    oq_pool *p = arg;

    for (size_t i = 0; i < n; i++) {
        ops[i].release = 1;
        if (result != 0) {
            ops[i].op = OQ_SETTLE_RETURN;
            ops[i].delay_ms = 0;
        }
    }
    p->qm->settle(p->done_qctx, ops, n);
    for (size_t i = 0; result == 0 && i < n; i++) {
        if (ops[i].result != 0)
            INC(&p->done, fenced);
        else if (ops[i].op == OQ_SETTLE_DEAD)
            INC(&p->done, dead);
        else
            INC(&p->done, processed);
    }
}

/* ------------------------------------------------------------ lifecycle */

static void free_workers(oq_pool *p)
{
    for (unsigned i = 0; p->w && i < p->opts.workers; i++) {
        worker *w = &p->w[i];
        for (unsigned j = 0; w->slots && j < p->opts.batch; j++)
            oq__txn_free(w->slots[j].txn);
        if (w->qctx)
            p->qm->detach(w->qctx);
        if (w->lctx)
            p->lm->detach(w->lctx);
        oq__free(w->slots);
        oq__free(w->ops);
        oq__free(w->pins);
        oq__free(w->claims);
        oq__free(w->lcs);
        oq__free(w->order);
        oq__free(w->d);
        pthread_cond_destroy(&w->hb.cv);
        pthread_mutex_destroy(&w->hb.mu);
    }
    oq__free(p->w);
    if (p->hb_qctx)
        p->qm->detach(p->hb_qctx);
    if (p->hb_lctx)
        p->lm->detach(p->hb_lctx);
    if (p->done_qctx)
        p->qm->detach(p->done_qctx);
}

static int alloc_workers(oq_pool *p)
{
    uint64_t seed = p->opts.seed ? p->opts.seed
                                 : (uint64_t)oq_clock_now(NULL) * 2654435761u;
    size_t b = p->opts.batch;
    int rc;

    p->w = oq__calloc(p->opts.workers, sizeof(*p->w));
    if (p->w == NULL)
        return OQ_ENOMEM;
    for (unsigned i = 0; i < p->opts.workers; i++) {
        worker *w = &p->w[i];
        w->p = p;
        pthread_mutex_init(&w->hb.mu, NULL);
        pthread_cond_init(&w->hb.cv, NULL);
        w->rng = seed + i * 0x9e3779b97f4a7c15ULL;
        w->avg_ms = 10 * SLOW_HANDLER_MS; /* one by one until measured */
        w->slots = oq__calloc(b, sizeof(*w->slots));
        w->ops = oq__calloc(b, sizeof(*w->ops));
        w->pins = oq__calloc(b, sizeof(*w->pins));
        w->claims = oq__calloc(b, sizeof(*w->claims));
        w->lcs = oq__calloc(b, sizeof(*w->lcs));
        w->order = oq__calloc(b, sizeof(*w->order));
        w->d = oq__calloc(b, sizeof(*w->d));
        if (w->slots == NULL || w->ops == NULL || w->pins == NULL ||
            w->claims == NULL || w->lcs == NULL || w->order == NULL ||
            w->d == NULL)
            return OQ_ENOMEM;
        for (unsigned j = 0; j < b; j++)
            if ((w->slots[j].txn = oq__txn_new()) == NULL)
                return OQ_ENOMEM;
        if ((rc = p->qm->attach(p->qb, &w->qctx)) != 0 ||
            (rc = p->lm->attach(p->lb, &w->lctx)) != 0)
            return rc;
    }
    if ((rc = p->qm->attach(p->qb, &p->done_qctx)) != 0)
        return rc;
    if (p->opts.lease_ms > 0 &&
        ((rc = p->qm->attach(p->qb, &p->hb_qctx)) != 0 ||
         (rc = p->lm->attach(p->lb, &p->hb_lctx)) != 0))
        return rc;
    return 0;
}

/* Stops and joins the workers already started. */
static void abort_start(oq_pool *p, unsigned started)
{
    atomic_store(&p->stopping, 1);
    p->qm->wake(p->qb);
    for (unsigned j = 0; j < started; j++)
        pthread_join(p->w[j].thread, NULL);
}

/* Starts the engine; lb NULL: the memory ledger over s and opts->sink. */
static int start(oq_pool **out, const oq__queue_methods *qm, void *qb,
                 const oq__ledger_methods *lm, void *lb, oq_idset *s,
                 const oq_pool_opts *opts, const oq__engine_hooks *hooks)
{
    oq_pool_opts o;
    oq_pool *p;
    int rc;

    oq_pool_opts_defaults(&o);
    if (out == NULL || qm == NULL || lm == NULL || qm->version < 1 ||
        lm->version < 1 || opts == NULL ||
        oq__opts_copy(&o, sizeof(o), opts) != 0 ||
        o.workers == 0 || o.batch == 0 || o.batch > 4096 ||
        o.reserved_[0] != NULL || o.reserved_[1] != NULL)
        return OQ_EINVAL;
    p = oq__calloc(1, sizeof(*p));
    if (p == NULL)
        return OQ_ENOMEM;
    p->qm = qm;
    p->qb = qb;
    p->lm = lm;
    p->lb = lb == NULL ? &p->mem : lb;
    p->opts = o;
    p->mem = (oq__mem_ledger){ .s = s, .sink = o.sink };
    if (hooks)
        p->hooks = *hooks;
    if (p->opts.poll_ms <= 0)
        p->opts.poll_ms = 100;
    pthread_mutex_init(&p->mu, NULL);
    oq__cond_init_monotonic(&p->cv);
    rc = alloc_workers(p);
    if (rc != 0)
        goto out_free;
    if (lm->set_done)
        lm->set_done(p->lb, engine_done, p);
    for (unsigned i = 0; i < p->opts.workers; i++) {
        rc = -pthread_create(&p->w[i].thread, NULL, worker_main, &p->w[i]);
        if (rc != 0) {
            abort_start(p, i);
            goto out_free;
        }
        pthread_mutex_lock(&p->mu);
        p->running++;
        pthread_mutex_unlock(&p->mu);
    }
    if (p->opts.lease_ms > 0 && !p->opts.handler_never_blocks) {
        rc = -pthread_create(&p->hb_thread, NULL, heartbeat_main, p);
        if (rc != 0) {
            abort_start(p, p->opts.workers);
            goto out_free;
        }
        p->hb_started = true;
    }
    *out = p;
    return 0;

out_free:
    free_workers(p);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    oq__free(p);
    return rc;
}

int oq__engine_start(oq_pool **out, const oq__queue_methods *qm, void *qb,
                     const oq__ledger_methods *lm, void *lb,
                     const oq_pool_opts *opts)
{
    return oq__engine_start_hooks(out, qm, qb, lm, lb, opts, NULL);
}

int oq__engine_start_hooks(oq_pool **out, const oq__queue_methods *qm,
                           void *qb, const oq__ledger_methods *lm, void *lb,
                           const oq_pool_opts *opts,
                           const oq__engine_hooks *hooks)
{
    if (lb == NULL)
        return OQ_EINVAL;
    return start(out, qm, qb, lm, lb, NULL, opts, hooks);
}

int oq_pool_start(oq_pool **out, oq_queue *q, oq_idset *s,
                  const oq_pool_opts *opts)
{
    if (q == NULL || s == NULL)
        return OQ_EINVAL;
    return start(out, &oq__mem_queue_methods, q, &oq__mem_ledger_methods,
                 NULL, s, opts, NULL);
}

/* Stops and joins the heartbeat thread (it never blocks for long). */
static void join_heartbeat(oq_pool *p)
{
    if (!p->hb_started || p->hb_joined)
        return;
    atomic_store(&p->stopping, 1);
    pthread_join(p->hb_thread, NULL);
    p->hb_joined = true;
}

static void join_all(oq_pool *p)
{
    if (p->joined)
        return;
    for (unsigned i = 0; i < p->opts.workers; i++)
        pthread_join(p->w[i].thread, NULL);
    join_heartbeat(p);
    p->joined = true;
}

int oq_pool_wait(oq_pool *p)
{
    join_all(p);
    return 0;
}

int oq_pool_stop(oq_pool *p, int64_t grace_ms)
{
    struct timespec until = oq__abstime_after(grace_ms);
    int busy = 0;

    atomic_store(&p->stopping, 1);
    p->qm->wake(p->qb);
    pthread_mutex_lock(&p->mu);
    while (p->running > 0) {
        if (grace_ms < 0) {
            pthread_cond_wait(&p->cv, &p->mu);
        } else if (pthread_cond_timedwait(&p->cv, &p->mu, &until) != 0) {
            busy = p->running > 0;
            break;
        }
    }
    pthread_mutex_unlock(&p->mu);
    /* No more heartbeats: a handler still running loses its lease, and
     * its late commit is fenced. */
    join_heartbeat(p);
    if (busy)
        return OQ_EBUSY;
    join_all(p);
    return 0;
}

static void add_counters(oq_pool_stats *out, counters *c)
{
    out->processed += atomic_load(&c->processed);
    out->duplicates += atomic_load(&c->duplicates);
    out->dead += atomic_load(&c->dead);
    out->rejected += atomic_load(&c->rejected);
    out->retried += atomic_load(&c->retried);
    out->busy += atomic_load(&c->busy);
    out->fenced += atomic_load(&c->fenced);
    out->handler_calls += atomic_load(&c->handler_calls);
    out->batches += atomic_load(&c->batches);
}

void oq_pool_stats_get(oq_pool *p, oq_pool_stats *out)
{
    memset(out, 0, sizeof(*out));
    for (unsigned i = 0; i < p->opts.workers; i++)
        add_counters(out, &p->w[i].c);
    add_counters(out, &p->done);
}

void oq__pool_histogram(oq_pool *p, uint64_t *buckets, uint64_t *count,
                        double *sum_s)
{
    uint64_t ns = 0;

    memset(buckets, 0, OQ__HIST_BUCKETS * sizeof(*buckets));
    *count = 0;
    for (unsigned i = 0; i < p->opts.workers; i++) {
        worker *w = &p->w[i];
        for (int b = 0; b <= OQ__HIST_BUCKETS; b++) {
            uint64_t v = atomic_load_explicit(&w->hist[b],
                                              memory_order_relaxed);
            if (b < OQ__HIST_BUCKETS)
                buckets[b] += v;
            *count += v;
        }
        ns += atomic_load_explicit(&w->hist_ns, memory_order_relaxed);
    }
    *sum_s = (double)ns / 1e9;
}

size_t oq__engine_fit(oq_pool *p)
{
    return atomic_load_explicit(&p->fit, memory_order_relaxed);
}

uint64_t oq__pool_lease_extensions(oq_pool *p)
{
    return atomic_load(&p->lease_extensions);
}

void oq_pool_free(oq_pool *p)
{
    if (p == NULL)
        return;
    if (!p->joined)
        oq_pool_stop(p, -1);
    free_workers(p);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    oq__free(p);
}
