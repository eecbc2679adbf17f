/*
 * Description: ledger conformance. The same cases run against every ledger
 * of the engine (src/oq_internal.h, "engine.c"): the memory ledger
 * (membackend.c), the SQLite ledger (store.c: group commit through the
 * committer thread, which hands deliveries back through the done
 * callback) and the Redis ledger (redis.c, against a redis-server this
 * test starts; skipped, and said so, where there is none). Deliveries come
 * from the matching queue backend: the memory queue for the memory and
 * SQLite ledgers, the Redis stream for Redis (its ledger XACKs the stream
 * entries it is handed). Each case checks one promise of the interface: a
 * commit makes the id DONE with its outputs written once; a second holder
 * is BUSY with the holder's deadline; a commit after the lease was lost is
 * refused with nothing written; a dead entry settles its id; a batch
 * commits every entry; a failed commit writes nothing and gives the claim
 * back. A ledger with OQ__LEDGER_SETTLES must have carried out the queue
 * op (the entry is no longer pending); any other must not have.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "oq_cli.h"
#include "redis_server.h"

#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VT 1000        /* memory and SQLite: visibility timeout, test ms */
#define REDIS_VT 300   /* Redis: visibility timeout, real ms */
#define MAXD 16

typedef struct fx fx;

/* One backend pair and what the cases need to look at it. */
typedef struct backend {
    const char *name;
    int64_t vt;            /* a delivery's visibility timeout, ms */
    int (*open)(fx *f);
    void (*close)(fx *f);
    void (*send)(fx *f, const char *id);
    /* The count the outputs of id added (each commit stages +1). */
    int64_t (*written)(fx *f, const char *id);
    /* Deliveries neither acked nor dead-lettered. */
    long (*pending)(fx *f);
    /* The engine clock now. */
    int64_t (*now)(fx *f);
    /* Moves time past the leases taken so far. */
    void (*lose_lease)(fx *f);
    /* Makes the next commits fail (on) or work again; false: no way to. */
    bool (*fail_commits)(fx *f, bool on);
} backend;

struct fx {
    const backend *b;
    const oq__queue_methods *qm;
    void *qb;
    const oq__ledger_methods *lm;
    void *lb;
    void *qctx, *lctx, *lctx2;
    /* memory and SQLite */
    oq_testclock *tc;
    oq_queue *q;
    oq_idset *s;
    oq__mem_ledger mem;
    char names[MAXD][16];  /* the memory sink: applies per id */
    int64_t applied[MAXD];
    size_t nnames;
    bool fail_apply;
    oq__store *st;
    oq__committer *cm;
    sqlite3 *db;           /* a reader of the state file */
    /* Redis */
    void *rb;
    redisContext *rc;
    /* The deliveries the test holds (released at teardown). */
    oq_delivery d[MAXD];
    bool ours[MAXD];
    size_t nd;
    /* What the done callback handed back (SQLite). */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct done_entry {
        uint64_t receipt;
        int result;
    } done[MAXD];
    size_t ndone;
};

static test_redis redis;
static char state_dir[] = "/tmp/onceq-test-ledger-XXXXXX";

/* ------------------------------------------------------- the memory pair */

static int mem_apply(const oq_event *ev, const oq_txn *txn, void *arg)
{
    fx *f = arg;
    size_t i;

    (void)txn;
    if (f->fail_apply)
        return OQ_ENOMEM;
    for (i = 0; i < f->nnames; i++)
        if (strlen(f->names[i]) == ev->id_len &&
            memcmp(f->names[i], ev->id, ev->id_len) == 0)
            break;
    if (i == f->nnames) {
        assert_true(i < MAXD);
        snprintf(f->names[i], sizeof(f->names[i]), "%.*s", (int)ev->id_len,
                 ev->id);
        f->nnames++;
    }
    f->applied[i]++;
    return 0;
}

