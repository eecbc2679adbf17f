/*
 * The processed set (oq_idset): which event ids are DONE, and which are
 * CLAIMED by a worker right now.
 *
 * DESIGN
 *
 * Shards and locks. The 128-bit XXH3 digest of an id picks one of
 * 2^shard_bits shards (the low bits of digest.hi). Each shard has its own
 * mutex, which guards every field of that shard and nothing else (see
 * struct shard). A shard lock is a leaf: while it is held no other lock is
 * taken, not another shard's nor the queue's. The clock is read before the
 * lock is taken, because a caller's clock may lock. stats_get takes the
 * shard locks one after another, never two at once. No state is shared by
 * all shards.
 *
 * Time. The public calls read the clock themselves; the _d calls take
 * "now" from the caller, and the engine's ledgers read it once for a batch
 * of claims or of commits (a clock read costs 25-50 ns here, and there were
 * three an event). So "now" can be a batch old. An old "now" only makes a
 * takeover later, or lets a commit or prepare through whose lease ended
 * after "now" was read and that nobody took over; neither lets two holders
 * commit one id, because a takeover changes the token under the shard
 * lock. (The engine also pins the delivery, the queue's own deadline
 * check, before it commits.)
 *
 * States. An id is in at most one of:
 *   - CLAIMED: a slot in its shard's claim table (see CLAIM table below),
 *     keyed by the id's digest, with a fencing token and a lease deadline;
 *   - DONE: its digest is in its shard's DONE table (cur or prev);
 *   - neither: never seen, released, or forgotten.
 * claim looks at DONE before CLAIMED, commit moves CLAIMED to DONE in one
 * lock hold, and insert_done drops a claim it finds, so the two never
 * overlap.
 *
 * Fencing. Tokens come from a counter per shard, tagged with the shard, so
 * they are unique in the set, strictly increase for each id, and are never
 * 0. A claim whose lease has ended
 * (now >= lease_deadline_ms) is taken over with a new token; the old
 * holder's commit and release then fail with OQ_ESTALE. Commit also needs
 * now < lease_deadline_ms, so a holder that overran its lease cannot commit
 * even when nobody took over: by then the queue may have handed the event to
 * another worker. A takeover and a commit of the same id are serialised by
 * the shard lock and the takeover changes the token, so however old "now"
 * is (see Time), two commits of one id cannot both get through.
 *
 * Prepare. A holder whose outputs go somewhere that can fail first prepares
 * (same checks as commit): the claim is marked committing and is never
 * taken over, even after its lease ends, until the holder commits (DONE) or
 * releases it. So a write that outlives the lease cannot race a takeover.
 *
 * CLAIM table. Open addressing with linear probing over 40-byte slots
 * keyed by the 128-bit digest, like the DONE table: a claim allocates
 * nothing and compares no id bytes (uthash entries cost a malloc, a free
 * and a memcmp per claim, and the free was often on another thread). So two
 * ids share a claim only when their 128-bit digests are equal, the same
 * assumption the DONE table makes. A table holds only live claims (as many
 * as messages in flight), is kept at most half full, and deletes by
 * backward shift, so there are no tombstones; it never shrinks.
 *
 * DONE table. Open addressing with linear probing over 16-byte slots that
 * hold the whole 128-bit digest: no per-id pointer, no id bytes. A false
 * "DONE" needs two ids with the same 128-bit digest. The all-zero digest
 * marks an empty slot, so a real zero digest is stored as {lo = 1, hi = 0}.
 * The slot index is the low bits of digest.lo (independent of the shard
 * bits). A table doubles when an insert would take its load past
 * DONE_LOAD_NUM/DONE_LOAD_DEN (0.8), so it is between 0.4 and 0.8 full: 20
 * to 40 bytes per id, about 27 at 10M ids over 64 shards.
 *
 * Retention. With retention_ms = R > 0 each shard keeps two DONE tables,
 * cur and prev, and gen_start_ms, which starts at the set's creation time
 * and only ever advances by whole multiples of R. Every operation first
 * calls rotate(): k = (now - gen_start_ms) / R whole periods have passed;
 * k = 1 drops prev and moves cur to prev, k >= 2 drops both, and
 * gen_start_ms advances by k * R. Inserts happen after that check, so cur
 * only holds ids inserted in [gen_start_ms, gen_start_ms + R), and such an
 * id is dropped by the first operation at or after gen_start_ms + 2R: it is
 * remembered at least R and forgotten within 2R. A rotation is O(1) plus a
 * free(); nothing ever scans for old ids.
 */
