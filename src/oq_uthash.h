/*
 * uthash, the one way onceq's modules include it: every allocation goes
 * through the seam (oq__malloc/oq__free, so tests can make it fail), and a
 * failed allocation is reported instead of uthash's default exit(-1). An
 * add that could not grow the table leaves the item out and sets
 * oq__hash_oom (per thread): clear it before an add and look right after.
 * Private; not installed.
 */
#ifndef OQ_UTHASH_H
#define OQ_UTHASH_H

#include "oq_internal.h"

extern _Thread_local int oq__hash_oom;

#define uthash_malloc(sz) oq__malloc(sz)
#define uthash_free(ptr, sz) oq__free(ptr)
#define HASH_NONFATAL_OOM 1
#define uthash_nonfatal_oom(obj) (oq__hash_oom = 1)
/* XXH3 instead of uthash's Jenkins hash: a short key (a word, an id) costs
 * a few dozen instructions instead of about ten a byte (callgrind). The
 * iteration order of a table is its insertion order, not the hash's. */
#include <xxhash.h>
#define HASH_FUNCTION(keyptr, keylen, hashv) \
    ((hashv) = (unsigned)XXH3_64bits((keyptr), (size_t)(keylen)))
#include <uthash.h>

#endif /* OQ_UTHASH_H */
