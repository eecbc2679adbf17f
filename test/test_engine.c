/*
 * Description: the engine (src/engine.c) keeps its promises over every
 * queue backend: the same cases run through oq__engine_start over the
 * memory queue and ledger (time from a test clock that only the test
 * moves) and over the Redis queue and ledger (against a redis-server this
 * test starts; skipped, and said so, where there is none). A message that
 * is not settled is received again after its deadline; a slow handler does
 * not make its finished batch-mates run again; a worker that lost its
 * lease cannot commit (the newer holder's outputs stand, applied once);
 * a stop returns the unstarted rest of a batch to the queue (every
 * message is processed or still there). test/test_pool.c covers more of
 * the memory pair through oq_pool_start.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "oq_cli.h"
#include "redis_server.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VT 1000        /* memory: visibility timeout, test ms */
#define REDIS_VT 300   /* Redis: visibility timeout, real ms */

typedef struct fx fx;

typedef struct backend {
    const char *name;
    /* Opens the backends for an engine of that many workers. */
    void (*open)(fx *f, unsigned workers, unsigned batch);
    void (*close)(fx *f);
    /* Sends the ids as one atomic batch (a receive may take them all). */
    void (*send)(fx *f, const char *const *ids, size_t n);
    /* What the committed outputs of id added (the handler counts +1). */
    int64_t (*applied)(fx *f, const char *id);
    bool (*has_record)(fx *f, const char *rec);
    /* Lets a delivery's deadline pass (called with a handler running). */
    void (*lose_lease)(fx *f);
    /* Messages sent and not yet acked or dead-lettered. */
    long (*left)(fx *f);
    /* Waits until everything sent is settled, then stops the engine. */
    void (*settle_all)(fx *f);
} backend;

struct fx {
    const backend *b;
    oq_pool *p;
    oq_pool_opts po;
    const oq__queue_methods *qm;
    void *qb;
    const oq__ledger_methods *lm;
    void *lb;
    /* memory */
    oq_testclock *tc;
    oq_queue *q;
    oq_idset *s;
    oq_memsink *sink;
    oq__mem_ledger mem;
    /* Redis */
    void *rb;
    redisContext *rc;
};

static test_redis redis;
static bool with_redis;
static fx *cur; /* for the handlers: the case running now */

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------ handler support */

/* Handler calls per id (ids are short, few per case). */
static pthread_mutex_t calls_mu = PTHREAD_MUTEX_INITIALIZER;
static char call_ids[128][16];
static int call_n[128];
static size_t ncall_ids;

static void note_call(const oq_event *ev)
{
    size_t i;

    pthread_mutex_lock(&calls_mu);
    for (i = 0; i < ncall_ids; i++)
        if (strlen(call_ids[i]) == ev->id_len &&
            memcmp(call_ids[i], ev->id, ev->id_len) == 0)
            break;
    if (i == ncall_ids && i < 128) {
        snprintf(call_ids[i], sizeof(call_ids[i]), "%.*s", (int)ev->id_len,
                 ev->id);
        ncall_ids++;
    }
    if (i < 128)
        call_n[i]++;
    pthread_mutex_unlock(&calls_mu);
}

static int calls(const char *id)
{
    int n = 0;

    pthread_mutex_lock(&calls_mu);
    for (size_t i = 0; i < ncall_ids; i++)
        if (strcmp(call_ids[i], id) == 0)
            n = call_n[i];
    pthread_mutex_unlock(&calls_mu);
    return n;
}

/* A gate a handler waits at until the test opens it. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started, open;
    int overtaken; /* attempt 2 ran while attempt 1 waited here */
} gate = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0 };

static void gate_wait_started(void)
{
    struct timespec until;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 20;
    pthread_mutex_lock(&gate.mu);
    while (!gate.started)
        assert_int_equal(pthread_cond_timedwait(&gate.cv, &gate.mu, &until),
                         0);
    pthread_mutex_unlock(&gate.mu);
}