#include "oq_internal.h"

#include <stdalign.h>
#include <stdatomic.h>
#include <string.h>
#include <xxhash.h>

#define MAX_SHARD_BITS 16
#define ID_MAX_LEN ((size_t)UINT32_MAX) /* ids are shorter than this */
#define CLAIM_MIN_CAP 16          /* claim slots in a table's first allocation */
#define DONE_MIN_CAP 16           /* slots in a table's first allocation */
#define DONE_LOAD_NUM 4           /* grow past 4/5 = 0.8 full */
#define DONE_LOAD_DEN 5

/* A DONE id: its XXH3-128 digest (oq__digest). All-zero means an empty
 * slot. */
typedef oq__digest digest;

/* An open-addressing set of digests. cap is 0 (slots NULL) or a power of 2. */
typedef struct dtable {
    digest *slots;
    size_t cap;   /* slots allocated */
    size_t count; /* slots in use */
} dtable;

/* A live (or expired but not yet taken over) claim: a slot of a claim
 * table. d all-zero means an empty slot. */
typedef struct claim {
    digest d;                  /* the id's digest (oq__idset_digest) */
    uint64_t token;            /* fencing token, never 0 */
    int64_t lease_deadline_ms; /* the lease ends here (absolute, ms) */
    bool committing;           /* prepared: no takeover, even once expired */
} claim;

/* An open-addressing table of claims. cap is 0 (slots NULL) or a power of
 * 2. */
typedef struct ctable {
    claim *slots;
    size_t cap;
    size_t count;
} ctable;

struct shard {
    alignas(64) pthread_mutex_t lock; /* guards every field below; a leaf */
    ctable claims;             /* live claims by digest */
    dtable cur;                /* DONE ids of this generation */
    dtable prev;               /* DONE ids of the previous one (retention) */
    int64_t gen_start_ms;      /* when cur's generation began (absolute, ms) */
    size_t init_cap;           /* first allocation of an empty DONE table */
    uint64_t takeovers;        /* expired leases taken over */
    uint64_t forgotten;        /* DONE ids dropped by retention */
    uint64_t next_token;       /* last fencing token handed out here */
};

struct oq_idset {
    struct shard *shards;      /* 2^shard_bits, 64-byte aligned */
    void *shards_mem;          /* what to free */
    size_t nshards;
    size_t shard_mask;         /* nshards - 1 */
    size_t init_cap;           /* DONE slots per shard from expected_ids */
    int64_t retention_ms;      /* 0: keep DONE ids forever */
    const oq_clock *clock;
};

/* ------------------------------------------------------------- digests */

oq__digest oq__idset_digest(const char *id, size_t len)
{
    XXH128_hash_t h = XXH3_128bits(id, len);
    digest d = { h.low64, h.high64 };
    if (d.lo == 0 && d.hi == 0)
        d.lo = 1; /* zero is the empty slot */
    return d;
}

static bool digest_empty(digest d)
{
    return (d.lo | d.hi) == 0;
}

static bool digest_eq(digest a, digest b)
{
    return a.lo == b.lo && a.hi == b.hi;
}

/* ----------------------------------------------------------- DONE table */

/*
 * Robin Hood linear probing: slots along a probe run are kept ordered by
 * their distance from their home slot, so a lookup of an absent id stops as
 * soon as it meets an entry closer to home than itself. At 0.8 load plain
 * linear probing needs about 13 probes for a miss (and most claims are
 * misses: new ids); Robin Hood needs about 3. No per-slot metadata: the
 * home slot is recomputed from the stored digest. Entries are never
 * deleted one by one (retention drops whole tables), so no backward shift.
 */
