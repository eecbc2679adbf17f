/* Description: the visibility-timeout queue follows its SQS/beanstalkd rules:
 * redelivery after the timeout, stale receipts refused and harmless,
 * max_receives and TTL to the dead-letter list with their reasons, delay
 * ordering, the producer dedup window by count and by age, close/drain, and
 * batch operations. Time comes from a test clock: no test sleeps, except
 * the one that checks a blocked receiver is woken by a send. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "oq_cli.h"

#define T0 1000000

typedef struct fx {
    oq_testclock *tc;
    oq_queue *q;
} fx;

static oq_queue *make_queue(fx *f, void (*tweak)(oq_queue_opts *))
{
    oq_queue_opts o;
    oq_queue_opts_defaults(&o);
    o.visibility_timeout_ms = 1000;
    o.clock = oq_testclock_clock(f->tc);
    if (tweak)
        tweak(&o);
    assert_int_equal(oq_queue_new(&f->q, &o), 0);
    return f->q;
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    f->tc = oq_testclock_new(T0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    oq_queue_free(f->q);
    oq_testclock_free(f->tc);
    free(f);
    return 0;
}

static int send_s(oq_queue *q, const char *id, int64_t delay)
{
    return oq_queue_send(q, id, strlen(id), id, strlen(id), delay);
}

static int recv1(oq_queue *q, oq_delivery *d)
{
    return oq_queue_receive(q, d, 1, 0);
}

static void test_send_receive_ack(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;
    oq_queue_stats st;

    assert_int_equal(oq_queue_send(q, "a", 1, "payload", 7, 0), 0);
    assert_int_equal(recv1(q, &d), 1);
    assert_int_equal(d.id_len, 1);
    assert_memory_equal(d.id, "a", 1);
    assert_int_equal(d.payload_len, 7);
    assert_memory_equal(d.payload, "payload", 7);
    assert_int_not_equal(d.receipt, 0);
    assert_int_equal(d.receive_count, 1);
    assert_int_equal(d.first_receive_ms, T0);
    assert_int_equal(d.deadline_ms, T0 + 1000);
    assert_int_equal(recv1(q, &d), 0); /* invisible now */
    assert_int_equal(oq_queue_ack(q, d.receipt), 0);
    oq_queue_release(q, &d, 1);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.sent, 1);
    assert_int_equal(st.received, 1);
    assert_int_equal(st.acked, 1);
    assert_int_equal(st.in_flight, 0);
    assert_int_equal(st.ready, 0);
}

static void test_fifo_order_and_batch(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d[8];
    char id[16];

    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof(id), "m%d", i);
        assert_int_equal(send_s(q, id, 0), 0);
    }
    assert_int_equal(oq_queue_receive(q, d, 3, 0), 3);
    assert_int_equal(oq_queue_receive(q, d + 3, 8, 0), 2);
    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof(id), "m%d", i);
        assert_memory_equal(d[i].id, id, strlen(id));
        for (int j = 0; j < i; j++)
            assert_int_not_equal(d[i].receipt, d[j].receipt);
    }
    oq_queue_release(q, d, 5);
}

static void test_redelivery_after_visibility_timeout(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d1, d2;
    oq_queue_stats st;

    send_s(q, "a", 0);
    assert_int_equal(recv1(q, &d1), 1);
    oq_testclock_advance(f->tc, 999);
    assert_int_equal(recv1(q, &d2), 0);
    oq_testclock_advance(f->tc, 1);
    assert_int_equal(recv1(q, &d2), 1);
    assert_int_equal(d2.receive_count, 2);
    assert_int_not_equal(d2.receipt, d1.receipt);
    assert_int_equal(d2.first_receive_ms, T0); /* unchanged */
    assert_int_equal(d2.deadline_ms, T0 + 2000);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.redelivered, 1);
    assert_int_equal(st.received, 2);
    oq_queue_release(q, &d1, 1);
    oq_queue_release(q, &d2, 1);
}

