/*
 * Description: the processed set (oq_idset). Claims, fencing tokens, lease
 * expiry and takeover, DONE membership by exact id, growth, generational
 * retention, stats, allocation failures, and two race tests that prove every
 * id is committed exactly once however many workers claim it.
 *
 * Time comes from an oq_testclock, so no test sleeps.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "oq_cli.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define T0 1000 /* the test clock's start, ms */

typedef struct fixture {
    oq_testclock *tc;
    oq_idset *s;
} fixture;

static int make_fixture(void **state, unsigned shard_bits, int64_t retention_ms)
{
    fixture *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    f->tc = oq_testclock_new(T0);
    if (f->tc == NULL)
        return -1;
    oq_idset_opts o;
    oq_idset_opts_defaults(&o);
    o.shard_bits = shard_bits;
    o.retention_ms = retention_ms;
    o.clock = oq_testclock_clock(f->tc);
    if (oq_idset_new(&f->s, &o) != 0)
        return -1;
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return make_fixture(state, 6, 0);
}

static int setup_one_shard(void **state)
{
    return make_fixture(state, 0, 0);
}

static int setup_retention(void **state)
{
    return make_fixture(state, 6, 100);
}

static int teardown(void **state)
{
    fixture *f = *state;
    oq__alloc_fail_after(-1);
    oq_idset_free(f->s);
    oq_testclock_free(f->tc);
    free(f);
    return 0;
}

/* Shorthands for NUL-terminated ids. */
static int claim(oq_idset *s, const char *id, int64_t deadline_ms,
                 oq_claim *c)
{
    return oq_idset_claim(s, id, strlen(id), deadline_ms, c);
}

static int commit(oq_idset *s, const char *id, uint64_t token)
{
    return oq_idset_commit(s, id, strlen(id), token);
}

static int release(oq_idset *s, const char *id, uint64_t token)
{
    return oq_idset_release(s, id, strlen(id), token);
}

static int insert_done(oq_idset *s, const char *id)
{
    return oq_idset_insert_done(s, id, strlen(id));
}

static int contains(oq_idset *s, const char *id)
{
    return oq_idset_contains(s, id, strlen(id));
}

/* ------------------------------------------------------ claim / commit */

static void test_claim_commit_makes_done(void **state)
{
    fixture *f = *state;
    oq_claim c;
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_CLAIMED);
    assert_true(c.token != 0);
    assert_int_equal(c.lease_deadline_ms, T0 + 100);
    assert_int_equal(contains(f->s, "a"), 0);
    assert_int_equal(commit(f->s, "a", c.token), 0);
    assert_int_equal(contains(f->s, "a"), 1);
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_DONE);
}

static void test_busy_while_lease_live_returns_holder(void **state)
{
    fixture *f = *state;
    oq_claim first, second;
    assert_int_equal(claim(f->s, "a", T0 + 100, &first), OQ_CLAIMED);
    oq_testclock_advance(f->tc, 99);
    assert_int_equal(claim(f->s, "a", T0 + 500, &second), OQ_BUSY);
    assert_int_equal(second.token, first.token);
    assert_int_equal(second.lease_deadline_ms, T0 + 100);
}

static void test_takeover_after_expiry_fences_old_token(void **state)
{
    fixture *f = *state;
    oq_claim old, taken;
    assert_int_equal(claim(f->s, "a", T0 + 100, &old), OQ_CLAIMED);
    oq_testclock_advance(f->tc, 100); /* now == deadline: expired */
    assert_int_equal(claim(f->s, "a", T0 + 300, &taken), OQ_CLAIMED);
    assert_true(taken.token > old.token);
    assert_int_equal(taken.lease_deadline_ms, T0 + 300);
    assert_int_equal(commit(f->s, "a", old.token), OQ_ESTALE);
    assert_int_equal(release(f->s, "a", old.token), OQ_ESTALE);
    assert_int_equal(contains(f->s, "a"), 0);
    assert_int_equal(commit(f->s, "a", taken.token), 0);
    assert_int_equal(contains(f->s, "a"), 1);
}

