/*
 * The visibility-timeout queue.
 *
 * DESIGN
 * ------
 * One mutex (q->mu) guards everything in struct oq_queue and the mutable
 * fields of every message; two condition variables wake blocked receivers.
 * The queue never calls out (no handler, no store, no user callback except
 * oq_queue_dead_letters' visitor, documented there) while holding q->mu, and
 * never takes another lock while holding it: it is a leaf lock.
 *
 * A message is in exactly one place at a time:
 *
 *   send ──▶ DELAYED (delayed heap, key due_ms = visible-at) ──┐
 *     └────▶ READY (FIFO) ◀────────────────────────────────────┘ when due
 *   READY ──receive──▶ INFLIGHT (deadline heap, key due_ms = deadline;
 *                                in-flight table keyed by receipt)
 *   INFLIGHT ── deadline passed ──▶ READY            (redelivered)
 *   INFLIGHT ── nack(delay) ──────▶ DELAYED or READY
 *   INFLIGHT ── pin ──────────────▶ PINNED (no deadline: a commit is running)
 *   INFLIGHT/PINNED ── ack ───────▶ GONE
 *   INFLIGHT/PINNED ── dead ──────▶ DEAD (dead-letter list)
 *   READY ── at delivery: receive_count >= max_receives, or older than TTL
 *          ──▶ DEAD, instead of being delivered.
 *
 * Time moves only when the clock says so: expiry of delayed and in-flight
 * messages is done lazily ("pump") by every operation that takes the lock,
 * popping due heap tops, so nothing scans all messages and no reaper thread
 * exists. Every operation is O(1) or O(log n).
 *
 * Lifetime: a message carries a reference count (guarded by q->mu). The
 * queue holds one while the message is READY/DELAYED/INFLIGHT/PINNED/DEAD,
 * and each outstanding delivery holds one, so a worker that overran its
 * visibility timeout can still read its id and payload after another worker
 * acked the message. id and payload never change after send, so holders read
 * them without the lock.
 */
#include "oq_internal.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "oq_uthash.h"

/* Longest wait on the condition variable, in real ms, before time is looked
 * at again. Bounds how late a receiver notices a test clock that moved. */
#define WAIT_SLICE_MS 20

enum msg_state {
    M_READY,
    M_DELAYED,
    M_INFLIGHT,
    M_PINNED,
    M_DEAD,
    M_GONE
};

typedef struct msg {
    /* Immutable after send; read without the lock by delivery holders. */
    const char *id;
    size_t id_len;
    const void *payload;
    size_t payload_len;
    uint64_t tag;
    int64_t sent_ms;          /* send time, ms */

    /* Guarded by q->mu. */
    enum msg_state state;
    int64_t due_ms;           /* DELAYED: visible at; INFLIGHT: deadline */
    size_t heap_pos;          /* index in the heap it is in */
    int64_t ready_ms;         /* READY: when it became ready */
    uint64_t receipt;         /* INFLIGHT/PINNED: current receipt, else 0 */
    uint32_t receive_count;
    bool counted;             /* the current delivery counted as a receive
                                 (a dying one does not: see take()) */
    int64_t first_receive_ms; /* 0 until the first delivery */
    unsigned refs;            /* queue's own + one per delivery */
    int hashed;               /* in q->receipts */
    struct slab *slab;        /* the batch allocation it lives in, or NULL */
    char *last_error;         /* the last nack's error text, or NULL */
    struct msg *next;         /* READY FIFO link, or free list */
    char data[];              /* id bytes, NUL, payload bytes, NUL */
} msg;

/*
 * Messages sent in one batch live in one allocation (a slab), built before
 * the queue lock is taken: one malloc per batch instead of one per message,
 * and no copying under the lock. The slab is freed when its last message
 * is; messages are freed outside the lock, by any thread, so the count is
 * atomic. (A slab outlives its quick messages while a slow one lives on:
 * at most one batch of memory per straggler.)
 */
typedef struct slab {
    _Atomic size_t refs; /* messages of this slab not yet freed */
} slab;

static void msg_free(msg *m)
{
    if (m == NULL)
        return;
    oq__free(m->last_error);
    if (m->slab == NULL)
        oq__free(m);
    else if (atomic_fetch_sub(&m->slab->refs, 1) == 1)
        oq__free(m->slab);
}

typedef struct dead {
    msg *m;                   /* holds the queue's reference */
    oq_dlq_reason reason;
    char *error;
    uint32_t attempts;
    int64_t dead_ms;
    struct dead *next;
} dead;

/* One id remembered by the producer dedup window. */
typedef struct dedup {
    int64_t sent_ms;
    struct dedup *next;       /* FIFO by send time */
    UT_hash_handle hh;        /* key: id bytes */
    size_t len;
    char id[];
} dedup;

