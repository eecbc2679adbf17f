/*
 * The worker pool.
 *
 * DESIGN
 * ------
 * N worker threads compete on one oq_queue and one oq_idset. Each loop:
 *
 *   receive a batch (one queue lock)
 *   A. for each message, in order: claim its id (one shard lock)
 *        DONE    -> ack as a duplicate
 *        BUSY    -> held by our own earlier message in this batch: redo it
 *                   after phase D; held by another worker: return it (not
 *                   counted as an attempt) with a short delay
 *        CLAIMED -> call the handler, no lock held
 *                     OK    -> stage for commit
 *                     RETRY -> release the claim; nack with backoff
 *                     FAIL  -> stage like OK, with no outputs; after the
 *                              fenced commit, dead-letter instead of ack
 *                              (so a duplicate of a poison event is a
 *                              duplicate, not a second dead letter)
 *   B. pin every message staged for commit (one queue lock): a pinned
 *      message cannot time out, so the ack after a successful commit cannot
 *      be refused. A message whose receipt went stale (we overran the
 *      visibility timeout and it was redelivered) is dropped here with its
 *      outputs: the new holder owns it.
 *   C. commit each pinned id in the idset, fenced by its token and lease
 *      (shard lock); only then apply the txn to the sink. A refused commit
 *      (lease lost) discards the txn and makes the message visible again.
 *   D. settle the batch (one queue lock): acks, nacks, returns, dead letters,
 *      and release of every delivery. Outcomes are counted only when the
 *      queue accepted them, so each message is counted once.
 *
 * Durable mode (opts.committer set): phase C prepares each pinned claim
 * and hands the event to the committer (src/store.c), which writes it in a
 * group commit, then commits the claim and settles the message itself; the
 * pool neither applies, commits nor settles it, and counts it nowhere (the
 * committer counts processed events).
 *
 * Locks: the pool takes the queue lock and shard locks only inside
 * oq_queue_* and oq_idset_* calls, one at a time; they are leaves and are
 * never nested. p->mu guards only p->running (for stop's timed wait). No
 * lock is held across a handler call or a sink apply.
 *
 * Stop: oq_pool_stop sets p->stopping; a worker finishes the message its
 * handler is running, returns the rest of its batch unprocessed (RETURN,
 * delay 0), settles, and exits. Nothing un-acked is lost: it stays in the
 * queue.
 */
#include "oq_internal.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

enum outcome {
    O_NONE,      /* nothing to count (stale, or redo) */
    O_PROCESSED, /* committed; ack */
    O_DUPLICATE, /* DONE at claim; ack */
    O_RETRY,     /* nack with backoff */
    O_BUSY,      /* returned: another worker holds the id */
    O_DEAD,      /* dead-lettered: handler FAIL */
    O_COMMIT,    /* staged: handler OK, to be pinned and committed */
    O_REJECTED,  /* dead-lettered: decode failed */
    O_FAILING,   /* staged: handler FAIL, to be pinned, committed, and
                    dead-lettered (a later duplicate is a duplicate) */
    O_REDO,      /* BUSY on our own claim: retry after this batch */
    O_HANDED     /* prepared and handed to the committer, which settles
                    and counts it */
};

typedef struct slot {
    oq_delivery d;
    const char *id;   /* the event id: d.id, or what decode found */
    size_t id_len;
    void *parsed;     /* decode's parsed form, or NULL */
    bool decoded;     /* id/parsed are set (kept across a redo) */
    bool pinned;      /* pinned early: its lease no longer runs */
    bool prepared;    /* its claim is prepared (staged outcomes) */
    oq_dlq_reason dead_reason; /* O_FAILING: FAILED, or a dying delivery's */
    oq_txn *txn;
    oq__digest dg;    /* the id's digest, computed once after decode */
    oq_claim claim;
    enum outcome outcome;
} slot;

/*
 * What a worker's running handler holds, for the heartbeat thread: written
 * by the worker before and after each handler call that may block, read by
 * the heartbeat thread, both under mu (a leaf: the heartbeat thread copies
 * what it needs and lets go before it calls into the queue or the set).
 */
typedef struct heartbeat {
    pthread_mutex_t mu;
    bool active;          /* a handler is running on delivery receipt */
    uint64_t receipt;
    char id[OQ__MAX_ID_LEN];
    size_t id_len;
    oq__digest dg;
    uint64_t token;
    int64_t extended_ms;  /* when its lease was last set (pool clock) */
    int64_t attempt_end_ms; /* opts.timeout_ms after the start, or max */
} heartbeat;