static void test_commit_after_own_lease_expired_refused(void **state)
{
    fixture *f = *state;
    oq_claim c;
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_CLAIMED);
    oq_testclock_advance(f->tc, 100);
    assert_int_equal(commit(f->s, "a", c.token), OQ_ESTALE);
    assert_int_equal(contains(f->s, "a"), 0);
    /* Nothing changed: the (expired) claim is still ours to release. */
    assert_int_equal(release(f->s, "a", c.token), 0);
}

static void test_commit_just_before_deadline_accepted(void **state)
{
    fixture *f = *state;
    oq_claim c;
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_CLAIMED);
    oq_testclock_advance(f->tc, 99);
    assert_int_equal(commit(f->s, "a", c.token), 0);
}

static void test_commit_wrong_token_changes_nothing(void **state)
{
    fixture *f = *state;
    oq_claim c, busy;
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_CLAIMED);
    assert_int_equal(commit(f->s, "a", c.token + 1), OQ_ESTALE);
    assert_int_equal(commit(f->s, "b", c.token), OQ_ESTALE);
    assert_int_equal(claim(f->s, "a", T0 + 100, &busy), OQ_BUSY);
    assert_int_equal(busy.token, c.token);
}

static void test_release_then_reclaim(void **state)
{
    fixture *f = *state;
    oq_claim first, second;
    assert_int_equal(claim(f->s, "a", T0 + 100, &first), OQ_CLAIMED);
    assert_int_equal(release(f->s, "a", first.token), 0);
    assert_int_equal(claim(f->s, "a", T0 + 100, &second), OQ_CLAIMED);
    assert_true(second.token > first.token);
    assert_int_equal(release(f->s, "a", first.token), OQ_ESTALE);
    assert_int_equal(commit(f->s, "a", first.token), OQ_ESTALE);
    assert_int_equal(commit(f->s, "a", second.token), 0);
}

static void test_release_unknown_id_is_stale(void **state)
{
    fixture *f = *state;
    assert_int_equal(release(f->s, "nobody", 1), OQ_ESTALE);
}

/* Tokens are unique in the set (a token of one id never fences another)
 * and increase for each id across takeovers. */
static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void test_tokens_strictly_increase(void **state)
{
    fixture *f = *state;
    uint64_t tok[1000], last = 0;
    char id[32];
    for (int i = 0; i < 1000; i++) {
        oq_claim c;
        snprintf(id, sizeof(id), "t-%d", i);
        assert_int_equal(claim(f->s, id, T0 + 10, &c), OQ_CLAIMED);
        assert_true(c.token != 0);
        tok[i] = c.token;
    }
    qsort(tok, 1000, sizeof(tok[0]), cmp_u64);
    for (int i = 1; i < 1000; i++)
        assert_true(tok[i] > tok[i - 1]);
    /* One id taken over again and again: its tokens increase. */
    for (int i = 0; i < 50; i++) {
        oq_claim c;
        oq_testclock_advance(f->tc, 20);
        assert_int_equal(claim(f->s, "again",
                               oq_clock_now(oq_testclock_clock(f->tc)) + 10,
                               &c), OQ_CLAIMED);
        assert_true(c.token > last);
        last = c.token;
    }
}

/* --------------------------------------------------------- insert_done */

static void test_insert_done_and_contains(void **state)
{
    fixture *f = *state;
    oq_claim c;
    assert_int_equal(contains(f->s, "a"), 0);
    assert_int_equal(insert_done(f->s, "a"), 0);
    assert_int_equal(contains(f->s, "a"), 1);
    assert_int_equal(insert_done(f->s, "a"), OQ_EEXIST);
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_DONE);
}

static void test_insert_done_fences_live_claim(void **state)
{
    fixture *f = *state;
    oq_claim c;
    oq_idset_stats st;
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_CLAIMED);
    assert_int_equal(insert_done(f->s, "a"), 0);
    assert_int_equal(commit(f->s, "a", c.token), OQ_ESTALE);
    oq_idset_stats_get(f->s, &st);
    assert_int_equal(st.claims, 0);
    assert_int_equal(st.done, 1);
}

/* ----------------------------------------------------------- exact ids */

