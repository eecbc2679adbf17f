/* Description: transactions (oq_txn) keep records and counter deltas byte-exact and in staging order, reset empties them, error text is copied and truncated; the memsink sums counters, keeps records in apply order, lists keys in bytewise order and gives exact totals under 4 concurrent appliers; oq_backoff_ms stays within [0, min(cap, base*2^(k-1))] and reaches near its ceiling; oq_strerror/oq_dlq_reason_name name every code; every allocation failure gives OQ_ENOMEM without a crash or a leak. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "oq_cli.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------- helpers */

/* What oq_txn_foreach / oq_memsink_foreach_* visited, flattened into one
 * log so that tests can compare order and bytes exactly. */
typedef struct visit {
    int is_count;
    char data[64];
    size_t len;
    int64_t delta;
} visit;

typedef struct visits {
    visit v[4096];
    size_t n;
} visits;

static void log_record(const void *data, size_t len, void *arg)
{
    visits *vs = arg;
    assert_true(vs->n < sizeof(vs->v) / sizeof(vs->v[0]));
    visit *v = &vs->v[vs->n++];
    v->is_count = 0;
    v->len = len;
    v->delta = 0;
    if (len)
        memcpy(v->data, data, OQ__MIN(len, sizeof(v->data)));
}

static void log_count(const char *key, size_t len, int64_t delta, void *arg)
{
    visits *vs = arg;
    assert_true(vs->n < sizeof(vs->v) / sizeof(vs->v[0]));
    visit *v = &vs->v[vs->n++];
    v->is_count = 1;
    v->len = len;
    v->delta = delta;
    if (len)
        memcpy(v->data, key, OQ__MIN(len, sizeof(v->data)));
}

static visits *visits_new(void)
{
    visits *vs = calloc(1, sizeof(*vs));
    assert_non_null(vs);
    return vs;
}

static void assert_visit(const visits *vs, size_t i, int is_count,
                         const void *data, size_t len, int64_t delta)
{
    assert_true(i < vs->n);
    assert_int_equal(vs->v[i].is_count, is_count);
    assert_int_equal(vs->v[i].len, len);
    /* The log keeps the first 64 bytes of each item. */
    if (len)
        assert_memory_equal(vs->v[i].data, data,
                            OQ__MIN(len, sizeof(vs->v[i].data)));
    assert_int_equal(vs->v[i].delta, delta);
}

static oq_txn *txn_new(void)
{
    oq_txn *t = oq__txn_new();
    assert_non_null(t);
    return t;
}

static oq_memsink *memsink_new(void)
{
    oq_memsink *m = NULL;
    assert_int_equal(oq_memsink_new(&m), 0);
    assert_non_null(m);
    return m;
}

static int sink_apply(oq_memsink *m, const oq_txn *t)
{
    oq_sink s = oq_memsink_sink(m);
    oq_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.id = "ev";
    ev.id_len = 2;
    return s.apply(&ev, t, s.arg);
}

static int64_t get_count(oq_memsink *m, const char *key)
{
    int64_t v = INT64_MIN;
    assert_int_equal(oq_memsink_get(m, key, strlen(key), &v), 0);
    return v;
}

static uint64_t test_seed(const char *test)
{
    const char *env = getenv("OQ_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0)
                        : (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ULL ^ (uint64_t)getpid();
    printf("%s: seed 0x%" PRIx64 " (replay with OQ_TEST_SEED)\n", test, seed);
    return seed;
}

/* ----------------------------------------------------------------- txn */

static void txn_new_is_empty(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    assert_int_equal(oq_txn_nrecords(t), 0);
    assert_int_equal(oq_txn_ncounts(t), 0);
    assert_string_equal(oq_txn_error_text(t), "");
    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, 0);
    free(vs);
    oq__txn_free(t);
}

static void txn_records_and_counts_in_order(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    assert_int_equal(oq_txn_record(t, "r1", 2), 0);
    assert_int_equal(oq_txn_count(t, "a", 1, 1), 0);
    assert_int_equal(oq_txn_record(t, "second", 6), 0);
    assert_int_equal(oq_txn_count(t, "bb", 2, -3), 0);
    assert_int_equal(oq_txn_count(t, "a", 1, 7), 0);
    assert_int_equal(oq_txn_record(t, "r3", 2), 0);
    assert_int_equal(oq_txn_nrecords(t), 3);
    assert_int_equal(oq_txn_ncounts(t), 3);

    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, 6);
    assert_visit(vs, 0, 0, "r1", 2, 0);
    assert_visit(vs, 1, 1, "a", 1, 1);
    assert_visit(vs, 2, 0, "second", 6, 0);
    assert_visit(vs, 3, 1, "bb", 2, -3);
    /* The txn keeps deltas as staged; summing is the sink's job. */
    assert_visit(vs, 4, 1, "a", 1, 7);
    assert_visit(vs, 5, 0, "r3", 2, 0);
    free(vs);
    oq__txn_free(t);
}

static void txn_foreach_with_only_one_callback(void **state)
{
    oq_txn *t = txn_new();
    visits *recs = visits_new(), *cnts = visits_new();
    assert_int_equal(oq_txn_record(t, "x", 1), 0);
    assert_int_equal(oq_txn_count(t, "k", 1, 5), 0);
    assert_int_equal(oq_txn_record(t, "y", 1), 0);
    oq_txn_foreach(t, log_record, NULL, recs);
    oq_txn_foreach(t, NULL, log_count, cnts);
    assert_int_equal(recs->n, 2);
    assert_visit(recs, 0, 0, "x", 1, 0);
    assert_visit(recs, 1, 0, "y", 1, 0);
    assert_int_equal(cnts->n, 1);
    assert_visit(cnts, 0, 1, "k", 1, 5);
    free(recs);
    free(cnts);
    oq__txn_free(t);
}

static void txn_binary_record_with_nul_bytes(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    char src[] = { 'a', '\0', 'b', '\0', '\xff', '\0' };
    char key[] = { '\0', 'k', '\0' };
    assert_int_equal(oq_txn_record(t, src, sizeof(src)), 0);
    assert_int_equal(oq_txn_count(t, key, sizeof(key), 2), 0);
    /* The txn holds copies: changing the caller's buffers changes nothing. */
    memset(src, 'Z', sizeof(src));
    memset(key, 'Z', sizeof(key));
    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, 2);
    assert_visit(vs, 0, 0, "a\0b\0\xff\0", 6, 0);
    assert_visit(vs, 1, 1, "\0k\0", 3, 2);
    free(vs);
    oq__txn_free(t);
}