static void test_stale_receipt_refused(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d1, d2;
    oq_queue_stats st;

    send_s(q, "a", 0);
    recv1(q, &d1);
    oq_testclock_advance(f->tc, 1000);
    assert_int_equal(recv1(q, &d2), 1);
    /* The first receipt is stale on every operation and changes nothing. */
    assert_int_equal(oq_queue_ack(q, d1.receipt), OQ_ESTALE);
    assert_int_equal(oq_queue_nack(q, d1.receipt, 0), OQ_ESTALE);
    assert_int_equal(oq_queue_extend(q, d1.receipt, 5000), OQ_ESTALE);
    assert_int_equal(oq_queue_dead_letter(q, d1.receipt, OQ_DLQ_FAILED, "x"),
                     OQ_ESTALE);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.acked, 0);
    assert_int_equal(st.nacked, 0);
    assert_int_equal(st.in_flight, 1);
    assert_int_equal(st.dead_lettered[OQ_DLQ_FAILED], 0);
    /* The new holder's deadline was not extended by the stale extend. */
    oq_testclock_advance(f->tc, 1000);
    oq_queue_release(q, &d2, 1);
    assert_int_equal(recv1(q, &d2), 1);
    assert_int_equal(d2.receive_count, 3);
    /* A receipt already acked is stale too. */
    assert_int_equal(oq_queue_ack(q, d2.receipt), 0);
    assert_int_equal(oq_queue_ack(q, d2.receipt), OQ_ESTALE);
    assert_int_equal(oq_queue_ack(q, 0), OQ_ESTALE);
    assert_int_equal(oq_queue_ack(q, 987654), OQ_ESTALE);
    oq_queue_release(q, &d1, 1);
    oq_queue_release(q, &d2, 1);
}

/* Up to a few thousand messages in flight at once, received and settled
 * by receipt number in a random order, so the receipts in flight are a
 * scattered set (the receipt table grows, collides, and deletes from the
 * middle of its probe runs): every current receipt works once, every
 * settled one is stale, and nothing is lost. Seeded; ONCEQ_TEST_SEED
 * repeats a run. */
static void test_many_receipts_in_random_order(void **state)
{
    enum { N = 4000, STEPS = 60000 };
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    static oq_delivery fl[N]; /* in flight, unordered */
    const char *env = getenv("ONCEQ_TEST_SEED");
    unsigned seed = env ? (unsigned)strtoul(env, NULL, 10) : (unsigned)time(NULL);
    size_t nfl = 0, acked = 0, most = 0;
    oq_queue_stats st;

    printf("receipts: seed %u\n", seed);
    srand(seed);
    for (int i = 0; i < N; i++) {
        char id[16];
        snprintf(id, sizeof(id), "m%d", i);
        assert_int_equal(send_s(q, id, 0), 0);
    }
    for (int step = 0; step < STEPS && acked < N; step++) {
        if (rand() % 2 == 0) {
            int n = oq_queue_receive(q, fl + nfl, 1 + (size_t)(rand() % 32), 0);
            assert_true(n >= 0);
            nfl += (size_t)n;
        } else if (nfl > 0) {
            size_t i = (size_t)rand() % nfl;
            oq_delivery d = fl[i];
            fl[i] = fl[--nfl];
            if (rand() % 3 == 0) {
                assert_int_equal(oq_queue_ack(q, d.receipt), 0);
                acked++;
            } else {
                assert_int_equal(oq_queue_nack(q, d.receipt, 0), 0);
            }
            assert_int_equal(oq_queue_ack(q, d.receipt), OQ_ESTALE);
            oq_queue_release(q, &d, 1);
            /* Another one still in flight is still found. */
            if (nfl > 0)
                assert_int_equal(oq_queue_extend(q, fl[(size_t)rand() % nfl].receipt,
                                                 1000), 0);
        }
        most = nfl > most ? nfl : most;
    }
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.in_flight, nfl);
    assert_int_equal(st.acked, acked);
    assert_int_equal(st.ready + st.in_flight + st.acked, N);
    assert_true(most > 500);
    for (size_t i = 0; i < nfl; i++)
        assert_int_equal(oq_queue_ack(q, fl[i].receipt), 0);
    oq_queue_release(q, fl, nfl);
}

