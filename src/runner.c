/*
 * The engine of `onceq run`: inputs -> queue -> worker pool -> results.
 *
 * DESIGN
 * ------
 * Threads:
 *   - the reader thread splits the inputs into lines (no JSON parsing: a
 *     single parsing reader would cap the pool at one core) and sends them
 *     to the queue in batches of 256, one lock hold each; lines it can judge
 *     alone (too large) go straight to the dead letters; blank lines are
 *     counted and skipped; it stops sending while the queue holds more than
 *     a high-water mark of ready messages, so memory stays bounded;
 *   - the pool's N workers decode each line (parse JSON, find the id: the
 *     pool's decode hook), claim the id, run the handler, commit, ack;
 *   - the main thread waits for SIGINT/SIGTERM with sigtimedwait (they are
 *     blocked in every thread), draws the progress line, and every 5 ms
 *     writes the records whose turn has come.
 * Lines are sent without an id (the reader does not parse), so the queue's
 * producer dedup window does not see them; the processed set catches every
 * duplicate, however far apart.
 *
 * Results go to the run sink. Counters go to one part per worker thread
 * (an oq_memsink written by that worker alone, merged once the pool has
 * stopped) and are written at the end, sorted by key. Records go to the
 * reorder buffer (below) and are written by the main thread as the run
 * goes, in input order, each event's at the line where its id first
 * appeared. Dead letters are written at the end, in input order.
 *
 * Accounting: every line ends as exactly one of processed, duplicate, dead
 * or blank, and the run checks lines = processed + duplicates + dead +
 * blank before it exits (after a signal, the lines not settled yet are
 * reported as unfinished).
 */
#include "oq_cli.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sqlite3.h>
#include <xxhash.h>

#include "oq_uthash.h"

#define TAG(file, line) (((uint64_t)(file) << 40) | (uint64_t)(line))
#define TAG_FILE(tag) ((unsigned)((tag) >> 40))
#define TAG_LINE(tag) ((tag) & ((1ULL << 40) - 1))

/* ------------------------------------------------------------ run sink */

/*
 * The run sink has one part per worker thread for counters, written by
 * that thread only (no shared lock on the hot path: one sink mutex taken
 * by every worker for every event was a serial point of the pool), and
 * folded into the run sink's own counters by merge_parts() once the pool
 * has stopped. Records go to the reorder buffer.
 */
typedef struct part {
    oq_memsink *counts;  /* written without its lock, by its worker only */
    int rc;              /* an allocation failed */
    struct part *next;   /* oq__run_sink.parts; set once, under oq__run_sink.mu */
} part;


static void part_free(part *p)
{
    oq_memsink_free(p->counts);
    oq__free(p);
}

/* This thread's part of rs, made on first use. NULL: out of memory. */
static part *my_part(oq__run_sink *rs)
{
    static _Thread_local oq__run_sink *owner;
    static _Thread_local part *mine;
    part *p;

    if (owner == rs && mine != NULL)
        return mine;
    if ((p = oq__calloc(1, sizeof(*p))) == NULL)
        return NULL;
    if (oq_memsink_new(&p->counts) != 0) {
        oq__free(p);
        return NULL;
    }
    pthread_mutex_lock(&rs->mu);
    p->next = rs->parts;
    rs->parts = p;
    pthread_mutex_unlock(&rs->mu);
    owner = rs;
    mine = p;
    return p;
}

static void run_duplicate(const oq_event *ev, void *arg)
{
    oq__run_sink *rs = arg;

    if (rs->ro != NULL)
        oq__reorder_dup(rs->ro, ev);
    if (rs->replies != NULL)
        oq__replies_duplicate(ev, rs->replies);
}

/* Counters go to the part's memsink, records to the reorder buffer; a txn
 * has one or the other in practice (a handler's output kind), so the two
 * applies need not be one atomic step. Each is all or nothing. With a
 * buffer, every processed event settles its line there, records or not. */