static void test_ids_differing_in_one_byte(void **state)
{
    fixture *f = *state;
    oq_claim c;
    assert_int_equal(insert_done(f->s, "evt-100"), 0);
    assert_int_equal(contains(f->s, "evt-101"), 0);
    assert_int_equal(contains(f->s, "evt-10"), 0);
    assert_int_equal(contains(f->s, "evt-1000"), 0);
    assert_int_equal(claim(f->s, "evt-101", T0 + 100, &c), OQ_CLAIMED);
    assert_int_equal(claim(f->s, "evt-100", T0 + 100, &c), OQ_DONE);
}

static void test_ids_with_nul_bytes(void **state)
{
    fixture *f = *state;
    oq_claim c1, c2, c3;
    /* "a", "a\0", "a\0b", "a\0c" are four different ids. */
    assert_int_equal(oq_idset_claim(f->s, "a\0b", 3, T0 + 100, &c1),
                     OQ_CLAIMED);
    assert_int_equal(oq_idset_claim(f->s, "a\0c", 3, T0 + 100, &c2),
                     OQ_CLAIMED);
    assert_int_equal(oq_idset_claim(f->s, "a\0", 2, T0 + 100, &c3),
                     OQ_CLAIMED);
    assert_int_equal(oq_idset_commit(f->s, "a\0b", 3, c1.token), 0);
    assert_int_equal(oq_idset_contains(f->s, "a\0b", 3), 1);
    assert_int_equal(oq_idset_contains(f->s, "a\0c", 3), 0);
    assert_int_equal(oq_idset_contains(f->s, "a\0", 2), 0);
    assert_int_equal(oq_idset_contains(f->s, "a", 1), 0);
    /* A claim is found by its exact bytes too. */
    assert_int_equal(oq_idset_commit(f->s, "a\0c", 3, c3.token), OQ_ESTALE);
    assert_int_equal(oq_idset_commit(f->s, "a\0c", 3, c2.token), 0);
}

static void test_long_ids(void **state)
{
    fixture *f = *state;
    enum { LEN = 1024 };
    char *a = malloc(LEN), *b = malloc(LEN);
    assert_non_null(a);
    assert_non_null(b);
    memset(a, 'x', LEN);
    memcpy(b, a, LEN);
    b[LEN - 1] = 'y';
    oq_claim ca, cb;
    assert_int_equal(oq_idset_claim(f->s, a, LEN, T0 + 100, &ca), OQ_CLAIMED);
    assert_int_equal(oq_idset_claim(f->s, b, LEN, T0 + 100, &cb), OQ_CLAIMED);
    assert_int_equal(oq_idset_commit(f->s, a, LEN, ca.token), 0);
    assert_int_equal(oq_idset_contains(f->s, a, LEN), 1);
    assert_int_equal(oq_idset_contains(f->s, b, LEN), 0);
    assert_int_equal(oq_idset_contains(f->s, a, LEN - 1), 0);
    assert_int_equal(oq_idset_commit(f->s, b, LEN, cb.token), 0);
    free(a);
    free(b);
}

static void test_empty_id_and_bad_args(void **state)
{
    fixture *f = *state;
    oq_claim c;
    assert_int_equal(oq_idset_insert_done(f->s, "", 0), 0);
    assert_int_equal(oq_idset_contains(f->s, NULL, 0), 1);
    assert_int_equal(oq_idset_claim(f->s, NULL, 3, T0 + 1, &c), OQ_EINVAL);
    assert_int_equal(oq_idset_commit(f->s, NULL, 3, 1), OQ_EINVAL);
    assert_int_equal(oq_idset_release(f->s, NULL, 3, 1), OQ_EINVAL);
    assert_int_equal(oq_idset_insert_done(f->s, NULL, 3), OQ_EINVAL);
    assert_int_equal(oq_idset_contains(f->s, NULL, 3), 0);

    oq_idset *s = NULL;
    oq_idset_opts o;
    oq_idset_opts_defaults(&o);
    o.shard_bits = 17;
    assert_int_equal(oq_idset_new(&s, &o), OQ_EINVAL);
    assert_null(s);
    oq_idset_opts_defaults(&o);
    o.retention_ms = -1;
    assert_int_equal(oq_idset_new(&s, &o), OQ_EINVAL);
}

/* -------------------------------------------------------------- growth */

