/* Description: the worker pool applies each event's effect exactly once:
 * duplicates are acked without effect, RETRY is retried with backoff, FAIL
 * is dead-lettered once (and settles the id), a worker that overran its
 * lease has its outputs discarded, a graceful stop loses nothing, and the
 * stats balance. Time comes from a test clock that only the test moves. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "oq_cli.h"

#define VT 1000

typedef struct fx {
    oq_testclock *tc;
    oq_queue *q;
    oq_idset *s;
    oq_memsink *sink;
    oq_pool *p;
    oq_pool_opts po;
} fx;

static void nap(void)
{
    struct timespec ts = { 0, 200 * 1000 };
    nanosleep(&ts, NULL);
}

static int setup_with(void **state, size_t dedup)
{
    fx *f = calloc(1, sizeof(*f));
    oq_queue_opts qo;
    oq_idset_opts so;

    f->tc = oq_testclock_new(1000000);
    oq_queue_opts_defaults(&qo);
    qo.visibility_timeout_ms = VT;
    qo.dedup_count = dedup;
    qo.clock = oq_testclock_clock(f->tc);
    assert_int_equal(oq_queue_new(&f->q, &qo), 0);
    oq_idset_opts_defaults(&so);
    so.clock = qo.clock;
    assert_int_equal(oq_idset_new(&f->s, &so), 0);
    assert_int_equal(oq_memsink_new(&f->sink), 0);
    oq_pool_opts_defaults(&f->po);
    f->po.clock = qo.clock;
    f->po.sink = oq_memsink_sink(f->sink);
    f->po.backoff_base_ms = 100;
    f->po.backoff_cap_ms = 400;
    f->po.poll_ms = 5;
    f->po.seed = 42;
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return setup_with(state, 0); /* duplicates reach the processed set */
}

static int teardown(void **state)
{
    fx *f = *state;
    oq_pool_free(f->p);
    oq_queue_free(f->q);
    oq_idset_free(f->s);
    oq_memsink_free(f->sink);
    oq_testclock_free(f->tc);
    free(f);
    return 0;
}

static void start(fx *f)
{
    assert_int_equal(oq_pool_start(&f->p, f->q, f->s, &f->po), 0);
}

/* Closes the queue and moves the test clock until the pool has drained. */
static void drain(fx *f)
{
    oq_queue_stats st;
    oq_queue_close(f->q);
    for (int i = 0; i < 200000; i++) {
        oq_queue_stats_get(f->q, &st);
        if (st.ready + st.delayed + st.in_flight == 0)
            break;
        oq_testclock_advance(f->tc, 10);
        nap();
    }
    assert_int_equal(oq_pool_wait(f->p), 0);
}

static void send_id(fx *f, const char *id)
{
    assert_int_equal(oq_queue_send(f->q, id, strlen(id), id, strlen(id), 0), 0);
}

/* Counts each event once under its id, and records the attempt. */
static int count_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)arg;
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    oq_txn_record(txn, ev->id, ev->id_len);
    return OQ_OK;
}

static int64_t effect(fx *f, const char *id)
{
    int64_t v = 0;
    if (oq_memsink_get(f->sink, id, strlen(id), &v) != 0)
        return 0;
    return v;
}

static void test_each_event_once(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    char id[16];

    f->po.handler = count_handler;
    start(f);
    for (int i = 0; i < 500; i++) {
        snprintf(id, sizeof(id), "e%d", i);
        send_id(f, id);
    }
    drain(f);
    for (int i = 0; i < 500; i++) {
        snprintf(id, sizeof(id), "e%d", i);
        assert_int_equal(effect(f, id), 1);
    }
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 500);
    assert_int_equal(ps.duplicates, 0);
    assert_int_equal(oq_memsink_nrecords(f->sink), 500);
}

static void test_duplicates_have_no_effect(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;

    f->po.handler = count_handler;
    f->po.workers = 1; /* same batch: exercises the redo path */
    start(f);
    send_id(f, "x");
    send_id(f, "y");
    send_id(f, "x");
    send_id(f, "x");
    drain(f);
    assert_int_equal(effect(f, "x"), 1);
    assert_int_equal(effect(f, "y"), 1);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 2);
    assert_int_equal(ps.duplicates, 2);
    assert_int_equal(ps.busy, 0);
}

