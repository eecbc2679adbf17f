/*
 * bench_pool: events/s through receive -> claim -> noop handler -> commit
 * -> ack, for several worker counts and batch sizes, each as a ratio to the
 * ideal measured in the same run: a bare single-thread loop that only
 * claims and commits the same ids in a processed set, with no queue.
 *
 * Only the measured loop is timed: messages are sent before the clock
 * starts. Each figure is the median of --reps runs.
 *
 * usage: bench_pool [--events N] [--reps R] [--csv PATH]
 */
#include "onceq.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static size_t nevents = 500000;
static int reps = 3;

static char **ids;
static size_t *lens;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int noop(const oq_event *ev, oq_txn *txn, void *arg)
{
    (void)ev;
    (void)txn;
    (void)arg;
    return OQ_OK;
}

static oq_idset *new_set(void)
{
    oq_idset_opts so;
    oq_idset *s;
    oq_idset_opts_defaults(&so);
    if (oq_idset_new(&s, &so) != 0)
        abort();
    return s;
}

/* The ideal: claim + commit each id, one thread, no queue. */
static double bare_loop(void)
{
    oq_idset *s = new_set();
    oq_claim c;
    double t0 = now_s(), dt;
    for (size_t i = 0; i < nevents; i++) {
        if (oq_idset_claim(s, ids[i], lens[i], INT64_MAX, &c) != OQ_CLAIMED ||
            oq_idset_commit(s, ids[i], lens[i], c.token) != 0)
            abort();
    }
    dt = now_s() - t0;
    oq_idset_free(s);
    return nevents / dt;
}

static double pool_run(unsigned workers, unsigned batch)
{
    oq_queue_opts qo;
    oq_pool_opts po;
    oq_queue *q;
    oq_idset *s = new_set();
    oq_pool *p;
    oq_pool_stats ps;
    double t0, dt;
    oq_message m[256];

    oq_queue_opts_defaults(&qo);
    qo.dedup_count = 0; /* ids are unique; measure the consumer side */
    if (oq_queue_new(&q, &qo) != 0)
        abort();
    for (size_t i = 0; i < nevents; i += 256) {
        size_t n = nevents - i < 256 ? nevents - i : 256;
        for (size_t k = 0; k < n; k++)
            m[k] = (oq_message){ ids[i + k], lens[i + k], ids[i + k],
                                 lens[i + k], 0, 0 };
        oq_queue_send_batch(q, m, n, NULL);
    }
    oq_queue_close(q);
    oq_pool_opts_defaults(&po);
    po.workers = workers;
    po.batch = batch;
    po.handler = noop;
    t0 = now_s();
    if (oq_pool_start(&p, q, s, &po) != 0)
        abort();
    oq_pool_wait(p);
    dt = now_s() - t0;
    oq_pool_stats_get(p, &ps);
    if (ps.processed != nevents) {
        fprintf(stderr, "bench_pool: processed %llu of %zu\n",
                (unsigned long long)ps.processed, nevents);
        abort();
    }
    oq_pool_free(p);
    oq_queue_free(q);
    oq_idset_free(s);
    return nevents / dt;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double (*fn)(unsigned, unsigned), unsigned w, unsigned b)
{
    double v[16];
    for (int i = 0; i < reps; i++)
        v[i] = fn(w, b);
    qsort(v, reps, sizeof(v[0]), cmp);
    return v[reps / 2];
}

static double bare_adapter(unsigned w, unsigned b)
{
    (void)w;
    (void)b;
    return bare_loop();
}

int main(int argc, char **argv)
{
    const char *csv = NULL;
    static const unsigned workers[] = { 1, 2, 4 };
    static const unsigned batches[] = { 1, 16, 64 };
    double base;
    FILE *out = NULL;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--events") == 0 && i + 1 < argc)
            nevents = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--csv") == 0 && i + 1 < argc)
            csv = argv[++i];
        else {
            fprintf(stderr, "usage: bench_pool [--events N] [--reps R] "
                            "[--csv PATH]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > 15 || nevents == 0) {
        fprintf(stderr, "bench_pool: bad --reps or --events\n");
        return 2;
    }
    ids = malloc(nevents * sizeof(*ids));
    lens = malloc(nevents * sizeof(*lens));
    for (size_t i = 0; i < nevents; i++) {
        char buf[32];
        lens[i] = (size_t)snprintf(buf, sizeof(buf), "evt-%zu", i);
        ids[i] = strdup(buf);
    }
    printf("bench_pool --events %zu --reps %d (median of reps)\n", nevents,
           reps);
    base = median(bare_adapter, 0, 0);
    printf("%-28s %12s %8s\n", "configuration", "events/s", "ratio");
    printf("%-28s %12.0f %8.2f\n", "bare loop (claim+commit)", base, 1.0);
    if (csv && (out = fopen(csv, "w")) == NULL) {
        perror(csv);
        return 1;
    }
    if (out)
        fprintf(out, "config,workers,batch,events,events_per_s,ratio_to_bare\n"
                     "bare,1,0,%zu,%.0f,1.000\n", nevents, base);
    for (size_t wi = 0; wi < 3; wi++)
        for (size_t bi = 0; bi < 3; bi++) {
            char name[64];
            double r = median(pool_run, workers[wi], batches[bi]);
            snprintf(name, sizeof(name), "pool w=%u batch=%u%s", workers[wi],
                     batches[bi], workers[wi] > 2 ? " (oversub)" : "");
            printf("%-28s %12.0f %8.2f\n", name, r, r / base);
            if (out)
                fprintf(out, "pool,%u,%u,%zu,%.0f,%.3f\n", workers[wi],
                        batches[bi], nevents, r, r / base);
        }
    if (out)
        fclose(out);
    for (size_t i = 0; i < nevents; i++)
        free(ids[i]);
    free(ids);
    free(lens);
    return 0;
}