static size_t probe_dist(digest s, size_t i, size_t mask)
{
    return (i - ((size_t)s.lo & mask)) & mask;
}

static bool dtable_contains(const dtable *t, digest d)
{
    if (t->count == 0)
        return false;
    size_t mask = t->cap - 1;
    size_t i = (size_t)d.lo & mask;
    for (size_t dist = 0;; dist++, i = (i + 1) & mask) {
        digest s = t->slots[i];
        if (digest_eq(s, d))
            return true;
        if (digest_empty(s) || probe_dist(s, i, mask) < dist)
            return false;
    }
}

/* Puts d (not present) into a table with room for it. */
static void dtable_place(digest *slots, size_t cap, digest d)
{
    size_t mask = cap - 1;
    size_t i = (size_t)d.lo & mask;
    for (size_t dist = 0;; dist++, i = (i + 1) & mask) {
        digest s = slots[i];
        if (digest_empty(s)) {
            slots[i] = d;
            return;
        }
        size_t sd = probe_dist(s, i, mask);
        if (sd < dist) {
            /* Take the slot from the richer entry; carry it on. */
            slots[i] = d;
            d = s;
            dist = sd;
        }
    }
}

/* A table's slots and cap are also read without the lock, by
 * oq__idset_prefetch (only to compute an address to prefetch): they are
 * written with relaxed atomic stores, and that read uses atomic loads. */
static void dtable_publish(dtable *t, digest *slots, size_t cap)
{
    __atomic_store_n(&t->slots, slots, __ATOMIC_RELAXED);
    __atomic_store_n(&t->cap, cap, __ATOMIC_RELAXED);
}

static int dtable_resize(dtable *t, size_t cap)
{
    /* Not calloc: a large calloc is fresh zero pages, and Robin Hood
     * placement reads a slot before it writes it, so every page would
     * fault twice (read: the shared zero page; write: copy-on-write),
     * and with several threads each copy-on-write fault sends a TLB
     * shootdown to the other CPUs. Writing the zeros first faults each
     * page once. */
    digest *slots = oq__malloc(cap * sizeof(*slots));
    if (slots == NULL)
        return OQ_ENOMEM;
    memset(slots, 0, cap * sizeof(*slots));
    for (size_t i = 0; i < t->cap; i++) {
        if (!digest_empty(t->slots[i]))
            dtable_place(slots, cap, t->slots[i]);
    }
    oq__free(t->slots);
    dtable_publish(t, slots, cap);
    return 0;
}

/* Adds d, which the caller checked is not present. 0 or OQ_ENOMEM (and the
 * table is unchanged). */
static int dtable_add(dtable *t, digest d, size_t init_cap)
{
    if ((t->count + 1) * DONE_LOAD_DEN > t->cap * DONE_LOAD_NUM) {
        size_t cap = t->cap ? t->cap * 2 : init_cap;
        while ((t->count + 1) * DONE_LOAD_DEN > cap * DONE_LOAD_NUM)
            cap *= 2;
        int rc = dtable_resize(t, cap);
        if (rc != 0)
            return rc;
    }
    dtable_place(t->slots, t->cap, d);
    t->count++;
    return 0;
}

static void dtable_clear(dtable *t)
{
    oq__free(t->slots);
    dtable_publish(t, NULL, 0);
    t->count = 0;
}

/* The smallest table that holds n ids below the load limit. */
static size_t cap_for(size_t n)
{
    size_t cap = DONE_MIN_CAP;
    while (n * DONE_LOAD_DEN > cap * DONE_LOAD_NUM)
        cap *= 2;
    return cap;
}

static size_t isqrt(size_t n)
{
    size_t r = 0;
    while ((r + 1) * (r + 1) <= n)
        r++;
    return r;
}

/* --------------------------------------------------------------- shards */

static struct shard *shard_of(const oq_idset *s, digest d)
{
    return &s->shards[(size_t)d.hi & s->shard_mask];
}

