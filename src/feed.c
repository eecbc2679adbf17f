/*
 * Feeding the queue of `onceq run`: the reader role (a reader thread, or
 * the workers in turn when they fill the CPUs), which reads input lines,
 * numbers them for the reorder buffer, tells the durable tracker, and
 * sends them in batches; and the workers' queue backend that takes the
 * role when its queue runs low (docs/ARCHITECTURE.md, decision 14).
 */
#include "oq_cli.h"

#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SEND_BATCH 256
#define READY_HIGH_WATER 65536
/* Up to this many workers a reader thread feeds them even when they fill
 * the CPUs: on 2 cores it was 1.03-1.08x faster at -w 2 and 1.12-1.37x at
 * -w 4 than the workers reading (bench_ab.sh, 2026-11-30). Reading and
 * sending is about 450 instructions a line against a worker's 3,300
 * (callgrind), so one reader thread keeps up with a few workers. */
#define READER_THREAD_WORKERS 4
#define TAG(file, line) (((uint64_t)(file) << 40) | (uint64_t)(line))

/* Sends n messages; a message the queue could not take for lack of memory
 * is tried again, after a pause, rather than lost. Returns 0, or OQ_ENOMEM
 * if memory did not come back within about ten seconds. */
int oq__send_all(oq__runner *r, oq_message *m, size_t n)
{
    int res[SEND_BATCH];
    struct timespec nap = { 0, 1000 * 1000 };

    for (unsigned tries = 0; n > 0; tries++) {
        size_t left = 0;
        if (tries > 0) {
            if (tries > 10000 || atomic_load(&r->stop))
                return OQ_ENOMEM;
            nanosleep(&nap, NULL);
        }
        oq_queue_send_batch(r->q, m, n, res);
        for (size_t i = 0; i < n; i++)
            if (res[i] == OQ_ENOMEM)
                m[left++] = m[i];
        n = left;
    }
    return 0;
}

/* Waits while the queue holds too much that is ready, or while the
 * records' reorder buffer spans too many lines (a line that waits, a
 * retry's backoff, holds back the writing of every line after it). A
 * buffer that failed may not move any more: it does not hold the reader. */
/* Must the reader wait before it reads on: the queue holds a lot, or the
 * reorder window is full? */
static bool must_wait(oq__runner *r)
{
    oq__reorder *ro = r->rs.ro;
    oq_queue_stats st;

    oq_queue_stats_get(r->q, &st);
    /* The line the reader holds is not settled, so the watermark is at
     * most its number, r->lines, and the reader waits for lines already
     * sent. */
    return st.ready >= READY_HIGH_WATER ||
           (ro != NULL && oq__reorder_full(ro, atomic_load(&r->lines)));
}

/* The reader thread waits while it must (a worker reading never does: see
 * read_some). */
static void throttle(oq__runner *r)
{
    struct timespec nap = { 0, 1000 * 1000 };

    while (r->reader_thread && !atomic_load(&r->stop) && must_wait(r))
        nanosleep(&nap, NULL);
}

static int reject_too_large(oq__runner *r, const oq__line *l)
{
    char err[128];
    oq_message m = { NULL, 0, l->data, l->len, 0, TAG(l->file, l->lineno) };

    struct timespec nap = { 0, 1000 * 1000 };

    snprintf(err, sizeof(err), "line of %zu bytes exceeds --max-line %zu "
             "(first %zu bytes kept)", l->full_len, r->c->max_line, l->len);
    for (int tries = 0; tries < 10000; tries++) {
        if (oq_queue_reject(r->q, &m, OQ_DLQ_TOO_LARGE, err) != OQ_ENOMEM)
            return 0;
        nanosleep(&nap, NULL);
    }
    return OQ_ENOMEM;
}

/* The reader thread's batch of lines not sent yet. */
typedef struct pending {
    oq__runner *r;
    oq_message m[SEND_BATCH];
    char *arena;    /* the lines' bytes (oq__reader_next reuses its buffer) */
    size_t cap, used, n;
    int rc;         /* a send that failed for good */
} pending;

