/*
 * The in-memory sink: counters summed by key (uthash) and records in commit
 * order. One mutex (m->mu) guards both; apply takes it once per txn, and a
 * txn's effects appear together or not at all. It is a leaf lock.
 */
#include "oq_internal.h"

#include <stdlib.h>
#include <string.h>

#include "oq_uthash.h"

typedef struct counter {
    int64_t value;
    struct counter *next_new; /* apply's list of counters it created */
    UT_hash_handle hh;
    size_t len;
    char key[];
} counter;

typedef struct record {
    struct record *next;
    size_t len;
    char data[];
} record;

struct oq_memsink {
    pthread_mutex_t mu;
    counter *counters;          /* guarded by mu */
    record *rec_head, *rec_tail; /* guarded by mu */
    size_t nrecords;            /* guarded by mu */
};

int oq_memsink_new(oq_memsink **out)
{
    oq_memsink *m = oq__calloc(1, sizeof(*m));
    if (m == NULL)
        return OQ_ENOMEM;
    pthread_mutex_init(&m->mu, NULL);
    *out = m;
    return 0;
}

void oq_memsink_free(oq_memsink *m)
{
    counter *c, *tmp;
    record *r;

    if (m == NULL)
        return;
    HASH_ITER(hh, m->counters, c, tmp) {
        HASH_DEL(m->counters, c);
        oq__free(c);
    }
    while ((r = m->rec_head) != NULL) {
        m->rec_head = r->next;
        oq__free(r);
    }
    pthread_mutex_destroy(&m->mu);
    oq__free(m);
}

/*
 * apply is all-or-nothing: phase 1 makes every allocation (new counters
 * enter the table at 0, records are built in a private list); if any fails,
 * phase 1 is undone and nothing is visible. Phase 2 cannot fail: it adds
 * the deltas and links the records.
 */
#define APPLY_REMEMBER 32

typedef struct apply_ctx {
    oq_memsink *m;
    int rc;
    counter *created;            /* counters phase 1 added, via next_new */
    record *head, *tail;         /* records phase 1 built */
    size_t nrec;
    /* The counters phase 1 found or made, in txn order, so phase 2 need
     * not look them up again (the first APPLY_REMEMBER of them). */
    counter *seen[APPLY_REMEMBER];
    size_t nseen, next;
} apply_ctx;

static void prepare_count(const char *key, size_t len, int64_t delta,
                          void *arg)
{
    apply_ctx *ctx = arg;
    counter *c;

    OQ__UNUSED(delta);
    if (ctx->rc != 0)
        return;
    HASH_FIND(hh, ctx->m->counters, key, len, c);
    if (c != NULL) {
        if (ctx->nseen < APPLY_REMEMBER)
            ctx->seen[ctx->nseen++] = c;
        return;
    }
    c = oq__malloc(sizeof(*c) + len);
    if (c == NULL) {
        ctx->rc = OQ_ENOMEM;
        return;
    }
    c->value = 0;
    c->len = len;
    if (len)
        memcpy(c->key, key, len);
    oq__hash_oom = 0;
    HASH_ADD_KEYPTR(hh, ctx->m->counters, c->key, len, c);
    if (oq__hash_oom) {
        oq__free(c);
        ctx->rc = OQ_ENOMEM;
        return;
    }
    c->next_new = ctx->created;
    ctx->created = c;
    if (ctx->nseen < APPLY_REMEMBER)
        ctx->seen[ctx->nseen++] = c;
}

static void prepare_record(const void *data, size_t len, void *arg)
{
    apply_ctx *ctx = arg;
    record *r;

    if (ctx->rc != 0)
        return;
    r = oq__malloc(sizeof(*r) + len);
    if (r == NULL) {
        ctx->rc = OQ_ENOMEM;
        return;
    }
    r->next = NULL;
    r->len = len;
    if (len)
        memcpy(r->data, data, len);
    if (ctx->tail)
        ctx->tail->next = r;
    else
        ctx->head = r;
    ctx->tail = r;
    ctx->nrec++;
}

static void add_count(const char *key, size_t len, int64_t delta, void *arg)
{
    apply_ctx *ctx = arg;
    counter *c;

    if (ctx->next < ctx->nseen)
        c = ctx->seen[ctx->next++];
    else
        HASH_FIND(hh, ctx->m->counters, key, len, c);
    c->value += delta; /* phase 1 made sure it exists */
}

static void undo(apply_ctx *ctx)
{
    counter *c;
    record *r;

    while ((c = ctx->created) != NULL) {
        ctx->created = c->next_new;
        HASH_DEL(ctx->m->counters, c);
        oq__free(c);
    }
    while ((r = ctx->head) != NULL) {
        ctx->head = r->next;
        oq__free(r);
    }
}