static int run_apply(const oq_event *ev, const oq_txn *txn, void *arg)
{
    oq__run_sink *rs = arg;
    int rc;

    if (oq_txn_ncounts(txn) > 0) {
        part *p = my_part(rs);
        if (p == NULL)
            return OQ_ENOMEM;
        /* Written by this worker alone, read once the pool stopped. */
        if ((rc = oq__memsink_apply_owned(p->counts, txn)) != 0)
            return rc;
    }
    return rs->ro != NULL ? oq__reorder_add(rs->ro, ev, txn) : 0;
}

/* Folds every part into rs (after the pool stopped: no worker writes). */
static void merge_parts(oq__run_sink *rs)
{
    part *p;

    pthread_mutex_lock(&rs->mu);
    while ((p = rs->parts) != NULL) {
        rs->parts = p->next;
        if (p->rc != 0 || oq__memsink_merge(rs->counts, p->counts) != 0)
            rs->rc = OQ_ENOMEM;
        part_free(p);
    }
    pthread_mutex_unlock(&rs->mu);
}



static void take_dead(const oq_dead_letter *dl, void *arg)
{
    oq__dl_list *l = arg;
    oq__dl_item *it;

    if (l->n == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 64;
        oq__dl_item **nv = oq__realloc(l->v, ncap * sizeof(*nv));
        if (nv == NULL) {
            l->rc = OQ_ENOMEM;
            return;
        }
        l->v = nv;
        l->cap = ncap;
    }
    it = oq__malloc(sizeof(*it) + dl->payload_len + 1);
    if (it == NULL || (it->error = strdup(dl->error)) == NULL) {
        oq__free(it);
        l->rc = OQ_ENOMEM;
        return;
    }
    it->tag = dl->tag;
    it->reason = dl->reason;
    it->attempts = dl->attempts;
    it->sent_ms = dl->sent_ms;
    it->dead_ms = dl->dead_ms;
    it->len = dl->payload_len;
    if (dl->payload_len)
        memcpy(it->payload, dl->payload, dl->payload_len);
    it->payload[it->len] = '\0';
    l->v[l->n++] = it;
}

static void dl_free(oq__dl_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i]->error);
        oq__free(l->v[i]);
    }
    oq__free(l->v);
    memset(l, 0, sizeof(*l));
}

/* ------------------------------------------------------------- the run */


static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------ results */


static void get_totals(oq__runner *r, oq__totals *t)
{
    oq_queue_stats qs;
    oq_pool_stats ps;
    uint64_t total;

    memset(t, 0, sizeof(*t));
    oq_queue_stats_get(r->q, &qs);
    oq_pool_stats_get(r->p, &ps);
    t->lines = atomic_load(&r->lines);
    t->blank = atomic_load(&r->blank);
    t->processed = ps.processed;
    if (r->cm) {
        oq__committer_stats cs;
        oq__committer_stats_get(r->cm, &cs);
        t->commits = cs.commits;
        t->commit_events = cs.events_total;
        t->commit_max = cs.events_max;
        t->write_ms = cs.write_ms;
        t->finish_ms = cs.finish_ms;
        t->redriven = r->nredrive;
        t->skipped = r->skipped;
    }
    t->duplicates = ps.duplicates + qs.duplicates_rejected;
    for (int i = 0; i < OQ_DLQ__COUNT; i++) {
        t->dead_by[i] = qs.dead_lettered[i];
        t->dead += qs.dead_lettered[i];
    }
    t->unfinished = qs.ready + qs.delayed + qs.in_flight;
    t->retried = ps.retried;
    t->redelivered = qs.redelivered;
    t->fenced = ps.fenced;
    t->lease_extensions = oq__pool_lease_extensions(r->p);
    oq__reader_progress(r->reader, &t->bytes, &total);
    t->elapsed_s = (oq_clock_now(NULL) - r->t0_ms) / 1000.0;
}

/* The metrics' snapshot (oq__metrics_fn): called from the metrics
 * threads; everything it reads is atomic or behind a leaf lock. */