static void test_stale_settle_through_delivery(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d1, d2;
    oq_settle op = { 0 };

    send_s(q, "a", 0);
    recv1(q, &d1);
    oq_testclock_advance(f->tc, 1000);
    recv1(q, &d2);
    op.d = &d1;
    op.op = OQ_SETTLE_ACK;
    op.release = 1;
    assert_int_equal(oq_queue_settle(q, &op, 1), 0);
    assert_int_equal(op.result, OQ_ESTALE);
    assert_null(d1.msg_); /* released all the same */
    op = (oq_settle){ .d = &d2, .op = OQ_SETTLE_ACK, .release = 1 };
    assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    assert_int_equal(op.result, 0);
}

static void test_payload_outlives_ack_by_other(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d1, d2;

    send_s(q, "keep-me", 0);
    recv1(q, &d1);
    oq_testclock_advance(f->tc, 1000);
    recv1(q, &d2);
    assert_int_equal(oq_queue_ack(q, d2.receipt), 0);
    oq_queue_release(q, &d2, 1);
    /* d1 still holds a reference: ASan would flag a use after free. */
    assert_memory_equal(d1.payload, "keep-me", 7);
    assert_memory_equal(d1.id, "keep-me", 7);
    oq_queue_release(q, &d1, 1);
}

static void test_nack_with_delay(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;
    oq_queue_stats st;

    send_s(q, "a", 0);
    recv1(q, &d);
    assert_int_equal(oq_queue_nack(q, d.receipt, 250), 0);
    oq_queue_release(q, &d, 1);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.delayed, 1);
    assert_int_equal(st.nacked, 1);
    oq_testclock_advance(f->tc, 249);
    assert_int_equal(recv1(q, &d), 0);
    oq_testclock_advance(f->tc, 1);
    assert_int_equal(recv1(q, &d), 1);
    assert_int_equal(d.receive_count, 2);
    oq_queue_release(q, &d, 1);
}

static void test_nack_zero_is_visible_at_once(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;

    send_s(q, "a", 0);
    recv1(q, &d);
    assert_int_equal(oq_queue_nack(q, d.receipt, 0), 0);
    oq_queue_release(q, &d, 1);
    assert_int_equal(recv1(q, &d), 1);
    oq_queue_release(q, &d, 1);
}

static void test_extend_is_a_heartbeat(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d, d2;

    send_s(q, "a", 0);
    recv1(q, &d);
    oq_testclock_advance(f->tc, 900);
    assert_int_equal(oq_queue_extend(q, d.receipt, 1000), 0);
    oq_testclock_advance(f->tc, 500); /* past the original deadline */
    assert_int_equal(recv1(q, &d2), 0);
    assert_int_equal(oq_queue_ack(q, d.receipt), 0);
    oq_queue_release(q, &d, 1);
}

static void vt_max3(oq_queue_opts *o)
{
    o->max_receives = 3;
}

typedef struct dl_seen {
    int n;
    char id[32];
    oq_dlq_reason reason;
    uint32_t attempts;
    char error[128];
    char payload[32];
} dl_seen;

static void collect(const oq_dead_letter *dl, void *arg)
{
    dl_seen *s = arg;
    s->n++;
    snprintf(s->id, sizeof(s->id), "%.*s", (int)dl->id_len, dl->id);
    snprintf(s->payload, sizeof(s->payload), "%.*s", (int)dl->payload_len,
             (const char *)dl->payload);
    s->reason = dl->reason;
    s->attempts = dl->attempts;
    snprintf(s->error, sizeof(s->error), "%s", dl->error);
}

