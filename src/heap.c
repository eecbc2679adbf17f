/*
 * A binary min-heap of intrusive items: each item stores its int64_t key and
 * its current index, so removal and re-keying cost O(log n) with no search.
 * The queue keeps two: delayed messages by due time, in-flight messages by
 * deadline. Not thread-safe: the owner's lock protects it.
 */
#include "oq_internal.h"

#define KEY(h, it) (*(int64_t *)((char *)(it) + (h)->key_off))
#define POS(h, it) (*(size_t *)((char *)(it) + (h)->pos_off))

void oq__heap_init(oq__heap *h, size_t key_off, size_t pos_off)
{
    h->items = NULL;
    h->len = h->cap = 0;
    h->key_off = key_off;
    h->pos_off = pos_off;
}

void oq__heap_destroy(oq__heap *h)
{
    oq__free(h->items);
    h->items = NULL;
    h->len = h->cap = 0;
}

static void place(oq__heap *h, size_t i, void *it)
{
    h->items[i] = it;
    POS(h, it) = i;
}

static void sift_up(oq__heap *h, size_t i)
{
    void *it = h->items[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (KEY(h, h->items[parent]) <= KEY(h, it))
            break;
        place(h, i, h->items[parent]);
        i = parent;
    }
    place(h, i, it);
}

static void sift_down(oq__heap *h, size_t i)
{
    void *it = h->items[i];
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        int64_t mk = KEY(h, it);
        if (l < h->len && KEY(h, h->items[l]) < mk) {
            m = l;
            mk = KEY(h, h->items[l]);
        }
        if (r < h->len && KEY(h, h->items[r]) < mk)
            m = r;
        if (m == i)
            break;
        place(h, i, h->items[m]);
        i = m;
    }
    place(h, i, it);
}

int oq__heap_push(oq__heap *h, void *item)
{
    if (h->len == h->cap) {
        size_t ncap = h->cap ? h->cap * 2 : 64;
        void **n = oq__realloc(h->items, ncap * sizeof(*n));
        if (n == NULL)
            return OQ_ENOMEM;
        h->items = n;
        h->cap = ncap;
    }
    h->items[h->len] = item;
    sift_up(h, h->len++);
    return 0;
}

void *oq__heap_peek(const oq__heap *h)
{
    return h->len ? h->items[0] : NULL;
}

void *oq__heap_pop(oq__heap *h)
{
    void *top;
    if (h->len == 0)
        return NULL;
    top = h->items[0];
    oq__heap_remove(h, top);
    return top;
}

void oq__heap_remove(oq__heap *h, void *item)
{
    size_t i = POS(h, item);
    void *last = h->items[--h->len];
    if (i == h->len)
        return;
    place(h, i, last);
    oq__heap_update(h, last);
}

void oq__heap_update(oq__heap *h, void *item)
{
    size_t i = POS(h, item);
    if (i > 0 && KEY(h, h->items[(i - 1) / 2]) > KEY(h, item))
        sift_up(h, i);
    else
        sift_down(h, i);
}