/* The memory queue, idset and test clock (also under the SQLite ledger). */
static void open_memory_queue(fx *f)
{
    oq_queue_opts qo;
    oq_idset_opts so;

    f->tc = oq_testclock_new(1000000);
    oq_queue_opts_defaults(&qo);
    qo.visibility_timeout_ms = VT;
    qo.dedup_count = 0;
    qo.clock = oq_testclock_clock(f->tc);
    assert_int_equal(oq_queue_new(&f->q, &qo), 0);
    oq_idset_opts_defaults(&so);
    so.clock = qo.clock;
    assert_int_equal(oq_idset_new(&f->s, &so), 0);
    f->qm = &oq__mem_queue_methods;
    f->qb = f->q;
}

static int mem_open(fx *f)
{
    open_memory_queue(f);
    f->mem = (oq__mem_ledger){ .s = f->s, .sink = { mem_apply, f, NULL } };
    f->lm = &oq__mem_ledger_methods;
    f->lb = &f->mem;
    return 0;
}

static void mem_close(fx *f)
{
    oq_queue_free(f->q);
    oq_idset_free(f->s);
    oq_testclock_free(f->tc);
}

static void mem_send(fx *f, const char *id)
{
    assert_int_equal(oq_queue_send(f->q, id, strlen(id), id, strlen(id), 0),
                     0);
}

static int64_t mem_written(fx *f, const char *id)
{
    for (size_t i = 0; i < f->nnames; i++)
        if (strcmp(f->names[i], id) == 0)
            return f->applied[i];
    return 0;
}

static long mem_pending(fx *f)
{
    oq_queue_stats qs;

    /* A message whose delivery ran out is ready again: still not acked. */
    oq_queue_stats_get(f->q, &qs);
    return (long)(qs.in_flight + qs.ready + qs.delayed);
}

static int64_t mem_now(fx *f)
{
    return oq_clock_now(oq_testclock_clock(f->tc));
}

static void mem_lose_lease(fx *f)
{
    oq_testclock_advance(f->tc, VT + 1);
}

static bool mem_fail_commits(fx *f, bool on)
{
    f->fail_apply = on;
    return true;
}

static const backend memory_backend = {
    "memory", VT, mem_open, mem_close, mem_send, mem_written, mem_pending,
    mem_now, mem_lose_lease, mem_fail_commits,
};

/* ------------------------------------------------------- the SQLite ledger */

/* The committer's done callback: note each result; the deliveries it
 * hands back are the test's again (released at teardown). */
static void sql_done(void *engine, oq_settle *ops, size_t n, int result)
{
    fx *f = engine;

    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < f->nd; k++)
            if (!f->ours[k] && f->d[k].receipt == ops[i].d->receipt) {
                f->d[k] = *ops[i].d;
                f->ours[k] = true;
            }
        if (f->ndone < MAXD)
            f->done[f->ndone++] = (struct done_entry){ ops[i].d->receipt,
                                                       result };
    }
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

static int sql_open(fx *f)
{
    char path[128], err[600] = "";
    oq__committer_opts co = { 0 };

    open_memory_queue(f);
    snprintf(path, sizeof(path), "%s/state.db", state_dir);
    unlink(path);
    assert_int_equal(oq__store_open(&f->st, path, OQ__STORE_CREATE,
                                    OQ__SYNC_OFF, err, sizeof(err)), 0);
    co.store = f->st;
    co.q = f->q;
    co.s = f->s;
    assert_int_equal(oq__committer_start(&f->cm, &co), 0);
    f->lm = &oq__sqlite_ledger_methods;
    f->lb = f->cm;
    f->lm->set_done(f->lb, sql_done, f);
    assert_int_equal(sqlite3_open_v2(path, &f->db, SQLITE_OPEN_READONLY,
                                     NULL), SQLITE_OK);
    sqlite3_busy_timeout(f->db, 10000);
    return 0;
}

static void sql_close(fx *f)
{
    oq__committer_stop(f->cm, NULL, 0); /* OQ_EIO after a failed commit */
    oq__committer_free(f->cm);
    oq__store_fail_after(-1);
    sqlite3_close(f->db);
    oq__store_close(f->st);
    mem_close(f);
}

