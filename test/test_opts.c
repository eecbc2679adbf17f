/* Description: the options structs can grow without breaking callers. A
 * caller built against an older onceq.h (a struct without its last field,
 * size = the smaller sizeof) gets its fields read and the missing ones at
 * their defaults, and *_defaults never writes past its struct; a caller
 * built against a newer header (a longer struct) is accepted when the
 * fields this library does not know are zero and refused with OQ_EINVAL
 * when it set one; size 0 (a struct not set up by *_defaults) is
 * OQ_EINVAL. The "older" structs are copies of today's without the last
 * field; the static asserts check that they are prefixes of today's. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <string.h>

#include "onceq.h"

#define CANARY 0xA5

/* oq_queue_opts of an older header: no deliver_dying. */
typedef struct old_queue_opts {
    size_t size;
    int64_t visibility_timeout_ms;
    uint32_t max_receives;
    int64_t ttl_ms;
    size_t dedup_count;
    int64_t dedup_age_ms;
    const oq_clock *clock;
} old_queue_opts;
_Static_assert(offsetof(old_queue_opts, clock) ==
               offsetof(oq_queue_opts, clock), "a prefix of oq_queue_opts");
_Static_assert(sizeof(old_queue_opts) < sizeof(oq_queue_opts),
               "shorter than oq_queue_opts");

/* oq_idset_opts of an older header: no clock. */
typedef struct old_idset_opts {
    size_t size;
    unsigned shard_bits;
    int64_t retention_ms;
    size_t expected_ids;
} old_idset_opts;
_Static_assert(offsetof(old_idset_opts, expected_ids) ==
               offsetof(oq_idset_opts, expected_ids), "a prefix");
_Static_assert(sizeof(old_idset_opts) < sizeof(oq_idset_opts), "shorter");

/* oq_pool_opts of an older header: no handler_never_blocks. */
typedef struct old_pool_opts {
    size_t size;
    unsigned workers;
    unsigned batch;
    int64_t backoff_base_ms;
    int64_t backoff_cap_ms;
    int64_t busy_retry_ms;
    int64_t poll_ms;
    uint64_t seed;
    oq_handler_fn handler;
    void *handler_arg;
    oq_sink sink;
    const oq_clock *clock;
    oq_decode_fn decode;
    void (*free_parsed)(void *parsed, void *arg);
    void *decode_arg;
    void *reserved_[2];
} old_pool_opts;
_Static_assert(offsetof(old_pool_opts, reserved_) ==
               offsetof(oq_pool_opts, reserved_), "a prefix");
_Static_assert(sizeof(old_pool_opts) < sizeof(oq_pool_opts), "shorter");

/* An old struct with garbage right after it, where today's struct has its
 * newer fields: a library that read past size would see the garbage. */
#define IN_BUFFER(type) \
    struct { type o; unsigned char after[64]; }

static void assert_canary(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        assert_int_equal(p[i], CANARY);
}

/* ------------------------------------------------------------- queue */

static void test_queue_defaults_sets_size(void **state)
{
    oq_queue_opts o;
    (void)state;
    memset(&o, CANARY, sizeof(o));
    oq_queue_opts_defaults(&o);
    assert_int_equal(o.size, sizeof(oq_queue_opts));
    assert_int_equal(o.visibility_timeout_ms, 30000);
    assert_int_equal(o.dedup_count, 10000);
    assert_int_equal(o.deliver_dying, 0);
    assert_null(o.clock);
}

static void test_queue_old_caller_defaults_stay_inside(void **state)
{
    IN_BUFFER(old_queue_opts) b;
    (void)state;
    memset(&b, CANARY, sizeof(b));
    oq_queue_opts_init((oq_queue_opts *)&b.o, sizeof(b.o));
    assert_int_equal(b.o.size, sizeof(old_queue_opts));
    assert_int_equal(b.o.visibility_timeout_ms, 30000);
    assert_int_equal(b.o.dedup_count, 10000);
    assert_int_equal(b.o.max_receives, 0);
    assert_null(b.o.clock);
    assert_canary(b.after, sizeof(b.after));
}

/* The old caller's fields are read (visibility timeout, max receives,
 * clock); deliver_dying, which it does not have, keeps its default 0 although
 * the bytes where today's struct has it are not zero: a message that
 * reached max_receives goes to the dead letters, not out as dying. */