static void test_duplicates_across_batches(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    char id[16];

    f->po.handler = count_handler;
    f->po.workers = 3;
    f->po.batch = 4;
    start(f);
    for (int r = 0; r < 5; r++)
        for (int i = 0; i < 60; i++) {
            snprintf(id, sizeof(id), "d%d", i);
            send_id(f, id);
        }
    drain(f);
    for (int i = 0; i < 60; i++) {
        snprintf(id, sizeof(id), "d%d", i);
        assert_int_equal(effect(f, id), 1);
    }
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 60);
    assert_int_equal(ps.duplicates, 240);
}

static int flaky_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)arg;
    if (ev->attempt < 3) {
        oq_txn_count(txn, "must-not-appear", 15, 1);
        oq_txn_error(txn, "try again");
        return OQ_RETRY;
    }
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    return OQ_OK;
}

static void test_retry_with_backoff(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    oq_queue_stats qs;

    f->po.handler = flaky_handler;
    start(f);
    send_id(f, "r1");
    send_id(f, "r2");
    drain(f);
    assert_int_equal(effect(f, "r1"), 1);
    assert_int_equal(effect(f, "r2"), 1);
    assert_int_equal(effect(f, "must-not-appear"), 0);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.retried, 4);
    assert_int_equal(ps.processed, 2);
    oq_queue_stats_get(f->q, &qs);
    assert_int_equal(qs.nacked, 4);
}

static int poison_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)arg;
    if (ev->id_len == 6 && memcmp(ev->id, "poison", 6) == 0) {
        oq_txn_count(txn, "poison-effect", 13, 1);
        oq_txn_error(txn, "cannot handle %.*s", (int)ev->id_len, ev->id);
        return OQ_FAIL;
    }
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    return OQ_OK;
}

typedef struct dls {
    int n;
    char error[64];
    oq_dlq_reason reason;
} dls;

static void collect(const oq_dead_letter *dl, void *arg)
{
    dls *d = arg;
    d->n++;
    d->reason = dl->reason;
    snprintf(d->error, sizeof(d->error), "%s", dl->error);
}

static void test_fail_dead_letters_once(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    dls seen = { 0 };

    f->po.handler = poison_handler;
    start(f);
    send_id(f, "ok");
    send_id(f, "poison");
    send_id(f, "poison"); /* a duplicate of a dead event is a duplicate */
    drain(f);
    oq_queue_dead_letters(f->q, 0, collect, &seen);
    assert_int_equal(seen.n, 1);
    assert_int_equal(seen.reason, OQ_DLQ_FAILED);
    assert_string_equal(seen.error, "cannot handle poison");
    assert_int_equal(effect(f, "poison-effect"), 0);
    assert_int_equal(effect(f, "ok"), 1);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.dead, 1);
    assert_int_equal(ps.duplicates, 1);
    assert_int_equal(ps.processed, 1);
}

/* A handler that, on its first attempt, blocks until the test lets it go:
 * the test moves the clock past its lease meanwhile. */
typedef struct stall {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started, release;
} stall;

static stall st_gate = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                         0, 0 };

static int stalling_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)arg;
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    if (ev->attempt == 1) {
        pthread_mutex_lock(&st_gate.mu);
        st_gate.started = 1;
        pthread_cond_broadcast(&st_gate.cv);
        while (!st_gate.release)
            pthread_cond_wait(&st_gate.cv, &st_gate.mu);
        pthread_mutex_unlock(&st_gate.mu);
    }
    return OQ_OK;
}

static void test_overrun_lease_outputs_discarded(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;

    f->po.handler = stalling_handler;
    f->po.workers = 2;
    f->po.batch = 1;
    start(f);
    send_id(f, "slow");
    pthread_mutex_lock(&st_gate.mu);
    while (!st_gate.started)
        pthread_cond_wait(&st_gate.cv, &st_gate.mu);
    pthread_mutex_unlock(&st_gate.mu);
    /* Past the visibility timeout and the lease: the other worker gets it,
     * takes the lease over, and commits. */
    oq_testclock_advance(f->tc, VT + 1);
    oq_queue_wake(f->q);
    for (int i = 0; i < 100000 && effect(f, "slow") == 0; i++)
        nap();
    assert_int_equal(effect(f, "slow"), 1);
    /* Now the first worker finishes: its commit must be refused. */
    pthread_mutex_lock(&st_gate.mu);
    st_gate.release = 1;
    pthread_cond_broadcast(&st_gate.cv);
    pthread_mutex_unlock(&st_gate.mu);
    drain(f);
    assert_int_equal(effect(f, "slow"), 1);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 1);
    assert_int_equal(ps.fenced, 1);
}