static void test_max_receives_dead_letters(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, vt_max3);
    oq_delivery d;
    oq_queue_stats st;
    dl_seen seen = { 0 };

    send_s(q, "poison", 0);
    for (int i = 1; i <= 3; i++) {
        assert_int_equal(recv1(q, &d), 1);
        assert_int_equal(d.receive_count, i);
        oq_queue_release(q, &d, 1);
        oq_testclock_advance(f->tc, 1000);
    }
    /* The 4th delivery does not happen: it goes to the dead letters. */
    assert_int_equal(recv1(q, &d), 0);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.dead_lettered[OQ_DLQ_MAX_ATTEMPTS], 1);
    assert_int_equal(st.ready + st.delayed + st.in_flight, 0);
    assert_int_equal(oq_queue_dead_letters(q, 0, collect, &seen), 1);
    assert_string_equal(seen.id, "poison");
    assert_string_equal(seen.payload, "poison");
    assert_int_equal(seen.reason, OQ_DLQ_MAX_ATTEMPTS);
    assert_int_equal(seen.attempts, 3);
    assert_true(strlen(seen.error) > 0);
    /* take empties the list */
    memset(&seen, 0, sizeof(seen));
    assert_int_equal(oq_queue_dead_letters(q, 1, collect, &seen), 1);
    assert_int_equal(oq_queue_dead_letters(q, 0, collect, &seen), 0);
}

static void ttl_500(oq_queue_opts *o)
{
    o->ttl_ms = 500;
}

static void test_ttl_expiry(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, ttl_500);
    oq_delivery d;
    oq_queue_stats st;
    dl_seen seen = { 0 };

    send_s(q, "young", 0);
    send_s(q, "old", 0);
    assert_int_equal(recv1(q, &d), 1); /* young delivered at age 0 */
    assert_int_equal(oq_queue_ack(q, d.receipt), 0);
    oq_queue_release(q, &d, 1);
    oq_testclock_advance(f->tc, 500);
    assert_int_equal(recv1(q, &d), 0); /* old is 500 ms old: expired */
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.dead_lettered[OQ_DLQ_EXPIRED], 1);
    oq_queue_dead_letters(q, 0, collect, &seen);
    assert_string_equal(seen.id, "old");
    assert_int_equal(seen.reason, OQ_DLQ_EXPIRED);
    assert_int_equal(seen.attempts, 0);
}

static void test_delay_ordering(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;
    oq_queue_stats st;

    send_s(q, "c", 30);
    send_s(q, "a", 10);
    send_s(q, "b", 20);
    send_s(q, "now", 0);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.delayed, 3);
    assert_int_equal(st.ready, 1);
    assert_int_equal(recv1(q, &d), 1);
    assert_memory_equal(d.id, "now", 3);
    oq_queue_release(q, &d, 1);
    assert_int_equal(recv1(q, &d), 0);
    const char *want[] = { "a", "b", "c" };
    for (int i = 0; i < 3; i++) {
        oq_testclock_advance(f->tc, 9);
        assert_int_equal(recv1(q, &d), 0);
        oq_testclock_advance(f->tc, 1);
        assert_int_equal(recv1(q, &d), 1);
        assert_memory_equal(d.id, want[i], 1);
        oq_queue_release(q, &d, 1);
    }
}

static void dedup3(oq_queue_opts *o)
{
    o->dedup_count = 3;
}

static void test_dedup_window_by_count(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, dedup3);
    oq_queue_stats st;

    assert_int_equal(send_s(q, "a", 0), 0);
    assert_int_equal(send_s(q, "b", 0), 0);
    assert_int_equal(send_s(q, "c", 0), 0);
    assert_int_equal(send_s(q, "a", 0), OQ_EEXIST);
    assert_int_equal(send_s(q, "d", 0), 0); /* evicts a */
    assert_int_equal(send_s(q, "a", 0), 0); /* evicts b */
    assert_int_equal(send_s(q, "c", 0), OQ_EEXIST);
    assert_int_equal(send_s(q, "b", 0), 0);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.sent, 6);
    assert_int_equal(st.duplicates_rejected, 2);
}