/* Retention: moves the shard's generations on to now. Lock held. */
static void rotate(oq_idset *s, struct shard *sh, int64_t now)
{
    if (s->retention_ms <= 0 || now - sh->gen_start_ms < s->retention_ms)
        return;
    int64_t k = (now - sh->gen_start_ms) / s->retention_ms;
    sh->forgotten += sh->prev.count;
    dtable_clear(&sh->prev);
    if (k == 1) {
        dtable_publish(&sh->prev, sh->cur.slots, sh->cur.cap);
        sh->prev.count = sh->cur.count;
        /* The next generation likely sees about as many ids as this one. */
        sh->init_cap = OQ__MAX(s->init_cap, cap_for(sh->cur.count));
    } else {
        sh->forgotten += sh->cur.count;
        dtable_clear(&sh->cur);
        sh->init_cap = s->init_cap;
    }
    dtable_publish(&sh->cur, NULL, 0);
    sh->cur.count = 0;
    sh->gen_start_ms += k * s->retention_ms;
}

static bool shard_done(const struct shard *sh, digest d)
{
    return dtable_contains(&sh->cur, d) || dtable_contains(&sh->prev, d);
}

/* ---------------------------------------------------------- CLAIM table */

/* The home slot: digest bits that pick neither the shard (low bits of hi)
 * nor a DONE slot (low bits of lo). */
static size_t claim_home(digest d, size_t mask)
{
    return (size_t)(d.hi >> 32) & mask;
}

static claim *shard_find_claim(struct shard *sh, digest d)
{
    const ctable *t = &sh->claims;
    if (t->count == 0)
        return NULL;
    size_t mask = t->cap - 1;
    for (size_t i = claim_home(d, mask);; i = (i + 1) & mask) {
        claim *c = &t->slots[i];
        if (digest_eq(c->d, d))
            return c;
        if (digest_empty(c->d))
            return NULL;
    }
}

/* Puts a claim (its digest not present) into slots with room for it. */
static claim *ctable_place(claim *slots, size_t cap, const claim *c)
{
    size_t mask = cap - 1;
    size_t i = claim_home(c->d, mask);
    while (!digest_empty(slots[i].d))
        i = (i + 1) & mask;
    slots[i] = *c;
    return &slots[i];
}

/* Grows the table, if need be, to take one more claim below half full.
 * 0 or OQ_ENOMEM (the table unchanged). */