/* Per-worker counters: written by one worker, read by stats_get. */
typedef struct counters {
    _Atomic uint64_t processed, duplicates, dead, rejected, retried, busy,
        fenced,
        handler_calls, batches;
} counters;

typedef struct worker {
    struct oq_pool *p;
    pthread_t thread;
    uint64_t rng;   /* jitter PRNG state; this worker's only */
    oq_delivery *d; /* opts.batch of them: receive buffer */
    slot *slots;    /* opts.batch of them */
    oq_settle *ops; /* opts.batch of them: phase A and D */
    oq_settle *pins; /* opts.batch of them: phase B */
    double avg_ms;  /* moving average of a message's phase A time, ms */
    heartbeat hb;   /* opts.lease_ms > 0 */
    counters c;
    /* Time per message in phase A (decode, claim, handler), by bucket of
     * oq__metrics_buckets (the last: above them all), and its sum. */
    _Atomic uint64_t hist[OQ__HIST_BUCKETS + 1];
    _Atomic uint64_t hist_ns;
} worker;

struct oq_pool {
    oq_queue *q;
    oq_idset *s;
    oq_pool_opts opts;  /* immutable after start */
    worker *w;          /* opts.workers of them */
    _Atomic int stopping;
    bool joined;

    pthread_mutex_t mu;
    pthread_cond_t cv;  /* a worker exited */
    unsigned running;   /* guarded by mu */

    /* Heartbeats (opts.lease_ms > 0): one thread extends the lease of
     * every running handler's message a third of a lease at a time. */
    pthread_t hb_thread;
    bool hb_started, hb_joined;
    _Atomic uint64_t lease_extensions;
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

#define INC(w, field) atomic_fetch_add_explicit(&(w)->c.field, 1, \
                                                memory_order_relaxed)

static void event_of(const oq_pool *p, const slot *s, oq_event *ev)
{
    ev->id = s->id;
    ev->id_len = s->id_len;
    ev->payload = s->d.payload;
    ev->payload_len = s->d.payload_len;
    ev->tag = s->d.tag;
    ev->receipt = s->d.receipt;
    ev->attempt = s->d.receive_count;
    ev->deadline_ms = s->d.deadline_ms;
    ev->clock = p->opts.clock;
    ev->parsed = s->parsed;
}

static bool staged(enum outcome o)
{
    return o == O_COMMIT || o == O_FAILING;
}

/* Did an earlier message of this batch claim the same id? */
static bool own_claim(const slot *slots, size_t i)
{
    for (size_t j = 0; j < i; j++)
        if (staged(slots[j].outcome) &&
            slots[j].id_len == slots[i].id_len &&
            slots[j].claim.token == slots[i].claim.token &&
            memcmp(slots[j].id, slots[i].id, slots[i].id_len) == 0)
            return true;
    return false;
}

/* Finds the event id, through the decode hook if there is one. Returns
 * false if the message must be dead-lettered (op is set up for it). */
static bool decode(worker *w, slot *s, oq_settle *op)
{
    oq_pool *p = w->p;
    oq_decoded dec;
    oq_event ev;

    if (s->decoded)
        return true;
    s->id = s->d.id;
    s->id_len = s->d.id_len;
    s->parsed = NULL;
    s->decoded = true;
    if (p->opts.decode == NULL) {
        if (s->id_len > 0)
            return true;
        /* Without a decode hook the message id is the event id; an id-less
         * message would collide with every other one. */
        oq__txn_reset(s->txn);
        oq_txn_error(s->txn, "message has no id (and the pool has no decode "
                             "hook)");
        s->outcome = O_REJECTED;
        op->op = OQ_SETTLE_DEAD;
        op->reason = OQ_DLQ_BAD_ID;
        op->error = oq_txn_error_text(s->txn);
        return false;
    }
    memset(&dec, 0, sizeof(dec));
    event_of(p, s, &ev);
    if (p->opts.decode(&ev, &dec, p->opts.decode_arg) != 0) {
        if (dec.parsed && p->opts.free_parsed)
            p->opts.free_parsed(dec.parsed, p->opts.decode_arg);
        oq__txn_reset(s->txn);
        oq_txn_error(s->txn, "%s", dec.error);
        s->outcome = O_REJECTED;
        op->op = OQ_SETTLE_DEAD;
        op->reason = (unsigned)dec.reason < OQ_DLQ__COUNT ? dec.reason
                                                          : OQ_DLQ_REJECTED;
        op->error = oq_txn_error_text(s->txn);
        return false;
    }
    s->id = dec.id;
    s->id_len = dec.id_len;
    s->parsed = dec.parsed;
    return true;
}