static void dedup_age(oq_queue_opts *o)
{
    o->dedup_age_ms = 100;
}

static void test_dedup_window_by_age(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, dedup_age);

    assert_int_equal(send_s(q, "a", 0), 0);
    oq_testclock_advance(f->tc, 99);
    assert_int_equal(send_s(q, "a", 0), OQ_EEXIST);
    oq_testclock_advance(f->tc, 1);
    assert_int_equal(send_s(q, "a", 0), 0);
}

static void test_dedup_remembers_deleted_ids(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;

    send_s(q, "a", 0);
    recv1(q, &d);
    oq_queue_ack(q, d.receipt);
    oq_queue_release(q, &d, 1);
    assert_int_equal(send_s(q, "a", 0), OQ_EEXIST);
    /* No id: never deduplicated. */
    assert_int_equal(oq_queue_send(q, NULL, 0, "x", 1, 0), 0);
    assert_int_equal(oq_queue_send(q, NULL, 0, "x", 1, 0), 0);
}

static void test_close_and_drain(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d, d2;

    send_s(q, "a", 0);
    oq_queue_close(q);
    assert_int_equal(send_s(q, "b", 0), OQ_ECLOSED);
    assert_int_equal(recv1(q, &d), 1);
    /* In flight: not drained yet, so no EOF. */
    assert_int_equal(recv1(q, &d2), 0);
    assert_int_equal(oq_queue_nack(q, d.receipt, 100), 0);
    oq_queue_release(q, &d, 1);
    assert_int_equal(recv1(q, &d), 0); /* delayed: still not drained */
    oq_testclock_advance(f->tc, 100);
    assert_int_equal(recv1(q, &d), 1);
    oq_queue_ack(q, d.receipt);
    oq_queue_release(q, &d, 1);
    assert_int_equal(recv1(q, &d), OQ_EOF);
    assert_int_equal(oq_queue_receive(q, &d, 1, 1000), OQ_EOF);
}

static void test_pin_and_return(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d, d2;
    oq_settle op = { 0 };
    oq_queue_stats st;

    send_s(q, "a", 0);
    recv1(q, &d);
    op.d = &d;
    op.op = OQ_SETTLE_PIN;
    assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    oq_testclock_advance(f->tc, 5000); /* far past the deadline */
    assert_int_equal(recv1(q, &d2), 0); /* pinned: not redelivered */
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.in_flight, 1);
    assert_int_equal(st.redelivered, 0);
    op.op = OQ_SETTLE_RETURN;
    op.release = 1;
    assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    assert_int_equal(recv1(q, &d2), 1);
    assert_int_equal(d2.receive_count, 1); /* a return is not an attempt */
    oq_queue_release(q, &d2, 1);
}

static void test_explicit_dead_letter(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;
    dl_seen seen = { 0 };

    send_s(q, "bad", 0);
    recv1(q, &d);
    assert_int_equal(oq_queue_dead_letter(q, d.receipt, OQ_DLQ_FAILED,
                                          "handler said no"), 0);
    assert_int_equal(oq_queue_ack(q, d.receipt), OQ_ESTALE);
    oq_queue_release(q, &d, 1);
    oq_queue_dead_letters(q, 0, collect, &seen);
    assert_int_equal(seen.n, 1);
    assert_int_equal(seen.reason, OQ_DLQ_FAILED);
    assert_string_equal(seen.error, "handler said no");
    assert_int_equal(seen.attempts, 1);
    assert_int_equal(oq_queue_dead_letter(q, 1, (oq_dlq_reason)99, "x"),
                     OQ_EINVAL);
}

