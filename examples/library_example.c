/*
 * Using libonceq from a program: a queue, a processed set and a pool of two
 * workers count the words of a few events, exactly once although two of
 * the events are delivered twice. Build against an installed onceq:
 *
 *   cc -o library_example library_example.c $(pkg-config --cflags --libs onceq)
 */
#include <onceq.h>

#include <stdio.h>
#include <string.h>

/* The handler stages one counter per word; the pool applies it only if the
 * event's fenced commit succeeds. */
static int count_words(const oq_event *ev, oq_txn *txn, void *arg)
{
    const char *p = ev->payload, *end = p + ev->payload_len;
    (void)arg;
    while (p < end) {
        const char *w = p;
        while (w < end && *w == ' ')
            w++;
        p = w;
        while (p < end && *p != ' ')
            p++;
        if (p > w && oq_txn_count(txn, w, (size_t)(p - w), 1) != 0)
            return OQ_RETRY;
    }
    return OQ_OK;
}

static void print_count(const char *key, size_t len, int64_t n, void *arg)
{
    (void)arg;
    printf("%.*s %lld\n", (int)len, key, (long long)n);
}

int main(void)
{
    static const char *events[][2] = {
        { "e1", "exactly once" }, { "e2", "at least once" },
        { "e1", "exactly once" }, /* a redelivery: no effect */
        { "e3", "once more" },    { "e2", "at least once" },
    };
    oq_queue_opts qo;
    oq_queue *q;
    oq_idset *s;
    oq_memsink *m;
    oq_pool *p;
    oq_pool_opts po;
    oq_pool_stats st;
    int rc;

    oq_queue_opts_defaults(&qo);
    qo.dedup_count = 0; /* let duplicates reach the processed set */
    if ((rc = oq_queue_new(&q, &qo)) != 0 || (rc = oq_idset_new(&s, NULL)) != 0 ||
        (rc = oq_memsink_new(&m)) != 0) {
        fprintf(stderr, "onceq: %s\n", oq_strerror(rc));
        return 1;
    }
    oq_pool_opts_defaults(&po);
    po.workers = 2;
    po.handler = count_words;
    po.sink = oq_memsink_sink(m);
    if ((rc = oq_pool_start(&p, q, s, &po)) != 0) {
        fprintf(stderr, "onceq: %s\n", oq_strerror(rc));
        return 1;
    }
    for (size_t i = 0; i < sizeof(events) / sizeof(events[0]); i++)
        oq_queue_send(q, events[i][0], strlen(events[i][0]), events[i][1],
                      strlen(events[i][1]), 0);
    oq_queue_close(q);
    oq_pool_wait(p);
    oq_memsink_foreach_count(m, print_count, NULL);
    oq_pool_stats_get(p, &st);
    printf("onceq %s: %llu processed, %llu duplicates\n", oq_version(),
           (unsigned long long)st.processed,
           (unsigned long long)st.duplicates);
    oq_pool_free(p);
    oq_queue_free(q);
    oq_idset_free(s);
    oq_memsink_free(m);
    return 0;
}