static void txn_empty_record_and_key(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    assert_int_equal(oq_txn_record(t, "abc", 3), 0);
    assert_int_equal(oq_txn_record(t, "", 0), 0);
    assert_int_equal(oq_txn_count(t, "", 0, 9), 0);
    assert_int_equal(oq_txn_record(t, "d", 1), 0);
    assert_int_equal(oq_txn_nrecords(t), 3);
    assert_int_equal(oq_txn_ncounts(t), 1);
    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, 4);
    assert_visit(vs, 0, 0, "abc", 3, 0);
    assert_visit(vs, 1, 0, "", 0, 0);
    assert_visit(vs, 2, 1, "", 0, 9);
    assert_visit(vs, 3, 0, "d", 1, 0);
    free(vs);
    oq__txn_free(t);
}

static void txn_invalid_arguments(void **state)
{
    oq_txn *t = txn_new();
    assert_int_equal(oq_txn_record(NULL, "x", 1), OQ_EINVAL);
    assert_int_equal(oq_txn_record(t, NULL, 1), OQ_EINVAL);
    assert_int_equal(oq_txn_count(NULL, "k", 1, 1), OQ_EINVAL);
    assert_int_equal(oq_txn_count(t, NULL, 3, 1), OQ_EINVAL);
    /* A refused call stages nothing. */
    assert_int_equal(oq_txn_nrecords(t), 0);
    assert_int_equal(oq_txn_ncounts(t), 0);
    oq__txn_free(t);
}

/* Many records of many sizes force the buffers to move; every record must
 * still read back exactly (offsets, not pointers, survive a realloc). */
static void txn_many_records_survive_growth(void **state)
{
    enum { N = 2000 };
    oq_txn *t = txn_new();
    char buf[700];
    for (int i = 0; i < N; i++) {
        size_t len = (size_t)(i * 37) % sizeof(buf);
        memset(buf, 'a' + i % 26, len);
        if (len >= 4)
            memcpy(buf, &i, sizeof(i));
        if (i % 5 == 0)
            assert_int_equal(oq_txn_count(t, buf, len, i), 0);
        else
            assert_int_equal(oq_txn_record(t, buf, len), 0);
    }
    assert_int_equal(oq_txn_ncounts(t), N / 5);
    assert_int_equal(oq_txn_nrecords(t), N - N / 5);

    /* With no callbacks, foreach visits nothing (and must not crash). */
    oq_txn_foreach(t, NULL, NULL, NULL);
    visits *vs = visits_new();
    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, N);
    for (int i = 0; i < N; i++) {
        size_t len = (size_t)(i * 37) % sizeof(buf);
        size_t cmp = OQ__MIN(len, sizeof(vs->v[i].data));
        memset(buf, 'a' + i % 26, len);
        if (len >= 4)
            memcpy(buf, &i, sizeof(i));
        assert_int_equal(vs->v[i].is_count, i % 5 == 0);
        assert_int_equal(vs->v[i].len, len);
        assert_int_equal(vs->v[i].delta, i % 5 == 0 ? i : 0);
        if (cmp)
            assert_memory_equal(vs->v[i].data, buf, cmp);
    }
    free(vs);
    oq__txn_free(t);
}

typedef struct big_ctx {
    const unsigned char *want;
    size_t want_len;
    size_t n;  /* records visited */
    int ok;    /* the second record matched want byte for byte */
} big_ctx;

static void big_cmp(const void *data, size_t len, void *arg)
{
    big_ctx *ctx = arg;
    if (ctx->n++ == 1)
        ctx->ok = len == ctx->want_len && memcmp(data, ctx->want, len) == 0;
}

/* A 1 MiB record goes through the txn and the sink byte-exact. */
static void txn_large_record_exact(void **state)
{
    enum { LEN = 1 << 20 };
    oq_txn *t = txn_new();
    oq_memsink *m = memsink_new();
    unsigned char *big = malloc(LEN);
    big_ctx ctx = { big, LEN, 0, 0 };
    assert_non_null(big);
    for (size_t i = 0; i < LEN; i++)
        big[i] = (unsigned char)(i * 131 + 7);
    assert_int_equal(oq_txn_record(t, "s", 1), 0);
    assert_int_equal(oq_txn_record(t, big, LEN), 0);
    assert_int_equal(sink_apply(m, t), 0);
    oq_memsink_foreach_record(m, big_cmp, &ctx);
    assert_int_equal(ctx.n, 2);
    assert_int_equal(ctx.ok, 1);
    oq_memsink_free(m);
    free(big);
    oq__txn_free(t);
}

static void txn_reset_empties(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    assert_int_equal(oq_txn_record(t, "old", 3), 0);
    assert_int_equal(oq_txn_count(t, "k", 1, 1), 0);
    oq_txn_error(t, "boom %d", 1);
    oq__txn_reset(t);
    assert_int_equal(oq_txn_nrecords(t), 0);
    assert_int_equal(oq_txn_ncounts(t), 0);
    assert_string_equal(oq_txn_error_text(t), "");
    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, 0);
    free(vs);
    oq__txn_free(t);
}

static void txn_reuse_after_reset(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    for (int round = 0; round < 3; round++) {
        char rec[16];
        int n = snprintf(rec, sizeof(rec), "round%d", round);
        assert_int_equal(oq_txn_record(t, rec, (size_t)n), 0);
        assert_int_equal(oq_txn_count(t, "c", 1, round), 0);
        vs->n = 0;
        oq_txn_foreach(t, log_record, log_count, vs);
        /* Only this round's items: nothing left over from before reset. */
        assert_int_equal(vs->n, 2);
        assert_visit(vs, 0, 0, rec, (size_t)n, 0);
        assert_visit(vs, 1, 1, "c", 1, round);
        oq__txn_reset(t);
    }
    free(vs);
    oq__txn_free(t);
}