static void test_growth_200k_all_contained(void **state)
{
    fixture *f = *state;
    enum { N = 200000 };
    char id[32];
    for (int i = 0; i < N; i++) {
        snprintf(id, sizeof(id), "evt-%d", i);
        assert_int_equal(insert_done(f->s, id), 0);
    }
    for (int i = 0; i < N; i++) {
        snprintf(id, sizeof(id), "evt-%d", i);
        if (contains(f->s, id) != 1)
            fail_msg("lost %s", id);
    }
    uint64_t rng = 42;
    for (int i = 0; i < 10000; i++) {
        snprintf(id, sizeof(id), "other-%llu",
                 (unsigned long long)oq__splitmix64(&rng));
        if (contains(f->s, id) != 0)
            fail_msg("false positive %s", id);
    }
    oq_idset_stats st;
    oq_idset_stats_get(f->s, &st);
    assert_int_equal(st.done, N);
    /* 16-byte slots between 0.4 and 0.8 full (a little slack for shards
     * that were not grown yet). */
    assert_in_range(st.table_bytes, (uint64_t)N * 16, (uint64_t)N * 48);
}

static void test_presized_set_does_not_grow(void **state)
{
    oq_idset *s;
    oq_idset_opts o;
    oq_idset_opts_defaults(&o);
    o.expected_ids = 50000;
    assert_int_equal(oq_idset_new(&s, &o), 0);
    oq_idset_stats st;
    oq_idset_stats_get(s, &st);
    uint64_t before = st.table_bytes;
    assert_true(before >= 50000 * 16);
    char id[32];
    for (int i = 0; i < 50000; i++) {
        snprintf(id, sizeof(id), "evt-%d", i);
        assert_int_equal(insert_done(s, id), 0);
    }
    oq_idset_stats_get(s, &st);
    assert_int_equal(st.table_bytes, before);
    assert_int_equal(st.done, 50000);
    oq_idset_free(s);
}

/* ----------------------------------------------------------- retention */

static void test_retention_remembered_until_r_minus_1(void **state)
{
    fixture *f = *state;
    assert_int_equal(insert_done(f->s, "a"), 0);
    oq_testclock_advance(f->tc, 99);
    assert_int_equal(contains(f->s, "a"), 1);
}

static void test_retention_forgotten_by_2r(void **state)
{
    fixture *f = *state;
    assert_int_equal(insert_done(f->s, "a"), 0);
    oq_testclock_advance(f->tc, 100);
    assert_int_equal(contains(f->s, "a"), 1); /* in prev now */
    oq_testclock_advance(f->tc, 100);
    assert_int_equal(contains(f->s, "a"), 0);
    oq_idset_stats st;
    oq_idset_stats_get(f->s, &st);
    assert_int_equal(st.forgotten, 1);
    assert_int_equal(st.done, 0);
}

static void test_retention_mid_generation_bounds(void **state)
{
    fixture *f = *state;
    oq_claim c;
    /* Inserted at T0+50 via claim+commit: kept through T0+149, gone at
     * T0+250, with lookups at every ms in between to drive rotations. */
    oq_testclock_set(f->tc, T0 + 50);
    assert_int_equal(claim(f->s, "a", T0 + 60, &c), OQ_CLAIMED);
    assert_int_equal(commit(f->s, "a", c.token), 0);
    int64_t gone_at = 0;
    for (int64_t t = T0 + 50; t <= T0 + 250; t++) {
        oq_testclock_set(f->tc, t);
        if (!contains(f->s, "a")) {
            gone_at = t;
            break;
        }
    }
    assert_in_range(gone_at, T0 + 150, T0 + 250);
}

static void test_retention_idle_shard_forgets_everything(void **state)
{
    fixture *f = *state;
    assert_int_equal(insert_done(f->s, "a"), 0);
    oq_testclock_advance(f->tc, 150);
    assert_int_equal(insert_done(f->s, "b"), 0);
    /* Long idle: a single lookup must not find ids older than 2R. */
    oq_testclock_advance(f->tc, 1000);
    assert_int_equal(contains(f->s, "a"), 0);
    assert_int_equal(contains(f->s, "b"), 0);
    oq_idset_stats st;
    oq_idset_stats_get(f->s, &st);
    assert_int_equal(st.forgotten, 2);
}