static int ctable_reserve(ctable *t)
{
    if ((t->count + 1) * 2 <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap * 2 : CLAIM_MIN_CAP;
    claim *slots = oq__malloc(cap * sizeof(*slots));
    if (slots == NULL)
        return OQ_ENOMEM;
    memset(slots, 0, cap * sizeof(*slots)); /* written first: see DONE */
    for (size_t i = 0; i < t->cap; i++) {
        if (!digest_empty(t->slots[i].d))
            ctable_place(slots, cap, &t->slots[i]);
    }
    oq__free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* Live claims in the shard. */
static size_t shard_nclaims(const struct shard *sh)
{
    return sh->claims.count;
}

/* The claim, if token is current and its lease unexpired (or prepared). */
static claim *current_claim(struct shard *sh, digest d, uint64_t token,
                            int64_t now)
{
    claim *c = shard_find_claim(sh, d);
    if (c != NULL && c->token == token &&
        (c->committing || now < c->lease_deadline_ms))
        return c;
    return NULL;
}

/* Deletes the claim in slot c by backward shift: every later entry of the
 * probe run that may move closer to its home does, so lookups never need
 * tombstones. */
static void shard_drop_claim(struct shard *sh, claim *c)
{
    ctable *t = &sh->claims;
    size_t mask = t->cap - 1;
    size_t hole = (size_t)(c - t->slots);

    for (size_t i = (hole + 1) & mask; !digest_empty(t->slots[i].d);
         i = (i + 1) & mask) {
        size_t home = claim_home(t->slots[i].d, mask);
        /* The entry at i may fill the hole if its home is not in the
         * cyclic range (hole, i]. */
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            t->slots[hole] = t->slots[i];
            hole = i;
        }
    }
    memset(&t->slots[hole], 0, sizeof(t->slots[hole]));
    t->count--;
}

/* Tokens come from a counter per shard (under its lock), with the shard's
 * index in the low bits, so they are unique in the set and increase for
 * each id: a set-wide atomic counter was one cache line written by every
 * claim of every worker. */
static uint64_t new_token(const oq_idset *s, struct shard *sh)
{
    return (++sh->next_token << MAX_SHARD_BITS) |
           (uint64_t)(sh - s->shards);
}

/* The public calls' limit on ids (kept from when claims were uthash
 * entries, whose key lengths are unsigned): shorter than 4 GiB. */
static bool id_ok(const char *id, size_t len)
{
    return (id != NULL || len == 0) && len < ID_MAX_LEN;
}

/* ------------------------------------------------------------ lifecycle */

void oq_idset_opts_init(oq_idset_opts *o, size_t size)
{
    oq_idset_opts d = { .size = sizeof(d) };

    d.shard_bits = 6;
    oq__opts_init(o, size, &d, sizeof(d));
}

int oq_idset_new(oq_idset **out, const oq_idset_opts *opts)
{
    oq_idset_opts def;
    if (out == NULL)
        return OQ_EINVAL;
    *out = NULL;
    oq_idset_opts_defaults(&def);
    if (opts && oq__opts_copy(&def, sizeof(def), opts) != 0)
        return OQ_EINVAL;
    opts = &def;
    if (opts->shard_bits > MAX_SHARD_BITS || opts->retention_ms < 0)
        return OQ_EINVAL;

    oq_idset *s = oq__calloc(1, sizeof(*s));
    if (s == NULL)
        return OQ_ENOMEM;
    s->nshards = (size_t)1 << opts->shard_bits;
    s->shard_mask = s->nshards - 1;
    s->retention_ms = opts->retention_ms;
    s->clock = opts->clock;

    /* One shard per 64-byte line at least, so locks do not share lines. */
    size_t align = alignof(struct shard);
    s->shards_mem = oq__calloc(1, s->nshards * sizeof(struct shard) + align);
    if (s->shards_mem == NULL)
        goto out_free_set;
    s->shards = (struct shard *)(((uintptr_t)s->shards_mem + align - 1) &
                                 ~(uintptr_t)(align - 1));

    /* Spread the hint over the shards. Ids fall into shards binomially, so
     * allow the fullest shard about 4 standard deviations over the mean. */
    size_t per_shard = OQ__MIN(opts->expected_ids / s->nshards,
                               (size_t)1 << 36); /* then calloc fails */
    s->init_cap = cap_for(per_shard + 4 * isqrt(per_shard) + 8);
    int64_t now = oq_clock_now(s->clock);
    size_t i;
    for (i = 0; i < s->nshards; i++) {
        struct shard *sh = &s->shards[i];
        if (oq__mutex_init(&sh->lock) != 0)
            goto out_destroy;
        sh->gen_start_ms = now;
        sh->init_cap = s->init_cap;
        if (opts->expected_ids > 0 &&
            dtable_resize(&sh->cur, s->init_cap) != 0) {
            pthread_mutex_destroy(&sh->lock);
            goto out_destroy;
        }
    }
    *out = s;
    return 0;

out_destroy:
    while (i-- > 0) {
        dtable_clear(&s->shards[i].cur);
        pthread_mutex_destroy(&s->shards[i].lock);
    }
    oq__free(s->shards_mem);
out_free_set:
    oq__free(s);
    return OQ_ENOMEM;
}

void oq_idset_free(oq_idset *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->nshards; i++) {
        struct shard *sh = &s->shards[i];
        oq__free(sh->claims.slots);
        dtable_clear(&sh->cur);
        dtable_clear(&sh->prev);
        pthread_mutex_destroy(&sh->lock);
    }
    oq__free(s->shards_mem);
    oq__free(s);
}