/* apply's work, with m->mu held or m owned by the caller. */
static int apply_held(oq_memsink *m, const oq_txn *txn)
{
    apply_ctx ctx = { .m = m };

    oq_txn_foreach(txn, prepare_record, prepare_count, &ctx);
    if (ctx.rc != 0) {
        undo(&ctx);
    } else {
        oq_txn_foreach(txn, NULL, add_count, &ctx);
        if (ctx.head) {
            if (m->rec_tail)
                m->rec_tail->next = ctx.head;
            else
                m->rec_head = ctx.head;
            m->rec_tail = ctx.tail;
            m->nrecords += ctx.nrec;
        }
    }
    return ctx.rc;
}

static int apply(const oq_event *ev, const oq_txn *txn, void *arg)
{
    oq_memsink *m = arg;
    int rc;

    OQ__UNUSED(ev);
    pthread_mutex_lock(&m->mu);
    rc = apply_held(m, txn);
    pthread_mutex_unlock(&m->mu);
    return rc;
}

int oq__memsink_apply_owned(oq_memsink *m, const oq_txn *txn)
{
    return apply_held(m, txn);
}

int oq__memsink_merge(oq_memsink *into, oq_memsink *from)
{
    counter *cs, *c, *tmp;
    record *rh, *rt;
    size_t nr;
    int rc = 0;

    /* One lock at a time: take from's contents, then add them to into. */
    pthread_mutex_lock(&from->mu);
    cs = from->counters;
    rh = from->rec_head;
    rt = from->rec_tail;
    nr = from->nrecords;
    from->counters = NULL;
    from->rec_head = from->rec_tail = NULL;
    from->nrecords = 0;
    pthread_mutex_unlock(&from->mu);

    pthread_mutex_lock(&into->mu);
    HASH_ITER(hh, cs, c, tmp) {
        counter *have;
        HASH_DEL(cs, c);
        HASH_FIND(hh, into->counters, c->key, c->len, have);
        if (have != NULL) {
            have->value += c->value;
            oq__free(c);
            continue;
        }
        oq__hash_oom = 0;
        HASH_ADD_KEYPTR(hh, into->counters, c->key, c->len, c);
        if (oq__hash_oom) {
            oq__free(c);
            rc = OQ_ENOMEM;
        }
    }
    if (rh) {
        if (into->rec_tail)
            into->rec_tail->next = rh;
        else
            into->rec_head = rh;
        into->rec_tail = rt;
        into->nrecords += nr;
    }
    pthread_mutex_unlock(&into->mu);
    return rc;
}

oq_sink oq_memsink_sink(oq_memsink *m)
{
    oq_sink s = { apply, m, NULL };
    return s;
}

int oq_memsink_get(oq_memsink *m, const char *key, size_t key_len,
                   int64_t *value)
{
    counter *c;
    pthread_mutex_lock(&m->mu);
    HASH_FIND(hh, m->counters, key, key_len, c);
    if (c && value)
        *value = c->value;
    pthread_mutex_unlock(&m->mu);
    return c ? 0 : OQ_ENOENT;
}

size_t oq_memsink_nkeys(oq_memsink *m)
{
    size_t n;
    pthread_mutex_lock(&m->mu);
    n = HASH_COUNT(m->counters);
    pthread_mutex_unlock(&m->mu);
    return n;
}

size_t oq_memsink_nrecords(oq_memsink *m)
{
    size_t n;
    pthread_mutex_lock(&m->mu);
    n = m->nrecords;
    pthread_mutex_unlock(&m->mu);
    return n;
}

static int by_key(const void *a, const void *b)
{
    const counter *x = *(const counter *const *)a;
    const counter *y = *(const counter *const *)b;
    size_t n = OQ__MIN(x->len, y->len);
    int c = memcmp(x->key, y->key, n);
    if (c != 0)
        return c;
    return (x->len > y->len) - (x->len < y->len);
}

void oq_memsink_foreach_count(oq_memsink *m, oq_txn_count_fn fn, void *arg)
{
    counter **v, *c, *tmp;
    size_t n, i = 0;

    pthread_mutex_lock(&m->mu);
    n = HASH_COUNT(m->counters);
    v = oq__malloc((n ? n : 1) * sizeof(*v));
    if (v == NULL) {
        /* Unsorted is better than nothing. */
        HASH_ITER(hh, m->counters, c, tmp)
            fn(c->key, c->len, c->value, arg);
        pthread_mutex_unlock(&m->mu);
        return;
    }
    HASH_ITER(hh, m->counters, c, tmp)
        v[i++] = c;
    qsort(v, n, sizeof(*v), by_key);
    for (i = 0; i < n; i++)
        fn(v[i]->key, v[i]->len, v[i]->value, arg);
    pthread_mutex_unlock(&m->mu);
    oq__free(v);
}

void oq_memsink_foreach_record(oq_memsink *m, oq_txn_record_fn fn, void *arg)
{
    pthread_mutex_lock(&m->mu);
    for (record *r = m->rec_head; r; r = r->next)
        fn(r->data, r->len, arg);
    pthread_mutex_unlock(&m->mu);
}