static int64_t sql_written(fx *f, const char *id)
{
    sqlite3_stmt *st;
    int64_t v = 0;

    assert_int_equal(sqlite3_prepare_v2(f->db, "SELECT value FROM aggregates "
                                        "WHERE key = ?", -1, &st, NULL),
                     SQLITE_OK);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static bool sql_fail_commits(fx *f, bool on)
{
    (void)f;
    oq__store_fail_after(on ? 0 : -1);
    return true;
}

static const backend sqlite_backend = {
    "sqlite", VT, sql_open, sql_close, mem_send, sql_written, mem_pending,
    mem_now, mem_lose_lease, sql_fail_commits,
};

/* ---------------------------------------------------------- the Redis pair */

#define cmd(f, ...) test_redis_cmd((f)->rc, __VA_ARGS__)

static int redis_open(fx *f)
{
    assert_int_equal(test_redis_flush(&redis), 0);
    assert_int_equal(oq__redis_backends_open(&f->rb, redis.url, "lt", "g",
                                             REDIS_VT, 5, 1, MAXD), 0);
    f->rc = test_redis_connect(&redis);
    assert_non_null(f->rc);
    f->qm = &oq__redis_queue_methods;
    f->qb = f->rb;
    f->lm = &oq__redis_ledger_methods;
    f->lb = f->rb;
    return 0;
}

static void redis_close(fx *f)
{
    oq__redis_backends_close(f->rb);
    redisFree(f->rc);
}

static void redis_send(fx *f, const char *id)
{
    freeReplyObject(cmd(f, "XADD lt * e %s s test:1", id));
}

static int64_t redis_written(fx *f, const char *id)
{
    redisReply *r = cmd(f, "HGET lt:counts %s", id);
    int64_t v = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : 0;

    freeReplyObject(r);
    return v;
}

static long redis_pending(fx *f)
{
    redisReply *r = cmd(f, "XPENDING lt g");
    long v;

    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    v = (long)r->element[0]->integer;
    freeReplyObject(r);
    return v;
}

static int64_t redis_now(fx *f)
{
    (void)f;
    return oq_clock_now(NULL);
}

static void redis_lose_lease(fx *f)
{
    /* A Redis claim is a key with PX: it expires on Redis's own clock,
     * which no test clock reaches. Wait the lease out. */
    struct timespec ts = { 0, (REDIS_VT + 100) * 1000L * 1000L };

    (void)f;
    nanosleep(&ts, NULL);
}

static bool redis_fail_commits(fx *f, bool on)
{
    /* No fault seam: a COMMIT script runs whole or not at all, and a
     * failed call is retried after a reconnect (fenced the second time). */
    (void)f;
    (void)on;
    return false;
}

static const backend redis_backend = {
    "redis", REDIS_VT, redis_open, redis_close, redis_send, redis_written,
    redis_pending, redis_now, redis_lose_lease, redis_fail_commits,
};

/* -------------------------------------------------------------- fixture */

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));

    assert_non_null(f);
    f->b = *state;
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    f->b->open(f);
    assert_int_equal(f->qm->attach(f->qb, &f->qctx), 0);
    assert_int_equal(f->lm->attach(f->lb, &f->lctx), 0);
    assert_int_equal(f->lm->attach(f->lb, &f->lctx2), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;

    /* Gives back every delivery the test still holds (the ledger's copies
     * of SQLite's handed-back ones included). */
    for (size_t i = 0; i < f->nd; i++)
        if (f->ours[i]) {
            oq_settle op = { .d = &f->d[i], .op = OQ_SETTLE_NONE,
                             .release = 1 };
            f->qm->settle(f->qctx, &op, 1);
        }
    f->lm->detach(f->lctx);
    f->lm->detach(f->lctx2);
    f->qm->detach(f->qctx);
    f->b->close(f);
    pthread_cond_destroy(&f->cv);
    pthread_mutex_destroy(&f->mu);
    free(f);
    return 0;
}

static bool settles(const fx *f)
{
    return (f->lm->flags & OQ__LEDGER_SETTLES) != 0;
}

/* Receives n deliveries (all sent before): their indexes start at the
 * returned one. */
static size_t receive(fx *f, size_t n)
{
    size_t first = f->nd;

    for (int tries = 0; f->nd < first + n && tries < 200; tries++) {
        int got = f->qm->receive(f->qctx, &f->d[f->nd], first + n - f->nd,
                                 50);
        assert_true(got >= 0);
        for (int i = 0; i < got; i++)
            f->ours[f->nd++] = true;
    }
    assert_int_equal(f->nd, first + n);
    return first;
}