#define ARENA_BYTES (SEND_BATCH * 512)
/* Lines a worker in the reader role reads at a time. */
#define READ_STEP (4 * SEND_BATCH)

static void flush(void *arg)
{
    pending *pb = arg;
    if (pb->n > 0 && pb->rc == 0)
        pb->rc = oq__send_all(pb->r, pb->m, pb->n);
    pb->n = pb->used = 0;
}

static void add_line(pending *pb, const oq__line *l)
{
    oq_message one = { NULL, 0, l->data, l->len, 0, TAG(l->file, l->lineno) };

    if (pb->used + l->len > pb->cap || pb->n == SEND_BATCH) {
        flush(pb);
        throttle(pb->r);
    }
    if (l->len > pb->cap) {
        if (pb->rc == 0)
            pb->rc = oq__send_all(pb->r, &one, 1);
        return;
    }
    memcpy(pb->arena + pb->used, l->data, l->len);
    one.payload = pb->arena + pb->used;
    pb->m[pb->n++] = one;
    pb->used += l->len;
}

/*
 * Who reads: a reader thread when there are fewer workers than CPUs (it
 * runs beside them), when there are at most READER_THREAD_WORKERS workers,
 * or when an input is not a regular file; else the workers themselves, one
 * at a time, when their queue runs dry (with many workers one reader
 * thread would not keep up, and it would take a core's time from them).
 * ONCEQ_READER=thread or =workers chooses between the two for regular
 * files, for benchmarks.
 */
int oq__start_reading(oq__runner *r)
{
    const char *force = getenv("ONCEQ_READER");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

    r->pb = oq__calloc(1, sizeof(*r->pb));
    if (r->pb == NULL)
        return OQ_ENOMEM;
    pthread_mutex_init(&r->reader_mu, NULL);
    if ((r->pb->arena = oq__malloc(ARENA_BYTES)) == NULL)
        return OQ_ENOMEM;
    r->pb->r = r;
    r->pb->cap = ARENA_BYTES;
    r->read_file = UINT_MAX;
    r->reader_thread = ncpu <= 0 || (long)r->c->workers < ncpu ||
                       r->c->workers <= READER_THREAD_WORKERS;
    if (force && strcmp(force, "thread") == 0)
        r->reader_thread = true;
    else if (force && strcmp(force, "workers") == 0)
        r->reader_thread = false;
    /* A pipe or a terminal can block a read for as long as its writer
     * likes: a worker blocked there would hold up the lines already
     * queued (with one worker, forever). Such input has a thread. */
    for (unsigned i = 0; i < oq__reader_count(r->reader); i++) {
        struct stat st;
        int fd = oq__reader_fd(r->reader, i);
        if (fd >= 0 && (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)))
            r->reader_thread = true;
    }
    return 0;
}

/* The input is done (its end, a stop, or an error): no more sends. */
static void end_reading(oq__runner *r, int rc)
{
    pending *pb = r->pb;

    if (pb->rc != 0) {
        rc = OQ_ENOMEM;
        snprintf(r->reader_err, sizeof(r->reader_err),
                 "out of memory: input lines could not be queued");
    }
    oq__reader_set_idle(r->reader, NULL, NULL);
    r->reader_rc = rc < 0 ? rc : 0;
    oq_queue_close(r->q);
    atomic_store(&r->reader_done, 1);
}

/* The reader role (r->reader_mu held): reads up to max lines and sends
 * them. Returns false once the input is done. */