/*
 * In-flight messages by receipt, for the callers that settle by receipt
 * number (oq_queue_ack and friends: the node protocol); oq_queue_settle
 * goes through the delivery's own pointer. Open addressing with linear
 * probing, at most half full, deletion by backward shift (no tombstones),
 * never shrinks: a delivery costs a multiply and a store, not a malloc or
 * a uthash bucket. Receipt 0 (never issued) marks an empty slot.
 */
typedef struct rslot {
    uint64_t receipt;
    msg *m;
} rslot;

typedef struct rtable {
    rslot *slots;
    size_t cap;   /* 0 or a power of 2 */
    size_t count;
} rtable;

struct oq_queue {
    oq_queue_opts opts;       /* immutable after new */

    pthread_mutex_t mu;
    pthread_cond_t cv;        /* a message became ready, or close */

    /* Everything below is guarded by mu. */
    msg *ready_head, *ready_tail;
    size_t ready_len;
    oq__heap delayed;         /* DELAYED messages by due_ms */
    oq__heap deadlines;       /* INFLIGHT messages by due_ms */
    rtable receipts;          /* INFLIGHT and PINNED messages by receipt */
    size_t pinned;
    uint64_t next_receipt;
    dead *dead_head, *dead_tail;
    dedup *dedup_hash, *dedup_head, *dedup_tail;
    size_t dedup_len;
    unsigned waiters;
    uint64_t wakes;           /* oq_queue_wake calls: a receiver blocked
                                 across one returns (with what it has) */
    bool closed;
    oq_queue_stats st;        /* counters; gauges are filled in on read */
};

void oq_queue_opts_init(oq_queue_opts *o, size_t size)
{
    oq_queue_opts d = { .size = sizeof(d) };

    d.visibility_timeout_ms = 30000;
    d.dedup_count = 10000;
    oq__opts_init(o, size, &d, sizeof(d));
}

static int64_t now_ms(const oq_queue *q)
{
    return oq_clock_now(q->opts.clock);
}

int oq_queue_new(oq_queue **out, const oq_queue_opts *opts)
{
    oq_queue *q;
    int rc;

    if (out == NULL)
        return OQ_EINVAL;
    q = oq__calloc(1, sizeof(*q));
    if (q == NULL)
        return OQ_ENOMEM;
    oq_queue_opts_defaults(&q->opts);
    if ((opts && oq__opts_copy(&q->opts, sizeof(q->opts), opts) != 0) ||
        q->opts.visibility_timeout_ms <= 0 || q->opts.ttl_ms < 0 ||
        q->opts.dedup_age_ms < 0) {
        oq__free(q);
        return OQ_EINVAL;
    }
    rc = oq__mutex_init(&q->mu);
    if (rc != 0) {
        oq__free(q);
        return rc;
    }
    rc = oq__cond_init_monotonic(&q->cv);
    if (rc != 0) {
        pthread_mutex_destroy(&q->mu);
        oq__free(q);
        return rc;
    }
    oq__heap_init(&q->delayed, offsetof(msg, due_ms), offsetof(msg, heap_pos));
    oq__heap_init(&q->deadlines, offsetof(msg, due_ms), offsetof(msg, heap_pos));
    *out = q;
    return 0;
}

static void free_dead(dead *d)
{
    oq__free(d->error);
    oq__free(d);
}

void oq_queue_free(oq_queue *q)
{
    msg *m;
    dedup *e, *etmp;
    dead *d;

    if (q == NULL)
        return;
    /* Every message is reachable from exactly one of these. */
    while ((m = q->ready_head) != NULL) {
        q->ready_head = m->next;
        msg_free(m);
    }
    while ((m = oq__heap_pop(&q->delayed)) != NULL)
        msg_free(m);
    while ((m = oq__heap_pop(&q->deadlines)) != NULL)
        m->state = M_GONE; /* also in the receipt table; freed below */
    for (size_t i = 0; i < q->receipts.cap; i++)
        if (q->receipts.slots[i].receipt != 0)
            msg_free(q->receipts.slots[i].m);
    oq__free(q->receipts.slots);
    while ((d = q->dead_head) != NULL) {
        q->dead_head = d->next;
        msg_free(d->m);
        free_dead(d);
    }
    HASH_ITER(hh, q->dedup_hash, e, etmp) {
        HASH_DEL(q->dedup_hash, e);
        oq__free(e);
    }
    oq__heap_destroy(&q->delayed);
    oq__heap_destroy(&q->deadlines);
    pthread_cond_destroy(&q->cv);
    pthread_mutex_destroy(&q->mu);
    oq__free(q);
}

