/* Description: time sources. oq_testclock starts where told and moves only on advance/set (also under concurrent advances), the monotonic clock tracks CLOCK_MONOTONIC and never goes backwards, oq_clock_now(NULL) reads the monotonic clock, oq__abstime_after returns a normalised timespec ms ahead, and a monotonic condvar times out on it. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "oq_cli.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static int64_t ts_ns(struct timespec ts)
{
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts_ns(ts);
}

/* Real-time waits stretch under sanitizers (OQ_TIME_MULT). */
static int64_t time_mult(void)
{
    const char *s = getenv("OQ_TIME_MULT");
    long m = s ? strtol(s, NULL, 10) : 1;
    return m > 0 ? m : 1;
}

/* ---- oq_testclock ---- */

static void testclock_starts_at_given_time(void **state)
{
    oq_testclock *tc = oq_testclock_new(12345);
    assert_non_null(tc);
    assert_int_equal(oq_clock_now(oq_testclock_clock(tc)), 12345);
    oq_testclock_free(tc);
}

static void testclock_negative_and_large_start(void **state)
{
    oq_testclock *a = oq_testclock_new(-77);
    oq_testclock *b = oq_testclock_new(INT64_MAX - 1);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(oq_clock_now(oq_testclock_clock(a)), -77);
    assert_int_equal(oq_clock_now(oq_testclock_clock(b)), INT64_MAX - 1);
    oq_testclock_free(a);
    oq_testclock_free(b);
}

static void testclock_does_not_move_by_itself(void **state)
{
    oq_testclock *tc = oq_testclock_new(500);
    const oq_clock *c;
    struct timespec ms2 = { 0, 2000000 };
    assert_non_null(tc);
    c = oq_testclock_clock(tc);
    nanosleep(&ms2, NULL);
    assert_int_equal(oq_clock_now(c), 500);
    assert_int_equal(c->now_ms(c->ctx), 500);
    oq_testclock_free(tc);
}

static void testclock_advance_accumulates(void **state)
{
    oq_testclock *tc = oq_testclock_new(1000);
    const oq_clock *c;
    assert_non_null(tc);
    c = oq_testclock_clock(tc);
    oq_testclock_advance(tc, 250);
    assert_int_equal(oq_clock_now(c), 1250);
    oq_testclock_advance(tc, 1);
    assert_int_equal(oq_clock_now(c), 1251);
    oq_testclock_advance(tc, 0);
    assert_int_equal(oq_clock_now(c), 1251);
    oq_testclock_free(tc);
}

static void testclock_set_moves_both_ways(void **state)
{
    oq_testclock *tc = oq_testclock_new(1000);
    const oq_clock *c;
    assert_non_null(tc);
    c = oq_testclock_clock(tc);
    oq_testclock_set(tc, 90000);
    assert_int_equal(oq_clock_now(c), 90000);
    oq_testclock_set(tc, 7);
    assert_int_equal(oq_clock_now(c), 7);
    oq_testclock_advance(tc, 3);
    assert_int_equal(oq_clock_now(c), 10);
    oq_testclock_free(tc);
}

static void testclocks_are_independent(void **state)
{
    oq_testclock *a = oq_testclock_new(1), *b = oq_testclock_new(2);
    assert_non_null(a);
    assert_non_null(b);
    assert_ptr_not_equal(oq_testclock_clock(a), oq_testclock_clock(b));
    oq_testclock_advance(a, 100);
    assert_int_equal(oq_clock_now(oq_testclock_clock(a)), 101);
    assert_int_equal(oq_clock_now(oq_testclock_clock(b)), 2);
    oq_testclock_free(a);
    oq_testclock_free(b);
}

enum { ADV_THREADS = 4, ADV_PER_THREAD = 20000 };

static void *advance_many(void *arg)
{
    oq_testclock *tc = arg;
    for (int i = 0; i < ADV_PER_THREAD; i++)
        oq_testclock_advance(tc, 3);
    return NULL;
}

/* The clock is shared by worker threads: concurrent advances lose nothing. */
static void testclock_concurrent_advances_sum(void **state)
{
    oq_testclock *tc = oq_testclock_new(0);
    pthread_t th[ADV_THREADS];
    assert_non_null(tc);
    for (int i = 0; i < ADV_THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, advance_many, tc), 0);
    for (int i = 0; i < ADV_THREADS; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(oq_clock_now(oq_testclock_clock(tc)),
                     (int64_t)ADV_THREADS * ADV_PER_THREAD * 3);
    oq_testclock_free(tc);
}

static void testclock_new_oom_returns_null(void **state)
{
    oq__alloc_fail_after(0);
    oq_testclock *tc = oq_testclock_new(1);
    oq__alloc_fail_after(-1);
    assert_null(tc);
}

/* ---- the monotonic clock ---- */