static void metrics_snap(oq__metrics_snap *m, void *arg)
{
    oq__runner *r = arg;
    oq_queue_stats qs;
    oq__totals t;

    if (atomic_load(&r->pool_up) == 0)
        return; /* the first write, before the run starts: all zero */
    get_totals(r, &t);
    oq_queue_stats_get(r->q, &qs);
    m->processed = t.processed;
    m->duplicates = t.duplicates;
    m->dead = t.dead;
    m->retried = t.retried;
    memcpy(m->dead_by, t.dead_by, sizeof(m->dead_by));
    m->ready = qs.ready;
    m->in_flight = qs.in_flight;
    m->oldest_ready_age_s = (double)qs.oldest_ready_age_ms / 1000.0;
    m->lease_extensions = t.lease_extensions;
    m->fenced = t.fenced;
    oq__pool_histogram(r->p, m->hist, &m->hist_count, &m->hist_sum_s);
}

/* The counts every mode reports (run.c writes them). */
static void counts_of(const oq__runner *r, const oq__totals *t,
                      oq__run_counts *n)
{
    memset(n, 0, sizeof(*n));
    n->lines = t->lines;
    n->processed = t->processed;
    n->duplicates = t->duplicates;
    n->dead = t->dead;
    n->blank = t->blank;
    n->unfinished = t->unfinished;
    memcpy(n->dead_by, t->dead_by, sizeof(n->dead_by));
    n->retried = t->retried;
    n->redelivered = t->redelivered;
    n->fenced = t->fenced;
    n->lease_extensions = t->lease_extensions;
    n->workers = r->c->workers;
    n->handler = r->h.name;
    n->elapsed_s = t->elapsed_s;
}

static void progress_line(oq__runner *r)
{
    oq__totals t;
    oq__run_counts n;
    oq_queue_stats qs;
    uint64_t done, total;
    char tail[128];
    int k;

    get_totals(r, &t);
    counts_of(r, &t, &n);
    oq_queue_stats_get(r->q, &qs);
    oq__reader_progress(r->reader, &done, &total);
    k = snprintf(tail, sizeof(tail), "  in-flight %" PRIu64, qs.in_flight);
    if (total > 0) {
        double frac = (double)done / total;
        double eta = frac > 0 ? t.elapsed_s * (1 - frac) / frac : 0;
        snprintf(tail + k, sizeof(tail) - (size_t)k,
                 "  read %5.1f%%  ETA %dm%02ds", 100 * frac, (int)eta / 60,
                 (int)eta % 60);
    }
    oq__draw_progress(&n, tail);
}

static int dl_by_tag(const void *a, const void *b)
{
    const oq__dl_item *x = *(oq__dl_item *const *)a, *y = *(oq__dl_item *const *)b;
    return (x->tag > y->tag) - (x->tag < y->tag);
}

/* One dead letter of the queue as a JSON line: the one writer of dead
 * letters (oq__write_dead_row), with times on the wall clock and the id
 * found again in the event (the queue keeps none for raw lines). */
static void write_dead(FILE *f, oq__runner *r, const oq__dl_item *it)
{
    const char *src = oq__reader_path(r->reader, TAG_FILE(it->tag));
    char source[4200];
    oq_event ev = { 0 };
    oq_decoded dec;
    oq__dead_row row = {
        .tag = it->tag,
        .source = source,
        .reason = oq_dlq_reason_name(it->reason),
        .error = it->error,
        .attempts = it->attempts,
        .first_seen_ms = r->wall0_ms + (it->sent_ms - r->t0_ms),
        .dead_ms = r->wall0_ms + (it->dead_ms - r->t0_ms),
        .event = it->payload,
        .event_len = it->len,
    };

    snprintf(source, sizeof(source), "%s:%" PRIu64,
             strcmp(src, "-") == 0 ? "<stdin>" : src,
             (uint64_t)TAG_LINE(it->tag));
    memset(&dec, 0, sizeof(dec));
    ev.payload = it->payload;
    ev.payload_len = it->len;
    if (it->reason != OQ_DLQ_PARSE_ERROR && it->reason != OQ_DLQ_TOO_LARGE &&
        oq__json_decode(&ev, &dec, &r->idspec) == 0) {
        row.id = dec.id;
        row.id_len = dec.id_len;
    }
    oq__write_dead_row(f, &row, false);
    if (dec.parsed)
        oq__json_free(dec.parsed, &r->idspec);
}

