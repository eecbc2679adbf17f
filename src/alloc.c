/*
 * The allocation seam. Every allocation of the library goes through here so
 * that tests can make the Nth allocation fail and check the error paths.
 */
#include "oq_internal.h"

#include <stdatomic.h>
#include <stdlib.h>

/* Allocations left before failures start; -1 means never fail. */
static _Atomic long fail_after = -1;

void oq__alloc_fail_after(long n)
{
    atomic_store(&fail_after, n);
}

static bool should_fail(void)
{
    long n = atomic_load_explicit(&fail_after, memory_order_relaxed);
    if (n < 0)
        return false;
    /* Count down; once at zero every allocation fails until reset. */
    while (n > 0) {
        if (atomic_compare_exchange_weak(&fail_after, &n, n - 1))
            return false;
    }
    return n == 0;
}

void *oq__malloc(size_t n)
{
    return should_fail() ? NULL : malloc(n);
}

void *oq__calloc(size_t n, size_t size)
{
    return should_fail() ? NULL : calloc(n, size);
}

void *oq__realloc(void *p, size_t n)
{
    return should_fail() ? NULL : realloc(p, n);
}

void oq__free(void *p)
{
    free(p);
}

/* uthash's failed-allocation flag (src/oq_uthash.h). */
_Thread_local int oq__hash_oom;