static void test_retention_forgotten_id_can_be_claimed(void **state)
{
    fixture *f = *state;
    oq_claim c;
    assert_int_equal(insert_done(f->s, "a"), 0);
    oq_testclock_advance(f->tc, 200);
    assert_int_equal(claim(f->s, "a", T0 + 300, &c), OQ_CLAIMED);
}

static void test_no_retention_remembers_forever(void **state)
{
    fixture *f = *state;
    assert_int_equal(insert_done(f->s, "a"), 0);
    oq_testclock_advance(f->tc, INT64_C(1) << 40);
    assert_int_equal(contains(f->s, "a"), 1);
}

/* --------------------------------------------------------------- stats */

static void test_stats_counts(void **state)
{
    fixture *f = *state;
    oq_claim c1, c2, c3;
    assert_int_equal(claim(f->s, "a", T0 + 10, &c1), OQ_CLAIMED);
    assert_int_equal(claim(f->s, "b", T0 + 10, &c2), OQ_CLAIMED);
    assert_int_equal(claim(f->s, "c", T0 + 100, &c3), OQ_CLAIMED);
    assert_int_equal(insert_done(f->s, "d"), 0);
    assert_int_equal(commit(f->s, "c", c3.token), 0);
    oq_testclock_advance(f->tc, 10);
    assert_int_equal(claim(f->s, "a", T0 + 100, &c1), OQ_CLAIMED);

    oq_idset_stats st;
    oq_idset_stats_get(f->s, &st);
    assert_int_equal(st.done, 2);
    assert_int_equal(st.claims, 2);
    assert_int_equal(st.takeovers, 1);
    assert_int_equal(st.forgotten, 0);
    assert_true(st.table_bytes >= 2 * 16);
}

/* ------------------------------------------------------------- a model */

/*
 * Random claims, commits, releases and clock steps on one shard (so every
 * claim shares one table, which grows and deletes by backward shift),
 * checked op by op against a plain model of the rules. Seeded: the seed is
 * printed, and ONCEQ_TEST_SEED repeats a run.
 */
enum { M_IDS = 600, M_OPS = 200000 };

typedef struct mstate {
    int state; /* 0 none, 1 claimed, 2 done */
    uint64_t token;
    int64_t deadline;
} mstate;

static uint64_t m_rand(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void test_claim_table_matches_model(void **state)
{
    fixture *f = *state;
    static mstate m[M_IDS];
    const char *env = getenv("ONCEQ_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
    uint64_t x = seed | 1;
    size_t live = 0, most = 0;

    printf("claim table model: seed %llu\n", (unsigned long long)seed);
    memset(m, 0, sizeof(m));
    for (int op = 0; op < M_OPS; op++) {
        int i = (int)(m_rand(&x) % M_IDS);
        char id[32];
        snprintf(id, sizeof(id), "id-%d", i);
        int64_t now = oq_clock_now(oq_testclock_clock(f->tc));
        uint64_t r = m_rand(&x) % 100;
        oq_claim c = { 0, 0 };
        if (r < 50) {
            int64_t dl = now + 1 + (int64_t)(m_rand(&x) % 50);
            int rc = claim(f->s, id, dl, &c);
            if (m[i].state == 2) {
                assert_int_equal(rc, OQ_DONE);
            } else if (m[i].state == 1 && m[i].deadline > now) {
                assert_int_equal(rc, OQ_BUSY);
                assert_true(c.token == m[i].token);
            } else {
                assert_int_equal(rc, OQ_CLAIMED);
                assert_true(c.token > m[i].token);
                live += m[i].state == 0;
                m[i] = (mstate){ 1, c.token, dl };
            }
        } else if (r < 90) {
            /* commit (r < 70) or release, with the current token or a
             * stale one */
            bool stale = m_rand(&x) % 8 == 0;
            uint64_t tok = stale ? m[i].token - 1 : m[i].token;
            int rc = r < 70 ? commit(f->s, id, tok) : release(f->s, id, tok);
            bool ok = m[i].state == 1 && !stale &&
                      (r >= 70 || now < m[i].deadline);
            assert_int_equal(rc, ok ? 0 : OQ_ESTALE);
            if (ok) {
                m[i].state = r < 70 ? 2 : 0;
                live--;
            }
        } else {
            oq_testclock_advance(f->tc, (int64_t)(m_rand(&x) % 5));
        }
        most = live > most ? live : most;
        if (op % 50000 == 0) {
            oq_idset_stats st;
            oq_idset_stats_get(f->s, &st);
            assert_int_equal(st.claims, live);
        }
    }
    /* It held many claims at once, not a handful. */
    assert_true(most > 100);
    for (int i = 0; i < M_IDS; i++) {
        char id[32];
        snprintf(id, sizeof(id), "id-%d", i);
        assert_int_equal(contains(f->s, id), m[i].state == 2);
    }
}

/* --------------------------------------------------- allocation failure */

static void test_alloc_fail_claim(void **state)
{
    fixture *f = *state;
    oq_claim c;
    oq_idset_stats st;
    oq__alloc_fail_after(0);
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_ENOMEM);
    oq__alloc_fail_after(-1);
    oq_idset_stats_get(f->s, &st);
    assert_int_equal(st.claims, 0);
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_CLAIMED);
    assert_int_equal(commit(f->s, "a", c.token), 0);
}