/* The handler of s starts: the heartbeat thread keeps its lease until it
 * returns (or its attempt's timeout passes). Returns the handler's
 * deadline: the end of the attempt. */
static int64_t beat_start(worker *w, const slot *s, int64_t now)
{
    oq_pool *p = w->p;
    heartbeat *hb = &w->hb;
    int64_t end = p->opts.timeout_ms > 0 ? oq__add_ms(now, p->opts.timeout_ms)
                                         : INT64_MAX;

    pthread_mutex_lock(&hb->mu);
    /* An id longer than the set's limit (a library caller's own id) gets
     * no heartbeats: its lease runs out as without them. */
    hb->active = s->id_len <= sizeof(hb->id);
    hb->receipt = s->d.receipt;
    if (hb->active)
        memcpy(hb->id, s->id, s->id_len);
    hb->id_len = s->id_len;
    hb->dg = s->dg;
    hb->token = s->claim.token;
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
    pthread_mutex_unlock(&w->hb.mu);
}

/* One heartbeat for worker w: extends its running message's visibility
 * and claim by a lease once a third of the lease has passed since the
 * last time, until the attempt's end. */
static void beat(oq_pool *p, worker *w, int64_t now)
{
    heartbeat *hb = &w->hb;
    int64_t lease = p->opts.lease_ms;
    char id[OQ__MAX_ID_LEN];
    size_t len;
    oq__digest dg;
    uint64_t receipt, token;

    pthread_mutex_lock(&hb->mu);
    if (!hb->active || now - hb->extended_ms < lease / 3 ||
        now >= hb->attempt_end_ms) {
        pthread_mutex_unlock(&hb->mu);
        return;
    }
    hb->extended_ms = now;
    receipt = hb->receipt;
    token = hb->token;
    dg = hb->dg;
    len = hb->id_len;
    memcpy(id, hb->id, len);
    pthread_mutex_unlock(&hb->mu);
    /* The queue first: a message delivered again since cannot be
     * extended, and then its claim is not either. */
    if (oq_queue_extend(p->q, receipt, lease) == 0 &&
        oq__idset_extend_d(p->s, id, len, dg, token,
                           oq__add_ms(now, lease)) == 0)
        atomic_fetch_add_explicit(&p->lease_extensions, 1,
                                  memory_order_relaxed);
}

/* How often the heartbeat thread looks, in real ms (it reads the pool
 * clock each time, so a test clock works too). */
#define BEAT_SLICE_MS 5