static void test_queue_old_caller_fields_read_rest_default(void **state)
{
    IN_BUFFER(old_queue_opts) b;
    oq_testclock *tc = oq_testclock_new(1000);
    oq_queue *q;
    oq_delivery d;
    oq_queue_stats st;
    (void)state;

    memset(&b, CANARY, sizeof(b));
    oq_queue_opts_init((oq_queue_opts *)&b.o, sizeof(b.o));
    b.o.visibility_timeout_ms = 500;
    b.o.max_receives = 1;
    b.o.clock = oq_testclock_clock(tc);
    assert_int_equal(oq_queue_new(&q, (const oq_queue_opts *)&b.o), 0);
    assert_int_equal(oq_queue_send(q, "a", 1, "x", 1, 0), 0);
    assert_int_equal(oq_queue_receive(q, &d, 1, 0), 1);
    assert_int_equal(d.deadline_ms, 1500);
    oq_queue_release(q, &d, 1);
    oq_testclock_advance(tc, 600);
    assert_int_equal(oq_queue_receive(q, &d, 1, 0), 0);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.dead_lettered[OQ_DLQ_MAX_ATTEMPTS], 1);
    oq_queue_free(q);
    oq_testclock_free(tc);
}

static void test_queue_size_zero_einval(void **state)
{
    oq_queue_opts o = { 0 };
    oq_queue *q = NULL;
    (void)state;
    o.visibility_timeout_ms = 1000;
    assert_int_equal(oq_queue_new(&q, &o), OQ_EINVAL);
    assert_null(q);
}

static void test_queue_newer_caller(void **state)
{
    struct { oq_queue_opts o; int64_t newer_option; uint32_t more; } n;
    oq_queue *q;
    (void)state;
    memset(&n, CANARY, sizeof(n));
    oq_queue_opts_init(&n.o, sizeof(n));
    /* The library zeroes the caller's whole struct, and says its size. */
    assert_int_equal(n.o.size, sizeof(n));
    assert_int_equal(n.newer_option, 0);
    assert_int_equal(n.more, 0);
    assert_int_equal(n.o.visibility_timeout_ms, 30000);
    /* Newer fields left at zero: accepted. */
    assert_int_equal(oq_queue_new(&q, &n.o), 0);
    oq_queue_free(q);
    /* A newer option set: this library cannot honour it. */
    n.more = 1;
    assert_int_equal(oq_queue_new(&q, &n.o), OQ_EINVAL);
}

/* ------------------------------------------------------------- idset */

static void test_idset_old_caller(void **state)
{
    IN_BUFFER(old_idset_opts) b;
    oq_idset *s;
    oq_claim c;
    (void)state;

    memset(&b, CANARY, sizeof(b));
    oq_idset_opts_init((oq_idset_opts *)&b.o, sizeof(b.o));
    assert_int_equal(b.o.size, sizeof(old_idset_opts));
    assert_int_equal(b.o.shard_bits, 6);
    assert_int_equal(b.o.retention_ms, 0);
    assert_canary(b.after, sizeof(b.after));

    /* Its fields are read: a shard count over the limit is refused. */
    b.o.shard_bits = 99;
    assert_int_equal(oq_idset_new(&s, (const oq_idset_opts *)&b.o),
                     OQ_EINVAL);
    /* The clock it does not have is the default (monotonic), not the
     * garbage after its struct: claim and commit work. */
    b.o.shard_bits = 2;
    assert_int_equal(oq_idset_new(&s, (const oq_idset_opts *)&b.o), 0);
    assert_int_equal(oq_idset_claim(s, "a", 1, oq_clock_now(NULL) + 60000, &c),
                     OQ_CLAIMED);
    assert_int_equal(oq_idset_commit(s, "a", 1, c.token), 0);
    assert_int_equal(oq_idset_contains(s, "a", 1), 1);
    oq_idset_free(s);
}

static void test_idset_size_zero_and_newer(void **state)
{
    oq_idset_opts z = { 0 };
    struct { oq_idset_opts o; uint64_t newer_option; } n;
    oq_idset *s = NULL;
    (void)state;

    assert_int_equal(oq_idset_new(&s, &z), OQ_EINVAL);
    assert_null(s);
    oq_idset_opts_init(&n.o, sizeof(n));
    assert_int_equal(oq_idset_new(&s, &n.o), 0);
    oq_idset_free(s);
    n.newer_option = 7;
    assert_int_equal(oq_idset_new(&s, &n.o), OQ_EINVAL);
    /* NULL options are still the defaults. */
    assert_int_equal(oq_idset_new(&s, NULL), 0);
    oq_idset_free(s);
}

/* -------------------------------------------------------------- pool */

static atomic_int calls;

static int count_calls(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)ev;
    (void)txn;
    (void)arg;
    atomic_fetch_add(&calls, 1);
    return OQ_OK;
}