static void gate_open(void)
{
    pthread_mutex_lock(&gate.mu);
    gate.open = 1;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
}

/* Holds the handler until the test opens the gate. */
static void gate_hold(void)
{
    pthread_mutex_lock(&gate.mu);
    gate.started = 1;
    pthread_cond_broadcast(&gate.cv);
    while (!gate.open)
        pthread_cond_wait(&gate.cv, &gate.mu);
    pthread_mutex_unlock(&gate.mu);
}

static bool is_id(const oq_event *ev, const char *id)
{
    return ev->id_len == strlen(id) && memcmp(ev->id, id, ev->id_len) == 0;
}

/* The event's id is its payload (the Redis queue has no message ids). */
static int payload_id(const oq_event *ev, oq_decoded *out, void *arg)
{
    (void)arg;
    out->id = ev->payload;
    out->id_len = ev->payload_len;
    return 0;
}

/* Counts the event under its id and records "id#attempt"; the first
 * attempt of "slow" waits at the gate. */
static int gated_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    char rec[48];
    int n;

    (void)arg;
    note_call(ev);
    if (is_id(ev, "slow") && ev->attempt == 1) {
        gate_hold();
    } else if (is_id(ev, "slow")) {
        pthread_mutex_lock(&gate.mu);
        gate.overtaken |= gate.started && !gate.open;
        pthread_mutex_unlock(&gate.mu);
    }
    if (is_id(ev, "g") && ev->attempt == 1)
        gate_hold();
    n = snprintf(rec, sizeof(rec), "%.*s#%u", (int)ev->id_len, ev->id,
                 ev->attempt);
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    oq_txn_record(txn, rec, (size_t)n);
    return OQ_OK;
}

/* "h" runs past its lease on its first attempt. */
static int hanging_handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)arg;
    note_call(ev);
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    if (is_id(ev, "h") && ev->attempt == 1)
        cur->b->lose_lease(cur);
    return OQ_OK;
}

/* ------------------------------------------------------- the memory pair */

static void mem_open(fx *f, unsigned workers, unsigned batch)
{
    oq_queue_opts qo;
    oq_idset_opts so;

    (void)workers;
    (void)batch;
    oq_queue_opts_defaults(&qo);
    qo.visibility_timeout_ms = VT;
    qo.dedup_count = 0;
    qo.clock = oq_testclock_clock(f->tc);
    assert_int_equal(oq_queue_new(&f->q, &qo), 0);
    oq_idset_opts_defaults(&so);
    so.clock = qo.clock;
    assert_int_equal(oq_idset_new(&f->s, &so), 0);
    assert_int_equal(oq_memsink_new(&f->sink), 0);
    f->mem = (oq__mem_ledger){ .s = f->s, .sink = oq_memsink_sink(f->sink) };
    f->qm = &oq__mem_queue_methods;
    f->qb = f->q;
    f->lm = &oq__mem_ledger_methods;
    f->lb = &f->mem;
    f->po.clock = qo.clock;
    f->po.poll_ms = 5;
}

static void mem_close(fx *f)
{
    oq_queue_free(f->q);
    oq_idset_free(f->s);
    oq_memsink_free(f->sink);
}

static void mem_send(fx *f, const char *const *ids, size_t n)
{
    oq_message m[64];

    assert_true(n <= 64);
    for (size_t i = 0; i < n; i++)
        m[i] = (oq_message){ ids[i], strlen(ids[i]), ids[i], strlen(ids[i]),
                             0, 0 };
    assert_int_equal(oq_queue_send_batch(f->q, m, n, NULL), (int)n);
}

static int64_t mem_applied(fx *f, const char *id)
{
    int64_t v = 0;

    return oq_memsink_get(f->sink, id, strlen(id), &v) == 0 ? v : 0;
}

typedef struct find {
    const char *rec;
    bool found;
} find;

static void find_record(const void *data, size_t len, void *arg)
{
    find *x = arg;

    x->found |= len == strlen(x->rec) && memcmp(data, x->rec, len) == 0;
}