/* ------------------------------------------------------ receipt table */

#define RTABLE_MIN_CAP 64

static size_t rtable_home(uint64_t receipt, size_t mask)
{
    return (size_t)((receipt * 0x9E3779B97F4A7C15u) >> 32) & mask;
}

static void rtable_place(rslot *slots, size_t cap, uint64_t receipt, msg *m)
{
    size_t mask = cap - 1, i = rtable_home(receipt, mask);
    while (slots[i].receipt != 0)
        i = (i + 1) & mask;
    slots[i].receipt = receipt;
    slots[i].m = m;
}

/* 0, or OQ_ENOMEM (the table unchanged). */
static int rtable_add(rtable *t, uint64_t receipt, msg *m)
{
    if ((t->count + 1) * 2 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : RTABLE_MIN_CAP;
        rslot *slots = oq__calloc(cap, sizeof(*slots));
        if (slots == NULL)
            return OQ_ENOMEM;
        for (size_t i = 0; i < t->cap; i++)
            if (t->slots[i].receipt != 0)
                rtable_place(slots, cap, t->slots[i].receipt, t->slots[i].m);
        oq__free(t->slots);
        t->slots = slots;
        t->cap = cap;
    }
    rtable_place(t->slots, t->cap, receipt, m);
    t->count++;
    return 0;
}

static rslot *rtable_find(const rtable *t, uint64_t receipt)
{
    if (t->count == 0 || receipt == 0)
        return NULL;
    size_t mask = t->cap - 1;
    for (size_t i = rtable_home(receipt, mask);; i = (i + 1) & mask) {
        if (t->slots[i].receipt == receipt)
            return &t->slots[i];
        if (t->slots[i].receipt == 0)
            return NULL;
    }
}

/* Removes a receipt that is in the table. */
static void rtable_del(rtable *t, uint64_t receipt)
{
    rslot *hole_at = rtable_find(t, receipt);
    size_t mask = t->cap - 1, hole = (size_t)(hole_at - t->slots);

    for (size_t i = (hole + 1) & mask; t->slots[i].receipt != 0;
         i = (i + 1) & mask) {
        size_t home = rtable_home(t->slots[i].receipt, mask);
        /* It may move back into the hole unless its home lies in the
         * cyclic range (hole, i]. */
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            t->slots[hole] = t->slots[i];
            hole = i;
        }
    }
    t->slots[hole] = (rslot){ 0, NULL };
    t->count--;
}

/* ------------------------------------------------- helpers, q->mu held */

static void ready_push(oq_queue *q, msg *m, int64_t now)
{
    m->state = M_READY;
    m->ready_ms = now;
    m->next = NULL;
    if (q->ready_tail)
        q->ready_tail->next = m;
    else
        q->ready_head = m;
    q->ready_tail = m;
    q->ready_len++;
}

static msg *ready_pop(oq_queue *q)
{
    msg *m = q->ready_head;
    if (m == NULL)
        return NULL;
    q->ready_head = m->next;
    if (q->ready_head == NULL)
        q->ready_tail = NULL;
    q->ready_len--;
    m->next = NULL;
    return m;
}

/* Drops one reference; a message with none left goes on *freelist, to be
 * freed after the lock is released. */
static void unref(msg *m, msg **freelist)
{
    if (--m->refs == 0) {
        m->next = *freelist;
        *freelist = m;
    }
}

static void free_list(msg *m)
{
    while (m) {
        msg *next = m->next;
        msg_free(m);
        m = next;
    }
}

/* Takes an INFLIGHT or PINNED message out of the in-flight structures. */
static void leave_flight(oq_queue *q, msg *m)
{
    if (m->state == M_INFLIGHT)
        oq__heap_remove(&q->deadlines, m);
    else
        q->pinned--;
    if (m->hashed) {
        rtable_del(&q->receipts, m->receipt);
        m->hashed = 0;
    }
    m->receipt = 0;
}

/* A dead-letter record for m, allocated before m leaves any structure, so
 * that running out of memory leaves m where it was. */
static dead *dead_new(const char *error)
{
    dead *d = oq__malloc(sizeof(*d));

    if (d == NULL)
        return NULL;
    d->error = NULL;
    if (error && *error) {
        size_t len = strlen(error) + 1;
        d->error = oq__malloc(len);
        if (d->error == NULL) {
            oq__free(d);
            return NULL;
        }
        memcpy(d->error, error, len);
    }
    return d;
}

/* Moves m (already out of every structure) to the dead-letter list, with
 * d from dead_new. The queue's reference moves with it. Cannot fail. */