/* A batch-mate that runs past the lease (a hanging command) must not make
 * the finished messages of its batch lose their lease and run again: they
 * are pinned before the next handler starts. */
static _Atomic int hang_calls[8];
static oq_testclock *hang_clock;

static int hang_index(const oq_event *ev)
{
    return ev->id_len == 1 && ev->id[0] >= 'a' && ev->id[0] <= 'h'
               ? ev->id[0] - 'a' : 7;
}

static int hanging_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)arg;
    atomic_fetch_add(&hang_calls[hang_index(ev)], 1);
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    if (ev->id_len == 1 && ev->id[0] == 'h' && ev->attempt == 1)
        oq_testclock_advance(hang_clock, 3 * VT); /* "hangs" past its lease */
    return OQ_OK;
}

typedef struct dead_seen {
    int n;
    int bad_id, max_attempts, other;
    char ids[8][8];
} dead_seen;

static void on_dead(const oq_dead_letter *dl, void *arg)
{
    dead_seen *d = arg;
    if (dl->reason == OQ_DLQ_BAD_ID)
        d->bad_id++;
    else if (dl->reason == OQ_DLQ_MAX_ATTEMPTS)
        d->max_attempts++;
    else
        d->other++;
    if (d->n < 8)
        snprintf(d->ids[d->n], sizeof(d->ids[0]), "%.*s", (int)dl->id_len,
                 dl->id);
    d->n++;
}

static void test_hanging_batch_mate(void **state)
{
    fx *f = *state;
    oq_queue_opts qo;
    oq_message m[5];
    const char *ids[5] = { "a", "b", "", "h", "c" };
    char warm[16];
    dead_seen dead = { 0 };

    /* At most one receive: a message whose lease runs out is dead. */
    oq_queue_free(f->q);
    oq_queue_opts_defaults(&qo);
    qo.visibility_timeout_ms = VT;
    qo.dedup_count = 0;
    qo.max_receives = 1;
    qo.clock = oq_testclock_clock(f->tc);
    assert_int_equal(oq_queue_new(&f->q, &qo), 0);
    hang_clock = f->tc;
    for (int i = 0; i < 8; i++)
        atomic_store(&hang_calls[i], 0);
    f->po.handler = hanging_handler;
    f->po.workers = 1;
    f->po.batch = 8;
    start(f);
    /* Warm up: quick handlers move the pool to whole batches. */
    for (int i = 0; i < 40; i++) {
        snprintf(warm, sizeof(warm), "w%d", i);
        send_id(f, warm);
    }
    for (int i = 0; i < 100000 && effect(f, "w39") == 0; i++)
        nap();
    for (int i = 0; i < 5; i++)
        m[i] = (oq_message){ ids[i], strlen(ids[i]), ids[i], strlen(ids[i]),
                             0, (uint64_t)i };
    assert_int_equal(oq_queue_send_batch(f->q, m, 5, NULL), 5);
    drain(f);
    /* a and b finished before h hung: each ran once, applied once, and was
     * neither redelivered nor dead-lettered. */
    assert_int_equal(atomic_load(&hang_calls[0]), 1);
    assert_int_equal(atomic_load(&hang_calls[1]), 1);
    assert_int_equal(effect(f, "a"), 1);
    assert_int_equal(effect(f, "b"), 1);
    oq_queue_dead_letters(f->q, 0, on_dead, &dead);
    /* The id-less message is bad_id, not max_attempts; h (and c, whose
     * lease ran out before it started) may be max_attempts. */
    assert_int_equal(dead.bad_id, 1);
    assert_int_equal(dead.other, 0);
    for (int i = 0; i < dead.n && i < 8; i++) {
        assert_string_not_equal(dead.ids[i], "a");
        assert_string_not_equal(dead.ids[i], "b");
    }
}

/* A copy that expires (TTL) is settled against the processed set: a copy
 * of a processed event is a duplicate, and an expired event that was never
 * processed is dead-lettered once, whatever the number of copies. */