/* Writes the dead letters; with none, the --dlq file is removed (no
 * stale one from an earlier run). Returns 0 or an exit status. */
static int write_dlq(oq__runner *r, uint64_t *count)
{
    oq__dl_list l = r->dead; /* those taken while records were written */
    int status = 0;

    memset(&r->dead, 0, sizeof(r->dead));
    oq_queue_dead_letters(r->q, 1, take_dead, &l);
    *count = l.n;
    if (l.rc != 0) {
        fprintf(stderr, "onceq run: out of memory collecting dead letters\n");
        oq__out_discard(&r->dlq, false);
        status = 3;
    } else if (l.n == 0) {
        oq__out_discard(&r->dlq, true);
    } else {
        qsort(l.v, l.n, sizeof(*l.v), dl_by_tag);
        for (size_t i = 0; i < l.n; i++)
            write_dead(r->dlq.f, r, l.v[i]);
        status = oq__out_commit(&r->dlq, "onceq run");
    }
    dl_free(&l);
    return status;
}

/*
 * The main thread's share of writing records (every 5 ms while the run
 * goes, and once at its end): it takes the queue's new dead letters, whose
 * lines settle (the dead letters are kept for --dlq), then writes the
 * records the watermark has passed. Writing here, not in the worker that
 * moved the watermark, keeps output I/O out of the workers and of the
 * buffer's lock.
 */
static void emit_ready(oq__runner *r)
{
    oq__reorder *ro = r->rs.ro;
    size_t n0 = r->dead.n;

    if (ro == NULL)
        return;
    oq_queue_dead_letters(r->q, 1, take_dead, &r->dead);
    if (r->dead.rc != 0) /* a dead letter's line is lost */
        oq__reorder_note_failed(ro, r->dead.rc);
    for (size_t i = n0; i < r->dead.n; i++)
        oq__reorder_settle(ro, r->dead.v[i]->tag);
    oq__reorder_write_ready(ro, r->out.f);
}




/* Writes the results. Returns 0 or an exit status. */
static int write_results(oq__runner *r)
{
    FILE *f = r->out.f;

    if (r->h.output == OQ__OUT_COUNTS) {
        oq__count_out c = { f, r->h.count_key ? r->h.count_key : "key" };
        oq_memsink_foreach_count(r->rs.counts, oq__write_count, &c);
    } else if (r->rs.ro != NULL) {
        /* Most records are written already; the pool has stopped. */
        emit_ready(r);
        oq__reorder_write_rest(r->rs.ro, f);
    }
    return oq__out_commit(&r->out, "onceq run");
}

void oq__write_stats_json(FILE *f, const oq__runner *r, const oq__totals *t)
{
    oq__run_counts n;

    counts_of(r, t, &n);
    oq__write_stats_head(f, &n);
    fprintf(f, ",\"bytes\":%" PRIu64, t->bytes);
    if (r->replies) {
        uint64_t req, rep, dup;
        oq__replies_stats(r->replies, &req, &rep, &dup);
        fprintf(f, ",\"requests\":%" PRIu64 ",\"replies\":%" PRIu64
                ",\"duplicate_replies\":%" PRIu64, req, rep, dup);
    }
    if (r->store)
        oq__write_state_stats(f, r, t);
    fputs("}\n", f);
}

static int write_stats(oq__runner *r, const oq__totals *t)
{
    if (r->stats.f == NULL)
        return 0;
    oq__write_stats_json(r->stats.f, r, t);
    return oq__out_commit(&r->stats, "onceq run");
}

static void summary(const oq__runner *r, const oq__totals *t, int sig)
{
    oq__run_counts n;

    counts_of(r, t, &n);
    oq__write_summary(&n, NULL, r->c->dlq_path, r->c->quiet, r->c->verbose);
    if (sig && !r->c->quiet)
        fprintf(stderr, "onceq: stopped by %s; %" PRIu64 " lines were not "
                "finished\n", sig == SIGINT ? "SIGINT" : "SIGTERM",
                t->unfinished);
}

