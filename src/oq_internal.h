/*
 * Private declarations shared between onceq's modules. Not installed.
 * Internal names are oq__*; static names carry no prefix.
 */
#ifndef OQ_INTERNAL_H
#define OQ_INTERNAL_H

#include "onceq.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define OQ__UNUSED(x) ((void)(x))
#define OQ__MIN(a, b) ((a) < (b) ? (a) : (b))
#define OQ__MAX(a, b) ((a) > (b) ? (a) : (b))

/* ------------------------------------------------------------- allocation */

/*
 * Every allocation of the library goes through these, so tests can inject
 * failures (beanstalkd's allocator seam). oq__alloc_fail_after: when >= 0,
 * that many more allocations succeed and the next ones fail.
 */
void *oq__malloc(size_t n);
void *oq__calloc(size_t n, size_t size);
void *oq__realloc(void *p, size_t n);
void oq__free(void *p);
void oq__alloc_fail_after(long n); /* -1: never fail (the default) */

/* ------------------------------------------------------------------ clock */

/* Absolute CLOCK_MONOTONIC timespec for "now + ms" (for timed waits). */
struct timespec oq__abstime_after(int64_t ms);
/* pthread_cond_t that waits on CLOCK_MONOTONIC. */
int oq__cond_init_monotonic(pthread_cond_t *c);
/* A mutex for short critical sections: it spins a little before sleeping
 * (glibc's adaptive mutex), which matters when two workers contend for the
 * queue lock for a few hundred ns at a time. */
int oq__mutex_init(pthread_mutex_t *m);

/* ------------------------------------------------------------------- heap */

/*
 * A binary min-heap of pointers to items that carry their own key and heap
 * position (so removal and key changes are O(log n) without a search).
 * key_off and pos_off are offsetof() the int64_t key and the size_t
 * position inside the item.
 */
typedef struct oq__heap {
    void **items;
    size_t len, cap;
    size_t key_off, pos_off;
} oq__heap;

void oq__heap_init(oq__heap *h, size_t key_off, size_t pos_off);
void oq__heap_destroy(oq__heap *h);
int oq__heap_push(oq__heap *h, void *item);
void *oq__heap_peek(const oq__heap *h);
void *oq__heap_pop(oq__heap *h);
void oq__heap_remove(oq__heap *h, void *item);
/* Call after the item's key changed. */
void oq__heap_update(oq__heap *h, void *item);

/* -------------------------------------------------------------------- txn */

oq_txn *oq__txn_new(void);
void oq__txn_reset(oq_txn *t); /* keeps its buffers */
void oq__txn_free(oq_txn *t);

/* -------------------------------------------------------- CLI subcommands */

/* Each subcommand of the onceq binary: argv[0] is the subcommand's name.
 * Returns the process exit status. */
int oq__cmd_node(int argc, char **argv);

/* ------------------------------------------------------------------- misc */

/* splitmix64: a small, good PRNG step for jitter and tests. */
static inline uint64_t oq__splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#endif /* OQ_INTERNAL_H */