static void test_reject_goes_straight_to_dead_letters(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_message m = { NULL, 0, "{not json", 9, 0, 42 };
    oq_delivery d;
    oq_queue_stats st;
    dl_seen seen = { 0 };

    assert_int_equal(oq_queue_reject(q, &m, OQ_DLQ_PARSE_ERROR, "bad"), 0);
    assert_int_equal(recv1(q, &d), 0); /* never delivered */
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.sent, 1);
    assert_int_equal(st.dead_lettered[OQ_DLQ_PARSE_ERROR], 1);
    oq_queue_dead_letters(q, 0, collect, &seen);
    assert_string_equal(seen.payload, "{not json");
    assert_string_equal(seen.error, "bad");
    assert_int_equal(seen.attempts, 0);
    assert_int_equal(oq_queue_reject(q, &m, OQ_DLQ__COUNT, "x"), OQ_EINVAL);
    oq__alloc_fail_after(0);
    assert_int_equal(oq_queue_reject(q, &m, OQ_DLQ_BAD_ID, "x"), OQ_ENOMEM);
    oq__alloc_fail_after(-1);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.sent, 1);
    assert_int_equal(st.dead_lettered[OQ_DLQ_BAD_ID], 0);
    oq_queue_close(q);
    assert_int_equal(recv1(q, &d), OQ_EOF);
}

static void test_dead_letter_out_of_memory_keeps_message(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;
    oq_queue_stats st;

    send_s(q, "a", 0);
    recv1(q, &d);
    oq__alloc_fail_after(0);
    assert_int_equal(oq_queue_dead_letter(q, d.receipt, OQ_DLQ_FAILED, "x"),
                     OQ_ENOMEM);
    oq__alloc_fail_after(-1);
    /* Nothing moved: still in flight under the same receipt, so the
     * caller can try again. */
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.in_flight, 1);
    assert_int_equal(st.dead_lettered[OQ_DLQ_FAILED], 0);
    assert_int_equal(oq_queue_dead_letter(q, d.receipt, OQ_DLQ_FAILED, "x"), 0);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.in_flight, 0);
    assert_int_equal(st.dead_lettered[OQ_DLQ_FAILED], 1);
    oq_queue_release(q, &d, 1);
}

static void test_max_receives_reports_last_error(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, vt_max3);
    oq_delivery d;
    oq_settle op = { 0 };
    dl_seen seen = { 0 };

    send_s(q, "flaky", 0);
    for (int i = 0; i < 3; i++) {
        char err[32];
        assert_int_equal(recv1(q, &d), 1);
        snprintf(err, sizeof(err), "busy %d", i + 1);
        op = (oq_settle){ .d = &d, .op = OQ_SETTLE_NACK, .release = 1,
                          .error = err };
        assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    }
    assert_int_equal(recv1(q, &d), 0);
    oq_queue_dead_letters(q, 0, collect, &seen);
    assert_int_equal(seen.reason, OQ_DLQ_MAX_ATTEMPTS);
    assert_non_null(strstr(seen.error, "last error: busy 3"));
}

static void dying_max2(oq_queue_opts *o)
{
    o->max_receives = 2;
    o->ttl_ms = 5000;
    o->deliver_dying = 1;
}

/* With deliver_dying, a message due for the dead letters is delivered once
 * more, marked, for the consumer to settle against its processed set; it
 * does not count as a receive, and a RETURN does not uncount one. */