static void test_pool_old_caller(void **state)
{
    IN_BUFFER(old_pool_opts) b;
    oq_queue_opts qo;
    oq_queue *q;
    oq_idset *s;
    oq_pool *p;
    oq_pool_stats st;
    (void)state;

    memset(&b, CANARY, sizeof(b));
    oq_pool_opts_init((oq_pool_opts *)&b.o, sizeof(b.o));
    assert_int_equal(b.o.size, sizeof(old_pool_opts));
    assert_int_equal(b.o.workers, 2);
    assert_int_equal(b.o.batch, 16);
    assert_null(b.o.reserved_[0]);
    assert_canary(b.after, sizeof(b.after));

    oq_queue_opts_defaults(&qo);
    qo.dedup_count = 0;
    assert_int_equal(oq_queue_new(&q, &qo), 0);
    assert_int_equal(oq_idset_new(&s, NULL), 0);
    b.o.workers = 0; /* read: refused */
    assert_int_equal(oq_pool_start(&p, q, s, (const oq_pool_opts *)&b.o),
                     OQ_EINVAL);
    b.o.workers = 1;
    b.o.handler = count_calls;
    assert_int_equal(oq_pool_start(&p, q, s, (const oq_pool_opts *)&b.o), 0);
    assert_int_equal(oq_queue_send(q, "a", 1, "x", 1, 0), 0);
    assert_int_equal(oq_queue_send(q, "b", 1, "y", 1, 0), 0);
    assert_int_equal(oq_queue_send(q, "a", 1, "x", 1, 0), 0);
    oq_queue_close(q);
    assert_int_equal(oq_pool_wait(p), 0);
    oq_pool_stats_get(p, &st);
    assert_int_equal(st.processed, 2);
    assert_int_equal(st.duplicates, 1);
    assert_int_equal(atomic_load(&calls), 2);
    oq_pool_free(p);
    oq_idset_free(s);
    oq_queue_free(q);
}

static void test_pool_size_zero_and_newer(void **state)
{
    oq_pool_opts z = { 0 };
    struct { oq_pool_opts o; uint32_t newer_option; } n;
    oq_queue *q;
    oq_idset *s;
    oq_pool *p = NULL;
    (void)state;

    assert_int_equal(oq_queue_new(&q, NULL), 0);
    assert_int_equal(oq_idset_new(&s, NULL), 0);
    z.workers = 1;
    z.batch = 1;
    z.handler = count_calls;
    assert_int_equal(oq_pool_start(&p, q, s, &z), OQ_EINVAL);
    assert_null(p);
    oq_pool_opts_init(&n.o, sizeof(n));
    n.o.handler = count_calls;
    n.newer_option = 1;
    assert_int_equal(oq_pool_start(&p, q, s, &n.o), OQ_EINVAL);
    n.newer_option = 0;
    assert_int_equal(oq_pool_start(&p, q, s, &n.o), 0);
    oq_queue_close(q);
    assert_int_equal(oq_pool_wait(p), 0);
    oq_pool_free(p);
    oq_idset_free(s);
    oq_queue_free(q);
}

/* A size too small to hold the size field itself: nothing is written. */
/* 0.1's committer hook is gone; its place must stay zero, so a caller
 * built for it is refused rather than silently run without its stage. */
static void test_pool_reserved_must_be_zero(void **state)
{
    oq_queue *q;
    oq_idset *s;
    oq_pool *p = NULL;
    oq_pool_opts o;
    int dummy;
    (void)state;

    assert_int_equal(oq_queue_new(&q, NULL), 0);
    assert_int_equal(oq_idset_new(&s, NULL), 0);
    oq_pool_opts_defaults(&o);
    o.reserved_[1] = &dummy;
    assert_int_equal(oq_pool_start(&p, q, s, &o), OQ_EINVAL);
    assert_null(p);
    oq_idset_free(s);
    oq_queue_free(q);
}

static void test_init_tiny_size_writes_nothing(void **state)
{
    unsigned char buf[sizeof(oq_pool_opts)];
    (void)state;
    memset(buf, CANARY, sizeof(buf));
    oq_pool_opts_init((oq_pool_opts *)(void *)buf, 0);
    oq_queue_opts_init((oq_queue_opts *)(void *)buf, sizeof(size_t) - 1);
    assert_canary(buf, sizeof(buf));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_queue_defaults_sets_size),
        cmocka_unit_test(test_queue_old_caller_defaults_stay_inside),
        cmocka_unit_test(test_queue_old_caller_fields_read_rest_default),
        cmocka_unit_test(test_queue_size_zero_einval),
        cmocka_unit_test(test_queue_newer_caller),
        cmocka_unit_test(test_idset_old_caller),
        cmocka_unit_test(test_idset_size_zero_and_newer),
        cmocka_unit_test(test_pool_old_caller),
        cmocka_unit_test(test_pool_size_zero_and_newer),
        cmocka_unit_test(test_pool_reserved_must_be_zero),
        cmocka_unit_test(test_init_tiny_size_writes_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