static void test_alloc_fail_insert_done(void **state)
{
    fixture *f = *state;
    oq__alloc_fail_after(0);
    assert_int_equal(insert_done(f->s, "a"), OQ_ENOMEM);
    oq__alloc_fail_after(-1);
    assert_int_equal(contains(f->s, "a"), 0);
    assert_int_equal(insert_done(f->s, "a"), 0);
    assert_int_equal(contains(f->s, "a"), 1);
}

/* A commit whose DONE table cannot grow keeps the claim as it was. */
static void test_alloc_fail_commit_keeps_claim(void **state)
{
    fixture *f = *state; /* one shard: the 13th DONE id grows the table */
    char id[32];
    for (int i = 0; i < 12; i++) {
        snprintf(id, sizeof(id), "d-%d", i);
        assert_int_equal(insert_done(f->s, id), 0);
    }
    oq_claim c, busy;
    assert_int_equal(claim(f->s, "a", T0 + 100, &c), OQ_CLAIMED);
    oq__alloc_fail_after(0);
    assert_int_equal(commit(f->s, "a", c.token), OQ_ENOMEM);
    oq__alloc_fail_after(-1);
    assert_int_equal(contains(f->s, "a"), 0);
    assert_int_equal(claim(f->s, "a", T0 + 100, &busy), OQ_BUSY);
    assert_int_equal(busy.token, c.token);
    assert_int_equal(commit(f->s, "a", c.token), 0);
    assert_int_equal(contains(f->s, "a"), 1);
}

static void test_alloc_fail_new(void **state)
{
    oq_idset_opts o;
    oq_idset_opts_defaults(&o);
    o.expected_ids = 1000;
    for (long n = 0; n < 70; n++) {
        oq_idset *s = (oq_idset *)(uintptr_t)1; /* must be reset to NULL */
        oq__alloc_fail_after(n);
        int rc = oq_idset_new(&s, &o);
        oq__alloc_fail_after(-1);
        if (rc == 0) {
            oq_idset_free(s);
            return; /* enough allocations to succeed */
        }
        assert_int_equal(rc, OQ_ENOMEM);
        assert_null(s);
    }
    fail_msg("oq_idset_new still failing after 70 allocations");
}

/* Failures at every point of a run that grows both tables: every call
 * reports success or OQ_ENOMEM, and what succeeded is all there after. */