static void txn_error_text_formats(void **state)
{
    oq_txn *t = txn_new();
    oq_txn_error(t, "bad input at %s:%d (%s)", "line", 42, "x");
    assert_string_equal(oq_txn_error_text(t), "bad input at line:42 (x)");
    /* The last error wins. */
    oq_txn_error(t, "%s", "second");
    assert_string_equal(oq_txn_error_text(t), "second");
    oq__txn_free(t);
}

static void txn_error_text_is_copied(void **state)
{
    oq_txn *t = txn_new();
    char msg[32];
    strcpy(msg, "transient");
    oq_txn_error(t, "%s", msg);
    strcpy(msg, "XXXXXXXXX");
    assert_string_equal(oq_txn_error_text(t), "transient");
    oq__txn_free(t);
}

static void txn_error_text_truncated(void **state)
{
    enum { LONG = 5000 };
    oq_txn *t = txn_new();
    char *s = malloc(LONG + 1);
    assert_non_null(s);
    for (int i = 0; i < LONG; i++)
        s[i] = (char)('a' + i % 26);
    s[LONG] = '\0';
    oq_txn_error(t, "%s", s);
    const char *e = oq_txn_error_text(t);
    size_t n = strlen(e);
    /* Truncated to a bounded, NUL-terminated prefix, not dropped. */
    assert_true(n > 100);
    assert_true(n < LONG);
    assert_memory_equal(e, s, n);
    free(s);
    oq__txn_free(t);
}

static void txn_free_null_is_noop(void **state)
{
    oq__txn_free(NULL);
}

static void txn_new_oom(void **state)
{
    oq__alloc_fail_after(0);
    oq_txn *t = oq__txn_new();
    oq__alloc_fail_after(-1);
    assert_null(t);
}

static void txn_record_oom_first_buffer(void **state)
{
    oq_txn *t = txn_new();
    oq__alloc_fail_after(0);
    int rc = oq_txn_record(t, "x", 1);
    oq__alloc_fail_after(-1);
    assert_int_equal(rc, OQ_ENOMEM);
    assert_int_equal(oq_txn_nrecords(t), 0);
    /* Usable once memory is back. */
    assert_int_equal(oq_txn_record(t, "y", 1), 0);
    assert_int_equal(oq_txn_nrecords(t), 1);
    oq__txn_free(t);
}

/* The second allocation of the first push (the item array) fails after the
 * byte buffer was grown: nothing may be staged, and nothing may leak. */
static void txn_record_oom_item_array(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    oq__alloc_fail_after(1);
    int rc = oq_txn_count(t, "key", 3, 1);
    oq__alloc_fail_after(-1);
    assert_int_equal(rc, OQ_ENOMEM);
    assert_int_equal(oq_txn_ncounts(t), 0);
    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, 0);
    free(vs);
    oq__txn_free(t);
}

/* Growth failures later on (buffer or item array full) refuse only the
 * push that needed memory and leave what was staged intact. */
static void txn_record_oom_on_growth_keeps_staged(void **state)
{
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    char rec[100];
    int staged = 0, failures = 0;
    memset(rec, 'r', sizeof(rec));
    /* Try each push with allocation failing first: it succeeds only when it
     * fits without growing. Stage it normally when it was refused. */
    while (failures < 4) {
        assert_true(staged < 2000);
        oq__alloc_fail_after(0);
        int rc = oq_txn_record(t, rec, sizeof(rec));
        oq__alloc_fail_after(-1);
        if (rc != 0) {
            assert_int_equal(rc, OQ_ENOMEM);
            assert_int_equal(oq_txn_nrecords(t), (size_t)staged);
            failures++;
            assert_int_equal(oq_txn_record(t, rec, sizeof(rec)), 0);
        }
        staged++;
    }
    assert_true(staged > failures); /* some pushes fitted in spare room */
    assert_int_equal(oq_txn_nrecords(t), (size_t)staged);
    oq_txn_foreach(t, log_record, log_count, vs);
    assert_int_equal(vs->n, (size_t)staged);
    for (int i = 0; i < staged; i++)
        assert_visit(vs, (size_t)i, 0, rec, sizeof(rec), 0);
    free(vs);
    oq__txn_free(t);
}

/* ------------------------------------------------------------- memsink */

