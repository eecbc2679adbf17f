/* Description: M producer threads and N workers push many messages through
 * the queue, processed set and engine (with the memory ledger, then with
 * the SQLite ledger and its group-commit thread), with 10% duplicate ids, 5% transient
 * failures, 1% of handlers stalling past the visibility timeout and 0.5%
 * poison events. It proves, and fails if any is broken:
 *   - every unique non-poison id's effect is applied exactly once;
 *   - every poison id is in the dead-letter list exactly once, with no
 *     effect;
 *   - the stats balance: sent = processed + duplicates + dead, and
 *     sent + rejected-at-send = messages produced.
 * Time is a virtual clock that a ticker thread moves faster than real time,
 * so lease overruns happen in milliseconds of real time. Run it under
 * ThreadSanitizer (make tsan) and in a loop with different seeds. The seed
 * also picks a presized processed set (odd seeds) and a handler that
 * claims never to block (seeds with bit 1 set).
 *
 * With the SQLite ledger, effects are the per-id counters the handler
 * stages, read back from the state file (one row per id, its value the
 * number of times it was committed), and dead letters the state's rows;
 * it runs a quarter of the messages (SQLite under TSAN is slow).
 *
 * usage: stress_pool [--seed S] [--messages N] [--producers M]
 *                    [--workers N] [--batch B] [--vt MS] [--speedup X]
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "oq_cli.h"

static struct {
    uint64_t seed;
    size_t messages;
    unsigned producers, workers, batch;
    int64_t vt_ms;
    int speedup;
} cfg = { 0, 100000, 2, 4, 16, 200, 20 };

enum kind { K_NORMAL, K_TRANSIENT, K_STALL, K_POISON };

typedef struct world {
    size_t nids;              /* distinct ids */
    uint8_t *kind;            /* per id */
    uint32_t *msg_id;         /* per message: which id it carries */
    _Atomic uint32_t *effects; /* per id: committed effects */
    _Atomic uint32_t *deadcnt; /* per id: dead letters */
    oq_testclock *tc;
    oq_queue *q;
    _Atomic int done;
    _Atomic uint64_t produced, rejected;
} world;

static world W;

static uint32_t parse_id(const oq_event *ev)
{
    return (uint32_t)strtoul(ev->id + 2, NULL, 10); /* "id%u" */
}

static void wait_past(const oq_event *ev)
{
    /* Stall until the lease is over (the ticker moves the clock). */
    while (oq_clock_now(ev->clock) <= ev->deadline_ms)
        sched_yield();
}

static int handler(const oq_event *ev, oq_txn *txn, void *arg)
{
    uint32_t id = parse_id(ev);
    (void)arg;
    oq_txn_count(txn, ev->id, ev->id_len, 1);
    switch (W.kind[id]) {
    case K_POISON:
        oq_txn_error(txn, "poison event %u", id);
        return OQ_FAIL;
    case K_TRANSIENT:
        return ev->attempt == 1 ? OQ_RETRY : OQ_OK;
    case K_STALL:
        if (ev->attempt == 1)
            wait_past(ev);
        return OQ_OK;
    default:
        return OQ_OK;
    }
}

/* The sink: one atomic counter per id. */
static int apply(const oq_event *ev, const oq_txn *txn, void *arg)
{
    (void)txn;
    (void)arg;
    atomic_fetch_add(&W.effects[parse_id(ev)], 1);
    return 0;
}