static void test_dying_copies_have_one_outcome(void **state)
{
    fx *f = *state;
    oq_queue_opts qo;
    oq_pool_stats ps;
    dead_seen dead = { 0 };

    oq_queue_free(f->q);
    oq_queue_opts_defaults(&qo);
    qo.visibility_timeout_ms = VT;
    qo.dedup_count = 0;
    qo.ttl_ms = 500;
    qo.deliver_dying = 1;
    qo.clock = oq_testclock_clock(f->tc);
    assert_int_equal(oq_queue_new(&f->q, &qo), 0);
    f->po.handler = count_handler;
    f->po.workers = 2;
    start(f);
    send_id(f, "x");
    for (int i = 0; i < 100000 && effect(f, "x") == 0; i++)
        nap();
    assert_int_equal(effect(f, "x"), 1);
    /* Ready only once they are older than the TTL. */
    assert_int_equal(oq_queue_send(f->q, "x", 1, "x", 1, 1000), 0);
    assert_int_equal(oq_queue_send(f->q, "y", 1, "y", 1, 1000), 0);
    assert_int_equal(oq_queue_send(f->q, "y", 1, "y", 1, 1000), 0);
    drain(f);
    assert_int_equal(effect(f, "x"), 1);
    assert_int_equal(effect(f, "y"), 0);
    oq_queue_dead_letters(f->q, 0, on_dead, &dead);
    assert_int_equal(dead.n, 1);
    assert_string_equal(dead.ids[0], "y");
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 1);
    assert_int_equal(ps.duplicates, 2);
    assert_int_equal(ps.dead, 1);
}

/* oq_txn_heartbeat from a handler: the attempt ends a timeout from now
 * with heartbeats, OQ_ENOENT without. */
static int64_t beat_seen;

static int beating_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)ev;
    (void)arg;
    beat_seen = oq_txn_heartbeat(txn);
    return OQ_OK;
}

static void test_txn_heartbeat(void **state)
{
    fx *f = *state;

    f->po.handler = beating_handler;
    f->po.workers = 1;
    f->po.lease_ms = VT;
    f->po.timeout_ms = 5 * VT;
    start(f);
    send_id(f, "b");
    drain(f);
    /* The test clock moves only while drain waits: the end is a timeout
     * after some time at or after the start. */
    assert_true(beat_seen >= 1000000 + 5 * VT);
    assert_true(beat_seen <= oq_clock_now(oq_testclock_clock(f->tc)) + 5 * VT);
    assert_int_equal(oq_txn_heartbeat(NULL), OQ_EINVAL);
}

static void test_txn_heartbeat_without_heartbeats(void **state)
{
    fx *f = *state;

    f->po.handler = beating_handler;
    f->po.workers = 1;
    start(f);
    send_id(f, "b");
    drain(f);
    assert_int_equal(beat_seen, OQ_ENOENT);
}

static void gate_reset(void)
{
    pthread_mutex_lock(&st_gate.mu);
    st_gate.started = st_gate.release = 0;
    pthread_mutex_unlock(&st_gate.mu);
}

static void gate_wait_started(void)
{
    pthread_mutex_lock(&st_gate.mu);
    while (!st_gate.started)
        pthread_cond_wait(&st_gate.cv, &st_gate.mu);
    pthread_mutex_unlock(&st_gate.mu);
}

static void gate_release(void)
{
    pthread_mutex_lock(&st_gate.mu);
    st_gate.release = 1;
    pthread_cond_broadcast(&st_gate.cv);
    pthread_mutex_unlock(&st_gate.mu);
}

/* Moves the test clock by total ms in steps of a quarter lease, giving
 * the heartbeat thread (it looks every 5 ms) time to see each step. */
static void advance_slowly(fx *f, int64_t total)
{
    for (int64_t t = 0; t < total; t += VT / 4) {
        struct timespec ts = { 0, 30 * 1000 * 1000 };
        oq_testclock_advance(f->tc, VT / 4);
        oq_queue_wake(f->q);
        nanosleep(&ts, NULL);
    }
}

/* Heartbeats: a handler that runs for several leases keeps its message
 * and its claim; it is neither delivered again nor fenced. */
static void test_heartbeat_keeps_a_long_handler(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    oq_queue_stats qs;

    gate_reset();
    f->po.handler = stalling_handler;
    f->po.workers = 2;
    f->po.batch = 1;
    f->po.lease_ms = VT;
    start(f);
    send_id(f, "long");
    gate_wait_started();
    advance_slowly(f, 4 * VT);
    gate_release();
    drain(f);
    assert_int_equal(effect(f, "long"), 1);
    oq_pool_stats_get(f->p, &ps);
    oq_queue_stats_get(f->q, &qs);
    assert_int_equal(ps.processed, 1);
    assert_int_equal(ps.handler_calls, 1);
    assert_int_equal(ps.fenced, 0);
    assert_int_equal(qs.redelivered, 0);
    assert_true(oq__pool_lease_extensions(f->p) >= 5);
}