static void monotonic_never_goes_backwards(void **state)
{
    const oq_clock *c = oq_clock_monotonic();
    int64_t prev = oq_clock_now(c), first = prev;
    for (int i = 0; i < 1000000; i++) {
        int64_t now = oq_clock_now(c);
        assert_true(now >= prev);
        prev = now;
    }
    /* A million reads take well under a minute. */
    assert_true(prev - first < 60000 * time_mult());
}

static void monotonic_matches_clock_gettime(void **state)
{
    int64_t before = mono_ns() / 1000000;
    int64_t now = oq_clock_now(oq_clock_monotonic());
    int64_t after = mono_ns() / 1000000;
    assert_true(before <= now);
    assert_true(now <= after);
}

static void monotonic_advances_with_real_time(void **state)
{
    const oq_clock *c = oq_clock_monotonic();
    struct timespec d = { 0, 30 * 1000000 };
    int64_t t0 = oq_clock_now(c);
    nanosleep(&d, NULL);
    int64_t t1 = oq_clock_now(c);
    /* Millisecond truncation may cost up to 1 ms at each end. */
    assert_true(t1 - t0 >= 29);
}

static void clock_now_null_is_monotonic(void **state)
{
    const oq_clock *c = oq_clock_monotonic();
    int64_t a = oq_clock_now(c);
    int64_t n = oq_clock_now(NULL);
    int64_t b = oq_clock_now(c);
    assert_true(a <= n);
    assert_true(n <= b);
}

static void clock_monotonic_is_a_singleton(void **state)
{
    assert_non_null(oq_clock_monotonic());
    assert_non_null(oq_clock_monotonic()->now_ms);
    assert_ptr_equal(oq_clock_monotonic(), oq_clock_monotonic());
}

/* ---- oq__abstime_after ---- */

static void check_abstime(int64_t ms)
{
    int64_t want = ms < 0 ? 0 : ms;
    int64_t before = mono_ns();
    struct timespec ts = oq__abstime_after(ms);
    int64_t after = mono_ns();
    assert_true(ts.tv_nsec >= 0);
    assert_true(ts.tv_nsec < 1000000000);
    assert_true(ts_ns(ts) >= before + want * 1000000);
    assert_true(ts_ns(ts) <= after + want * 1000000);
}

static void abstime_after_fixed_values(void **state)
{
    int64_t v[] = { 0, 1, 999, 1000, 1001, 1500, 1999, 2000, 123456,
                    86400000 };
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        check_abstime(v[i]);
}

/* Many sub-second offsets, read at many different nanosecond phases, so the
 * nsec carry is exercised whatever the current time is. */
static void abstime_after_normalises_nsec(void **state)
{
    uint64_t rng = 42;
    for (int i = 0; i < 20000; i++)
        check_abstime((int64_t)(oq__splitmix64(&rng) % 3000));
}

static void abstime_after_negative_is_now(void **state)
{
    check_abstime(-1);
    check_abstime(-5000);
    check_abstime(INT64_MIN / 2);
}

static void cond_monotonic_times_out_at_abstime(void **state)
{
    pthread_cond_t cv;
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    int64_t wait_ms = 20;
    int rc;

    assert_int_equal(oq__cond_init_monotonic(&cv), 0);
    int64_t t0 = mono_ns();
    struct timespec until = oq__abstime_after(wait_ms);
    pthread_mutex_lock(&mu);
    do
        rc = pthread_cond_timedwait(&cv, &mu, &until);
    while (rc == 0); /* spurious wakeups */
    pthread_mutex_unlock(&mu);
    int64_t waited = mono_ns() - t0;
    assert_int_equal(rc, ETIMEDOUT);
    /* The condvar reads CLOCK_MONOTONIC: on CLOCK_REALTIME this deadline
     * would be decades in the past and the wait would return at once. */
    assert_true(waited >= (wait_ms - 1) * 1000000);
    assert_true(waited < 5000 * 1000000LL * time_mult());
    pthread_cond_destroy(&cv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(testclock_starts_at_given_time),
        cmocka_unit_test(testclock_negative_and_large_start),
        cmocka_unit_test(testclock_does_not_move_by_itself),
        cmocka_unit_test(testclock_advance_accumulates),
        cmocka_unit_test(testclock_set_moves_both_ways),
        cmocka_unit_test(testclocks_are_independent),
        cmocka_unit_test(testclock_concurrent_advances_sum),
        cmocka_unit_test(testclock_new_oom_returns_null),
        cmocka_unit_test(monotonic_never_goes_backwards),
        cmocka_unit_test(monotonic_matches_clock_gettime),
        cmocka_unit_test(monotonic_advances_with_real_time),
        cmocka_unit_test(clock_now_null_is_monotonic),
        cmocka_unit_test(clock_monotonic_is_a_singleton),
        cmocka_unit_test(abstime_after_fixed_values),
        cmocka_unit_test(abstime_after_normalises_nsec),
        cmocka_unit_test(abstime_after_negative_is_now),
        cmocka_unit_test(cond_monotonic_times_out_at_abstime),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