static void test_alloc_fail_sweep(void **state)
{
    enum { N = 600 };
    for (long n = 0; n < 400; n += 7) {
        oq_idset *s;
        oq_idset_opts o;
        oq_idset_opts_defaults(&o);
        o.shard_bits = 0;
        assert_int_equal(oq_idset_new(&s, &o), 0);
        static unsigned char done_ok[N], claimed_ok[N];
        static uint64_t tokens[N];
        char id[32];
        oq__alloc_fail_after(n);
        for (int i = 0; i < N; i++) {
            oq_claim c;
            snprintf(id, sizeof(id), "c-%d", i);
            int rc = claim(s, id, INT64_MAX, &c);
            assert_true(rc == OQ_CLAIMED || rc == OQ_ENOMEM);
            claimed_ok[i] = rc == OQ_CLAIMED;
            tokens[i] = c.token;
            snprintf(id, sizeof(id), "d-%d", i);
            rc = insert_done(s, id);
            assert_true(rc == 0 || rc == OQ_ENOMEM);
            done_ok[i] = rc == 0;
        }
        oq__alloc_fail_after(-1);
        oq_idset_stats st;
        oq_idset_stats_get(s, &st);
        uint64_t nclaims = 0, ndone = 0;
        for (int i = 0; i < N; i++) {
            oq_claim c;
            snprintf(id, sizeof(id), "d-%d", i);
            assert_int_equal(contains(s, id), done_ok[i]);
            ndone += done_ok[i];
            snprintf(id, sizeof(id), "c-%d", i);
            if (claimed_ok[i]) {
                nclaims++;
                assert_int_equal(claim(s, id, INT64_MAX, &c), OQ_BUSY);
                assert_int_equal(c.token, tokens[i]);
            } else {
                assert_int_equal(claim(s, id, INT64_MAX, &c), OQ_CLAIMED);
            }
        }
        assert_int_equal(st.claims, nclaims);
        assert_int_equal(st.done, ndone);
        oq_idset_free(s);
    }
}

/* --------------------------------------------------------------- races */

/*
 * Four workers claim overlapping ids (each walks all ids from its own
 * offset) until every id is DONE. Invariant: each id's effect is counted
 * exactly once in total, never twice and never zero times.
 */
enum { MT_IDS = 20000, MT_THREADS = 4 };

typedef struct mt_ctx {
    oq_idset *s;
    oq_testclock *tc;
    int64_t lease_ms;          /* lease length */
    atomic_int commits[MT_IDS];
    atomic_int stale;          /* commits refused */
    atomic_bool stop;
    bool tick;                 /* a ticker thread moves the clock */
} mt_ctx;

typedef struct mt_arg {
    mt_ctx *ctx;
    int worker;
} mt_arg;

static void *mt_worker(void *p)
{
    mt_arg *a = p;
    mt_ctx *ctx = a->ctx;
    const oq_clock *clk = oq_testclock_clock(ctx->tc);
    char id[32];
    int pending = MT_IDS;
    /* Sweep until a whole pass sees every id DONE. */
    for (int pass = 0; pending > 0; pass++) {
        pending = 0;
        for (int k = 0; k < MT_IDS; k++) {
            int i = (k + a->worker * (MT_IDS / MT_THREADS)) % MT_IDS;
            size_t len = (size_t)snprintf(id, sizeof(id), "mt-%d", i);
            oq_claim c;
            int64_t now = oq_clock_now(clk);
            int rc = oq_idset_claim(ctx->s, id, len, now + ctx->lease_ms, &c);
            if (rc == OQ_DONE)
                continue;
            pending++;
            if (rc != OQ_CLAIMED)
                continue;
            if ((i + a->worker) % 5 == 0) {
                /* A slow handler; in the first pass, with a moving clock,
                 * one that overruns its lease for sure. */
                if (ctx->tick && pass == 0)
                    oq_testclock_advance(ctx->tc, ctx->lease_ms);
                sched_yield();
            }
            rc = oq_idset_commit(ctx->s, id, len, c.token);
            if (rc == 0) {
                atomic_fetch_add(&ctx->commits[i], 1);
            } else {
                atomic_fetch_add(&ctx->stale, 1);
                oq_idset_release(ctx->s, id, len, c.token);
            }
        }
    }
    return NULL;
}

static void *mt_ticker(void *p)
{
    mt_ctx *ctx = p;
    while (!atomic_load(&ctx->stop)) {
        oq_testclock_advance(ctx->tc, 1);
        sched_yield();
    }
    return NULL;
}