static void test_deliver_dying(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, dying_max2);
    oq_delivery d;
    oq_settle op;
    oq_queue_stats st;

    send_s(q, "m", 0);
    for (int i = 1; i <= 2; i++) {
        assert_int_equal(recv1(q, &d), 1);
        assert_false(d.dying);
        assert_int_equal(d.receive_count, i);
        op = (oq_settle){ .d = &d, .op = OQ_SETTLE_NACK, .release = 1,
                          .error = "boom" };
        assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    }
    for (int i = 0; i < 2; i++) {
        assert_int_equal(recv1(q, &d), 1);
        assert_true(d.dying);
        assert_int_equal(d.dying_reason, OQ_DLQ_MAX_ATTEMPTS);
        assert_int_equal(d.receive_count, 2);
        assert_string_equal(d.last_error, "boom");
        /* Returned (its id was busy elsewhere): still dying next time. */
        op = (oq_settle){ .d = &d, .op = OQ_SETTLE_RETURN, .release = 1 };
        assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    }
    assert_int_equal(recv1(q, &d), 1);
    assert_true(d.dying);
    op = (oq_settle){ .d = &d, .op = OQ_SETTLE_ACK, .release = 1 };
    assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.dead_lettered[OQ_DLQ_MAX_ATTEMPTS], 0);
    assert_int_equal(st.acked, 1);

    /* Past the TTL: dying with reason EXPIRED. */
    send_s(q, "t", 0);
    oq_testclock_advance(f->tc, 5000);
    assert_int_equal(recv1(q, &d), 1);
    assert_true(d.dying);
    assert_int_equal(d.dying_reason, OQ_DLQ_EXPIRED);
    assert_int_equal(d.receive_count, 0);
    op = (oq_settle){ .d = &d, .op = OQ_SETTLE_DEAD, .release = 1,
                      .reason = OQ_DLQ_EXPIRED, .error = "old" };
    assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.dead_lettered[OQ_DLQ_EXPIRED], 1);
}

/* Times saturate: a delay, timeout or extension near INT64_MAX means
 * "never", not "at once" (now + ms used to overflow). */
static void big_vt(oq_queue_opts *o)
{
    o->visibility_timeout_ms = INT64_MAX;
}

static void test_huge_times_saturate(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, big_vt);
    oq_delivery d;
    oq_settle op;

    send_s(q, "late", INT64_MAX);
    send_s(q, "late2", INT64_MAX - 1);
    oq_testclock_advance(f->tc, 1000000);
    assert_int_equal(recv1(q, &d), 0);
    send_s(q, "now", 0);
    assert_int_equal(recv1(q, &d), 1);
    assert_true(d.deadline_ms == INT64_MAX);
    oq_testclock_advance(f->tc, 1000000);
    op = (oq_settle){ .d = &d, .op = OQ_SETTLE_EXTEND, .delay_ms = INT64_MAX };
    assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    op = (oq_settle){ .d = &d, .op = OQ_SETTLE_NACK, .release = 1,
                      .delay_ms = INT64_MAX };
    assert_int_equal(oq_queue_settle(q, &op, 1), 1);
    oq_testclock_advance(f->tc, 1000000);
    assert_int_equal(recv1(q, &d), 0);
}

static void test_stats_gauges_and_oldest_age(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;
    oq_queue_stats st;

    send_s(q, "a", 0);
    oq_testclock_advance(f->tc, 40);
    send_s(q, "b", 0);
    send_s(q, "c", 500);
    oq_testclock_advance(f->tc, 10);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.ready, 2);
    assert_int_equal(st.delayed, 1);
    assert_int_equal(st.oldest_ready_age_ms, 50);
    recv1(q, &d);
    oq_queue_stats_get(q, &st);
    assert_int_equal(st.in_flight, 1);
    assert_int_equal(st.oldest_ready_age_ms, 10);
    oq_queue_release(q, &d, 1);
}

static void test_send_batch_results(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_message m[3] = {
        { "x", 1, "1", 1, 0, 7 },
        { "x", 1, "2", 1, 0, 8 },
        { "y", 1, "3", 1, 0, 9 },
    };
    int res[3];
    oq_delivery d[3];

    assert_int_equal(oq_queue_send_batch(q, m, 3, res), 2);
    assert_int_equal(res[0], 0);
    assert_int_equal(res[1], OQ_EEXIST);
    assert_int_equal(res[2], 0);
    assert_int_equal(oq_queue_receive(q, d, 3, 0), 2);
    assert_int_equal(d[0].tag, 7);
    assert_int_equal(d[1].tag, 9);
    oq_queue_release(q, d, 2);
}