static void *ticker(void *arg)
{
    struct timespec ts = { 0, 50 * 1000 };
    int64_t real0 = oq_clock_now(NULL) * 1000, virt0;
    (void)arg;
    virt0 = oq_clock_now(oq_testclock_clock(W.tc));
    while (!atomic_load(&W.done)) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t us = (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000;
        oq_testclock_set(W.tc, virt0 + (us - real0) * cfg.speedup / 1000);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void *producer(void *arg)
{
    unsigned me = (unsigned)(uintptr_t)arg;
    oq_message batch[64];
    char ids[64][16];
    size_t nb = 0;

    for (size_t i = me; i < cfg.messages; i += cfg.producers) {
        int len = snprintf(ids[nb], sizeof(ids[nb]), "id%u", W.msg_id[i]);
        batch[nb] = (oq_message){ ids[nb], (size_t)len, ids[nb], (size_t)len,
                                  0, i };
        if (++nb == 64 || i + cfg.producers >= cfg.messages) {
            int res[64];
            oq_queue_send_batch(W.q, batch, nb, res);
            for (size_t k = 0; k < nb; k++) {
                assert_true(res[k] == 0 || res[k] == OQ_EEXIST);
                if (res[k] == OQ_EEXIST)
                    atomic_fetch_add(&W.rejected, 1);
            }
            atomic_fetch_add(&W.produced, nb);
            nb = 0;
        }
    }
    return NULL;
}

static void count_dead(const oq_dead_letter *dl, void *arg)
{
    char buf[16];
    (void)arg;
    snprintf(buf, sizeof(buf), "%.*s", (int)dl->id_len, dl->id);
    atomic_fetch_add(&W.deadcnt[strtoul(buf + 2, NULL, 10)], 1);
    assert_int_equal(dl->reason, OQ_DLQ_FAILED);
}

/* Builds the workload: ids with their kinds, and the message sequence with
 * 10% duplicates of earlier (or upcoming) ids. */
static void make_workload(void)
{
    uint64_t rng = cfg.seed;
    size_t n = cfg.messages;

    W.nids = n - n / 10;
    W.kind = calloc(W.nids, 1);
    W.msg_id = calloc(n, sizeof(*W.msg_id));
    W.effects = calloc(W.nids, sizeof(*W.effects));
    W.deadcnt = calloc(W.nids, sizeof(*W.deadcnt));
    for (size_t i = 0; i < W.nids; i++) {
        uint64_t r = oq__splitmix64(&rng) % 1000;
        W.kind[i] = r < 5 ? K_POISON : r < 15 ? K_STALL
                  : r < 65 ? K_TRANSIENT : K_NORMAL;
    }
    /* Every id once, then duplicates, then a shuffle. */
    for (size_t i = 0; i < n; i++)
        W.msg_id[i] = i < W.nids ? (uint32_t)i
                                 : (uint32_t)(oq__splitmix64(&rng) % W.nids);
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = oq__splitmix64(&rng) % (i + 1);
        uint32_t t = W.msg_id[i];
        W.msg_id[i] = W.msg_id[j];
        W.msg_id[j] = t;
    }
}

/* The state's counters (id -> times committed) and dead letters. */
static void effect_row(const char *key, size_t len, int64_t v, void *arg)
{
    char buf[16];
    (void)arg;
    snprintf(buf, sizeof(buf), "%.*s", (int)len, key);
    atomic_fetch_add(&W.effects[strtoul(buf + 2, NULL, 10)], (uint32_t)v);
}

static void dead_row(const oq__dead_row *d, void *arg)
{
    char buf[16];
    (void)arg;
    assert_non_null(d->id);
    snprintf(buf, sizeof(buf), "%.*s", (int)d->id_len, d->id);
    atomic_fetch_add(&W.deadcnt[strtoul(buf + 2, NULL, 10)], 1);
    assert_string_equal(d->reason, "failed");
}

static void run_stress(bool sqlite)
{
    oq_queue_opts qo;
    oq_idset_opts so;
    oq_pool_opts po;
    oq_idset *s;
    oq_pool *p;
    oq_pool_stats ps;
    oq_queue_stats qs;
    pthread_t tick, prod[64];
    uint64_t dead = 0, poison = 0;
    oq__store *st = NULL;
    oq__committer *cm = NULL;
    char path[] = "/tmp/oq_stress_XXXXXX", err[600] = "";
    size_t messages = cfg.messages;

    if (sqlite) {
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        close(fd);
        unlink(path);
        cfg.messages = OQ__MAX(cfg.messages / 4, (size_t)100);
    }
    memset(&W, 0, sizeof(W));
    make_workload();
    W.tc = oq_testclock_new(1000000);
    oq_queue_opts_defaults(&qo);
    qo.visibility_timeout_ms = cfg.vt_ms;
    qo.dedup_count = 1000; /* small: most duplicates reach the idset */
    qo.clock = oq_testclock_clock(W.tc);
    assert_int_equal(oq_queue_new(&W.q, &qo), 0);
    oq_idset_opts_defaults(&so);
    so.clock = qo.clock;
    /* Odd seeds: the set sized for the ids at start (as `onceq run` sizes
     * it from its input), so the prefetch reads presized tables. */
    if (cfg.seed & 1)
        so.expected_ids = W.nids;
    assert_int_equal(oq_idset_new(&s, &so), 0);
    oq_pool_opts_defaults(&po);
    po.workers = cfg.workers;
    po.batch = cfg.batch;
    po.clock = qo.clock;
    po.handler = handler;
    po.sink = (oq_sink){ apply, NULL, NULL };
    po.backoff_base_ms = 10;
    po.backoff_cap_ms = 200;
    po.poll_ms = 50;
    po.seed = cfg.seed;
    /* Seeds with bit 1 set: the handler says it never blocks (it does
     * stall sometimes: the promise is broken on purpose), so the engine
     * reads the clock once every few events; nothing may run twice. */
    po.handler_never_blocks = (cfg.seed >> 1) & 1;

    pthread_create(&tick, NULL, ticker, NULL);
    if (sqlite) {
        oq__committer_opts co = { .store = NULL };
        assert_int_equal(oq__store_open(&st, path, OQ__STORE_CREATE,
                                        OQ__SYNC_OFF, err, sizeof(err)), 0);
        co.store = st;
        co.q = W.q;
        co.s = s;
        assert_int_equal(oq__committer_start(&cm, &co), 0);
        po.sink = (oq_sink){ NULL, NULL, NULL };
        assert_int_equal(oq__engine_start(&p, &oq__mem_queue_methods, W.q,
                                          &oq__sqlite_ledger_methods, cm,
                                          &po), 0);
    } else {
        assert_int_equal(oq_pool_start(&p, W.q, s, &po), 0);
    }
    for (unsigned i = 0; i < cfg.producers; i++)
        pthread_create(&prod[i], NULL, producer, (void *)(uintptr_t)i);
    for (unsigned i = 0; i < cfg.producers; i++)
        pthread_join(prod[i], NULL);
    oq_queue_close(W.q);
    assert_int_equal(oq_pool_wait(p), 0);
    atomic_store(&W.done, 1);
    pthread_join(tick, NULL);

    if (sqlite) {
        assert_int_equal(oq__committer_stop(cm, err, sizeof(err)), 0);
        assert_int_equal(oq__store_foreach_count(st, effect_row, NULL), 0);
        assert_int_equal(oq__store_foreach_dead(st, dead_row, NULL), 0);
    } else {
        oq_queue_dead_letters(W.q, 0, count_dead, NULL);
    }
    for (size_t i = 0; i < W.nids; i++) {
        if (W.kind[i] == K_POISON) {
            poison++;
            if (atomic_load(&W.effects[i]) != 0 ||
                atomic_load(&W.deadcnt[i]) != 1)
                fail_msg("poison id%zu: effects %u, dead letters %u (seed %llu)",
                         i, atomic_load(&W.effects[i]),
                         atomic_load(&W.deadcnt[i]),
                         (unsigned long long)cfg.seed);
        } else if (atomic_load(&W.effects[i]) != 1 ||
                   atomic_load(&W.deadcnt[i]) != 0) {
            fail_msg("id%zu (kind %d): effects %u, dead letters %u (seed %llu)",
                     i, W.kind[i], atomic_load(&W.effects[i]),
                     atomic_load(&W.deadcnt[i]), (unsigned long long)cfg.seed);
        }
    }
    oq_pool_stats_get(p, &ps);
    oq_queue_stats_get(W.q, &qs);
    for (int r = 0; r < OQ_DLQ__COUNT; r++)
        dead += qs.dead_lettered[r];
    printf("stress (%s ledger%s%s): seed %llu: %zu messages, %zu ids (%llu poison); sent %llu, "
           "rejected at send %llu; processed %llu, duplicates %llu, dead %llu; "
           "retried %llu, busy %llu, fenced %llu, redelivered %llu\n",
           sqlite ? "sqlite" : "memory", cfg.seed & 1 ? ", presized" : "",
           (cfg.seed >> 1) & 1 ? ", never-blocks" : "",
           (unsigned long long)cfg.seed, cfg.messages, W.nids,
           (unsigned long long)poison, (unsigned long long)qs.sent,
           (unsigned long long)qs.duplicates_rejected,
           (unsigned long long)ps.processed, (unsigned long long)ps.duplicates,
           (unsigned long long)dead, (unsigned long long)ps.retried,
           (unsigned long long)ps.busy, (unsigned long long)ps.fenced,
           (unsigned long long)qs.redelivered);
    assert_int_equal(qs.sent + qs.duplicates_rejected, cfg.messages);
    assert_int_equal(qs.sent, ps.processed + ps.duplicates + dead);
    assert_int_equal(ps.processed, W.nids - poison);
    assert_int_equal(dead, poison);
    assert_int_equal(ps.dead, poison);
    assert_true(ps.fenced > 0 || cfg.messages < 10000);

    oq_pool_free(p);
    oq__committer_free(cm);
    oq__store_close(st);
    if (sqlite) {
        char wal[64];
        unlink(path);
        snprintf(wal, sizeof(wal), "%s-wal", path);
        unlink(wal);
        snprintf(wal, sizeof(wal), "%s-shm", path);
        unlink(wal);
        snprintf(wal, sizeof(wal), "%s.lock", path);
        unlink(wal);
    }
    cfg.messages = messages;
    oq_idset_free(s);
    oq_queue_free(W.q);
    oq_testclock_free(W.tc);
    free(W.kind);
    free(W.msg_id);
    free(W.effects);
    free(W.deadcnt);
}

static void stress(void **state)
{
    (void)state;
    run_stress(false);
}

static void stress_sqlite(void **state)
{
    (void)state;
    run_stress(true);
}

static void usage(void)
{
    fprintf(stderr, "usage: stress_pool [--seed S] [--messages N] "
                    "[--producers M] [--workers N] [--batch B] [--vt MS] "
                    "[--speedup X]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = { cmocka_unit_test(stress),
                                        cmocka_unit_test(stress_sqlite) };

    cfg.seed = (uint64_t)time(NULL);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        unsigned long long v = strtoull(argv[++i], NULL, 10);
        if (strcmp(a, "--seed") == 0)
            cfg.seed = v;
        else if (strcmp(a, "--messages") == 0)
            cfg.messages = v;
        else if (strcmp(a, "--producers") == 0 && v > 0 && v <= 64)
            cfg.producers = (unsigned)v;
        else if (strcmp(a, "--workers") == 0 && v > 0)
            cfg.workers = (unsigned)v;
        else if (strcmp(a, "--batch") == 0 && v > 0)
            cfg.batch = (unsigned)v;
        else if (strcmp(a, "--vt") == 0 && v > 0)
            cfg.vt_ms = (int64_t)v;
        else if (strcmp(a, "--speedup") == 0 && v > 0)
            cfg.speedup = (int)v;
        else
            usage();
    }
    if (cfg.messages < 100)
        usage();
    printf("stress: --seed %llu --messages %zu --producers %u --workers %u "
           "--batch %u --vt %lld --speedup %d\n",
           (unsigned long long)cfg.seed, cfg.messages, cfg.producers,
           cfg.workers, cfg.batch, (long long)cfg.vt_ms, cfg.speedup);
    fflush(stdout);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