static void dead_link(oq_queue *q, msg *m, dead *d, oq_dlq_reason reason,
                      int64_t now)
{
    d->m = m;
    d->reason = reason;
    d->attempts = m->receive_count;
    d->dead_ms = now;
    d->next = NULL;
    if (q->dead_tail)
        q->dead_tail->next = d;
    else
        q->dead_head = d;
    q->dead_tail = d;
    m->state = M_DEAD;
    q->st.dead_lettered[reason]++;
}

/* Lazy expiry: due delayed messages become ready; in-flight messages past
 * their deadline become ready again (a redelivery). */
static void pump(oq_queue *q, int64_t now)
{
    msg *m;

    while ((m = oq__heap_peek(&q->delayed)) != NULL && m->due_ms <= now) {
        oq__heap_pop(&q->delayed);
        ready_push(q, m, now);
    }
    while ((m = oq__heap_peek(&q->deadlines)) != NULL && m->due_ms <= now) {
        leave_flight(q, m);
        q->st.redelivered++;
        ready_push(q, m, now);
    }
}

static void wake_one(oq_queue *q)
{
    if (q->waiters)
        pthread_cond_signal(&q->cv);
}

static bool drained(const oq_queue *q)
{
    return q->ready_len == 0 && q->delayed.len == 0 &&
           q->deadlines.len == 0 && q->pinned == 0;
}

/* ------------------------------------------------------------------ send */

static void dedup_forget_oldest(oq_queue *q)
{
    dedup *e = q->dedup_head;

    q->dedup_head = e->next;
    if (q->dedup_head == NULL)
        q->dedup_tail = NULL;
    HASH_DEL(q->dedup_hash, e);
    q->dedup_len--;
    oq__free(e);
}

static bool dedup_seen(oq_queue *q, const char *id, size_t len, int64_t now)
{
    dedup *e;

    /* Evict by age first, so an id older than the window is accepted. */
    while (q->opts.dedup_age_ms > 0 && (e = q->dedup_head) != NULL &&
           now - e->sent_ms >= q->opts.dedup_age_ms)
        dedup_forget_oldest(q);
    HASH_FIND(hh, q->dedup_hash, id, len, e);
    return e != NULL;
}

/* Remembers id; on OOM the id is simply not remembered (the dedup window is
 * an optimisation in front of the processed set, not the guarantee). */
static void dedup_remember(oq_queue *q, const char *id, size_t len,
                           int64_t now)
{
    dedup *e = oq__malloc(sizeof(*e) + len);

    if (e == NULL)
        return;
    e->sent_ms = now;
    e->next = NULL;
    e->len = len;
    memcpy(e->id, id, len);
    oq__hash_oom = 0;
    HASH_ADD_KEYPTR(hh, q->dedup_hash, e->id, len, e);
    if (oq__hash_oom) {
        oq__free(e);
        return;
    }
    if (q->dedup_tail)
        q->dedup_tail->next = e;
    else
        q->dedup_head = e;
    q->dedup_tail = e;
    q->dedup_len++;
    while (q->dedup_len > q->opts.dedup_count && q->dedup_head)
        dedup_forget_oldest(q);
}

static size_t msg_size(const oq_message *in)
{
    size_t n = sizeof(msg) + in->id_len + 1 + in->payload_len + 1;
    return (n + 15) & ~(size_t)15;
}

static bool msg_valid(const oq_message *in)
{
    return (in->id_len == 0 || in->id != NULL) &&
           (in->payload_len == 0 || in->payload != NULL);
}

/* Fills the message at m (msg_size(in) bytes) from in. */
static msg *msg_init(msg *m, const oq_message *in, int64_t now)
{
    char *p;

    memset(m, 0, sizeof(*m));
    p = m->data;
    if (in->id_len)
        memcpy(p, in->id, in->id_len);
    p[in->id_len] = '\0';
    m->id = p;
    m->id_len = in->id_len;
    p += in->id_len + 1;
    if (in->payload_len)
        memcpy(p, in->payload, in->payload_len);
    p[in->payload_len] = '\0';
    m->payload = p;
    m->payload_len = in->payload_len;
    m->tag = in->tag;
    m->sent_ms = now;
    m->refs = 1;
    return m;
}

static msg *msg_new(const oq_message *in, int64_t now)
{
    msg *m = oq__malloc(msg_size(in));
    return m ? msg_init(m, in, now) : NULL;
}