static bool mem_has_record(fx *f, const char *rec)
{
    find x = { rec, false };

    oq_memsink_foreach_record(f->sink, find_record, &x);
    return x.found;
}

static void mem_lose_lease(fx *f)
{
    oq_testclock_advance(f->tc, 3 * VT);
    oq_queue_wake(f->q);
}

static long mem_left(fx *f)
{
    oq_queue_stats qs;

    oq_queue_stats_get(f->q, &qs);
    return (long)(qs.ready + qs.delayed + qs.in_flight);
}

/* Closes the queue and moves the test clock (retries come due) until the
 * engine has drained it. */
static void mem_settle_all(fx *f)
{
    oq_queue_close(f->q);
    for (int i = 0; i < 200000 && mem_left(f) > 0; i++) {
        struct timespec ts = { 0, 200 * 1000 };
        oq_testclock_advance(f->tc, 10);
        nanosleep(&ts, NULL);
    }
    assert_int_equal(mem_left(f), 0);
    assert_int_equal(oq_pool_wait(f->p), 0);
}

static const backend memory_backend = {
    "memory", mem_open, mem_close, mem_send, mem_applied, mem_has_record,
    mem_lose_lease, mem_left, mem_settle_all,
};

/* ---------------------------------------------------------- the Redis pair */

#define cmd(f, ...) test_redis_cmd((f)->rc, __VA_ARGS__)

static void redis_open(fx *f, unsigned workers, unsigned batch)
{
    assert_int_equal(test_redis_flush(&redis), 0);
    assert_int_equal(oq__redis_backends_open(&f->rb, redis.url, "et", "g",
                                             REDIS_VT, 10, workers, batch),
                     0);
    f->rc = test_redis_connect(&redis);
    assert_non_null(f->rc);
    f->qm = &oq__redis_queue_methods;
    f->qb = f->rb;
    f->lm = &oq__redis_ledger_methods;
    f->lb = f->rb;
    f->po.poll_ms = 100;
}

static void redis_close(fx *f)
{
    oq__redis_backends_close(f->rb);
    redisFree(f->rc);
}

static void redis_send(fx *f, const char *const *ids, size_t n)
{
    void *r;

    /* MULTI: a blocked XREADGROUP is served after EXEC, with them all. */
    redisAppendCommand(f->rc, "MULTI");
    for (size_t i = 0; i < n; i++)
        redisAppendCommand(f->rc, "XADD et * e %s s test:%u", ids[i],
                           (unsigned)i + 1);
    redisAppendCommand(f->rc, "EXEC");
    for (size_t i = 0; i < n + 2; i++) {
        assert_int_equal(redisGetReply(f->rc, &r), REDIS_OK);
        assert_int_not_equal(((redisReply *)r)->type, REDIS_REPLY_ERROR);
        freeReplyObject(r);
    }
}

static int64_t redis_applied(fx *f, const char *id)
{
    redisReply *r = cmd(f, "HGET et:counts %s", id);
    int64_t v = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : 0;

    freeReplyObject(r);
    return v;
}

static bool redis_has_record(fx *f, const char *rec)
{
    redisReply *r = cmd(f, "XRANGE et:results - +");
    bool found = false;

    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *kv = r->element[i]->element[1];
        for (size_t j = 0; j + 1 < kv->elements; j += 2)
            found |= strcmp(kv->element[j]->str, "r") == 0 &&
                     strcmp(kv->element[j + 1]->str, rec) == 0;
    }
    freeReplyObject(r);
    return found;
}

static void redis_lose_lease(fx *f)
{
    /* The lease is a claim key's PX and the entry's idle time, both on
     * Redis's clock: no test clock reaches them, so wait them out. */
    (void)f;
    nap_ms(3 * REDIS_VT);
}