static void run_mt(int64_t lease_ms, bool tick)
{
    mt_ctx *ctx = calloc(1, sizeof(*ctx));
    assert_non_null(ctx);
    ctx->tc = oq_testclock_new(T0);
    assert_non_null(ctx->tc);
    ctx->lease_ms = lease_ms;
    ctx->tick = tick;
    oq_idset_opts o;
    oq_idset_opts_defaults(&o);
    o.shard_bits = 2; /* few shards: more contention */
    o.clock = oq_testclock_clock(ctx->tc);
    assert_int_equal(oq_idset_new(&ctx->s, &o), 0);

    pthread_t th[MT_THREADS], ticker;
    mt_arg args[MT_THREADS];
    if (tick)
        assert_int_equal(pthread_create(&ticker, NULL, mt_ticker, ctx), 0);
    for (int w = 0; w < MT_THREADS; w++) {
        args[w] = (mt_arg){ ctx, w };
        assert_int_equal(pthread_create(&th[w], NULL, mt_worker, &args[w]), 0);
    }
    for (int w = 0; w < MT_THREADS; w++)
        pthread_join(th[w], NULL);
    atomic_store(&ctx->stop, true);
    if (tick)
        pthread_join(ticker, NULL);

    for (int i = 0; i < MT_IDS; i++) {
        int n = atomic_load(&ctx->commits[i]);
        if (n != 1)
            fail_msg("id mt-%d committed %d times", i, n);
    }
    oq_idset_stats st;
    oq_idset_stats_get(ctx->s, &st);
    assert_int_equal(st.done, MT_IDS);
    assert_int_equal(st.claims, 0);
    if (tick)
        assert_true(atomic_load(&ctx->stale) > 0);
    print_message("    lease %lld ms: %llu takeovers, %d commits refused\n",
                  (long long)lease_ms, (unsigned long long)st.takeovers,
                  atomic_load(&ctx->stale));
    oq_idset_free(ctx->s);
    oq_testclock_free(ctx->tc);
    free(ctx);
}

static void test_mt_each_id_committed_once(void **state)
{
    run_mt(INT64_C(1) << 40, false);
}

/* Same, with a clock that keeps moving, 2 ms leases, and handlers that
 * overrun them, so commits are refused and leases are taken over. */
static void test_mt_takeovers_each_id_committed_once(void **state)
{
    run_mt(2, true);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_claim_commit_makes_done, setup, teardown),
        cmocka_unit_test_setup_teardown(test_busy_while_lease_live_returns_holder, setup, teardown),
        cmocka_unit_test_setup_teardown(test_takeover_after_expiry_fences_old_token, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_after_own_lease_expired_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_just_before_deadline_accepted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_wrong_token_changes_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_then_reclaim, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_unknown_id_is_stale, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tokens_strictly_increase, setup, teardown),
        cmocka_unit_test_setup_teardown(test_insert_done_and_contains, setup, teardown),
        cmocka_unit_test_setup_teardown(test_insert_done_fences_live_claim, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ids_differing_in_one_byte, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ids_with_nul_bytes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_ids, setup, teardown),
        cmocka_unit_test_setup_teardown(test_empty_id_and_bad_args, setup, teardown),
        cmocka_unit_test_setup_teardown(test_growth_200k_all_contained, setup, teardown),
        cmocka_unit_test(test_presized_set_does_not_grow),
        cmocka_unit_test_setup_teardown(test_retention_remembered_until_r_minus_1, setup_retention, teardown),
        cmocka_unit_test_setup_teardown(test_retention_forgotten_by_2r, setup_retention, teardown),
        cmocka_unit_test_setup_teardown(test_retention_mid_generation_bounds, setup_retention, teardown),
        cmocka_unit_test_setup_teardown(test_retention_idle_shard_forgets_everything, setup_retention, teardown),
        cmocka_unit_test_setup_teardown(test_retention_forgotten_id_can_be_claimed, setup_retention, teardown),
        cmocka_unit_test_setup_teardown(test_no_retention_remembers_forever, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stats_counts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_claim_table_matches_model, setup_one_shard, teardown),
        cmocka_unit_test_setup_teardown(test_alloc_fail_claim, setup, teardown),
        cmocka_unit_test_setup_teardown(test_alloc_fail_insert_done, setup, teardown),
        cmocka_unit_test_setup_teardown(test_alloc_fail_commit_keeps_claim, setup_one_shard, teardown),
        cmocka_unit_test(test_alloc_fail_new),
        cmocka_unit_test(test_alloc_fail_sweep),
        cmocka_unit_test(test_mt_each_id_committed_once),
        cmocka_unit_test(test_mt_takeovers_each_id_committed_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