/* ----------------------------------------------------------- operations */

/* Claim a new id: a new slot. Lock held. */
static int claim_add(oq_idset *s, struct shard *sh, digest d,
                     int64_t lease_deadline_ms, oq_claim *out)
{
    if (ctable_reserve(&sh->claims) != 0)
        return OQ_ENOMEM;
    claim c = { .d = d, .token = new_token(s, sh),
                .lease_deadline_ms = lease_deadline_ms };
    ctable_place(sh->claims.slots, sh->claims.cap, &c);
    sh->claims.count++;
    out->token = c.token;
    out->lease_deadline_ms = lease_deadline_ms;
    return OQ_CLAIMED;
}

int64_t oq__idset_now(const oq_idset *s)
{
    return oq_clock_now(s->clock);
}

void oq__idset_prefetch(const oq_idset *s, oq__digest d)
{
    const dtable *t = &shard_of(s, d)->cur;
    const digest *slots = __atomic_load_n(&t->slots, __ATOMIC_RELAXED);
    size_t cap = __atomic_load_n(&t->cap, __ATOMIC_RELAXED);

    /* Without the lock: slots and cap may be a resize apart, and the
     * address stale or outside the table. A prefetch never faults. */
    if (slots != NULL && cap != 0)
        __builtin_prefetch(&slots[(size_t)d.lo & (cap - 1)]);
}

int oq_idset_claim(oq_idset *s, const char *id, size_t len,
                   int64_t lease_deadline_ms, oq_claim *out)
{
    if (s == NULL || !id_ok(id, len))
        return OQ_EINVAL;
    return oq__idset_claim_d(s, oq__idset_digest(id, len), lease_deadline_ms,
                             oq_clock_now(s->clock), out);
}

int oq__idset_claim_d(oq_idset *s, oq__digest d, int64_t lease_deadline_ms,
                      int64_t now, oq_claim *out)
{
    oq_claim ignored;
    if (out == NULL)
        out = &ignored;
    struct shard *sh = shard_of(s, d);
    int rc;

    pthread_mutex_lock(&sh->lock);
    rotate(s, sh, now);
    if (shard_done(sh, d)) {
        rc = OQ_DONE;
        goto out_unlock;
    }
    claim *c = shard_find_claim(sh, d);
    if (c == NULL) {
        rc = claim_add(s, sh, d, lease_deadline_ms, out);
    } else if (c->committing || c->lease_deadline_ms > now) {
        out->token = c->token;
        out->lease_deadline_ms = c->lease_deadline_ms;
        rc = OQ_BUSY;
    } else {
        c->token = new_token(s, sh);
        c->lease_deadline_ms = lease_deadline_ms;
        sh->takeovers++;
        out->token = c->token;
        out->lease_deadline_ms = lease_deadline_ms;
        rc = OQ_CLAIMED;
    }
out_unlock:
    pthread_mutex_unlock(&sh->lock);
    return rc;
}

int oq_idset_commit(oq_idset *s, const char *id, size_t len, uint64_t token)
{
    if (s == NULL || !id_ok(id, len))
        return OQ_EINVAL;
    return oq__idset_commit_d(s, oq__idset_digest(id, len), token,
                              oq_clock_now(s->clock));
}

int oq__idset_commit_d(oq_idset *s, oq__digest d, uint64_t token, int64_t now)
{
    struct shard *sh = shard_of(s, d);
    int rc = OQ_ESTALE;

    pthread_mutex_lock(&sh->lock);
    rotate(s, sh, now);
    claim *c = current_claim(sh, d, token, now);
    if (c != NULL) {
        /* Add first: if that fails the claim is still there, unchanged. */
        rc = dtable_add(&sh->cur, d, sh->init_cap);
        if (rc == 0)
            shard_drop_claim(sh, c);
    }
    pthread_mutex_unlock(&sh->lock);
    return rc;
}

int oq_idset_prepare(oq_idset *s, const char *id, size_t len, uint64_t token)
{
    if (s == NULL || !id_ok(id, len))
        return OQ_EINVAL;
    return oq__idset_prepare_d(s, oq__idset_digest(id, len), token,
                               oq_clock_now(s->clock));
}