/* Pending (delivered, not acked) plus not yet delivered to the group. */
static long redis_left(fx *f)
{
    redisReply *r = cmd(f, "XPENDING et g");
    long n = (long)r->element[0]->integer;

    freeReplyObject(r);
    r = cmd(f, "XINFO GROUPS et");
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *g = r->element[i];
        for (size_t j = 0; j + 1 < g->elements; j += 2)
            if (strcmp(g->element[j]->str, "lag") == 0 &&
                g->element[j + 1]->type == REDIS_REPLY_INTEGER)
                n += (long)g->element[j + 1]->integer;
    }
    freeReplyObject(r);
    return n;
}

static void redis_settle_all(fx *f)
{
    /* Redeliveries wait for the housekeeper's XAUTOCLAIM (real time). */
    for (int i = 0; i < 2000 && redis_left(f) > 0; i++)
        nap_ms(10);
    assert_int_equal(redis_left(f), 0);
    assert_int_equal(oq_pool_stop(f->p, -1), 0);
}

static const backend redis_backend = {
    "redis", redis_open, redis_close, redis_send, redis_applied,
    redis_has_record, redis_lose_lease, redis_left, redis_settle_all,
};

/* -------------------------------------------------------------- fixture */

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    f->b = *state;
    f->tc = oq_testclock_new(1000000);
    oq_pool_opts_defaults(&f->po);
    f->po.decode = payload_id;
    f->po.backoff_base_ms = 10;
    f->po.backoff_cap_ms = 50;
    f->po.busy_retry_ms = 5;
    f->po.seed = 42;
    pthread_mutex_lock(&calls_mu);
    ncall_ids = 0;
    memset(call_n, 0, sizeof(call_n));
    pthread_mutex_unlock(&calls_mu);
    pthread_mutex_lock(&gate.mu);
    gate.started = gate.open = gate.overtaken = 0;
    pthread_mutex_unlock(&gate.mu);
    cur = f;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;

    gate_open(); /* a failed case may have left a handler waiting */
    oq_pool_free(f->p);
    if (f->qb)
        f->b->close(f);
    oq_testclock_free(f->tc);
    cur = NULL;
    free(f);
    return 0;
}

static void start(fx *f, unsigned workers, unsigned batch)
{
    f->po.workers = workers;
    f->po.batch = batch;
    f->b->open(f, workers, batch);
    assert_int_equal(oq__engine_start(&f->p, f->qm, f->qb, f->lm, f->lb,
                                      &f->po), 0);
}

static void send1(fx *f, const char *id)
{
    f->b->send(f, &id, 1);
}

/* Waits (real time, up to 20 s) until id's outputs are applied. */
static void wait_applied(fx *f, const char *id)
{
    for (int i = 0; i < 20000 && f->b->applied(f, id) == 0; i++)
        nap_ms(1);
    assert_int_equal(f->b->applied(f, id), 1);
}

/* Quick messages first: the engine then takes whole batches (it goes one
 * by one until it has measured the handler). */
static void warm_up(fx *f)
{
    char ids[40][16];
    const char *p[40];

    for (int i = 0; i < 40; i++) {
        snprintf(ids[i], sizeof(ids[i]), "w%d", i);
        p[i] = ids[i];
        send1(f, p[i]);
    }
    wait_applied(f, "w39");
}

/* "slow" hangs at the gate past its lease; another worker receives it
 * again and commits; then the first finishes. No heartbeats (lease_ms 0):
 * nothing keeps the first attempt's lease. */
static void overtake(fx *f)
{
    oq_pool_stats ps;

    f->po.handler = gated_handler;
    start(f, 2, 1);
    send1(f, "slow");
    gate_wait_started();
    f->b->lose_lease(f);
    wait_applied(f, "slow");
    gate_open();
    f->b->settle_all(f);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.processed, 1);
}

/* ---------------------------------------------------------------- cases */

static void test_redelivery_after_the_deadline(void **state)
{
    fx *f = *state;

    overtake(f);
    /* Received again while the first attempt still ran, after its
     * deadline, and applied once. */
    assert_int_equal(gate.overtaken, 1);
    assert_int_equal(calls("slow"), 2);
    assert_int_equal(f->b->applied(f, "slow"), 1);
}

