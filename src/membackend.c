/*
 * The memory backends of the engine: the visibility-timeout queue
 * (src/queue.c) as a queue backend, and the processed set (src/idset.c)
 * with an oq_sink as a ledger.
 *
 * DESIGN
 * ------
 * Both are thin: an oq_queue and an oq_idset are thread-safe already (the
 * queue lock and the shard locks are leaves), so a context is the backend
 * itself and attach allocates nothing.
 *
 * The memory ledger's commit is two-phase when there are outputs: prepare
 * the claim (fenced by its token and lease; a prepared claim can no longer
 * be taken over), apply the txn to the sink, then mark the id DONE. A sink
 * that fails (out of memory) has applied nothing: the claim is given back
 * and the entry fails, so the engine retries the message later. Without
 * outputs to write (a dead id, or no sink) the claim is committed at once.
 */
#include "oq_internal.h"

#include <string.h>
#include <time.h>

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------- the queue */

int oq__ctx_self(void *backend, void **ctx)
{
    *ctx = backend;
    return 0;
}

void oq__ctx_none(void *ctx)
{
    (void)ctx;
}

static int q_receive(void *ctx, oq_delivery *out, size_t max, int64_t wait_ms)
{
    return oq_queue_receive(ctx, out, max, wait_ms);
}

static void q_settle(void *ctx, oq_settle *ops, size_t n)
{
    oq_queue_settle(ctx, ops, n);
    for (size_t i = 0; i < n; i++) {
        /* A dead letter that found no memory is still ours (its id may be
         * settled already): try until the queue takes it. */
        while (ops[i].op == OQ_SETTLE_DEAD && ops[i].result == OQ_ENOMEM) {
            oq_settle again = ops[i];
            nap_ms(1);
            oq_queue_settle(ctx, &again, 1);
            ops[i].result = again.result;
        }
    }
}

static void q_wake(void *backend)
{
    oq_queue_wake(backend);
}

const oq__queue_methods oq__mem_queue_methods = {
    .version = 1,
    .name = "memory",
    .attach = oq__ctx_self,
    .detach = oq__ctx_none,
    .receive = q_receive,
    .settle = q_settle,
    .wake = q_wake,
};

/* ------------------------------------------------------------ the ledger */

static int l_claim(void *ctx, oq__lclaim *c, size_t n)
{
    oq__mem_ledger *l = ctx;
    int64_t now = oq__idset_now(l->s); /* once a batch: idset.c, Time */

    for (size_t i = 0; i < n; i++)
        oq__idset_prefetch(l->s, c[i].dg);
    for (size_t i = 0; i < n; i++) {
        oq_claim cl = { 0, 0 };
        c[i].status = oq__idset_claim_d(l->s, c[i].dg, c[i].d->deadline_ms,
                                        now, &cl);
        c[i].token = cl.token;
        c[i].holder_deadline_ms = cl.lease_deadline_ms;
    }
    return 0;
}

static void l_release(void *ctx, oq__lclaim *c, size_t n)
{
    oq__mem_ledger *l = ctx;

    for (size_t i = 0; i < n; i++)
        oq__idset_release_d(l->s, c[i].dg, c[i].token);
}

static int l_extend(void *ctx, const oq__lclaim *c, int64_t deadline_ms)
{
    oq__mem_ledger *l = ctx;

    return oq__idset_extend_d(l->s, c->dg, c->token, deadline_ms);
}

/* Prepared -> DONE once the outputs are applied: only memory to grow the
 * DONE table can be short. Wait for it rather than let the event be
 * applied twice. */
static void commit_prepared(oq__mem_ledger *l, const oq__lclaim *c,
                            int64_t now)
{
    while (oq__idset_commit_d(l->s, c->dg, c->token, now) != 0)
        nap_ms(1);
}

/* Commits one entry; see the DESIGN note. A staged reply is committed
 * with the id: prepared before anything is applied, published after. */
static int commit_one(oq__mem_ledger *l, const oq__lcommit *e, int64_t now)
{
    const oq__lclaim *c = e->claim;
    const oq__reply_sink *rs = &l->replies;
    size_t rlen;
    bool reply = rs->prepare && oq__txn_reply(e->txn, &rlen) != NULL;
    bool apply = e->kind == OQ__LC_COMMIT && l->sink.apply != NULL;
    void *prepared = NULL;
    int rc;

    if (!apply && !reply) {
        rc = oq__idset_commit_d(l->s, c->dg, c->token, now);
        if (rc == OQ_ENOMEM) /* no room in the DONE table: nothing done */
            oq__idset_release_d(l->s, c->dg, c->token);
        return rc;
    }
    rc = oq__idset_prepare_d(l->s, c->dg, c->token, now);
    if (rc != 0)
        return rc;
    if (reply && (prepared = rs->prepare(e->ev, e->txn, rs->arg)) == NULL)
        goto out_release;
    if (apply && l->sink.apply(e->ev, e->txn, l->sink.arg) != 0) {
        if (prepared)
            rs->abort(prepared, rs->arg);
        goto out_release;
    }
    if (prepared)
        rs->publish(prepared, rs->arg);
    commit_prepared(l, c, now);
    return 0;

out_release:
    oq__idset_release_d(l->s, c->dg, c->token);
    return OQ_ENOMEM;
}

static void l_commit(void *ctx, oq__lcommit *c, size_t n)
{
    int64_t now = oq__idset_now(((oq__mem_ledger *)ctx)->s);

    for (size_t i = 0; i < n; i++)
        c[i].result = commit_one(ctx, &c[i], now);
}

const oq__ledger_methods oq__mem_ledger_methods = {
    .version = 1,
    .name = "memory",
    .flags = 0,
    .attach = oq__ctx_self,
    .detach = oq__ctx_none,
    .claim = l_claim,
    .release = l_release,
    .extend = l_extend,
    .commit = l_commit,
    .set_done = NULL,
};