/* Sends m, built from in; q->mu held. On failure the caller frees m. */
static int send_locked(oq_queue *q, const oq_message *in, msg *m, int64_t now)
{
    bool dedup_on = q->opts.dedup_count > 0 && in->id_len > 0;
    int rc;

    if (dedup_on && dedup_seen(q, in->id, in->id_len, now)) {
        q->st.duplicates_rejected++;
        return OQ_EEXIST;
    }
    if (in->delay_ms > 0) {
        m->state = M_DELAYED;
        m->due_ms = oq__add_ms(now, in->delay_ms);
        rc = oq__heap_push(&q->delayed, m);
        if (rc != 0)
            return rc;
    } else {
        ready_push(q, m, now); /* the caller wakes a receiver */
    }
    if (dedup_on)
        dedup_remember(q, in->id, in->id_len, now);
    q->st.sent++;
    return 0;
}

/* Builds the messages of a batch in one slab; NULL when out of memory. */
static slab *slab_build(const oq_message *msgs, size_t n, msg **out,
                        int64_t now)
{
    size_t total = (sizeof(slab) + 15) & ~(size_t)15, nvalid = 0;
    slab *sl;
    char *p;

    for (size_t i = 0; i < n; i++)
        if (msg_valid(&msgs[i])) {
            total += msg_size(&msgs[i]);
            nvalid++;
        }
    if (nvalid == 0)
        return NULL;
    sl = oq__malloc(total);
    if (sl == NULL)
        return NULL;
    atomic_init(&sl->refs, nvalid);
    p = (char *)sl + ((sizeof(slab) + 15) & ~(size_t)15);
    for (size_t i = 0; i < n; i++) {
        out[i] = NULL;
        if (!msg_valid(&msgs[i]))
            continue;
        out[i] = msg_init((msg *)(void *)p, &msgs[i], now);
        out[i]->slab = sl;
        p += msg_size(&msgs[i]);
    }
    return sl;
}

#define SEND_CHUNK 256

int oq_queue_send_batch(oq_queue *q, const oq_message *msgs, size_t n,
                        int *results)
{
    int accepted = 0;
    int64_t now = now_ms(q);
    msg *built[SEND_CHUNK];

    /* In chunks, each one slab and one lock hold. */
    for (size_t base = 0; base < n; base += SEND_CHUNK) {
        size_t k = OQ__MIN(n - base, (size_t)SEND_CHUNK);
        const oq_message *in = msgs + base;
        slab *sl = slab_build(in, k, built, now);
        msg *freelist = NULL;

        pthread_mutex_lock(&q->mu);
        pump(q, now);
        for (size_t i = 0; i < k; i++) {
            int rc;
            if (!msg_valid(&in[i]))
                rc = OQ_EINVAL;
            else if (sl == NULL)
                rc = OQ_ENOMEM;
            else if (q->closed)
                rc = OQ_ECLOSED;
            else
                rc = send_locked(q, &in[i], built[i], now);
            if (rc != 0 && sl && built[i]) {
                built[i]->next = freelist;
                freelist = built[i];
            }
            if (results)
                results[base + i] = rc;
            if (rc == 0)
                accepted++;
        }
        /* One wake a chunk: a receiver that takes part of it wakes the
         * next (oq_queue_receive). */
        if (q->ready_len > 0)
            wake_one(q);
        if (q->closed && accepted == 0) {
            pthread_mutex_unlock(&q->mu);
            free_list(freelist);
            for (size_t i = base + k; results && i < n; i++)
                results[i] = OQ_ECLOSED;
            return OQ_ECLOSED;
        }
        pthread_mutex_unlock(&q->mu);
        free_list(freelist);
    }
    return accepted;
}

int oq_queue_reject(oq_queue *q, const oq_message *in, oq_dlq_reason reason,
                    const char *error)
{
    int64_t now = now_ms(q);
    msg *m;
    dead *d;
    int rc;

    if ((unsigned)reason >= OQ_DLQ__COUNT || in == NULL ||
        (in->id_len > 0 && in->id == NULL) ||
        (in->payload_len > 0 && in->payload == NULL))
        return OQ_EINVAL;
    m = msg_new(in, now);
    if (m == NULL)
        return OQ_ENOMEM;
    d = dead_new(error);
    if (d == NULL) {
        msg_free(m);
        return OQ_ENOMEM;
    }
    pthread_mutex_lock(&q->mu);
    if (q->closed) {
        rc = OQ_ECLOSED;
    } else {
        dead_link(q, m, d, reason, now);
        q->st.sent++;
        rc = 0;
    }
    pthread_mutex_unlock(&q->mu);
    if (rc != 0) {
        free_dead(d);
        msg_free(m);
    }
    return rc;
}

int oq_queue_send(oq_queue *q, const char *id, size_t id_len,
                  const void *payload, size_t payload_len, int64_t delay_ms)
{
    oq_message m = { id, id_len, payload, payload_len, delay_ms, 0 };
    int rc;
    int n = oq_queue_send_batch(q, &m, 1, &rc);
    return n < 0 ? n : rc;
}