static void test_stale_worker_cannot_commit(void **state)
{
    fx *f = *state;
    oq_pool_stats ps;

    overtake(f);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(ps.fenced, 1);
    /* The newer holder's outputs stand; the stale one's are discarded. */
    assert_int_equal(f->b->applied(f, "slow"), 1);
    assert_true(f->b->has_record(f, "slow#2"));
    assert_false(f->b->has_record(f, "slow#1"));
}

static void test_slow_handler_keeps_finished_batch_mates(void **state)
{
    fx *f = *state;
    static const char *const ids[4] = { "a", "b", "h", "c" };

    f->po.handler = hanging_handler;
    f->po.handler_never_blocks = 0;
    start(f, 1, 8);
    warm_up(f);
    f->b->send(f, ids, 4);
    f->b->settle_all(f);
    /* a and b finished before h ran past the lease: each ran once. */
    assert_int_equal(calls("a"), 1);
    assert_int_equal(calls("b"), 1);
    assert_int_equal(calls("h"), 2);
    for (int i = 0; i < 4; i++)
        assert_int_equal(f->b->applied(f, ids[i]), 1);
}

static void test_stop_returns_unstarted_work(void **state)
{
    fx *f = *state;
    static const char *const ids[8] = { "g",  "x1", "x2", "x3",
                                        "x4", "x5", "x6", "x7" };
    oq_pool_stats ps;

    f->po.handler = gated_handler;
    start(f, 1, 8);
    warm_up(f);
    f->b->send(f, ids, 8);
    gate_wait_started();
    /* Stop while g runs (grace 0: the call returns at once), then let g
     * finish: the rest of its batch must go back unstarted. */
    assert_int_equal(oq_pool_stop(f->p, 0), OQ_EBUSY);
    gate_open();
    assert_int_equal(oq_pool_stop(f->p, -1), 0);
    oq_pool_stats_get(f->p, &ps);
    assert_int_equal(f->b->applied(f, "g"), 1);
    assert_int_equal(ps.processed, 41);
    assert_int_equal(ps.handler_calls, ps.processed);
    /* None lost: what was not processed is still in the queue. */
    assert_int_equal(f->b->left(f), 7);
    for (int i = 1; i < 8; i++)
        assert_int_equal(f->b->applied(f, ids[i]), 0);
}

/* ----------------------------------------------------------------- main */

static const struct {
    const char *name;
    CMUnitTestFunction fn;
} cases[] = {
    { "redelivery after the deadline", test_redelivery_after_the_deadline },
    { "slow handler keeps finished batch-mates",
      test_slow_handler_keeps_finished_batch_mates },
    { "stale worker cannot commit", test_stale_worker_cannot_commit },
    { "stop returns unstarted work", test_stop_returns_unstarted_work },
};
#define NCASES (sizeof(cases) / sizeof(cases[0]))

static int group_setup(void **state)
{
    (void)state;
    return with_redis ? test_redis_start(&redis) : 0;
}

static int group_teardown(void **state)
{
    (void)state;
    test_redis_stop(&redis);
    return 0;
}

int main(void)
{
    static const backend *const backends[] = { &memory_backend,
                                               &redis_backend };
    static char names[2][NCASES][96];
    struct CMUnitTest t[2 * NCASES];
    size_t n = 0, nb = 2;

    with_redis = test_redis_available();
    if (!with_redis) {
        printf("test_engine: SKIP the redis cases: no %s\n",
               TEST_REDIS_SERVER);
        nb = 1;
    }
    for (size_t b = 0; b < nb; b++)
        for (size_t i = 0; i < NCASES; i++) {
            snprintf(names[b][i], sizeof(names[b][i]), "%s: %s",
                     backends[b]->name, cases[i].name);
            t[n++] = (struct CMUnitTest){ names[b][i], cases[i].fn, setup,
                                          teardown,
                                          (void *)(uintptr_t)backends[b] };
        }
    return _cmocka_run_group_tests("engine", t, n, group_setup,
                                   group_teardown);
}