/* With a timeout, heartbeats stop at the attempt's end: the message is
 * delivered again one lease later and done by the other worker, and the
 * first attempt's late commit is fenced. */
static void test_heartbeat_stops_at_the_timeout(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;

    gate_reset();
    f->po.handler = stalling_handler;
    f->po.workers = 2;
    f->po.batch = 1;
    f->po.lease_ms = VT;
    f->po.timeout_ms = 3 * VT / 2;
    start(f);
    send_id(f, "capped");
    gate_wait_started();
    advance_slowly(f, 3 * VT);
    for (int i = 0; i < 100000 && effect(f, "capped") == 0; i++)
        nap();
    assert_int_equal(effect(f, "capped"), 1);
    gate_release();
    drain(f);
    assert_int_equal(effect(f, "capped"), 1);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 1);
    assert_int_equal(ps.handler_calls, 2);
    assert_int_equal(ps.fenced, 1);
}

static void test_graceful_stop_loses_nothing(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    oq_queue_stats qs;
    char id[16];

    f->po.handler = count_handler;
    f->po.workers = 2;
    f->po.batch = 8;
    for (int i = 0; i < 2000; i++) {
        snprintf(id, sizeof(id), "s%d", i);
        send_id(f, id);
    }
    start(f);
    assert_int_equal(oq_pool_stop(f->p, 5000), 0);
    oq_pool_stats_get(f->p, &ps);
    oq_queue_stats_get(f->q, &qs);
    /* What was not processed is still in the queue, visible, not in flight. */
    assert_int_equal(qs.in_flight, 0);
    assert_int_equal(ps.processed + qs.ready, 2000);
    assert_int_equal(oq_memsink_nkeys(f->sink), ps.processed);
}

static void test_stats_balance(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    oq_queue_stats qs;
    char id[16];
    uint64_t dead = 0;

    f->po.handler = poison_handler;
    f->po.workers = 2;
    start(f);
    for (int i = 0; i < 300; i++) {
        snprintf(id, sizeof(id), "b%d", i % 200);
        send_id(f, id);
    }
    send_id(f, "poison");
    drain(f);
    oq_pool_stats_get(f->p, &ps);
    oq_queue_stats_get(f->q, &qs);
    for (int r = 0; r < OQ_DLQ__COUNT; r++)
        dead += qs.dead_lettered[r];
    assert_int_equal(qs.sent, 301);
    assert_int_equal(qs.sent, ps.processed + ps.duplicates + dead);
    assert_int_equal(qs.acked, ps.processed + ps.duplicates);
    assert_int_equal(ps.processed, 200);
    assert_int_equal(ps.duplicates, 100);
    assert_int_equal(dead, 1);
}

/* A decode hook: payload "id=X" gives id X (parsed form: a heap copy of
 * X, which the handler checks); anything else is dead-lettered BAD_ID. */
static _Atomic int parsed_live;

static int decode_kv(const oq_event *ev, oq_decoded *out, void *arg)
{
    const char *p = ev->payload;
    char *copy;
    (void)arg;
    if (ev->payload_len < 4 || memcmp(p, "id=", 3) != 0) {
        out->reason = OQ_DLQ_BAD_ID;
        snprintf(out->error, sizeof(out->error), "no id in '%.*s'",
                 (int)ev->payload_len, p);
        return -1;
    }
    copy = strndup(p + 3, ev->payload_len - 3);
    atomic_fetch_add(&parsed_live, 1);
    out->parsed = copy;
    out->id = copy;
    out->id_len = strlen(copy);
    return 0;
}

static void free_kv(void *parsed, void *arg)
{
    (void)arg;
    atomic_fetch_sub(&parsed_live, 1);
    free(parsed);
}

static int parsed_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)arg;
    assert_non_null(ev->parsed);
    assert_memory_equal(ev->parsed, ev->id, ev->id_len);
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    return OQ_OK;
}