/* --------------------------------------------------------------- receive */

/* Delivers up to max ready messages; q->mu held. */
/* Puts m back at the head of the READY FIFO (it was just popped). */
static void ready_unpop(oq_queue *q, msg *m)
{
    m->next = q->ready_head;
    q->ready_head = m;
    if (q->ready_tail == NULL)
        q->ready_tail = m;
    q->ready_len++;
}

/* The redrive policy: why m must not be delivered now, or -1. */
static int must_die(const oq_queue *q, const msg *m, int64_t now)
{
    if (q->opts.ttl_ms > 0 && now - m->sent_ms >= q->opts.ttl_ms)
        return OQ_DLQ_EXPIRED;
    if (q->opts.max_receives > 0 && m->receive_count >= q->opts.max_receives)
        return OQ_DLQ_MAX_ATTEMPTS;
    return -1;
}

/*
 * Delivers up to max ready messages; q->mu held. A message due for the dead
 * letters (must_die) goes there now, or, with opts.deliver_dying, is
 * delivered once more marked dying, without counting as a receive, so the
 * consumer can look at its processed set first: a copy of an event already
 * processed is a duplicate, not a dead letter, and an event has one outcome.
 */
static size_t take(oq_queue *q, oq_delivery *out, size_t max, int64_t now)
{
    size_t n = 0;
    msg *m;

    while (n < max && (m = ready_pop(q)) != NULL) {
        int why = must_die(q, m, now);
        if (why >= 0 && !q->opts.deliver_dying) {
            char err[640];
            dead *d;
            snprintf(err, sizeof(err), "%s%s%s", why == OQ_DLQ_EXPIRED
                     ? "message older than its TTL"
                     : "receive count reached max_receives",
                     m->last_error ? "; last error: " : "",
                     m->last_error ? m->last_error : "");
            if ((d = dead_new(err)) == NULL) {
                ready_unpop(q, m); /* out of memory: try again later */
                break;
            }
            dead_link(q, m, d, (oq_dlq_reason)why, now);
            continue;
        }
        m->due_ms = oq__add_ms(now, q->opts.visibility_timeout_ms);
        if (oq__heap_push(&q->deadlines, m) != 0) {
            /* Out of memory: put it back, deliver what we have. */
            ready_unpop(q, m);
            break;
        }
        m->state = M_INFLIGHT;
        m->receipt = ++q->next_receipt;
        /* Without memory for the receipt table, the delivery still works
         * through its oq_delivery; only oq_queue_ack(receipt) won't find it. */
        m->hashed = rtable_add(&q->receipts, m->receipt, m) == 0;
        m->counted = why < 0;
        if (m->counted)
            m->receive_count++;
        if (m->first_receive_ms == 0)
            m->first_receive_ms = now;
        m->refs++;
        q->st.received++;

        out[n].id = m->id;
        out[n].id_len = m->id_len;
        out[n].payload = m->payload;
        out[n].payload_len = m->payload_len;
        out[n].tag = m->tag;
        out[n].receipt = m->receipt;
        out[n].receive_count = m->receive_count;
        out[n].sent_ms = m->sent_ms;
        out[n].first_receive_ms = m->first_receive_ms;
        out[n].deadline_ms = m->due_ms;
        out[n].dying = why >= 0;
        out[n].dying_reason = why >= 0 ? (oq_dlq_reason)why : OQ_DLQ_MAX_ATTEMPTS;
        out[n].last_error = m->last_error;
        out[n].msg_ = m;
        n++;
    }
    return n;
}

/* How long (queue clock ms) until the next delayed or in-flight event. */
static int64_t next_event_in(const oq_queue *q, int64_t now)
{
    int64_t best = INT64_MAX;
    const msg *m;

    if ((m = oq__heap_peek(&q->delayed)) != NULL)
        best = m->due_ms - now;
    if ((m = oq__heap_peek(&q->deadlines)) != NULL)
        best = OQ__MIN(best, m->due_ms - now);
    return best;
}