static bool read_some(oq__runner *r, size_t max)
{
    pending *pb = r->pb;
    oq__reorder *ro = r->rs.ro;
    oq__line l;
    int rc = 1;

    if (atomic_load(&r->reader_done))
        return false;
    /* Lines from a pipe must not wait for a full batch. */
    oq__reader_set_idle(r->reader, flush, pb);
    for (size_t k = 0; k < max; k++) {
        uint64_t seq;
        /* A worker never waits here for the others (it may be the one
         * that has to settle the line the window waits for): it stops
         * reading for now. Looked at once a batch (must_wait takes the
         * queue lock): the window may be passed by a batch. */
        if (!r->reader_thread && k > 0 && k % SEND_BATCH == 0 &&
            must_wait(r))
            break;
        if (atomic_load(&r->stop) || pb->rc != 0 ||
            (rc = oq__reader_next(r->reader, &l, r->reader_err,
                                  sizeof(r->reader_err))) <= 0)
            break;
        /* Lines are numbered from 1 in the order read (reorder). */
        seq = atomic_fetch_add(&r->lines, 1) + 1;
        if (ro != NULL && l.file != r->read_file) {
            oq__reorder_input(ro, l.file, seq, l.lineno);
            r->read_file = l.file;
        }
        if (r->tracker &&
            oq__tracker_add(r->tracker, l.file, l.lineno, l.end,
                            l.kind == OQ__LINE_BLANK) != 0) {
            pb->rc = OQ_ENOMEM;
            break;
        }
        if (l.kind == OQ__LINE_BLANK) {
            atomic_fetch_add(&r->blank, 1);
            if (ro != NULL)
                oq__reorder_settle(ro, TAG(l.file, l.lineno));
        } else if (l.kind == OQ__LINE_TOO_LARGE) {
            pb->rc = reject_too_large(r, &l);
        } else {
            add_line(pb, &l);
        }
    }
    flush(pb);
    if (rc > 0 && pb->rc == 0 && !atomic_load(&r->stop))
        return true;
    end_reading(r, rc);
    return false;
}

void *oq__reader_main(void *arg)
{
    oq__runner *r = arg;

    pthread_mutex_lock(&r->reader_mu);
    while (read_some(r, SIZE_MAX))
        ;
    pthread_mutex_unlock(&r->reader_mu);
    return NULL;
}

/*
 * The workers' queue backend when they take the reader role themselves
 * (no reader thread: with as many workers as cores, a reader thread only
 * competes with them): the memory queue, and when it has nothing ready, a
 * worker that gets the role reads a batch of lines and sends them, then
 * receives. The others wait on the queue as usual.
 */
static int feed_receive(void *ctx, oq_delivery *out, size_t max,
                        int64_t wait_ms)
{
    oq__runner *r = ctx;
    int n = oq_queue_receive(r->q, out, max, 0);

    /* Fewer than asked: the queue is running dry. Refill it before it
     * is empty, so that the other workers do not wait while we read. */
    if (n >= 0 && (size_t)n < max && !atomic_load(&r->reader_done) &&
        pthread_mutex_trylock(&r->reader_mu) == 0) {
        read_some(r, READ_STEP);
        pthread_mutex_unlock(&r->reader_mu);
        if (n == 0)
            n = oq_queue_receive(r->q, out, max, 0);
    }
    return n != 0 ? n : oq_queue_receive(r->q, out, max, wait_ms);
}

static void feed_settle(void *ctx, oq_settle *ops, size_t n)
{
    oq__runner *r = ctx;
    oq__mem_queue_methods.settle(r->q, ops, n);
}

static void feed_wake(void *backend)
{
    oq__runner *r = backend;
    oq_queue_wake(r->q);
}

const oq__queue_methods oq__feed_methods = {
    .version = 1,
    .name = "memory+reader",
    .attach = oq__ctx_self,
    .detach = oq__ctx_none,
    .receive = feed_receive,
    .settle = feed_settle,
    .wake = feed_wake,
};

/* Frees what the reader role holds (after the run). */
void oq__reading_free(oq__runner *r)
{
    if (r->pb == NULL)
        return;
    oq__free(r->pb->arena);
    oq__free(r->pb);
    r->pb = NULL;
    pthread_mutex_destroy(&r->reader_mu);
}