static void test_send_out_of_memory(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;

    oq__alloc_fail_after(0);
    assert_int_equal(send_s(q, "a", 0), OQ_ENOMEM);
    oq__alloc_fail_after(-1);
    /* Nothing half-done: the id was not remembered, the queue works. */
    assert_int_equal(send_s(q, "a", 0), 0);
    assert_int_equal(recv1(q, &d), 1);
    oq_queue_release(q, &d, 1);
}

static void test_bad_options(void **state)
{
    fx *f = *state;
    oq_queue_opts o;
    oq_queue *q = NULL;

    oq_queue_opts_defaults(&o);
    assert_int_equal(o.visibility_timeout_ms, 30000);
    assert_int_equal(o.dedup_count, 10000);
    o.visibility_timeout_ms = 0;
    assert_int_equal(oq_queue_new(&q, &o), OQ_EINVAL);
    assert_null(q);
    (void)f;
}

/* The one test on real time: a receiver blocked in a long poll is woken by
 * a send from another thread long before its wait ends. */
static void *late_sender(void *arg)
{
    struct timespec ts = { 0, 20 * 1000 * 1000 };
    nanosleep(&ts, NULL);
    send_s(arg, "late", 0);
    return NULL;
}

static void test_long_poll_woken_by_send(void **state)
{
    oq_queue *q;
    oq_delivery d;
    pthread_t t;
    int64_t t0;
    (void)state;

    assert_int_equal(oq_queue_new(&q, NULL), 0);
    pthread_create(&t, NULL, late_sender, q);
    t0 = oq_clock_now(NULL);
    assert_int_equal(oq_queue_receive(q, &d, 1, 10000), 1);
    assert_true(oq_clock_now(NULL) - t0 < 5000);
    pthread_join(t, NULL);
    oq_queue_release(q, &d, 1);
    oq_queue_free(q);
}

/* A receiver blocked on a test clock that does not move returns when the
 * queue is woken (a pool that stops relies on it), not never. */
static void *late_waker(void *arg)
{
    struct timespec ts = { 0, 50 * 1000 * 1000 };
    nanosleep(&ts, NULL);
    oq_queue_wake(arg);
    return NULL;
}

static void test_wake_returns_a_blocked_receiver(void **state)
{
    fx *f = *state;
    oq_queue *q = make_queue(f, NULL);
    oq_delivery d;
    pthread_t t;
    int64_t t0 = oq_clock_now(NULL);

    pthread_create(&t, NULL, late_waker, q);
    /* 100 ms of a clock that never moves: only the wake can end it. */
    assert_int_equal(oq_queue_receive(q, &d, 1, 100), 0);
    assert_true(oq_clock_now(NULL) - t0 < 5000);
    pthread_join(t, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(test_send_receive_ack),
        T(test_fifo_order_and_batch),
        T(test_redelivery_after_visibility_timeout),
        T(test_stale_receipt_refused),
        T(test_many_receipts_in_random_order),
        T(test_stale_settle_through_delivery),
        T(test_payload_outlives_ack_by_other),
        T(test_nack_with_delay),
        T(test_nack_zero_is_visible_at_once),
        T(test_extend_is_a_heartbeat),
        T(test_max_receives_dead_letters),
        T(test_ttl_expiry),
        T(test_delay_ordering),
        T(test_dedup_window_by_count),
        T(test_dedup_window_by_age),
        T(test_dedup_remembers_deleted_ids),
        T(test_close_and_drain),
        T(test_pin_and_return),
        T(test_explicit_dead_letter),
        T(test_stats_gauges_and_oldest_age),
        T(test_reject_goes_straight_to_dead_letters),
        T(test_dead_letter_out_of_memory_keeps_message),
        T(test_max_receives_reports_last_error),
        T(test_deliver_dying),
        T(test_huge_times_saturate),
        T(test_send_batch_results),
        T(test_send_out_of_memory),
        T(test_bad_options),
        cmocka_unit_test(test_long_poll_woken_by_send),
        cmocka_unit_test_setup_teardown(test_wake_returns_a_blocked_receiver,
                                        setup, teardown),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