/* ----------------------------------------------------------- setup */

static int open_all(oq__runner *r, char *err, size_t errlen)
{
    const oq__run_config *c = r->c;
    static const char *const stdin_only[] = { "-" };
    oq__handler_opts ho = { c->kill_grace_ms, c->emit };
    oq_queue_opts qo;
    oq_idset_opts so;
    int rc;

    rc = oq__handler_from_spec(c->handler_spec, &ho, &r->h, err, errlen);
    if (rc != 0)
        return rc;
    if (c->emit && strcmp(r->h.name, "noop") != 0) {
        snprintf(err, errlen, "--emit works only with --handler noop");
        return OQ_EINVAL;
    }
    if (c->replies_dir && c->state_path) {
        /* A reply must be committed with its id: in the state, that is a
         * table of its own, not built yet. */
        snprintf(err, errlen, "--replies works in memory only (not with "
                 "--state, yet)");
        return OQ_EINVAL;
    }
    if (c->replies_dir &&
        (rc = oq__replies_open(&r->replies, c->replies_dir, err, errlen)) != 0)
        return rc;
    rc = oq__reader_open(&r->reader, c->ninputs ? c->inputs : stdin_only,
                         c->ninputs ? c->ninputs : 1, c->max_line, err, errlen);
    if (rc != 0)
        return rc;
    oq_queue_opts_defaults(&qo);
    qo.visibility_timeout_ms = c->vt_ms;
    qo.max_receives = c->max_attempts;
    qo.ttl_ms = c->ttl_ms;
    /* The workers decide a dying message's outcome against the processed
     * set: one outcome per id. */
    qo.deliver_dying = 1;
    qo.dedup_count = c->dedup_window;
    if ((rc = oq_queue_new(&r->q, &qo)) != 0)
        goto nomem;
    oq_idset_opts_defaults(&so);
    /* Sized for the input at once: growing a table rehashes it, with a
     * cache miss an id (+12-14% wall time on 1M events, bench_ab.sh).
     * Only a hint: without the memory for it, the set grows as it goes.
     * ONCEQ_TEST_EXPECTED_IDS: a test seam (test_run.py). */
    so.expected_ids = (size_t)oq__reader_estimate_lines(r->reader);
    if (getenv("ONCEQ_TEST_EXPECTED_IDS"))
        so.expected_ids = (size_t)strtoull(getenv("ONCEQ_TEST_EXPECTED_IDS"),
                                           NULL, 10);
    if ((rc = oq_idset_new(&r->s, &so)) != 0 && so.expected_ids > 0) {
        so.expected_ids = 0;
        rc = oq_idset_new(&r->s, &so);
    }
    if (rc != 0)
        goto nomem;
    if ((rc = oq_memsink_new(&r->rs.counts)) != 0)
        goto nomem;
    oq__mutex_init(&r->rs.mu);
    /* Records are written in input order, at each event's first line
     * (noop writes records only with --emit); in memory mode through the
     * reorder buffer (made in start_pool: not with --state). */
    r->rs.track_first = r->h.output == OQ__OUT_RECORDS &&
                        (strcmp(r->h.name, "noop") != 0 || c->emit);
    r->idspec.field = c->id_field;
    r->idspec.fallback = strcmp(c->id_field, "id") == 0;
    return 0;
nomem:
    snprintf(err, errlen, "%s", oq_strerror(rc));
    return rc;
}

/* The decode hook with --replies (see oq__request_decode). */
static int run_decode(const oq_event *ev, oq_decoded *out, void *arg)
{
    oq__runner *r = arg;
    return oq__request_decode(ev, out, &r->idspec, NULL) < 0 ? -1 : 0;
}

static void run_free(void *parsed, void *arg)
{
    oq__runner *r = arg;
    oq__json_free(parsed, &r->idspec);
}