int oq__idset_prepare_d(oq_idset *s, oq__digest d, uint64_t token,
                        int64_t now)
{
    struct shard *sh = shard_of(s, d);
    int rc = OQ_ESTALE;

    pthread_mutex_lock(&sh->lock);
    claim *c = current_claim(sh, d, token, now);
    if (c != NULL) {
        c->committing = true;
        rc = 0;
    }
    pthread_mutex_unlock(&sh->lock);
    return rc;
}

int oq__idset_extend_d(oq_idset *s, oq__digest d, uint64_t token,
                       int64_t lease_deadline_ms)
{
    struct shard *sh = shard_of(s, d);
    int rc = OQ_ESTALE;

    pthread_mutex_lock(&sh->lock);
    claim *c = shard_find_claim(sh, d);
    /* The holder's token is still current (nobody took the claim over);
     * a lease is only ever moved later. */
    if (c != NULL && c->token == token) {
        if (lease_deadline_ms > c->lease_deadline_ms)
            c->lease_deadline_ms = lease_deadline_ms;
        rc = 0;
    }
    pthread_mutex_unlock(&sh->lock);
    return rc;
}

int oq_idset_release(oq_idset *s, const char *id, size_t len, uint64_t token)
{
    if (s == NULL || !id_ok(id, len))
        return OQ_EINVAL;
    return oq__idset_release_d(s, oq__idset_digest(id, len), token);
}

int oq__idset_release_d(oq_idset *s, oq__digest d, uint64_t token)
{
    struct shard *sh = shard_of(s, d);
    int rc = OQ_ESTALE;

    pthread_mutex_lock(&sh->lock);
    claim *c = shard_find_claim(sh, d);
    if (c != NULL && c->token == token) {
        shard_drop_claim(sh, c);
        rc = 0;
    }
    pthread_mutex_unlock(&sh->lock);
    return rc;
}

int oq_idset_insert_done(oq_idset *s, const char *id, size_t len)
{
    if (s == NULL || !id_ok(id, len))
        return OQ_EINVAL;
    digest d = oq__idset_digest(id, len);
    struct shard *sh = shard_of(s, d);
    int64_t now = oq_clock_now(s->clock);
    int rc = OQ_EEXIST;

    pthread_mutex_lock(&sh->lock);
    rotate(s, sh, now);
    if (!shard_done(sh, d)) {
        rc = dtable_add(&sh->cur, d, sh->init_cap);
        /* DONE and CLAIMED never overlap: the holder's token goes stale. */
        claim *c = rc == 0 ? shard_find_claim(sh, d) : NULL;
        if (c != NULL)
            shard_drop_claim(sh, c);
    }
    pthread_mutex_unlock(&sh->lock);
    return rc;
}

int oq_idset_contains(oq_idset *s, const char *id, size_t len)
{
    if (s == NULL || !id_ok(id, len))
        return 0;
    digest d = oq__idset_digest(id, len);
    struct shard *sh = shard_of(s, d);
    int64_t now = oq_clock_now(s->clock);

    pthread_mutex_lock(&sh->lock);
    rotate(s, sh, now);
    int found = shard_done(sh, d);
    pthread_mutex_unlock(&sh->lock);
    return found;
}

void oq_idset_stats_get(oq_idset *s, oq_idset_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (s == NULL)
        return;
    int64_t now = oq_clock_now(s->clock);
    for (size_t i = 0; i < s->nshards; i++) {
        struct shard *sh = &s->shards[i];
        pthread_mutex_lock(&sh->lock);
        rotate(s, sh, now);
        out->done += sh->cur.count + sh->prev.count;
        out->claims += shard_nclaims(sh);
        out->takeovers += sh->takeovers;
        out->forgotten += sh->forgotten;
        out->table_bytes += (sh->cur.cap + sh->prev.cap) * sizeof(digest);
        pthread_mutex_unlock(&sh->lock);
    }
}