int oq_queue_receive(oq_queue *q, oq_delivery *out, size_t max,
                     int64_t wait_ms)
{
    int64_t now = now_ms(q);
    int64_t until = wait_ms < 0 ? INT64_MAX : oq__add_ms(now, wait_ms);
    uint64_t wakes;
    int rc = 0;

    if (out == NULL && max > 0)
        return OQ_EINVAL;
    pthread_mutex_lock(&q->mu);
    wakes = q->wakes;
    for (;;) {
        size_t n;

        pump(q, now);
        n = take(q, out, max, now);
        if (n > 0) {
            rc = (int)n;
            break;
        }
        if (q->closed && drained(q)) {
            rc = OQ_EOF;
            break;
        }
        /* Woken on purpose (a pool stopping, a test clock moved): return,
         * so the caller looks at its own state; with a clock that does not
         * move, the wait would otherwise never end. */
        if (now >= until || max == 0 || q->wakes != wakes)
            break;
        {
            int64_t sleep = OQ__MIN(until - now, next_event_in(q, now));
            struct timespec ts;
            sleep = OQ__MAX(OQ__MIN(sleep, WAIT_SLICE_MS), 1);
            ts = oq__abstime_after(sleep);
            q->waiters++;
            pthread_cond_timedwait(&q->cv, &q->mu, &ts);
            q->waiters--;
        }
        now = now_ms(q);
    }
    /* Another receiver may be able to use what is left. */
    if (rc > 0 && q->ready_len > 0)
        wake_one(q);
    pthread_mutex_unlock(&q->mu);
    return rc;
}

/* ---------------------------------------------------------------- settle */

/* The message behind a receipt, if the receipt is current. */
static msg *lookup_receipt(oq_queue *q, uint64_t receipt)
{
    rslot *r = rtable_find(&q->receipts, receipt);
    return r ? r->m : NULL;
}

static bool current(const msg *m, uint64_t receipt)
{
    return m && receipt != 0 && m->receipt == receipt &&
           (m->state == M_INFLIGHT || m->state == M_PINNED);
}

/* Applies one op to m, whose receipt is current; q->mu held. */
static int apply(oq_queue *q, msg *m, const oq_settle *op, int64_t now,
                 msg **freelist)
{
    switch (op->op) {
    case OQ_SETTLE_NONE:
        return 0;
    case OQ_SETTLE_ACK:
        leave_flight(q, m);
        m->state = M_GONE;
        q->st.acked++;
        unref(m, freelist);
        return 0;
    case OQ_SETTLE_RETURN:
        /* The consumer could not start it: not an attempt. */
        if (m->counted && m->receive_count > 0)
            m->receive_count--;
        /* fall through */
    case OQ_SETTLE_NACK:
        if (op->error && *op->error) {
            /* Kept for a later dead letter; best effort. */
            size_t len = strlen(op->error) + 1;
            char *e = oq__malloc(len);
            if (e) {
                memcpy(e, op->error, len);
                oq__free(m->last_error);
                m->last_error = e;
            }
        }
        leave_flight(q, m);
        q->st.nacked++;
        if (op->delay_ms > 0) {
            m->state = M_DELAYED;
            m->due_ms = oq__add_ms(now, op->delay_ms);
            if (oq__heap_push(&q->delayed, m) == 0)
                return 0;
            /* No memory for the heap slot: make it ready now instead. */
        }
        ready_push(q, m, now);
        wake_one(q);
        return 0;
    case OQ_SETTLE_EXTEND:
        if (m->state == M_INFLIGHT) {
            m->due_ms = oq__add_ms(now, OQ__MAX(op->delay_ms, 0));
            oq__heap_update(&q->deadlines, m);
        }
        return 0;
    case OQ_SETTLE_PIN:
        if (m->state == M_INFLIGHT) {
            oq__heap_remove(&q->deadlines, m);
            m->state = M_PINNED;
            q->pinned++;
        }
        return 0;
    case OQ_SETTLE_DEAD: {
        dead *d;
        if ((unsigned)op->reason >= OQ_DLQ__COUNT)
            return OQ_EINVAL;
        /* Out of memory: the message stays as it is, in flight with its
         * receipt, so the caller can try again. */
        if ((d = dead_new(op->error)) == NULL)
            return OQ_ENOMEM;
        leave_flight(q, m);
        dead_link(q, m, d, op->reason, now);
        return 0;
    }
    }
    return OQ_EINVAL;
}

int oq_queue_settle(oq_queue *q, oq_settle *ops, size_t n)
{
    int ok = 0;
    int64_t now = now_ms(q);
    msg *freelist = NULL;

    pthread_mutex_lock(&q->mu);
    pump(q, now);
    for (size_t i = 0; i < n; i++) {
        oq_settle *op = &ops[i];
        msg *m = op->d ? op->d->msg_ : NULL;

        if (op->op == OQ_SETTLE_NONE)
            op->result = 0;
        else if (m == NULL || !current(m, op->d->receipt))
            op->result = OQ_ESTALE;
        else
            op->result = apply(q, m, op, now, &freelist);
        if (op->result == 0)
            ok++;
        /* Out of memory leaves the delivery's reference, so the caller
         * can retry the op. */
        if (op->release && m && op->result != OQ_ENOMEM) {
            unref(m, &freelist);
            op->d->msg_ = NULL;
        }
    }
    if (q->closed && drained(q))
        pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    free_list(freelist);
    return ok;
}