static void *heartbeat_main(void *arg)
{
    oq_pool *p = arg;
    struct timespec ts = { 0, BEAT_SLICE_MS * 1000000L };

    while (!atomic_load(&p->stopping)) {
        int64_t now = oq_clock_now(p->opts.clock);
        for (unsigned i = 0; i < p->opts.workers; i++)
            beat(p, &p->w[i], now);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* Phase A for one message: decode, claim and run the handler. now is the
 * pool clock's time. */
static void run_one(worker *w, slot *s, size_t i, oq_settle *op, int64_t now)
{
    oq_pool *p = w->p;
    int rc;

    op->d = &s->d;
    op->release = 1;
    if (now >= s->d.deadline_ms) {
        /* Its lease is over (a slow message before it in the batch): it
         * is redelivered or will be; do not run it for nothing. */
        s->outcome = O_NONE;
        op->op = OQ_SETTLE_NONE;
        INC(w, fenced);
        return;
    }
    if (!decode(w, s, op))
        return;
    s->dg = oq__idset_digest(s->id, s->id_len);
    rc = oq__idset_claim_d(p->s, s->id, s->id_len, s->dg, s->d.deadline_ms,
                           &s->claim);
    if (rc == OQ_DONE) {
        s->outcome = O_DUPLICATE;
        op->op = OQ_SETTLE_ACK;
        return;
    }
    if (rc == OQ_BUSY && own_claim(w->slots, i)) {
        s->outcome = O_REDO;
        op->op = OQ_SETTLE_NONE;
        op->release = 0;
        return;
    }
    if (rc == OQ_BUSY) {
        /* Another worker holds it: try again soon, not as an attempt. */
        int64_t left = s->claim.lease_deadline_ms - now;
        s->outcome = O_BUSY;
        op->op = OQ_SETTLE_RETURN;
        op->delay_ms = OQ__MAX(OQ__MIN(p->opts.busy_retry_ms, left), 1);
        return;
    }
    if (rc == OQ_EINVAL) {
        /* An id the set cannot take (from a decode hook): never valid. */
        oq__txn_reset(s->txn);
        oq_txn_error(s->txn, "invalid id");
        s->outcome = O_REJECTED;
        op->op = OQ_SETTLE_DEAD;
        op->reason = OQ_DLQ_BAD_ID;
        op->error = oq_txn_error_text(s->txn);
        return;
    }
    if (rc != OQ_CLAIMED) {
        /* Out of memory: a real attempt, retried with backoff, so a lasting
         * shortage ends in the dead letters instead of spinning. */
        s->outcome = O_RETRY;
        op->op = OQ_SETTLE_NACK;
        op->error = "cannot claim the id: out of memory";
        op->delay_ms = oq_backoff_ms(p->opts.backoff_base_ms,
                                     p->opts.backoff_cap_ms,
                                     s->d.receive_count, &w->rng);
        return;
    }

    oq__txn_reset(s->txn);
    if (s->d.dying) {
        /* Due for the dead letters (max receives, TTL), and not processed:
         * settle the id as dead, like a handler FAIL, so that every other
         * copy of the event is a duplicate. It does not run again. */
        oq_txn_error(s->txn, "%s%s%s",
                     s->d.dying_reason == OQ_DLQ_EXPIRED
                         ? "message older than its TTL"
                         : "no attempts left (the maximum number of "
                           "deliveries was reached)",
                     s->d.last_error ? "; last error: " : "",
                     s->d.last_error ? s->d.last_error : "");
        s->dead_reason = s->d.dying_reason;
        s->outcome = O_FAILING;
        op->op = OQ_SETTLE_PIN;
        op->release = 0;
        return;
    }
    {
        oq_event ev;
        event_of(p, s, &ev);
        INC(w, handler_calls);
        /* A handler that only computes cannot outlast its lease: no
         * heartbeats (two locks an event) for it. */
        bool beats = p->opts.lease_ms > 0 && !p->opts.handler_never_blocks;
        if (beats) {
            ev.deadline_ms = beat_start(w, s, now);
            oq__txn_set_heartbeat(s->txn, beat_more, w);
        }
        rc = p->opts.handler ? p->opts.handler(&ev, s->txn,
                                               p->opts.handler_arg)
                             : OQ_OK;
        if (beats) {
            oq__txn_set_heartbeat(s->txn, NULL, NULL);
            beat_stop(w);
        }
    }
    switch (rc) {
    case OQ_OK:
        s->outcome = O_COMMIT;
        op->op = OQ_SETTLE_PIN;
        op->release = 0;
        return;
    case OQ_RETRY:
        oq__idset_release_d(p->s, s->id, s->id_len, s->dg,
                            s->claim.token);
        s->outcome = O_RETRY;
        op->op = OQ_SETTLE_NACK;
        op->error = oq_txn_error_text(s->txn);
        op->delay_ms = oq_backoff_ms(p->opts.backoff_base_ms,
                                     p->opts.backoff_cap_ms,
                                     s->d.receive_count, &w->rng);
        return;
    default:
        /* A permanent failure settles the id too, fenced like a commit:
         * the event's outcome is "dead-lettered", decided once. */
        if (rc != OQ_FAIL)
            oq_txn_error(s->txn, "handler returned %d", rc);
        s->dead_reason = OQ_DLQ_FAILED;
        s->outcome = O_FAILING;
        op->op = OQ_SETTLE_PIN;
        op->release = 0;
        return;
    }
}

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* Applies s's outputs to the sink while its claim is prepared. If the sink
 * fails (out of memory), nothing was applied: give the claim up and retry
 * the message later, as a transient failure. */
static bool apply_outputs(worker *w, slot *s, oq_settle *op)
{
    oq_pool *p = w->p;
    oq_event ev;

    if (p->opts.sink.apply == NULL)
        return true;
    event_of(p, s, &ev);
    if (p->opts.sink.apply(&ev, s->txn, p->opts.sink.arg) == 0)
        return true;
    oq__idset_release_d(p->s, s->id, s->id_len, s->dg,
                        s->claim.token);
    s->outcome = O_RETRY;
    op->op = OQ_SETTLE_NACK;
    op->delay_ms = oq_backoff_ms(p->opts.backoff_base_ms,
                                 p->opts.backoff_cap_ms, s->d.receive_count,
                                 &w->rng);
    return false;
}

/* Prepared -> DONE. It can fail only for lack of memory to grow the DONE
 * table; the outputs are applied by then, so it must not give up: wait for
 * memory rather than let the event be applied twice. */
static void commit_prepared(oq_pool *p, const slot *s)
{
    while (oq__idset_commit_d(p->s, s->id, s->id_len, s->dg,
                              s->claim.token) != 0)
        nap_ms(1);
}

/* Durable mode: prepare s's claim and hand the event to the committer,
 * which writes it, commits the claim and settles the message. A refused
 * handoff (the store failed) gives the claim up and returns the message. */
static void hand_off(worker *w, slot *s, oq_settle *op)
{
    oq_pool *p = w->p;
    oq_event ev;
    oq_handoff h;

    if (!s->prepared &&
        oq__idset_prepare_d(p->s, s->id, s->id_len, s->dg,
                            s->claim.token) != 0) {
        /* Lease lost: discard the outputs; it will be redone. */
        s->outcome = O_NONE;
        op->op = OQ_SETTLE_NACK;
        op->delay_ms = 0;
        INC(w, fenced);
        return;
    }
    event_of(p, s, &ev);
    h = (oq_handoff){ &ev, s->txn, &s->d, s->claim.token,
                      s->outcome == O_FAILING, s->dead_reason };
    if (p->opts.committer.submit(&h, p->opts.committer.arg) == 0) {
        s->outcome = O_HANDED;
        op->op = OQ_SETTLE_NONE;
        op->release = 0;
        s->d.msg_ = NULL; /* the committer holds the reference now */
        return;
    }
    oq__idset_release_d(p->s, s->id, s->id_len, s->dg,
                        s->claim.token);
    s->outcome = O_NONE;
    op->op = OQ_SETTLE_RETURN;
    op->delay_ms = OQ__MAX(oq_backoff_ms(p->opts.backoff_base_ms,
                                         p->opts.backoff_cap_ms,
                                         s->d.receive_count, &w->rng), 1);
}

/*
 * Pins the decided messages of slots [lo, hi) that are not pinned yet, and
 * prepares the claims of those staged for commit, before the next handler
 * of the batch runs: that handler may run until the lease ends (a hanging
 * command), and a finished message must not lose its lease, and run again,
 * while it waits for the batch to settle. One queue lock for the lot.
 * Skipped when the handler cannot block (opts.handler_never_blocks).
 */
static void pin_decided(worker *w, size_t lo, size_t hi)
{
    oq_pool *p = w->p;
    size_t k = 0;

    for (size_t i = lo; i < hi; i++) {
        slot *s = &w->slots[i];
        if (!s->pinned && s->outcome != O_REDO && w->ops[i].d != NULL &&
            w->ops[i].op != OQ_SETTLE_NONE)
            w->pins[k++] = (oq_settle){ .d = &s->d, .op = OQ_SETTLE_PIN };
    }
    if (k == 0)
        return;
    oq_queue_settle(p->q, w->pins, k);
    k = 0;
    for (size_t i = lo; i < hi; i++) {
        slot *s = &w->slots[i];
        oq_settle *op = &w->ops[i];
        if (s->pinned || s->outcome == O_REDO || op->d == NULL ||
            op->op == OQ_SETTLE_NONE)
            continue;
        if (w->pins[k++].result != 0) {
            /* Redelivered already: the new holder owns it. */
            if (staged(s->outcome))
                oq__idset_release_d(p->s, s->id, s->id_len, s->dg,
                                    s->claim.token);
            s->outcome = O_NONE;
            op->op = OQ_SETTLE_NONE;
            op->release = 1;
            INC(w, fenced);
            continue;
        }
        s->pinned = true;
        if (staged(s->outcome)) {
            if (oq__idset_prepare_d(p->s, s->id, s->id_len, s->dg,
                                 s->claim.token) != 0) {
                /* Lease lost between the handler and the pin. */
                s->outcome = O_NONE;
                op->op = OQ_SETTLE_NACK;
                op->delay_ms = 0;
                op->release = 1;
                INC(w, fenced);
                continue;
            }
            s->prepared = true;
        }
    }
}

/* Phases B and C: pin, then commit, the messages whose handler said OK. */
static void commit_staged(worker *w, size_t lo, size_t hi)
{
    oq_pool *p = w->p;
    size_t npin = 0, nstaged = 0;

    for (size_t i = lo; i < hi; i++)
        if (staged(w->slots[i].outcome)) {
            nstaged++;
            if (!w->slots[i].pinned)
                npin++;
        }
    if (nstaged == 0)
        return;
    /* The other ops must not act yet, so the pins go in an array of their
     * own. */
    {
        oq_settle *pins = w->pins;
        size_t k = 0;
        for (size_t i = lo; i < hi; i++)
            if (staged(w->slots[i].outcome) && !w->slots[i].pinned)
                pins[k++] = (oq_settle){ .d = &w->slots[i].d,
                                         .op = OQ_SETTLE_PIN };
        if (npin > 0)
            oq_queue_settle(p->q, pins, npin);
        k = 0;
        for (size_t i = lo; i < hi; i++) {
            slot *s = &w->slots[i];
            oq_settle *op = &w->ops[i];
            if (!staged(s->outcome))
                continue;
            op->release = 1;
            if (!s->pinned && pins[k++].result != 0) {
                /* Redelivered since: the new holder owns it. */
                oq__idset_release_d(p->s, s->id, s->id_len, s->dg,
                                    s->claim.token);
                s->outcome = O_NONE;
                op->op = OQ_SETTLE_NONE;
                INC(w, fenced);
                continue;
            }
            if (p->opts.committer.submit != NULL) {
                hand_off(w, s, op);
                continue;
            }
            /* With nothing to write, commit at once; else prepare, so a
             * failed write can still give the claim back. */
            bool direct = s->outcome == O_FAILING || p->opts.sink.apply == NULL;
            int rc = direct
                ? oq__idset_commit_d(p->s, s->id, s->id_len, s->dg,
                                     s->claim.token)
                : s->prepared
                ? 0
                : oq__idset_prepare_d(p->s, s->id, s->id_len, s->dg,
                                      s->claim.token);
            if (rc == OQ_ENOMEM && direct) {
                /* No memory for the DONE table: nothing was applied yet;
                 * give the claim up and retry later. */
                oq__idset_release_d(p->s, s->id, s->id_len, s->dg,
                                    s->claim.token);
            }
            if (rc != 0) {
                /* Lease lost: discard the outputs; it will be redone. */
                s->outcome = O_NONE;
                op->op = OQ_SETTLE_NACK;
                op->delay_ms = 0;
                INC(w, fenced);
                continue;
            }
            /* Prepared: nobody can take the claim over now. */
            if (!direct) {
                if (!apply_outputs(w, s, op))
                    continue;
                commit_prepared(p, s);
            }
            if (s->outcome == O_FAILING) {
                s->outcome = O_DEAD;
                op->op = OQ_SETTLE_DEAD;
                op->reason = s->dead_reason;
                op->error = oq_txn_error_text(s->txn);
            } else {
                s->outcome = O_PROCESSED;
                op->op = OQ_SETTLE_ACK;
            }
        }
    }
}

static void count(worker *w, const slot *s, const oq_settle *op)
{
    oq_pool *p = w->p;

    if (op->op != OQ_SETTLE_NONE && op->result != 0) {
        INC(w, fenced); /* the receipt went stale under us */
        return;
    }
    switch (s->outcome) {
    case O_PROCESSED: INC(w, processed); break;
    case O_DUPLICATE:
        INC(w, duplicates);
        if (p->opts.sink.duplicate) {
            oq_event ev;
            event_of(p, s, &ev);
            p->opts.sink.duplicate(&ev, p->opts.sink.arg);
        }
        break;
    case O_RETRY: INC(w, retried); break;
    case O_BUSY: INC(w, busy); break;
    case O_DEAD: INC(w, dead); break;
    case O_REJECTED: INC(w, rejected); break;
    default: break;
    }
}

/* Phases B-D for slots [lo, hi): pin, commit, settle, count. */
static void settle_range(worker *w, size_t lo, size_t hi)
{
    oq_pool *p = w->p;

    commit_staged(w, lo, hi);
    oq_queue_settle(p->q, w->ops + lo, hi - lo);
    for (size_t i = lo; i < hi; i++) {
        /* A dead letter that found no memory is still ours (its id is
         * settled already): try until the queue takes it. */
        while (w->ops[i].op == OQ_SETTLE_DEAD &&
               w->ops[i].result == OQ_ENOMEM) {
            oq_settle again = w->ops[i];
            nap_ms(1);
            oq_queue_settle(p->q, &again, 1);
            w->ops[i].result = again.result;
        }
    }
    for (size_t i = lo; i < hi; i++) {
        slot *s = &w->slots[i];
        if (s->outcome == O_REDO)
            continue;
        count(w, s, &w->ops[i]);
        if (s->parsed && p->opts.free_parsed)
            p->opts.free_parsed(s->parsed, p->opts.decode_arg);
        s->parsed = NULL;
    }
}

/* Handlers slower than this (ms, moving average) are received and
 * committed one by one: a fast message must not wait in a batch behind a
 * slow one, or it may outlive its lease. Faster ones go per batch. */
#define SLOW_HANDLER_MS 1.0

/* The histogram's bucket bounds, seconds (the library keeps the counts,
 * the CLI's metrics module prints them). */
const double oq__metrics_buckets[OQ__HIST_BUCKETS] = {
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60,
};

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* n handler calls of ns each (on average) into the worker's histogram of
 * durations (oq__metrics_buckets). */
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

static void note_duration(worker *w, int64_t ms)
{
    w->avg_ms = 0.8 * w->avg_ms + 0.2 * (double)ms;
}

/* Runs phases A-D over slots[0..n); returns how many were left to redo
 * (moved to the front of slots). */
static size_t run_batch(worker *w, size_t n)
{
    oq_pool *p = w->p;
    size_t redo = 0, lo = 0;
    bool fast = w->avg_ms < SLOW_HANDLER_MS;
    int64_t t0 = fast ? mono_ns() : 0;
    int64_t start = oq_clock_now(p->opts.clock);

    for (size_t i = 0; i < n; i++) {
        slot *s = &w->slots[i];
        oq_settle *op = &w->ops[i];
        memset(op, 0, sizeof(*op));
        s->outcome = O_NONE;
        s->pinned = s->prepared = false;
        if (i > lo && !p->opts.handler_never_blocks)
            pin_decided(w, lo, i);
        if (atomic_load(&p->stopping)) {
            /* Stopping: hand the rest back untouched. */
            op->d = &s->d;
            op->op = OQ_SETTLE_RETURN;
            op->release = 1;
        } else {
            int64_t now = oq_clock_now(p->opts.clock);
            /* Half the batch's lease is gone (a slow message): commit what
             * is finished before going on, or it may outlive its lease. */
            if (i > lo &&
                now - start >= (w->slots[lo].d.deadline_ms - start) / 2) {
                settle_range(w, lo, i);
                lo = i;
            }
            if (w->avg_ms >= SLOW_HANDLER_MS) {
                /* Slow mode: time each message to notice when it is over. */
                int64_t t1 = mono_ns(), dt;
                run_one(w, s, i, op, now);
                dt = mono_ns() - t1;
                note_duration(w, dt / 1000000);
                observe(w, dt, 1);
            } else {
                run_one(w, s, i, op, now);
            }
        }
        if (i + 1 == n || w->avg_ms >= SLOW_HANDLER_MS) {
            settle_range(w, lo, i + 1);
            lo = i + 1;
        }
    }
    if (fast) {
        /* Fast mode: one time reading per batch, spread over its messages
         * (a slow message here switches to slow mode for the next one). */
        int64_t per = (mono_ns() - t0) / (int64_t)n;
        note_duration(w, per / 1000000);
        observe(w, per, n);
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

static void *worker_main(void *arg)
{
    worker *w = arg;
    oq_pool *p = w->p;
    oq_delivery *d = w->d;

    while (!atomic_load(&p->stopping)) {
        /* Slow handlers take one message at a time: a batch would hold
         * messages that other workers could start, until their leases
         * run out. */
        size_t want = w->avg_ms >= SLOW_HANDLER_MS ? 1 : p->opts.batch;
        int n = oq_queue_receive(p->q, d, want, p->opts.poll_ms);
        if (n == OQ_EOF)
            break;
        if (n <= 0)
            continue;
        INC(w, batches);
        for (int i = 0; i < n; i++) {
            w->slots[i].d = d[i];
            w->slots[i].decoded = false;
            w->slots[i].parsed = NULL;
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

static void free_workers(oq_pool *p)
{
    for (unsigned i = 0; p->w && i < p->opts.workers; i++) {
        worker *w = &p->w[i];
        for (unsigned j = 0; w->slots && j < p->opts.batch; j++)
            oq__txn_free(w->slots[j].txn);
        oq__free(w->slots);
        oq__free(w->ops);
        oq__free(w->pins);
        oq__free(w->d);
        pthread_mutex_destroy(&w->hb.mu);
    }
    oq__free(p->w);
}

static int alloc_workers(oq_pool *p)
{
    uint64_t seed = p->opts.seed ? p->opts.seed
                                 : (uint64_t)oq_clock_now(NULL) * 2654435761u;

    p->w = oq__calloc(p->opts.workers, sizeof(*p->w));
    if (p->w == NULL)
        return OQ_ENOMEM;
    for (unsigned i = 0; i < p->opts.workers; i++) {
        worker *w = &p->w[i];
        w->p = p;
        pthread_mutex_init(&w->hb.mu, NULL);
        w->rng = seed + i * 0x9e3779b97f4a7c15ULL;
        w->avg_ms = 10 * SLOW_HANDLER_MS; /* one by one until measured */
        w->slots = oq__calloc(p->opts.batch, sizeof(*w->slots));
        w->ops = oq__calloc(p->opts.batch, sizeof(*w->ops));
        w->pins = oq__calloc(p->opts.batch, sizeof(*w->pins));
        w->d = oq__calloc(p->opts.batch, sizeof(*w->d));
        if (w->slots == NULL || w->ops == NULL || w->pins == NULL ||
            w->d == NULL)
            return OQ_ENOMEM;
        for (unsigned j = 0; j < p->opts.batch; j++)
            if ((w->slots[j].txn = oq__txn_new()) == NULL)
                return OQ_ENOMEM;
    }
    return 0;
}

int oq_pool_start(oq_pool **out, oq_queue *q, oq_idset *s,
                  const oq_pool_opts *opts)
{
    oq_pool_opts o;
    oq_pool *p;
    int rc;

    oq_pool_opts_defaults(&o);
    if (out == NULL || q == NULL || s == NULL || opts == NULL ||
        oq__opts_copy(&o, sizeof(o), opts) != 0 ||
        o.workers == 0 || o.batch == 0 || o.batch > 4096)
        return OQ_EINVAL;
    p = oq__calloc(1, sizeof(*p));
    if (p == NULL)
        return OQ_ENOMEM;
    p->q = q;
    p->s = s;
    p->opts = o;
    if (p->opts.poll_ms <= 0)
        p->opts.poll_ms = 100;
    pthread_mutex_init(&p->mu, NULL);
    oq__cond_init_monotonic(&p->cv);
    rc = alloc_workers(p);
    if (rc != 0)
        goto out_free;
    for (unsigned i = 0; i < p->opts.workers; i++) {
        rc = -pthread_create(&p->w[i].thread, NULL, worker_main, &p->w[i]);
        if (rc != 0) {
            /* Stop and join the ones already running. */
            atomic_store(&p->stopping, 1);
            oq_queue_wake(q);
            for (unsigned j = 0; j < i; j++)
                pthread_join(p->w[j].thread, NULL);
            goto out_free;
        }
        pthread_mutex_lock(&p->mu);
        p->running++;
        pthread_mutex_unlock(&p->mu);
    }
    if (p->opts.lease_ms > 0) {
        rc = -pthread_create(&p->hb_thread, NULL, heartbeat_main, p);
        if (rc != 0) {
            atomic_store(&p->stopping, 1);
            oq_queue_wake(q);
            for (unsigned j = 0; j < p->opts.workers; j++)
                pthread_join(p->w[j].thread, NULL);
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
    oq_queue_wake(p->q);
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

void oq_pool_stats_get(oq_pool *p, oq_pool_stats *out)
{
    memset(out, 0, sizeof(*out));
    for (unsigned i = 0; i < p->opts.workers; i++) {
        counters *c = &p->w[i].c;
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