/* A claim of the event in delivery d (its payload is its id). */
static oq__lclaim claim_of(const oq_delivery *d)
{
    oq__lclaim c = { .id = d->payload, .id_len = d->payload_len, .d = d };

    c.dg = oq__idset_digest(c.id, c.id_len);
    return c;
}

static int claim1(fx *f, void *lctx, oq__lclaim *c)
{
    assert_int_equal(f->lm->claim(lctx, c, 1), 0);
    return c->status;
}

/* What one commit entry needs around it. */
typedef struct entry {
    oq__lclaim *claim;
    oq_event ev;
    oq_txn *txn;
    oq_settle op;
    oq__lcommit lc;
} entry;

/* A COMMIT (outputs: +1 under the id) or DEAD entry for claim c of
 * delivery d. */
static void entry_init(entry *e, oq__lcommit_kind kind, oq__lclaim *c,
                       oq_delivery *d)
{
    memset(e, 0, sizeof(*e));
    e->claim = c;
    e->ev = (oq_event){ .id = c->id, .id_len = c->id_len,
                        .payload = d->payload, .payload_len = d->payload_len,
                        .receipt = d->receipt, .attempt = d->receive_count,
                        .deadline_ms = d->deadline_ms };
    e->txn = oq__txn_new();
    assert_non_null(e->txn);
    /* Staged for a DEAD entry too: a dead id must get no outputs. */
    assert_int_equal(oq_txn_count(e->txn, c->id, c->id_len, 1), 0);
    e->op = (oq_settle){ .d = d, .op = OQ_SETTLE_ACK };
    if (kind == OQ__LC_DEAD) {
        oq_txn_error(e->txn, "boom");
        e->op.op = OQ_SETTLE_DEAD;
        e->op.reason = OQ_DLQ_FAILED;
        e->op.error = "boom";
    }
    e->lc = (oq__lcommit){ .kind = kind, .claim = c, .ev = &e->ev,
                           .txn = e->txn, .op = &e->op };
}

static int done_result(fx *f, uint64_t receipt)
{
    for (size_t i = 0; i < f->ndone; i++)
        if (f->done[i].receipt == receipt)
            return f->done[i].result;
    return OQ__PENDING;
}

/* Commits e[0..n) in one call and returns with every result final: an
 * OQ__PENDING one waits for the done callback (its delivery is the
 * ledger's until then). */
static void commit(fx *f, void *lctx, entry *e, size_t n)
{
    oq__lcommit lc[MAXD];

    for (size_t i = 0; i < n; i++)
        lc[i] = e[i].lc;
    pthread_mutex_lock(&f->mu);
    f->lm->commit(lctx, lc, n);
    for (size_t i = 0; i < n; i++) {
        if (lc[i].result != OQ__PENDING)
            continue;
        for (size_t k = 0; k < f->nd; k++)
            if (&f->d[k] == e[i].op.d)
                f->ours[k] = false; /* handed to the ledger */
    }
    for (size_t i = 0; i < n; i++) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 10;
        while (lc[i].result == OQ__PENDING &&
               done_result(f, e[i].ev.receipt) == OQ__PENDING)
            assert_int_equal(pthread_cond_timedwait(&f->cv, &f->mu, &until),
                             0);
        if (lc[i].result == OQ__PENDING)
            lc[i].result = done_result(f, e[i].ev.receipt);
    }
    pthread_mutex_unlock(&f->mu);
    for (size_t i = 0; i < n; i++) {
        e[i].lc.result = lc[i].result;
        oq__txn_free(e[i].txn);
        e[i].txn = NULL;
    }
}

/* ---------------------------------------------------------------- cases */

