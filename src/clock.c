/*
 * Time. The library reads time only through an oq_clock so tests can
 * substitute oq_testclock and check timeouts, backoff and TTL without
 * sleeping. Timed waits on condition variables use CLOCK_MONOTONIC.
 */
#include "oq_internal.h"

#include <stdatomic.h>
#include <time.h>

static int64_t monotonic_now(void *ctx)
{
    struct timespec ts;
    OQ__UNUSED(ctx);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const oq_clock monotonic = { monotonic_now, NULL };

const oq_clock *oq_clock_monotonic(void)
{
    return &monotonic;
}

int64_t oq_clock_now(const oq_clock *c)
{
    if (c == NULL)
        c = &monotonic;
    return c->now_ms(c->ctx);
}

struct oq_testclock {
    oq_clock clock;
    _Atomic int64_t now_ms; /* the test's time, in ms */
};

static int64_t testclock_now(void *ctx)
{
    oq_testclock *tc = ctx;
    return atomic_load(&tc->now_ms);
}

oq_testclock *oq_testclock_new(int64_t start_ms)
{
    oq_testclock *tc = oq__malloc(sizeof(*tc));
    if (tc == NULL)
        return NULL;
    tc->clock.now_ms = testclock_now;
    tc->clock.ctx = tc;
    atomic_init(&tc->now_ms, start_ms);
    return tc;
}

void oq_testclock_free(oq_testclock *tc)
{
    oq__free(tc);
}

const oq_clock *oq_testclock_clock(oq_testclock *tc)
{
    return &tc->clock;
}

void oq_testclock_advance(oq_testclock *tc, int64_t delta_ms)
{
    atomic_fetch_add(&tc->now_ms, delta_ms);
}

void oq_testclock_set(oq_testclock *tc, int64_t now_ms)
{
    atomic_store(&tc->now_ms, now_ms);
}

struct timespec oq__abstime_after(int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (ms < 0)
        ms = 0;
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    return ts;
}

int oq__mutex_init(pthread_mutex_t *m)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc != 0)
        return -rc;
#ifdef PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
#endif
    rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    return -rc;
}

int oq__cond_init_monotonic(pthread_cond_t *c)
{
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc != 0)
        return -rc;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    rc = pthread_cond_init(c, &attr);
    pthread_condattr_destroy(&attr);
    return -rc;
}