/* One op by receipt, for callers that hold no delivery (the node protocol). */
static int by_receipt(oq_queue *q, uint64_t receipt, oq_settle *op)
{
    int64_t now = now_ms(q);
    msg *freelist = NULL;
    msg *m;
    int rc;

    pthread_mutex_lock(&q->mu);
    pump(q, now);
    m = lookup_receipt(q, receipt);
    rc = current(m, receipt) ? apply(q, m, op, now, &freelist) : OQ_ESTALE;
    if (q->closed && drained(q))
        pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    free_list(freelist);
    return rc;
}

int oq_queue_ack(oq_queue *q, uint64_t receipt)
{
    oq_settle op = { .op = OQ_SETTLE_ACK };
    return by_receipt(q, receipt, &op);
}

int oq_queue_nack(oq_queue *q, uint64_t receipt, int64_t delay_ms)
{
    oq_settle op = { .op = OQ_SETTLE_NACK, .delay_ms = delay_ms };
    return by_receipt(q, receipt, &op);
}

int oq_queue_extend(oq_queue *q, uint64_t receipt, int64_t ms)
{
    oq_settle op = { .op = OQ_SETTLE_EXTEND, .delay_ms = ms };
    return by_receipt(q, receipt, &op);
}

int oq_queue_dead_letter(oq_queue *q, uint64_t receipt, oq_dlq_reason reason,
                         const char *error)
{
    oq_settle op = { .op = OQ_SETTLE_DEAD, .reason = reason, .error = error };
    if ((unsigned)reason >= OQ_DLQ__COUNT)
        return OQ_EINVAL;
    return by_receipt(q, receipt, &op);
}

void oq_queue_release(oq_queue *q, oq_delivery *d, size_t n)
{
    msg *freelist = NULL;

    pthread_mutex_lock(&q->mu);
    for (size_t i = 0; i < n; i++) {
        if (d[i].msg_) {
            unref(d[i].msg_, &freelist);
            d[i].msg_ = NULL;
        }
    }
    pthread_mutex_unlock(&q->mu);
    free_list(freelist);
}

/* ------------------------------------------------------- close and stats */

void oq_queue_close(oq_queue *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = true;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

void oq_queue_wake(oq_queue *q)
{
    pthread_mutex_lock(&q->mu);
    q->wakes++;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

void oq_queue_stats_get(oq_queue *q, oq_queue_stats *out)
{
    int64_t now = now_ms(q);

    pthread_mutex_lock(&q->mu);
    pump(q, now);
    *out = q->st;
    out->ready = q->ready_len;
    out->delayed = q->delayed.len;
    out->in_flight = q->deadlines.len + q->pinned;
    out->oldest_ready_age_ms = q->ready_head ? now - q->ready_head->ready_ms : 0;
    pthread_mutex_unlock(&q->mu);
}

static void visit(const dead *d, oq_dead_fn fn, void *arg)
{
    oq_dead_letter dl = {
        .id = d->m->id,
        .id_len = d->m->id_len,
        .payload = d->m->payload,
        .payload_len = d->m->payload_len,
        .tag = d->m->tag,
        .reason = d->reason,
        .error = d->error ? d->error : "",
        .attempts = d->attempts,
        .sent_ms = d->m->sent_ms,
        .first_receive_ms = d->m->first_receive_ms,
        .dead_ms = d->dead_ms,
    };
    fn(&dl, arg);
}

size_t oq_queue_dead_letters(oq_queue *q, int take_all, oq_dead_fn fn,
                             void *arg)
{
    size_t n = 0;
    dead *d, *list;
    msg *freelist = NULL;

    pthread_mutex_lock(&q->mu);
    if (!take_all) {
        /* Visited under the lock: fn must not call into the queue. */
        for (d = q->dead_head; d; d = d->next, n++)
            if (fn)
                visit(d, fn, arg);
        pthread_mutex_unlock(&q->mu);
        return n;
    }
    list = q->dead_head;
    q->dead_head = q->dead_tail = NULL;
    pthread_mutex_unlock(&q->mu);

    for (d = list; d; d = d->next, n++)
        if (fn)
            visit(d, fn, arg);

    pthread_mutex_lock(&q->mu);
    while ((d = list) != NULL) {
        list = d->next;
        d->m->state = M_GONE;
        unref(d->m, &freelist);
        free_dead(d);
    }
    pthread_mutex_unlock(&q->mu);
    free_list(freelist);
    return n;
}