static int start_pool(oq__runner *r)
{
    oq_pool_opts po;
    int rc;

    oq_pool_opts_defaults(&po);
    po.workers = r->c->workers;
    po.batch = r->c->batch;
    po.backoff_base_ms = r->c->backoff_base_ms;
    po.backoff_cap_ms = r->c->backoff_cap_ms;
    po.seed = r->c->seed;
    po.handler = r->h.fn;
    po.handler_arg = r->h.arg;
    po.handler_never_blocks = r->h.never_blocks;
    /* Heartbeats: a running handler keeps its lease (a third at a time)
     * until --timeout, which is its deadline. */
    po.lease_ms = r->c->vt_ms;
    po.timeout_ms = r->c->timeout_ms;
    po.sink = (oq_sink){ run_apply, &r->rs, run_duplicate };
    if (!r->cm && r->rs.track_first) {
        /* Test seam (test/test_run.py): a small window, so that the
         * reader waits on the watermark. */
        const char *w = getenv("ONCEQ_TEST_REORDER_WINDOW");
        if (oq__reorder_new(&r->rs.ro, r->c->ninputs,
                            w ? (uint64_t)atol(w) : OQ__REORDER_WINDOW) != 0)
            return OQ_ENOMEM;
    }
    /* The engine keeps a duplicate's delivery until the hook has run (one
     * more queue call a batch): only when something reads duplicates. */
    if (r->rs.ro == NULL && r->replies == NULL)
        po.sink.duplicate = NULL;
    if (r->cm)
        po.sink = (oq_sink){ NULL, r->cm, oq__durable_dup };
    r->mem = (oq__mem_ledger){ .s = r->s, .sink = po.sink };
    po.decode = oq__json_decode;
    po.free_parsed = oq__json_free;
    po.decode_arg = &r->idspec;
    {
        const oq__queue_methods *qm = r->reader_thread
                                          ? &oq__mem_queue_methods
                                          : &oq__feed_methods;
        void *qb = r->reader_thread ? (void *)r->q : (void *)r;
        oq__engine_hooks hooks = { .max_attempts = r->c->max_attempts };
        if (r->replies) {
            /* Requests: each reply is staged after the handler and
             * committed with the id by the memory ledger. */
            hooks.reply = oq__replies_stage;
            hooks.arg = r->replies;
            r->mem.replies = (oq__reply_sink){
                oq__replies_prepare, oq__replies_publish, oq__replies_abort,
                r->replies };
            r->rs.replies = r->replies;
            po.decode = run_decode;
            po.free_parsed = run_free;
            po.decode_arg = r;
        }
        if (r->cm)
            rc = oq__engine_start_hooks(&r->p, qm, qb,
                                        &oq__sqlite_ledger_methods, r->cm,
                                        &po, &hooks);
        else
            rc = oq__engine_start_hooks(&r->p, qm, qb,
                                        &oq__mem_ledger_methods, &r->mem,
                                        &po, &hooks);
        if (rc != 0)
            return OQ_ENOMEM;
    }
    atomic_store(&r->pool_up, 1);
    return 0;
}

static void close_all(oq__runner *r)
{
    /* First: its threads read the queue and the pool. */
    oq__metrics_stop(r->metrics);
    r->metrics = NULL;
    /* Outputs not finished (a run that did not start): left as they were. */
    oq__out_discard(&r->out, false);
    oq__out_discard(&r->dlq, false);
    oq__out_discard(&r->stats, false);
    oq_pool_free(r->p);
    if (r->store)
        oq__close_state(r);
    if (r->replies) {
        char err[512];
        oq__replies_close(r->replies, err, sizeof(err));
        r->replies = NULL;
    }
    oq_queue_free(r->q);
    oq_idset_free(r->s);
    while (r->rs.parts) {
        part *p = r->rs.parts;
        r->rs.parts = p->next;
        part_free(p);
    }
    oq_memsink_free(r->rs.counts);
    oq__reorder_free(r->rs.ro);
    dl_free(&r->dead);
    if (r->rs.counts)
        pthread_mutex_destroy(&r->rs.mu);
    if (r->reader)
        oq__reader_close(r->reader);
    oq__reading_free(r);
    if (r->h.fn)
        oq__handler_free(&r->h);
}