static void test_claim_then_commit(void **state)
{
    fx *f = *state;
    size_t i;
    oq__lclaim c, again;
    entry e;

    f->b->send(f, "a");
    i = receive(f, 1);
    c = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx, &c), OQ_CLAIMED);
    assert_int_not_equal(c.token, 0);
    entry_init(&e, OQ__LC_COMMIT, &c, &f->d[i]);
    commit(f, f->lctx, &e, 1);
    assert_int_equal(e.lc.result, 0);
    assert_int_equal(f->b->written(f, "a"), 1);
    assert_int_equal(f->b->pending(f), settles(f) ? 0 : 1);
    /* Any context, any later copy: the id is done. */
    again = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx2, &again), OQ_DONE);
    assert_int_equal(f->b->written(f, "a"), 1);
}

static void test_second_holder_is_busy(void **state)
{
    fx *f = *state;
    size_t i;
    oq__lclaim c, other;
    entry e;
    int64_t now;

    f->b->send(f, "b");
    i = receive(f, 1);
    c = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx, &c), OQ_CLAIMED);
    other = claim_of(&f->d[i]);
    now = f->b->now(f);
    assert_int_equal(claim1(f, f->lctx2, &other), OQ_BUSY);
    /* The holder's lease is the delivery's rest (Redis: its PTTL, read a
     * few ms later, so the guess may end a little after). */
    assert_true(other.holder_deadline_ms > now);
    assert_true(other.holder_deadline_ms <= f->d[i].deadline_ms + 50);
    /* The refused claim took nothing from the holder. */
    entry_init(&e, OQ__LC_COMMIT, &c, &f->d[i]);
    commit(f, f->lctx, &e, 1);
    assert_int_equal(e.lc.result, 0);
    assert_int_equal(f->b->written(f, "b"), 1);
}

static void test_commit_after_lost_lease_is_refused(void **state)
{
    fx *f = *state;
    size_t i;
    oq__lclaim c, newer;
    oq_delivery later;
    entry e, e2;

    f->b->send(f, "c");
    i = receive(f, 1);
    c = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx, &c), OQ_CLAIMED);
    f->b->lose_lease(f);
    /* Another context claims the id on a later delivery's lease. */
    later = f->d[i];
    later.deadline_ms = f->b->now(f) + f->b->vt;
    newer = claim_of(&later);
    assert_int_equal(claim1(f, f->lctx2, &newer), OQ_CLAIMED);
    entry_init(&e, OQ__LC_COMMIT, &c, &f->d[i]);
    commit(f, f->lctx, &e, 1);
    assert_int_equal(e.lc.result, OQ_ESTALE);
    assert_int_equal(f->b->written(f, "c"), 0);
    assert_int_equal(f->b->pending(f), 1); /* not acked by the stale one */
    /* The newer holder's commit stands. */
    entry_init(&e2, OQ__LC_COMMIT, &newer, &f->d[i]);
    commit(f, f->lctx2, &e2, 1);
    assert_int_equal(e2.lc.result, 0);
    assert_int_equal(f->b->written(f, "c"), 1);
    assert_int_equal(f->b->pending(f), settles(f) ? 0 : 1);
}

static void test_dead_settles_the_id(void **state)
{
    fx *f = *state;
    size_t i;
    oq__lclaim c, again;
    entry e;

    f->b->send(f, "d");
    i = receive(f, 1);
    c = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx, &c), OQ_CLAIMED);
    entry_init(&e, OQ__LC_DEAD, &c, &f->d[i]);
    commit(f, f->lctx, &e, 1);
    assert_int_equal(e.lc.result, 0);
    assert_int_equal(f->b->written(f, "d"), 0); /* no outputs */
    assert_int_equal(f->b->pending(f), settles(f) ? 0 : 1);
    again = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx2, &again), OQ_DONE);
}