static void memsink_apply_sums_counters(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    assert_int_equal(oq_txn_count(t, "a", 1, 5), 0);
    assert_int_equal(oq_txn_count(t, "b", 1, -2), 0);
    assert_int_equal(oq_txn_count(t, "a", 1, 10), 0);
    assert_int_equal(sink_apply(m, t), 0);
    assert_int_equal(get_count(m, "a"), 15);
    assert_int_equal(get_count(m, "b"), -2);
    assert_int_equal(oq_memsink_nkeys(m), 2);

    oq__txn_reset(t);
    assert_int_equal(oq_txn_count(t, "b", 1, 7), 0);
    assert_int_equal(oq_txn_count(t, "c", 1, 0), 0);
    assert_int_equal(sink_apply(m, t), 0);
    assert_int_equal(get_count(m, "a"), 15);
    assert_int_equal(get_count(m, "b"), 5);
    /* A zero delta still creates the key. */
    assert_int_equal(get_count(m, "c"), 0);
    assert_int_equal(oq_memsink_nkeys(m), 3);
    assert_int_equal(oq_memsink_nrecords(m), 0);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void memsink_records_in_apply_order(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    assert_int_equal(oq_txn_record(t, "1", 1), 0);
    assert_int_equal(oq_txn_count(t, "k", 1, 1), 0);
    assert_int_equal(oq_txn_record(t, "2\0x", 3), 0);
    assert_int_equal(sink_apply(m, t), 0);
    oq__txn_reset(t);
    assert_int_equal(oq_txn_record(t, "3", 1), 0);
    assert_int_equal(sink_apply(m, t), 0);
    assert_int_equal(oq_memsink_nrecords(m), 3);
    oq_memsink_foreach_record(m, log_record, vs);
    assert_int_equal(vs->n, 3);
    assert_visit(vs, 0, 0, "1", 1, 0);
    assert_visit(vs, 1, 0, "2\0x", 3, 0);
    assert_visit(vs, 2, 0, "3", 1, 0);
    free(vs);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void memsink_apply_keeps_copies(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    int64_t v = 0;
    assert_int_equal(oq_txn_record(t, "kept", 4), 0);
    assert_int_equal(oq_txn_count(t, "key", 3, 3), 0);
    assert_int_equal(sink_apply(m, t), 0);
    /* The sink must not point into the txn, which is reused at once. */
    oq__txn_reset(t);
    assert_int_equal(oq_txn_record(t, "XXXX", 4), 0);
    assert_int_equal(oq_txn_count(t, "YYY", 3, 1), 0);
    oq__txn_free(t);
    oq_memsink_foreach_record(m, log_record, vs);
    assert_int_equal(vs->n, 1);
    assert_visit(vs, 0, 0, "kept", 4, 0);
    assert_int_equal(oq_memsink_get(m, "key", 3, &v), 0);
    assert_int_equal(v, 3);
    free(vs);
    oq_memsink_free(m);
}

static void memsink_foreach_count_sorted_bytewise(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    /* Staged out of order; includes prefixes, a NUL byte and a byte >= 0x80
     * (which sorts last bytewise, though negative as a signed char). */
    struct { const char *k; size_t len; } keys[] = {
        { "b", 1 }, { "abc", 3 }, { "\xff", 1 }, { "a", 1 }, { "ab", 2 },
        { "a\0", 2 }, { "B", 1 }, { "", 0 }, { "\x80z", 2 },
    };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        assert_int_equal(oq_txn_count(t, keys[i].k, keys[i].len,
                                      (int64_t)i + 1), 0);
    assert_int_equal(sink_apply(m, t), 0);
    oq_memsink_foreach_count(m, log_count, vs);
    assert_int_equal(vs->n, 9);
    assert_visit(vs, 0, 1, "", 0, 8);
    assert_visit(vs, 1, 1, "B", 1, 7);
    assert_visit(vs, 2, 1, "a", 1, 4);
    assert_visit(vs, 3, 1, "a\0", 2, 6);
    assert_visit(vs, 4, 1, "ab", 2, 5);
    assert_visit(vs, 5, 1, "abc", 3, 2);
    assert_visit(vs, 6, 1, "b", 1, 1);
    assert_visit(vs, 7, 1, "\x80z", 2, 9);
    assert_visit(vs, 8, 1, "\xff", 1, 3);
    free(vs);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void memsink_foreach_count_many_keys_sorted(void **state)
{
    enum { N = 3000 };
    uint64_t rng = test_seed("memsink_foreach_count_many_keys_sorted");
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    visits *vs = visits_new();
    for (int i = 0; i < N; i++) {
        char k[8];
        size_t len = 1 + (size_t)(oq__splitmix64(&rng) % 4);
        for (size_t j = 0; j < len; j++)
            k[j] = (char)("ab\0\xfe"[oq__splitmix64(&rng) % 4]);
        assert_int_equal(oq_txn_count(t, k, len, 1), 0);
    }
    assert_int_equal(sink_apply(m, t), 0);
    size_t nkeys = oq_memsink_nkeys(m);
    assert_true(nkeys > 50);
    oq_memsink_foreach_count(m, log_count, vs);
    assert_int_equal(vs->n, nkeys);
    int64_t total = 0;
    for (size_t i = 0; i < vs->n; i++) {
        total += vs->v[i].delta;
        if (i == 0)
            continue;
        const visit *a = &vs->v[i - 1], *b = &vs->v[i];
        size_t n = OQ__MIN(a->len, b->len);
        int c = memcmp(a->data, b->data, n);
        /* Strictly increasing: bytewise, shorter prefix first, no repeats. */
        assert_true(c < 0 || (c == 0 && a->len < b->len));
    }
    assert_int_equal(total, N);
    free(vs);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void memsink_get_missing_is_enoent(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    int64_t v = 1234;
    assert_int_equal(oq_memsink_get(m, "nope", 4, &v), OQ_ENOENT);
    assert_int_equal(oq_txn_count(t, "abc", 3, 1), 0);
    assert_int_equal(sink_apply(m, t), 0);
    /* A prefix or an extension of a present key is a different key. */
    assert_int_equal(oq_memsink_get(m, "ab", 2, &v), OQ_ENOENT);
    assert_int_equal(oq_memsink_get(m, "abcd", 4, &v), OQ_ENOENT);
    assert_int_equal(oq_memsink_get(m, "abc\0", 4, &v), OQ_ENOENT);
    assert_int_equal(v, 1234); /* untouched on ENOENT */
    assert_int_equal(oq_memsink_get(m, "abc", 3, &v), 0);
    assert_int_equal(v, 1);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void memsink_get_null_value_pointer(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    assert_int_equal(oq_txn_count(t, "k", 1, 1), 0);
    assert_int_equal(sink_apply(m, t), 0);
    assert_int_equal(oq_memsink_get(m, "k", 1, NULL), 0);
    assert_int_equal(oq_memsink_get(m, "j", 1, NULL), OQ_ENOENT);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void memsink_empty_txn_changes_nothing(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    assert_int_equal(sink_apply(m, t), 0);
    assert_int_equal(oq_memsink_nkeys(m), 0);
    assert_int_equal(oq_memsink_nrecords(m), 0);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void memsink_free_null_is_noop(void **state)
{
    oq_memsink_free(NULL);
}

enum { CT_THREADS = 4, CT_TXNS = 5000 };

typedef struct ct_arg {
    oq_memsink *m;
    int id;
    int rc;
} ct_arg;

static void *concurrent_applier(void *arg)
{
    ct_arg *a = arg;
    oq_txn *t = oq__txn_new();
    oq_sink s = oq_memsink_sink(a->m);
    oq_event ev;
    memset(&ev, 0, sizeof(ev));
    if (t == NULL) {
        a->rc = -1;
        return NULL;
    }
    for (int i = 0; i < CT_TXNS && a->rc == 0; i++) {
        char own[16], rec[16];
        int on = snprintf(own, sizeof(own), "t%d", a->id);
        int rn = snprintf(rec, sizeof(rec), "%d:%d", a->id, i);
        oq__txn_reset(t);
        if (oq_txn_count(t, "shared", 6, 1) || oq_txn_count(t, own, (size_t)on, 2) ||
            oq_txn_count(t, "per-i", 5, i) || oq_txn_record(t, rec, (size_t)rn) ||
            oq_txn_count(t, "shared", 6, 1))
            a->rc = -2;
        else
            a->rc = s.apply(&ev, t, s.arg);
    }
    oq__txn_free(t);
    return NULL;
}

typedef struct rec_order {
    int next[CT_THREADS]; /* next expected i per thread */
    int bad;
    size_t n;
} rec_order;

static void check_rec_order(const void *data, size_t len, void *arg)
{
    rec_order *ro = arg;
    char buf[32];
    int id, i;
    ro->n++;
    if (len >= sizeof(buf)) {
        ro->bad++;
        return;
    }
    memcpy(buf, data, len);
    buf[len] = '\0';
    if (sscanf(buf, "%d:%d", &id, &i) != 2 || id < 0 || id >= CT_THREADS ||
        ro->next[id] != i)
        ro->bad++;
    else
        ro->next[id]++;
}

/* Four threads apply concurrently: totals are exact, and each thread's
 * records appear in that thread's apply order. */
static void memsink_concurrent_applies_exact(void **state)
{
    oq_memsink *m = memsink_new();
    pthread_t th[CT_THREADS];
    ct_arg args[CT_THREADS];
    for (int i = 0; i < CT_THREADS; i++) {
        args[i] = (ct_arg){ m, i, 0 };
        assert_int_equal(pthread_create(&th[i], NULL, concurrent_applier,
                                        &args[i]), 0);
    }
    for (int i = 0; i < CT_THREADS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].rc, 0);
    }
    assert_int_equal(get_count(m, "shared"), 2 * CT_THREADS * CT_TXNS);
    assert_int_equal(get_count(m, "per-i"),
                     (int64_t)CT_THREADS * CT_TXNS * (CT_TXNS - 1) / 2);
    for (int i = 0; i < CT_THREADS; i++) {
        char own[16];
        snprintf(own, sizeof(own), "t%d", i);
        assert_int_equal(get_count(m, own), 2 * CT_TXNS);
    }
    assert_int_equal(oq_memsink_nkeys(m), 2 + CT_THREADS);
    assert_int_equal(oq_memsink_nrecords(m), CT_THREADS * CT_TXNS);
    rec_order ro;
    memset(&ro, 0, sizeof(ro));
    oq_memsink_foreach_record(m, check_rec_order, &ro);
    assert_int_equal(ro.n, CT_THREADS * CT_TXNS);
    assert_int_equal(ro.bad, 0);
    oq_memsink_free(m);
}

static void memsink_new_oom(void **state)
{
    oq_memsink *m = (oq_memsink *)&m; /* must stay untouched */
    oq__alloc_fail_after(0);
    int rc = oq_memsink_new(&m);
    oq__alloc_fail_after(-1);
    assert_int_equal(rc, OQ_ENOMEM);
    assert_ptr_equal(m, (oq_memsink *)&m);
}

/* Fail the k-th allocation of an apply, for every k until one succeeds.
 * Each failing apply must return OQ_ENOMEM, never crash or leak (ASan
 * checks that), and leave the sink usable. */
static void memsink_apply_oom_every_allocation(void **state)
{
    oq_txn *t = txn_new();
    int succeeded = 0;
    assert_int_equal(oq_txn_record(t, "rec", 3), 0);
    assert_int_equal(oq_txn_count(t, "k", 1, 5), 0);
    for (long k = 0; k < 50 && !succeeded; k++) {
        oq_memsink *m = memsink_new();
        int64_t v = 0;
        oq__alloc_fail_after(k);
        int rc = sink_apply(m, t);
        oq__alloc_fail_after(-1);
        if (rc == 0) {
            succeeded = 1;
            assert_int_equal(oq_memsink_get(m, "k", 1, &v), 0);
            assert_int_equal(v, 5);
            assert_int_equal(oq_memsink_nrecords(m), 1);
        } else {
            assert_int_equal(rc, OQ_ENOMEM);
            /* The counter never half-exists: it is absent or exact. */
            int g = oq_memsink_get(m, "k", 1, &v);
            assert_true(g == OQ_ENOENT || (g == 0 && v == 5));
            /* And the sink still works afterwards. */
            assert_int_equal(sink_apply(m, t), 0);
            assert_int_equal(oq_memsink_get(m, "k", 1, &v), 0);
            assert_true(v == 5 || v == 10);
        }
        oq_memsink_free(m);
    }
    assert_true(succeeded);
    oq__txn_free(t);
}

/* Counters against a model: thousands of keys in one sink, applied in
 * random txns; some applies fail part-way (out of memory), which deletes
 * the keys they had created again from the middle of the counter table.
 * Every key keeps its exact value, and a failed apply leaves no key
 * behind. Seeded; ONCEQ_TEST_SEED repeats a run. */
static void memsink_counters_match_model(void **state)
{
    enum { KEYS = 20000, TXNS = 6000 };
    static int64_t model[KEYS];
    oq_memsink *m = memsink_new();
    const char *env = getenv("ONCEQ_TEST_SEED");
    unsigned seed = env ? (unsigned)strtoul(env, NULL, 10) : (unsigned)time(NULL);
    size_t failed = 0, present = 0;

    (void)state;
    printf("memsink model: seed %u\n", seed);
    srand(seed);
    memset(model, 0, sizeof(model));
    for (int n = 0; n < TXNS; n++) {
        oq_txn *t = txn_new();
        int picked[16], np = 1 + rand() % 16;
        for (int j = 0; j < np; j++) {
            char key[16];
            picked[j] = rand() % KEYS;
            snprintf(key, sizeof(key), "k%d", picked[j]);
            assert_int_equal(oq_txn_count(t, key, strlen(key), 1 + j), 0);
        }
        bool fail = rand() % 3 == 0;
        if (fail)
            oq__alloc_fail_after(rand() % 16);
        int rc = sink_apply(m, t);
        oq__alloc_fail_after(-1);
        if (rc == 0) {
            for (int j = 0; j < np; j++)
                model[picked[j]] += 1 + j;
        } else {
            assert_true(fail);
            assert_int_equal(rc, OQ_ENOMEM);
            failed++;
        }
        oq__txn_free(t);
    }
    for (int k = 0; k < KEYS; k++) {
        char key[16];
        int64_t v = -1;
        snprintf(key, sizeof(key), "k%d", k);
        int g = oq_memsink_get(m, key, strlen(key), &v);
        /* A key with a zero total was only ever in failed applies. */
        if (model[k] == 0) {
            assert_int_equal(g, OQ_ENOENT);
        } else {
            assert_int_equal(g, 0);
            assert_true(v == model[k]);
            present++;
        }
    }
    printf("memsink model: %zu applies failed, %zu keys\n", failed, present);
    assert_int_equal(oq_memsink_nkeys(m), present);
    assert_true(failed > 100 && present > 1000);
    oq_memsink_free(m);
}

/* Adding a key to a hash that already holds others, when memory runs out. */
static void memsink_apply_oom_adding_key_to_existing(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    int64_t v = 0;
    for (int i = 0; i < 40; i++) {
        char k[8];
        int n = snprintf(k, sizeof(k), "k%d", i);
        assert_int_equal(oq_txn_count(t, k, (size_t)n, 1), 0);
    }
    assert_int_equal(sink_apply(m, t), 0);
    oq__txn_reset(t);
    assert_int_equal(oq_txn_count(t, "new", 3, 1), 0);
    oq__alloc_fail_after(0);
    int rc = sink_apply(m, t);
    oq__alloc_fail_after(-1);
    assert_int_equal(rc, OQ_ENOMEM);
    assert_int_equal(oq_memsink_get(m, "new", 3, &v), OQ_ENOENT);
    assert_int_equal(oq_memsink_nkeys(m), 40);
    assert_int_equal(get_count(m, "k17"), 1);
    oq__txn_free(t);
    oq_memsink_free(m);
}

static void count_visits(const char *key, size_t len, int64_t delta, void *arg)
{
    (void)key;
    (void)len;
    *(int64_t *)arg += delta;
}

/* Without memory to sort, foreach_count still visits every key once. */
static void memsink_foreach_count_oom_visits_all(void **state)
{
    oq_memsink *m = memsink_new();
    oq_txn *t = txn_new();
    int64_t sum = 0;
    for (int i = 0; i < 10; i++) {
        char k[8];
        int n = snprintf(k, sizeof(k), "k%d", i);
        assert_int_equal(oq_txn_count(t, k, (size_t)n, 1 << i), 0);
    }
    assert_int_equal(sink_apply(m, t), 0);
    oq__alloc_fail_after(0);
    oq_memsink_foreach_count(m, count_visits, &sum);
    oq__alloc_fail_after(-1);
    assert_int_equal(sum, (1 << 10) - 1);
    oq__txn_free(t);
    oq_memsink_free(m);
}

/* ------------------------------------------------------------- backoff */

#define BASE 100
#define CAP 30000

static int64_t ceiling_for(uint32_t k)
{
    int64_t c = BASE;
    for (uint32_t i = 1; i < k && c < CAP; i++)
        c *= 2;
    return c < CAP ? c : CAP;
}

static void backoff_ceiling_table(void **state)
{
    /* The model used below, spelled out: 100, 200, ... then capped. */
    assert_int_equal(ceiling_for(1), 100);
    assert_int_equal(ceiling_for(2), 200);
    assert_int_equal(ceiling_for(9), 25600);
    assert_int_equal(ceiling_for(10), 30000);
}

static void backoff_within_bounds(void **state)
{
    uint64_t rng = test_seed("backoff_within_bounds");
    for (uint32_t k = 1; k <= 20; k++) {
        int64_t ceil = ceiling_for(k);
        for (int i = 0; i < 5000; i++) {
            int64_t d = oq_backoff_ms(BASE, CAP, k, &rng);
            if (d < 0 || d > ceil)
                fail_msg("attempt %u: %" PRId64 " outside [0, %" PRId64 "]",
                         k, d, ceil);
        }
    }
}

static void backoff_reaches_near_ceiling(void **state)
{
    uint64_t rng = test_seed("backoff_reaches_near_ceiling");
    for (uint32_t k = 1; k <= 12; k++) {
        int64_t ceil = ceiling_for(k), max = 0, min = INT64_MAX;
        for (int i = 0; i < 10000; i++) {
            int64_t d = oq_backoff_ms(BASE, CAP, k, &rng);
            max = OQ__MAX(max, d);
            min = OQ__MIN(min, d);
        }
        /* Full jitter: the draws spread over the whole range. */
        if (max * 10 <= ceil * 9)
            fail_msg("attempt %u: max %" PRId64 " not within 10%% of %" PRId64,
                     k, max, ceil);
        if (min * 10 >= ceil)
            fail_msg("attempt %u: min %" PRId64 " not within 10%% of 0 (ceil %"
                     PRId64 ")", k, min, ceil);
    }
}

static void backoff_mean_is_half_ceiling(void **state)
{
    uint64_t rng = test_seed("backoff_mean_is_half_ceiling");
    double sum = 0;
    for (int i = 0; i < 20000; i++)
        sum += (double)oq_backoff_ms(BASE, CAP, 5, &rng);
    double mean = sum / 20000, want = ceiling_for(5) / 2.0;
    /* Uniform on [0, 1600]: the mean is 800 with a standard error of ~3. */
    assert_true(mean > want * 0.95 && mean < want * 1.05);
}

static void backoff_huge_attempts_capped(void **state)
{
    uint64_t rng = test_seed("backoff_huge_attempts_capped");
    uint32_t ks[] = { 64, 65, 1000, 100000, UINT32_MAX };
    for (size_t j = 0; j < sizeof(ks) / sizeof(ks[0]); j++) {
        int64_t max = 0;
        for (int i = 0; i < 10000; i++) {
            int64_t d = oq_backoff_ms(BASE, CAP, ks[j], &rng);
            assert_true(d >= 0);
            assert_true(d <= CAP);
            max = OQ__MAX(max, d);
        }
        assert_true(max * 10 > CAP * 9);
    }
}

/* The cap at its largest: base * 2^(k-1) saturates at INT64_MAX and the
 * draw must not overflow computing its range (ceil + 1 is signed overflow
 * when ceil == INT64_MAX). UBSan aborts the process here, so this test runs
 * near the end. */
static void backoff_cap_int64_max_does_not_overflow(void **state)
{
    uint64_t rng = 7;
    for (int i = 0; i < 1000; i++) {
        int64_t d = oq_backoff_ms(1, INT64_MAX, 1000, &rng);
        assert_true(d >= 0);
    }
    assert_true(oq_backoff_ms(INT64_MAX, INT64_MAX, 1, &rng) >= 0);
}

static void backoff_base_nonpositive_is_zero(void **state)
{
    uint64_t rng = 1;
    for (uint32_t k = 0; k < 40; k++) {
        assert_int_equal(oq_backoff_ms(0, CAP, k, &rng), 0);
        assert_int_equal(oq_backoff_ms(-100, CAP, k, &rng), 0);
        assert_int_equal(oq_backoff_ms(INT64_MIN, CAP, k, &rng), 0);
    }
}

static void backoff_cap_nonpositive_is_zero(void **state)
{
    uint64_t rng = 1;
    assert_int_equal(oq_backoff_ms(BASE, 0, 3, &rng), 0);
    assert_int_equal(oq_backoff_ms(BASE, -1, 3, &rng), 0);
}

static void backoff_cap_below_base(void **state)
{
    uint64_t rng = test_seed("backoff_cap_below_base");
    int64_t max = 0;
    for (int i = 0; i < 10000; i++) {
        int64_t d = oq_backoff_ms(500, 50, 1, &rng);
        assert_true(d >= 0 && d <= 50);
        max = OQ__MAX(max, d);
    }
    assert_true(max >= 45);
}

static void backoff_attempt_zero_like_first(void **state)
{
    uint64_t rng = test_seed("backoff_attempt_zero_like_first");
    int64_t max = 0;
    for (int i = 0; i < 10000; i++) {
        int64_t d = oq_backoff_ms(BASE, CAP, 0, &rng);
        assert_true(d >= 0 && d <= BASE);
        max = OQ__MAX(max, d);
    }
    assert_true(max >= 90);
}

static void backoff_deterministic_per_seed(void **state)
{
    uint64_t a = 99, b = 99, c = 100;
    int differs = 0;
    for (int i = 0; i < 100; i++) {
        int64_t x = oq_backoff_ms(BASE, CAP, 8, &a);
        int64_t y = oq_backoff_ms(BASE, CAP, 8, &b);
        int64_t z = oq_backoff_ms(BASE, CAP, 8, &c);
        assert_int_equal(x, y);
        differs |= x != z;
    }
    assert_true(differs);
    /* The caller's state moves on each draw. */
    assert_int_not_equal(a, 99);
    assert_int_equal(a, b);
}

/* ------------------------------------------------------- error, names */

static void strerror_every_code_named(void **state)
{
    int codes[] = { OQ_ENOMEM, OQ_EINVAL, OQ_ESTALE, OQ_EEXIST, OQ_ECLOSED,
                    OQ_ENOENT, OQ_EBUSY, OQ_EIO, OQ_ENOSPC, OQ_EOF };
    size_t n = sizeof(codes) / sizeof(codes[0]);
    for (size_t i = 0; i < n; i++) {
        const char *s = oq_strerror(codes[i]);
        assert_non_null(s);
        assert_true(s[0] != '\0');
        if (strcmp(s, "unknown error") == 0)
            fail_msg("code %d has no text", codes[i]);
        for (size_t j = 0; j < i; j++)
            if (strcmp(s, oq_strerror(codes[j])) == 0)
                fail_msg("codes %d and %d share the text \"%s\"", codes[i],
                         codes[j], s);
    }
}

static void strerror_specific_texts(void **state)
{
    assert_string_equal(oq_strerror(0), "success");
    assert_string_equal(oq_strerror(OQ_ENOMEM), "out of memory");
    assert_string_equal(oq_strerror(OQ_EOF), "end of queue (closed and drained)");
    /* Codes without their own text fall back to the C library's. */
    assert_string_equal(oq_strerror(OQ_EIO), strerror(EIO));
}

static void strerror_unknown_codes(void **state)
{
    assert_string_equal(oq_strerror(1), "unknown error");
    assert_string_equal(oq_strerror(12345), "unknown error");
    assert_string_equal(oq_strerror(-4096), "unknown error");
    assert_string_equal(oq_strerror(INT32_MIN), "unknown error");
    assert_non_null(oq_strerror(-4000));
}

static void dlq_reason_names(void **state)
{
    assert_string_equal(oq_dlq_reason_name(OQ_DLQ_MAX_ATTEMPTS), "max_attempts");
    assert_string_equal(oq_dlq_reason_name(OQ_DLQ_EXPIRED), "expired");
    assert_string_equal(oq_dlq_reason_name(OQ_DLQ_FAILED), "failed");
    assert_string_equal(oq_dlq_reason_name(OQ_DLQ_REJECTED), "rejected");
}

/* Every reason, including ones added later, has its own real name. */
static void dlq_reason_every_reason_named(void **state)
{
    for (int r = 0; r < OQ_DLQ__COUNT; r++) {
        const char *s = oq_dlq_reason_name((oq_dlq_reason)r);
        assert_non_null(s);
        assert_true(s[0] != '\0');
        if (strcmp(s, "unknown") == 0)
            fail_msg("reason %d has no name", r);
        for (int j = 0; j < r; j++)
            if (strcmp(s, oq_dlq_reason_name((oq_dlq_reason)j)) == 0)
                fail_msg("reasons %d and %d share the name \"%s\"", r, j, s);
    }
}

static void dlq_reason_name_out_of_range(void **state)
{
    assert_string_equal(oq_dlq_reason_name(OQ_DLQ__COUNT), "unknown");
    assert_string_equal(oq_dlq_reason_name((oq_dlq_reason)-1), "unknown");
    assert_string_equal(oq_dlq_reason_name((oq_dlq_reason)1000), "unknown");
}

static void version_string(void **state)
{
    char want[32];
    snprintf(want, sizeof(want), "%d.%d.%d", OQ_VERSION_MAJOR,
             OQ_VERSION_MINOR, OQ_VERSION_PATCH);
    assert_string_equal(oq_version(), want);
    assert_string_equal(oq_version(), OQ_VERSION_STRING);
}

/* ------------------------------ zero-length items in a fresh txn (bug) */

/*
 * A zero-length record or key is valid (and NULL with length 0 passes the
 * argument check), but when every item so far is empty the txn has no byte
 * buffer yet: oq_txn_foreach then computes NULL + 0 (undefined in C) and
 * hands callbacks a NULL pointer, and the memsink memcpy()s from it (memcpy
 * from NULL is undefined even for 0 bytes). UBSan aborts the process on
 * either, so these tests run last.
 */

static void nonnull_record(const void *data, size_t len, void *arg)
{
    assert_int_equal(len, 0);
    assert_non_null(data);
    (*(int *)arg)++;
}

static void nonnull_count(const char *key, size_t len, int64_t delta, void *arg)
{
    assert_int_equal(len, 0);
    assert_non_null(key);
    (*(int *)arg)++;
}

static void txn_foreach_empty_items_on_fresh_txn_non_null(void **state)
{
    oq_txn *t = txn_new();
    int n = 0;
    assert_int_equal(oq_txn_record(t, "", 0), 0);
    assert_int_equal(oq_txn_count(t, "", 0, 1), 0);
    oq_txn_foreach(t, nonnull_record, nonnull_count, &n);
    assert_int_equal(n, 2);
    oq__txn_free(t);
}

static void memsink_apply_empty_record_on_fresh_txn(void **state)
{
    oq_txn *t = txn_new();
    oq_memsink *m = memsink_new();
    visits *vs = visits_new();
    assert_int_equal(oq_txn_record(t, "", 0), 0);
    assert_int_equal(sink_apply(m, t), 0);
    oq_memsink_foreach_record(m, log_record, vs);
    assert_int_equal(vs->n, 1);
    assert_visit(vs, 0, 0, "", 0, 0);
    free(vs);
    oq_memsink_free(m);
    oq__txn_free(t);
}

static void memsink_apply_null_empty_key_on_fresh_txn(void **state)
{
    oq_txn *t = txn_new();
    oq_memsink *m = memsink_new();
    int64_t v = 0;
    assert_int_equal(oq_txn_count(t, NULL, 0, 4), 0);
    assert_int_equal(oq_txn_ncounts(t), 1);
    assert_int_equal(sink_apply(m, t), 0);
    assert_int_equal(oq_memsink_get(m, "", 0, &v), 0);
    assert_int_equal(v, 4);
    oq_memsink_free(m);
    oq__txn_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(txn_new_is_empty),
        cmocka_unit_test(txn_records_and_counts_in_order),
        cmocka_unit_test(txn_foreach_with_only_one_callback),
        cmocka_unit_test(txn_binary_record_with_nul_bytes),
        cmocka_unit_test(txn_empty_record_and_key),
        cmocka_unit_test(txn_invalid_arguments),
        cmocka_unit_test(txn_many_records_survive_growth),
        cmocka_unit_test(txn_large_record_exact),
        cmocka_unit_test(txn_reset_empties),
        cmocka_unit_test(txn_reuse_after_reset),
        cmocka_unit_test(txn_error_text_formats),
        cmocka_unit_test(txn_error_text_is_copied),
        cmocka_unit_test(txn_error_text_truncated),
        cmocka_unit_test(txn_free_null_is_noop),
        cmocka_unit_test(txn_new_oom),
        cmocka_unit_test(txn_record_oom_first_buffer),
        cmocka_unit_test(txn_record_oom_item_array),
        cmocka_unit_test(txn_record_oom_on_growth_keeps_staged),
        cmocka_unit_test(memsink_apply_sums_counters),
        cmocka_unit_test(memsink_records_in_apply_order),
        cmocka_unit_test(memsink_apply_keeps_copies),
        cmocka_unit_test(memsink_foreach_count_sorted_bytewise),
        cmocka_unit_test(memsink_foreach_count_many_keys_sorted),
        cmocka_unit_test(memsink_get_missing_is_enoent),
        cmocka_unit_test(memsink_get_null_value_pointer),
        cmocka_unit_test(memsink_empty_txn_changes_nothing),
        cmocka_unit_test(memsink_free_null_is_noop),
        cmocka_unit_test(memsink_concurrent_applies_exact),
        cmocka_unit_test(memsink_new_oom),
        cmocka_unit_test(memsink_apply_oom_every_allocation),
        cmocka_unit_test(memsink_apply_oom_adding_key_to_existing),
        cmocka_unit_test(memsink_counters_match_model),
        cmocka_unit_test(memsink_foreach_count_oom_visits_all),
        cmocka_unit_test(backoff_ceiling_table),
        cmocka_unit_test(backoff_within_bounds),
        cmocka_unit_test(backoff_reaches_near_ceiling),
        cmocka_unit_test(backoff_mean_is_half_ceiling),
        cmocka_unit_test(backoff_huge_attempts_capped),
        cmocka_unit_test(backoff_base_nonpositive_is_zero),
        cmocka_unit_test(backoff_cap_nonpositive_is_zero),
        cmocka_unit_test(backoff_cap_below_base),
        cmocka_unit_test(backoff_attempt_zero_like_first),
        cmocka_unit_test(backoff_deterministic_per_seed),
        cmocka_unit_test(strerror_every_code_named),
        cmocka_unit_test(strerror_specific_texts),
        cmocka_unit_test(strerror_unknown_codes),
        cmocka_unit_test(dlq_reason_names),
        cmocka_unit_test(dlq_reason_every_reason_named),
        cmocka_unit_test(dlq_reason_name_out_of_range),
        cmocka_unit_test(version_string),
        /* Last: under UBSan these abort the process (see above). */
        cmocka_unit_test(backoff_cap_int64_max_does_not_overflow),
        cmocka_unit_test(txn_foreach_empty_items_on_fresh_txn_non_null),
        cmocka_unit_test(memsink_apply_empty_record_on_fresh_txn),
        cmocka_unit_test(memsink_apply_null_empty_key_on_fresh_txn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