/* Waits for the end of the run or a signal; returns the signal or 0. */
static int wait_done(oq__runner *r, const sigset_t *sigs)
{
    /* Look for the end every 5 ms; draw progress every 200 ms. */
    struct timespec tick = { 0, 5 * 1000 * 1000 };
    oq_queue_stats st;

    for (unsigned n = 1;; n++) {
        int sig = sigtimedwait(sigs, NULL, &tick);
        if (sig == SIGINT || sig == SIGTERM)
            return sig;
        if (r->c->progress && n % 40 == 0)
            progress_line(r);
        emit_ready(r);
        if ((r->cm && oq__committer_failed(r->cm, NULL, 0)) ||
            (r->replies && oq__replies_failed(r->replies)))
            return -1;
        if (atomic_load(&r->reader_done)) {
            oq_queue_stats_get(r->q, &st);
            if (st.ready + st.delayed + st.in_flight == 0)
                return 0;
        }
    }
}

static int open_outputs(oq__runner *r, char *err, size_t errlen)
{
    const oq__run_config *c = r->c;

    if (oq__out_begin(&r->out, c->out_path ? c->out_path : "-", "results", err,
                  errlen) != 0 ||
        oq__out_begin(&r->dlq, c->dlq_path, "dead letters", err, errlen) != 0 ||
        oq__out_begin(&r->stats, c->stats_path, "stats", err, errlen) != 0)
        return OQ_EIO;
    return 0;
}

/* Writes the results, dead letters and stats; returns the exit status. */
static int finish(oq__runner *r, const oq__totals *t, int status, uint64_t *ndead)
{
    int st2;

    if (r->store) {
        st2 = oq__write_results_db(r);
        status = status ? status : st2;
        st2 = oq__write_dlq_db(r, ndead);
        status = status ? status : st2;
    } else {
        st2 = write_results(r);
        status = status ? status : st2;
        st2 = write_dlq(r, ndead);
        status = status ? status : st2;
    }
    st2 = write_stats(r, t);
    status = status ? status : st2;
    if (r->replies) {
        char err[512];
        if (oq__replies_close(r->replies, err, sizeof(err)) != 0) {
            fprintf(stderr, "onceq run: %s\n", err);
            status = status ? status : 3;
        }
        r->replies = NULL;
    }
    return status;
}

/* Stops everything early (a signal, or the state could not commit). Returns
 * false if a handler is stuck (the caller must _exit). */
static bool stop_early(oq__runner *r)
{
    atomic_store(&r->stop, 1);
    oq__reader_cancel(r->reader);
    oq__handler_cancel(&r->h);
    return oq_pool_stop(r->p, r->c->kill_grace_ms + 1000) == 0;
}