static void test_batch_commit(void **state)
{
    fx *f = *state;
    static const char *const ids[4] = { "e1", "e2", "e3", "e4" };
    oq__lclaim c[4], again[4];
    entry e[4];
    size_t i0;

    for (int k = 0; k < 4; k++)
        f->b->send(f, ids[k]);
    i0 = receive(f, 4);
    for (int k = 0; k < 4; k++)
        c[k] = claim_of(&f->d[i0 + k]);
    assert_int_equal(f->lm->claim(f->lctx, c, 4), 0);
    for (int k = 0; k < 4; k++) {
        assert_int_equal(c[k].status, OQ_CLAIMED);
        /* The last one settles as dead in the same call. */
        entry_init(&e[k], k == 3 ? OQ__LC_DEAD : OQ__LC_COMMIT, &c[k],
                   &f->d[i0 + k]);
    }
    commit(f, f->lctx, e, 4);
    for (int k = 0; k < 4; k++) {
        const char *id = f->d[i0 + k].payload;
        size_t len = f->d[i0 + k].payload_len;
        char name[8];
        snprintf(name, sizeof(name), "%.*s", (int)len, id);
        assert_int_equal(e[k].lc.result, 0);
        assert_int_equal(f->b->written(f, name), k == 3 ? 0 : 1);
        again[k] = claim_of(&f->d[i0 + k]);
    }
    assert_int_equal(f->b->pending(f), settles(f) ? 0 : 4);
    assert_int_equal(f->lm->claim(f->lctx2, again, 4), 0);
    for (int k = 0; k < 4; k++)
        assert_int_equal(again[k].status, OQ_DONE);
}

static void test_failed_commit_gives_the_claim_back(void **state)
{
    fx *f = *state;
    size_t i;
    oq__lclaim c, again;
    entry e;

    if (!f->b->fail_commits(f, true)) {
        /* The Redis ledger has no fault seam (see redis_fail_commits). */
        skip();
    }
    f->b->send(f, "f");
    i = receive(f, 1);
    c = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx, &c), OQ_CLAIMED);
    entry_init(&e, OQ__LC_COMMIT, &c, &f->d[i]);
    commit(f, f->lctx, &e, 1);
    f->b->fail_commits(f, false);
    assert_true(e.lc.result < 0);
    assert_int_not_equal(e.lc.result, OQ_ESTALE);
    assert_int_equal(f->b->written(f, "f"), 0);
    assert_int_equal(f->b->pending(f), 1);
    /* The claim was given back: another context takes the id at once. */
    again = claim_of(&f->d[i]);
    assert_int_equal(claim1(f, f->lctx2, &again), OQ_CLAIMED);
}

/* ----------------------------------------------------------------- main */

static const struct {
    const char *name;
    CMUnitTestFunction fn;
} cases[] = {
    { "claim then commit", test_claim_then_commit },
    { "second holder is busy", test_second_holder_is_busy },
    { "commit after a lost lease is refused",
      test_commit_after_lost_lease_is_refused },
    { "dead settles the id", test_dead_settles_the_id },
    { "batch commit", test_batch_commit },
    { "failed commit gives the claim back",
      test_failed_commit_gives_the_claim_back },
};
#define NCASES (sizeof(cases) / sizeof(cases[0]))

static bool with_redis;

/* The state file's directory, and the Redis server when there is one. */
static int group_setup(void **state)
{
    (void)state;
    if (mkdtemp(state_dir) == NULL)
        return -1;
    return with_redis ? test_redis_start(&redis) : 0;
}

static int group_teardown(void **state)
{
    static const char *const files[] = { "state.db", "state.db-wal",
                                         "state.db-shm", "state.db-journal" };
    char path[128];

    (void)state;
    test_redis_stop(&redis);
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", state_dir, files[i]);
        unlink(path);
    }
    rmdir(state_dir);
    return 0;
}

int main(void)
{
    static const backend *const backends[] = { &memory_backend,
                                               &sqlite_backend,
                                               &redis_backend };
    static char names[3][NCASES][96];
    struct CMUnitTest t[3 * NCASES];
    size_t n = 0, nb = 3;

    with_redis = test_redis_available();
    if (!with_redis) {
        printf("test_ledger: SKIP the redis cases: no %s\n",
               TEST_REDIS_SERVER);
        nb = 2;
    }
    for (size_t b = 0; b < nb; b++)
        for (size_t i = 0; i < NCASES; i++) {
            snprintf(names[b][i], sizeof(names[b][i]), "%s: %s",
                     backends[b]->name, cases[i].name);
            t[n++] = (struct CMUnitTest){ names[b][i], cases[i].fn, setup,
                                          teardown, (void *)(uintptr_t)backends[b] };
        }
    return _cmocka_run_group_tests("ledger", t, n, group_setup,
                                   group_teardown);
}
