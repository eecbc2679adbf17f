/* Description: the intrusive min-heap (oq__heap) pops keys in sorted order, keeps every item's stored position equal to its index after push, pop, remove and update, survives 10k random operations checked against a sorted-array model, and leaves the heap unchanged when growing it runs out of memory. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "oq_cli.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* A heap item as the queue lays them out: a key and a position, plus a
 * payload so that the test can tell items with equal keys apart. */
typedef struct hitem {
    int64_t key;
    int id;
    size_t pos;
} hitem;

static void heap_init(oq__heap *h)
{
    oq__heap_init(h, offsetof(hitem, key), offsetof(hitem, pos));
}

/* The seed comes from OQ_TEST_SEED when set, so a failure can be replayed;
 * it is always printed. */
static uint64_t test_seed(const char *test)
{
    const char *env = getenv("OQ_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0)
                        : (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ULL ^ (uint64_t)getpid();
    printf("%s: seed 0x%" PRIx64 " (replay with OQ_TEST_SEED)\n", test, seed);
    return seed;
}

/* Every parent's key is <= its children's, and every item knows its index. */
static void assert_heap_valid(const oq__heap *h)
{
    for (size_t i = 0; i < h->len; i++) {
        const hitem *it = h->items[i];
        assert_int_equal(it->pos, i);
        if (i > 0) {
            const hitem *parent = h->items[(i - 1) / 2];
            assert_true(parent->key <= it->key);
        }
    }
}

static void peek_empty_is_null(void **state)
{
    oq__heap h;
    heap_init(&h);
    assert_null(oq__heap_peek(&h));
    assert_null(oq__heap_pop(&h));
    assert_int_equal(h.len, 0);
    oq__heap_destroy(&h);
}

static void peek_returns_min_without_removing(void **state)
{
    oq__heap h;
    hitem a = { .key = 30 }, b = { .key = 10 }, c = { .key = 20 };
    heap_init(&h);
    assert_int_equal(oq__heap_push(&h, &a), 0);
    assert_int_equal(oq__heap_push(&h, &b), 0);
    assert_int_equal(oq__heap_push(&h, &c), 0);
    assert_ptr_equal(oq__heap_peek(&h), &b);
    assert_ptr_equal(oq__heap_peek(&h), &b);
    assert_int_equal(h.len, 3);
    oq__heap_destroy(&h);
}

static void push_random_pops_sorted(void **state)
{
    enum { N = 5000 };
    uint64_t rng = test_seed("push_random_pops_sorted");
    hitem *items = calloc(N, sizeof(*items));
    oq__heap h;
    assert_non_null(items);
    heap_init(&h);
    for (int i = 0; i < N; i++) {
        /* A narrow range so that there are many equal keys. */
        items[i].key = (int64_t)(oq__splitmix64(&rng) % 1000) - 500;
        items[i].id = i;
        assert_int_equal(oq__heap_push(&h, &items[i]), 0);
    }
    assert_int_equal(h.len, N);
    assert_heap_valid(&h);

    int64_t prev = INT64_MIN;
    int seen = 0;
    char *popped = calloc(N, 1);
    assert_non_null(popped);
    for (hitem *it; (it = oq__heap_pop(&h)) != NULL; seen++) {
        assert_true(it->key >= prev);
        assert_int_equal(popped[it->id], 0); /* each item comes out once */
        popped[it->id] = 1;
        prev = it->key;
    }
    assert_int_equal(seen, N);
    assert_int_equal(h.len, 0);
    free(popped);
    oq__heap_destroy(&h);
    free(items);
}

static void extreme_keys_order(void **state)
{
    oq__heap h;
    hitem it[4] = { { .key = INT64_MAX }, { .key = 0 }, { .key = INT64_MIN },
                    { .key = -1 } };
    heap_init(&h);
    for (int i = 0; i < 4; i++)
        assert_int_equal(oq__heap_push(&h, &it[i]), 0);
    assert_ptr_equal(oq__heap_pop(&h), &it[2]);
    assert_ptr_equal(oq__heap_pop(&h), &it[3]);
    assert_ptr_equal(oq__heap_pop(&h), &it[1]);
    assert_ptr_equal(oq__heap_pop(&h), &it[0]);
    oq__heap_destroy(&h);
}

static void remove_arbitrary_keeps_order(void **state)
{
    enum { N = 300 };
    uint64_t rng = test_seed("remove_arbitrary_keeps_order");
    hitem items[N];
    char removed[N] = { 0 };
    oq__heap h;
    heap_init(&h);
    for (int i = 0; i < N; i++) {
        items[i] = (hitem){ .key = (int64_t)(oq__splitmix64(&rng) % 10000), .id = i };
        assert_int_equal(oq__heap_push(&h, &items[i]), 0);
    }
    /* Remove every third item, in a scrambled order, from wherever it is. */
    for (int k = 0; k < N; k++) {
        int i = (int)((k * 7919) % N);
        if (i % 3 != 0)
            continue;
        oq__heap_remove(&h, &items[i]);
        removed[i] = 1;
        assert_heap_valid(&h);
    }
    assert_int_equal(h.len, N - (N + 2) / 3);
    int64_t prev = INT64_MIN;
    for (hitem *it; (it = oq__heap_pop(&h)) != NULL;) {
        assert_int_equal(removed[it->id], 0);
        assert_true(it->key >= prev);
        prev = it->key;
    }
    oq__heap_destroy(&h);
}

static void remove_last_and_root(void **state)
{
    oq__heap h;
    hitem it[5];
    heap_init(&h);
    for (int i = 0; i < 5; i++) {
        it[i] = (hitem){ .key = (i + 1) * 10, .id = i };
        assert_int_equal(oq__heap_push(&h, &it[i]), 0);
    }
    /* Keys pushed ascending stay in place, so it[4] is the last slot. */
    assert_int_equal(it[4].pos, 4);
    oq__heap_remove(&h, &it[4]);
    assert_int_equal(h.len, 4);
    assert_heap_valid(&h);
    oq__heap_remove(&h, &it[0]);
    assert_int_equal(h.len, 3);
    assert_heap_valid(&h);
    assert_ptr_equal(oq__heap_peek(&h), &it[1]);
    oq__heap_destroy(&h);
}

/* Removing an item from the middle can require moving the last item up, not
 * only down (it may be smaller than the removed item's parent). */
static void remove_moves_last_item_up(void **state)
{
    oq__heap h;
    /*        0
     *     10    1
     *   11  12 2  3     removing the 11 puts 3 (the last) under 10. */
    int64_t keys[] = { 0, 10, 1, 11, 12, 2, 3 };
    hitem it[7];
    heap_init(&h);
    for (int i = 0; i < 7; i++) {
        it[i] = (hitem){ .key = keys[i], .id = i };
        assert_int_equal(oq__heap_push(&h, &it[i]), 0);
    }
    assert_heap_valid(&h);
    assert_int_equal(it[3].pos, 3); /* the 11 */
    oq__heap_remove(&h, &it[3]);
    assert_heap_valid(&h);
    int64_t want[] = { 0, 1, 2, 3, 10, 12 };
    for (int i = 0; i < 6; i++) {
        hitem *p = oq__heap_pop(&h);
        assert_non_null(p);
        assert_int_equal(p->key, want[i]);
    }
    assert_null(oq__heap_pop(&h));
    oq__heap_destroy(&h);
}

static void update_after_key_decrease(void **state)
{
    enum { N = 100 };
    oq__heap h;
    hitem it[N];
    heap_init(&h);
    for (int i = 0; i < N; i++) {
        it[i] = (hitem){ .key = i * 10, .id = i };
        assert_int_equal(oq__heap_push(&h, &it[i]), 0);
    }
    it[N - 1].key = -1;
    oq__heap_update(&h, &it[N - 1]);
    assert_heap_valid(&h);
    assert_ptr_equal(oq__heap_peek(&h), &it[N - 1]);
    assert_int_equal(it[N - 1].pos, 0);

    /* A decrease that lands in the middle. */
    it[80].key = 355;
    oq__heap_update(&h, &it[80]);
    assert_heap_valid(&h);
    int64_t prev = INT64_MIN;
    int n = 0;
    for (hitem *p; (p = oq__heap_pop(&h)) != NULL; n++) {
        assert_true(p->key >= prev);
        prev = p->key;
    }
    assert_int_equal(n, N);
    oq__heap_destroy(&h);
}

static void update_after_key_increase(void **state)
{
    enum { N = 100 };
    oq__heap h;
    hitem it[N];
    heap_init(&h);
    for (int i = 0; i < N; i++) {
        it[i] = (hitem){ .key = i * 10, .id = i };
        assert_int_equal(oq__heap_push(&h, &it[i]), 0);
    }
    assert_ptr_equal(oq__heap_peek(&h), &it[0]);
    it[0].key = 100000;
    oq__heap_update(&h, &it[0]);
    assert_heap_valid(&h);
    assert_ptr_equal(oq__heap_peek(&h), &it[1]);
    assert_int_not_equal(it[0].pos, 0);

    hitem *last = NULL;
    int n = 0;
    for (hitem *p; (p = oq__heap_pop(&h)) != NULL; n++)
        last = p;
    assert_int_equal(n, N);
    assert_ptr_equal(last, &it[0]);
    oq__heap_destroy(&h);
}

static void update_unchanged_key_is_noop(void **state)
{
    oq__heap h;
    hitem it[10];
    heap_init(&h);
    for (int i = 0; i < 10; i++) {
        it[i] = (hitem){ .key = 5, .id = i };
        assert_int_equal(oq__heap_push(&h, &it[i]), 0);
    }
    void *before[10];
    memcpy(before, h.items, sizeof(before));
    for (int i = 0; i < 10; i++)
        oq__heap_update(&h, &it[i]);
    /* Equal keys never swap: the layout is exactly as before. */
    assert_memory_equal(before, h.items, sizeof(before));
    assert_heap_valid(&h);
    oq__heap_destroy(&h);
}

/* ---- randomized operations against a sorted-array model ---- */

typedef struct model {
    int64_t *keys; /* sorted ascending: a multiset of the heap's keys */
    size_t len;
} model;

static size_t model_lower_bound(const model *m, int64_t k)
{
    size_t lo = 0, hi = m->len;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (m->keys[mid] < k)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void model_insert(model *m, int64_t k)
{
    size_t i = model_lower_bound(m, k);
    memmove(&m->keys[i + 1], &m->keys[i], (m->len - i) * sizeof(*m->keys));
    m->keys[i] = k;
    m->len++;
}

static void model_erase(model *m, int64_t k)
{
    size_t i = model_lower_bound(m, k);
    assert_true(i < m->len);
    assert_int_equal(m->keys[i], k);
    memmove(&m->keys[i], &m->keys[i + 1], (m->len - i - 1) * sizeof(*m->keys));
    m->len--;
}

static void random_ops_match_sorted_model(void **state)
{
    enum { N = 2000, OPS = 10000 };
    uint64_t rng = test_seed("random_ops_match_sorted_model");
    hitem *items = calloc(N, sizeof(*items));
    char *in = calloc(N, 1);     /* in[i]: items[i] is in the heap */
    hitem **present = calloc(N, sizeof(*present));
    size_t npresent = 0;
    model m = { calloc(N, sizeof(int64_t)), 0 };
    oq__heap h;
    int counts[5] = { 0 };

    assert_non_null(items);
    assert_non_null(in);
    assert_non_null(present);
    assert_non_null(m.keys);
    heap_init(&h);
    for (int i = 0; i < N; i++)
        items[i].id = i;

    for (int op = 0; op < OPS; op++) {
        unsigned kind = (unsigned)(oq__splitmix64(&rng) % 5);
        int64_t key = (int64_t)(oq__splitmix64(&rng) % 5000) - 2500;
        if (npresent == 0)
            kind = 0;
        if (kind == 0 && npresent == N)
            kind = 1;
        counts[kind]++;
        switch (kind) {
        case 0: { /* push a free item */
            int i;
            do
                i = (int)(oq__splitmix64(&rng) % N);
            while (in[i]);
            items[i].key = key;
            assert_int_equal(oq__heap_push(&h, &items[i]), 0);
            in[i] = 1;
            present[npresent++] = &items[i];
            model_insert(&m, key);
            break;
        }
        case 1: { /* pop: the smallest key comes out */
            hitem *p = oq__heap_pop(&h);
            assert_non_null(p);
            assert_int_equal(p->key, m.keys[0]);
            assert_int_equal(in[p->id], 1);
            model_erase(&m, p->key);
            in[p->id] = 0;
            for (size_t j = 0; j < npresent; j++)
                if (present[j] == p) {
                    present[j] = present[--npresent];
                    break;
                }
            break;
        }
        case 2: { /* remove an arbitrary present item */
            size_t j = (size_t)(oq__splitmix64(&rng) % npresent);
            hitem *p = present[j];
            oq__heap_remove(&h, p);
            model_erase(&m, p->key);
            in[p->id] = 0;
            present[j] = present[--npresent];
            break;
        }
        case 3: { /* change an arbitrary item's key */
            size_t j = (size_t)(oq__splitmix64(&rng) % npresent);
            hitem *p = present[j];
            model_erase(&m, p->key);
            p->key = key;
            oq__heap_update(&h, p);
            model_insert(&m, key);
            break;
        }
        default: { /* peek */
            hitem *p = oq__heap_peek(&h);
            assert_non_null(p);
            assert_int_equal(p->key, m.keys[0]);
            break;
        }
        }
        assert_int_equal(h.len, m.len);
        assert_int_equal(h.len, npresent);
        if (op % 97 == 0)
            assert_heap_valid(&h);
    }
    assert_heap_valid(&h);
    /* Every kind of operation really ran. */
    for (int k = 0; k < 5; k++)
        assert_true(counts[k] > OPS / 10);

    /* Drain: exactly the model's keys, in the model's order. */
    for (size_t i = 0; i < m.len; i++) {
        hitem *p = oq__heap_pop(&h);
        assert_non_null(p);
        assert_int_equal(p->key, m.keys[i]);
    }
    assert_null(oq__heap_pop(&h));
    oq__heap_destroy(&h);
    free(m.keys);
    free(present);
    free(in);
    free(items);
}

/* ---- allocation failures ---- */

static void push_oom_on_first_growth(void **state)
{
    oq__heap h;
    hitem a = { .key = 1 };
    heap_init(&h);
    oq__alloc_fail_after(0);
    int rc = oq__heap_push(&h, &a);
    oq__alloc_fail_after(-1);
    assert_int_equal(rc, OQ_ENOMEM);
    assert_int_equal(h.len, 0);
    assert_null(oq__heap_peek(&h));
    /* The heap works once memory is back. */
    assert_int_equal(oq__heap_push(&h, &a), 0);
    assert_ptr_equal(oq__heap_peek(&h), &a);
    oq__heap_destroy(&h);
}

static void push_oom_on_later_growth_keeps_contents(void **state)
{
    oq__heap h;
    hitem *it = calloc(200, sizeof(*it));
    size_t n = 0;
    int rc = 0;
    assert_non_null(it);
    heap_init(&h);
    /* Fill to capacity, whatever the growth policy, then fail the growth. */
    for (;;) {
        it[n] = (hitem){ .key = 1000 - (int64_t)n, .id = (int)n };
        assert_int_equal(oq__heap_push(&h, &it[n]), 0);
        n++;
        if (h.len == h.cap)
            break;
        assert_true(n < 199);
    }
    hitem extra = { .key = -5, .id = -1 };
    oq__alloc_fail_after(0);
    rc = oq__heap_push(&h, &extra);
    oq__alloc_fail_after(-1);
    assert_int_equal(rc, OQ_ENOMEM);
    assert_int_equal(h.len, n);
    assert_heap_valid(&h);
    /* The min is still the last item pushed, not the refused one. */
    assert_ptr_equal(oq__heap_peek(&h), &it[n - 1]);
    assert_int_equal(oq__heap_push(&h, &extra), 0);
    assert_ptr_equal(oq__heap_peek(&h), &extra);
    oq__heap_destroy(&h);
    free(it);
}

static void destroy_then_reuse(void **state)
{
    oq__heap h;
    hitem a = { .key = 3 }, b = { .key = 2 };
    heap_init(&h);
    assert_int_equal(oq__heap_push(&h, &a), 0);
    oq__heap_destroy(&h);
    assert_int_equal(h.len, 0);
    assert_null(oq__heap_peek(&h));
    assert_int_equal(oq__heap_push(&h, &b), 0);
    assert_ptr_equal(oq__heap_pop(&h), &b);
    oq__heap_destroy(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(peek_empty_is_null),
        cmocka_unit_test(peek_returns_min_without_removing),
        cmocka_unit_test(push_random_pops_sorted),
        cmocka_unit_test(extreme_keys_order),
        cmocka_unit_test(remove_arbitrary_keeps_order),
        cmocka_unit_test(remove_last_and_root),
        cmocka_unit_test(remove_moves_last_item_up),
        cmocka_unit_test(update_after_key_decrease),
        cmocka_unit_test(update_after_key_increase),
        cmocka_unit_test(update_unchanged_key_is_noop),
        cmocka_unit_test(random_ops_match_sorted_model),
        cmocka_unit_test(push_oom_on_first_growth),
        cmocka_unit_test(push_oom_on_later_growth_keeps_contents),
        cmocka_unit_test(destroy_then_reuse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