int oq__run(const oq__run_config *c)
{
    oq__runner *r = oq__calloc(1, sizeof(*r));
    char err[512] = "", serr[512] = "";
    sigset_t sigs, old;
    pthread_t reader;
    oq__totals t;
    int sig, status = 0;
    uint64_t ndead = 0;
    bool state_failed = false;

    if (r == NULL) {
        fprintf(stderr, "onceq run: out of memory\n");
        return 3;
    }
    r->c = c;
    r->t0_ms = oq_clock_now(NULL);
    r->wall0_ms = wall_ms();
    if (oq__check_outputs(c, err, sizeof(err)) != 0 ||
        open_outputs(r, err, sizeof(err)) != 0 ||
        open_all(r, err, sizeof(err)) != 0 ||
        (c->state_path && oq__open_state(r, err, sizeof(err)) != 0)) {
        fprintf(stderr, "onceq run: %s\n", err);
        close_all(r);
        oq__free(r);
        return 2;
    }
    if (c->metrics_path || c->metrics_listen) {
        oq__metrics_opts mo = { c->metrics_path, c->metrics_interval_ms,
                                c->metrics_listen, metrics_snap, r };
        if (oq__metrics_start(&r->metrics, &mo, err, sizeof(err)) != 0) {
            fprintf(stderr, "onceq run: %s\n", err);
            close_all(r);
            oq__free(r);
            return 2;
        }
    }
    /* Signals go to the main thread only; exec children may close pipes. */
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, &old);
    if (oq__start_reading(r) != 0 || start_pool(r) != 0 ||
        (r->reader_thread &&
         pthread_create(&reader, NULL, oq__reader_main, r) != 0)) {
        fprintf(stderr, "onceq run: cannot start threads\n");
        oq_queue_close(r->q);
        close_all(r);
        oq__free(r);
        return 3;
    }
    sig = wait_done(r, &sigs);
    if (sig != 0) {
        if (!stop_early(r)) {
            /* A handler is stuck: report and leave without freeing what
             * its thread may still touch. */
            get_totals(r, &t);
            summary(r, &t, sig > 0 ? sig : 0);
            oq__out_discard(&r->out, false);
            oq__out_discard(&r->dlq, false);
            oq__out_discard(&r->stats, false);
            _exit(sig == SIGINT ? 130 : sig == SIGTERM ? 143 : 3);
        }
    } else {
        oq_pool_wait(r->p);
    }
    if (r->reader_thread)
        pthread_join(reader, NULL);
    /* The last metrics, with every worker stopped. */
    if (r->metrics && oq__metrics_stop(r->metrics) != 0 && status == 0) {
        fprintf(stderr, "onceq run: write error on metrics '%s'\n",
                c->metrics_path);
        status = 3;
    }
    r->metrics = NULL;
    merge_parts(&r->rs); /* every worker has stopped */
    if (r->cm && oq__committer_stop(r->cm, serr, sizeof(serr)) != 0) {
        fprintf(stderr, "onceq run: state '%s': %s\nonceq run: stopped; "
                "every event acknowledged as processed is in the state: run "
                "again to resume\n", c->state_path, serr);
        state_failed = true;
        status = 3;
    }
    if (c->progress) {
        progress_line(r); /* the final state stays on the screen */
        fputc('\n', stderr);
    }
    get_totals(r, &t);
    if (r->store && !state_failed)
        oq__state_totals(r, &t);
    /* A read error stops the reading, not the run: what was read is
     * processed and written, and the status says the input was cut short
     * (3, an I/O error, like a write error; 2 means nothing ran). */
    if (r->reader_rc != 0 && !(sig && r->reader_rc == -ECANCELED)) {
        fprintf(stderr, "onceq run: %s\n", r->reader_err);
        status = status ? status : 3;
    }
    if (r->rs.rc != 0) {
        fprintf(stderr, "onceq run: out of memory keeping results\n");
        status = status ? status : 3;
    } else if (r->rs.ro && oq__reorder_error(r->rs.ro) != 0) {
        /* Records were kept, but perhaps not all at their first line. */
        fprintf(stderr, "onceq run: %s ordering results\n",
                oq__reorder_error(r->rs.ro) == OQ_ENOMEM ? "out of memory"
                : "internal error");
        status = status ? status : 3;
    }
    if (state_failed) {
        /* The outputs stay as they were; a rerun resumes and writes them. */
        oq__out_discard(&r->out, false);
        oq__out_discard(&r->dlq, false);
        write_stats(r, &t);
    } else
        status = finish(r, &t, status, &ndead);
    if (r->store && !state_failed)
        oq__save_last_run(r, &t);
    summary(r, &t, sig > 0 ? sig : 0);
    if (sig == 0 && t.lines + t.redriven !=
                        t.processed + t.duplicates + t.dead + t.blank) {
        fprintf(stderr, "onceq run: internal error: %" PRIu64 " lines but "
                "%" PRIu64 " processed + %" PRIu64 " duplicates + %" PRIu64
                " dead + %" PRIu64 " blank\n", t.lines + t.redriven,
                t.processed, t.duplicates, t.dead, t.blank);
        status = status ? status : 70;
    }
    if (sig > 0)
        status = sig == SIGINT ? 130 : 143;
    else if (status == 0 && ndead > 0)
        status = 1;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close_all(r);
    oq__free(r);
    return status;
}