static void test_decode_hook(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    dls seen = { 0 };
    static const char *payloads[] = { "id=a", "id=b", "junk", "id=a", "id=c" };

    f->po.handler = parsed_handler;
    f->po.decode = decode_kv;
    f->po.free_parsed = free_kv;
    f->po.workers = 1;
    start(f);
    for (int i = 0; i < 5; i++)
        assert_int_equal(oq_queue_send(f->q, NULL, 0, payloads[i],
                                       strlen(payloads[i]), 0), 0);
    drain(f);
    assert_int_equal(effect(f, "a"), 1);
    assert_int_equal(effect(f, "b"), 1);
    assert_int_equal(effect(f, "c"), 1);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 3);
    assert_int_equal(ps.duplicates, 1);
    assert_int_equal(ps.rejected, 1);
    oq_queue_dead_letters(f->q, 0, collect, &seen);
    assert_int_equal(seen.n, 1);
    assert_int_equal(seen.reason, OQ_DLQ_BAD_ID);
    assert_string_equal(seen.error, "no id in 'junk'");
    assert_int_equal(atomic_load(&parsed_live), 0);
}

static void test_idless_message_is_bad_id(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;
    dls seen = { 0 };

    f->po.handler = count_handler;
    start(f);
    assert_int_equal(oq_queue_send(f->q, NULL, 0, "one", 3, 0), 0);
    assert_int_equal(oq_queue_send(f->q, NULL, 0, "two", 3, 0), 0);
    send_id(f, "real");
    drain(f);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 1);
    assert_int_equal(ps.duplicates, 0);
    assert_int_equal(ps.rejected, 2);
    oq_queue_dead_letters(f->q, 0, collect, &seen);
    assert_int_equal(seen.n, 2);
    assert_int_equal(seen.reason, OQ_DLQ_BAD_ID);
}

/* A sink whose first apply fails (as if out of memory): the event must be
 * retried and applied once, not acked with its effect missing. */
static _Atomic int applies, failures_left;

static int flaky_apply(const oq_event *ev, const oq_txn *txn, void *arg)
{
    (void)ev;
    (void)txn;
    (void)arg;
    if (atomic_fetch_sub(&failures_left, 1) > 0)
        return OQ_ENOMEM;
    atomic_fetch_add(&applies, 1);
    return 0;
}

static void test_failed_sink_apply_is_retried(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;

    atomic_store(&failures_left, 1);
    atomic_store(&applies, 0);
    f->po.handler = count_handler;
    f->po.sink = (oq_sink){ flaky_apply, NULL, NULL };
    f->po.workers = 1;
    start(f);
    send_id(f, "s1");
    drain(f);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(atomic_load(&applies), 1);
    assert_int_equal(ps.processed, 1);
    assert_int_equal(ps.retried, 1);
    assert_int_equal(ps.handler_calls, 2);
}

static void test_backoff_full_jitter(void **state)
{
    uint64_t rng = 7;
    int64_t max = 0;
    (void)state;
    for (int i = 0; i < 5000; i++) {
        int64_t b = oq_backoff_ms(100, 30000, 4, &rng);
        assert_true(b >= 0 && b <= 800);
        max = OQ__MAX(max, b);
    }
    assert_true(max > 700);
    assert_true(oq_backoff_ms(100, 30000, 100, &rng) <= 30000);
}

static void test_bad_options(void **state)
{
    fx *f = *state;
    oq_pool *p = NULL;
    f->po.workers = 0;
    assert_int_equal(oq_pool_start(&p, f->q, f->s, &f->po), OQ_EINVAL);
    f->po.workers = 1;
    f->po.batch = 0;
    assert_int_equal(oq_pool_start(&p, f->q, f->s, &f->po), OQ_EINVAL);
    assert_null(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(test_each_event_once),
        T(test_duplicates_have_no_effect),
        T(test_duplicates_across_batches),
        T(test_retry_with_backoff),
        T(test_fail_dead_letters_once),
        T(test_overrun_lease_outputs_discarded),
        T(test_hanging_batch_mate),
        T(test_dying_copies_have_one_outcome),
        T(test_heartbeat_keeps_a_long_handler),
        T(test_heartbeat_stops_at_the_timeout),
        T(test_txn_heartbeat),
        T(test_txn_heartbeat_without_heartbeats),
        T(test_graceful_stop_loses_nothing),
        T(test_stats_balance),
        T(test_bad_options),
        T(test_decode_hook),
        T(test_idless_message_is_bad_id),
        T(test_failed_sink_apply_is_retried),
        cmocka_unit_test(test_backoff_full_jitter),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
