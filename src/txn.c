/*
 * Transactions: what a handler stages. Records are opaque byte strings kept
 * in one growing buffer; counter deltas are (key, delta) pairs. Nothing here
 * has an effect: the pool hands a txn to the sink only after the fenced
 * commit succeeded, and resets it otherwise. A txn belongs to one worker at
 * a time and needs no lock.
 */
#include "oq_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define ERR_MAX 512

typedef struct item {
    size_t off;   /* into buf */
    size_t len;
    int64_t delta;
    int is_count;
} item;

struct oq_txn {
    char *buf;          /* record bytes and counter keys */
    size_t len, cap;
    item *items;
    size_t nitems, icap;
    size_t nrecords, ncounts;
    char error[ERR_MAX]; /* "" when none */
    /* Set by the pool around a handler call that has heartbeats: pushes
     * the attempt's end on (oq_txn_heartbeat). NULL: none. */
    int64_t (*beat)(void *arg);
    void *beat_arg;
    /* The reply to a request (request-reply), staged by the engine after
     * the handler: committed with the id, never by the handler. */
    oq__buf reply;
    bool has_reply;
};

oq_txn *oq__txn_new(void)
{
    return oq__calloc(1, sizeof(oq_txn));
}

void oq__txn_reset(oq_txn *t)
{
    t->len = 0;
    t->nitems = t->nrecords = t->ncounts = 0;
    t->error[0] = '\0';
    t->reply.len = 0;
    t->has_reply = false;
}

int oq__txn_set_reply(oq_txn *t, const char *data, size_t len)
{
    t->reply.len = 0;
    t->has_reply = false;
    if (oq__buf_add(&t->reply, data, len) != 0)
        return OQ_ENOMEM;
    t->has_reply = true;
    return 0;
}

const char *oq__txn_reply(const oq_txn *t, size_t *len)
{
    if (!t->has_reply)
        return NULL;
    *len = t->reply.len;
    return t->reply.data;
}

void oq__txn_set_heartbeat(oq_txn *t, int64_t (*fn)(void *arg), void *arg)
{
    t->beat = fn;
    t->beat_arg = arg;
}

int64_t oq_txn_heartbeat(oq_txn *t)
{
    if (t == NULL)
        return OQ_EINVAL;
    if (t->beat == NULL)
        return OQ_ENOENT;
    return t->beat(t->beat_arg);
}

void oq__txn_free(oq_txn *t)
{
    if (t == NULL)
        return;
    oq__free(t->buf);
    oq__free(t->items);
    oq__buf_free(&t->reply);
    oq__free(t);
}

static int push(oq_txn *t, const void *data, size_t len, int is_count,
                int64_t delta)
{
    if (t->len + len > t->cap) {
        size_t ncap = t->cap ? t->cap : 256;
        char *nb;
        while (ncap < t->len + len)
            ncap *= 2;
        nb = oq__realloc(t->buf, ncap);
        if (nb == NULL)
            return OQ_ENOMEM;
        t->buf = nb;
        t->cap = ncap;
    }
    if (t->nitems == t->icap) {
        size_t ncap = t->icap ? t->icap * 2 : 8;
        item *ni = oq__realloc(t->items, ncap * sizeof(*ni));
        if (ni == NULL)
            return OQ_ENOMEM;
        t->items = ni;
        t->icap = ncap;
    }
    if (len)
        memcpy(t->buf + t->len, data, len);
    t->items[t->nitems++] = (item){ t->len, len, delta, is_count };
    t->len += len;
    if (is_count)
        t->ncounts++;
    else
        t->nrecords++;
    return 0;
}

int oq_txn_record(oq_txn *t, const void *data, size_t len)
{
    if (t == NULL || (data == NULL && len > 0))
        return OQ_EINVAL;
    return push(t, data, len, 0, 0);
}

int oq_txn_count(oq_txn *t, const char *key, size_t key_len, int64_t delta)
{
    if (t == NULL || (key == NULL && key_len > 0))
        return OQ_EINVAL;
    return push(t, key, key_len, 1, delta);
}

void oq_txn_error(oq_txn *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->error, sizeof(t->error), fmt, ap);
    va_end(ap);
}

const char *oq_txn_error_text(const oq_txn *t)
{
    return t->error;
}

size_t oq_txn_nrecords(const oq_txn *t)
{
    return t->nrecords;
}

size_t oq_txn_ncounts(const oq_txn *t)
{
    return t->ncounts;
}

void oq_txn_foreach(const oq_txn *t, oq_txn_record_fn rec,
                    oq_txn_count_fn cnt, void *arg)
{
    for (size_t i = 0; i < t->nitems; i++) {
        const item *it = &t->items[i];
        /* Only zero-length items so far: no buffer yet, but never NULL. */
        const char *data = t->buf ? t->buf + it->off : "";
        if (it->is_count) {
            if (cnt)
                cnt(data, it->len, it->delta, arg);
        } else if (rec) {
            rec(data, it->len, arg);
        }
    }
}
