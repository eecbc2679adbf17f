/*
 * The reorder buffer of `onceq run`'s record outputs: records written in
 * input order, at each event's first line, as the watermark of settled
 * lines passes them (src/runner.c feeds it).
 */
#include "oq_cli.h"

#include <stdatomic.h>
#include <string.h>

#include "oq_uthash.h"

#define TAG_FILE(tag) ((unsigned)((tag) >> 40))
#define TAG_LINE(tag) ((tag) & ((1ULL << 40) - 1))

/* ------------------------------------------------------- reorder buffer */

/*
 * Record outputs (exec:, plugin:, noop --emit) are written in input order,
 * each event's records at the line where its id first appeared, whichever
 * copy committed, and they are written as the run goes rather than held
 * to its end (holding every record cost six times the input in memory).
 *
 * Every line read has a sequence number, its rank in the inputs counted
 * from 1 (blank lines included); a tag maps to it through the number of
 * its input's line 0. A line settles exactly once: processed (the sink's
 * apply), duplicate (the sink's duplicate hook), dead-lettered (taken from
 * the queue by the main thread) or blank (the reader). The watermark wm is
 * the first line not settled. The records of the lines below it are final:
 * they move to the ready list, which the main thread writes. Until then a
 * committed event's records wait in the ring at their line, and in ids by
 * their event id, so that a duplicate that settles at a smaller line moves
 * them there (the event first appeared there). Such a duplicate cannot
 * settle after the records were written, because the watermark does not
 * pass a line before it settles; nor before the apply of the copy that
 * committed, because a copy is a duplicate only once its id is DONE, which
 * the pool marks after the apply.
 *
 * So the buffer holds the lines between the watermark and the reader: about
 * what the queue holds (the reader throttles on the queue), plus what a
 * slow line (a retry's backoff, a long handler) keeps waiting behind it,
 * which the reader bounds to REORDER_WINDOW lines.
 *
 * Lock: mu guards the fields below it; a leaf, taken once per settled line
 * and once per main-thread tick. The counting handlers have no buffer, so
 * their hot path takes no shared lock.
 */

typedef struct pend {
    UT_hash_handle hh;  /* in reorder.ids, by event id */
    struct pend *next;  /* reorder.ready */
    uint64_t seq;       /* the line its records are written at */
    size_t id_len;
    size_t out_len;     /* of the records, each followed by a newline */
    char buf[];         /* the id, then the records */
} pend;

typedef struct rslot {
    pend *p;            /* the records written at this line, or NULL */
    bool settled;
} rslot;

struct oq__reorder {
    pthread_mutex_t mu;
    rslot *ring;        /* line seq is ring[seq & (cap - 1)], for
                           wm <= seq < wm + cap */
    size_t cap;         /* a power of 2 */
    uint64_t wm;        /* the first line not settled */
    uint64_t *line0;    /* per input: the sequence number of its line 0 */
    unsigned nfiles;
    pend *ids;          /* the records in the ring, by event id */
    pend *ready, **ready_tail; /* below the watermark, not written yet */
    _Atomic int rc;     /* a line could not be placed (out of memory): the
                           watermark may stop there; read without mu */
    _Atomic uint64_t wm_seen; /* wm, for the reader's throttle */
    uint64_t window;    /* the reader waits beyond this many lines past
                           the watermark; immutable */
};

int oq__reorder_new(oq__reorder **out, unsigned nfiles, uint64_t window)
{
    oq__reorder *ro = oq__calloc(1, sizeof(*ro));

    if (ro == NULL)
        return OQ_ENOMEM;
    ro->cap = 4096;
    ro->nfiles = nfiles ? nfiles : 1;
    ro->ring = oq__calloc(ro->cap, sizeof(*ro->ring));
    ro->line0 = oq__calloc(ro->nfiles, sizeof(*ro->line0));
    if (ro->ring == NULL || ro->line0 == NULL) {
        oq__free(ro->ring);
        oq__free(ro->line0);
        oq__free(ro);
        return OQ_ENOMEM;
    }
    ro->wm = 1;
    ro->window = OQ__MAX(window, 1);
    atomic_init(&ro->wm_seen, 1);
    ro->ready_tail = &ro->ready;
    oq__mutex_init(&ro->mu);
    *out = ro;
    return 0;
}

static void free_pends(pend *list)
{
    while (list != NULL) {
        pend *next = list->next;
        oq__free(list);
        list = next;
    }
}

void oq__reorder_free(oq__reorder *ro)
{
    if (ro == NULL)
        return;
    HASH_CLEAR(hh, ro->ids);
    for (size_t i = 0; i < ro->cap; i++)
        oq__free(ro->ring[i].p);
    free_pends(ro->ready);
    oq__free(ro->ring);
    oq__free(ro->line0);
    pthread_mutex_destroy(&ro->mu);
    oq__free(ro);
}

/* The reader starts input file, whose line 1 is line seq of the run. */
void oq__reorder_input(oq__reorder *ro, unsigned file, uint64_t seq,
                       uint64_t lineno)
{
    pthread_mutex_lock(&ro->mu);
    if (file < ro->nfiles)
        ro->line0[file] = seq - lineno;
    pthread_mutex_unlock(&ro->mu);
}

/* Makes the ring cover line seq (> wm). mu held. */
static int grow(oq__reorder *ro, uint64_t seq)
{
    size_t ncap = ro->cap;
    rslot *nr;

    while (seq - ro->wm >= ncap)
        ncap *= 2;
    if ((nr = oq__calloc(ncap, sizeof(*nr))) == NULL)
        return OQ_ENOMEM;
    for (size_t i = 0; i < ro->cap; i++)
        nr[(ro->wm + i) & (ncap - 1)] = ro->ring[(ro->wm + i) & (ro->cap - 1)];
    oq__free(ro->ring);
    ro->ring = nr;
    ro->cap = ncap;
    return 0;
}

/* The line of tag, in the ring and not settled: 0 and *seq, OQ_ENOMEM, or
 * OQ_EINVAL for a line never read or settled already (a bug). mu held. */
static int line_of(oq__reorder *ro, uint64_t tag, uint64_t *seq)
{
    unsigned file = TAG_FILE(tag);
    uint64_t s;

    if (file >= ro->nfiles)
        return OQ_EINVAL;
    s = ro->line0[file] + TAG_LINE(tag);
    if (s < ro->wm || (s - ro->wm < ro->cap &&
                       ro->ring[s & (ro->cap - 1)].settled))
        return OQ_EINVAL;
    if (s - ro->wm >= ro->cap && grow(ro, s) != 0)
        return OQ_ENOMEM;
    *seq = s;
    return 0;
}

/* Settles line seq (placed) and moves the watermark over the settled
 * prefix, handing the records it passes to the ready list. mu held. */
static void settle_line(oq__reorder *ro, uint64_t seq)
{
    size_t mask = ro->cap - 1;
    rslot *s;

    ro->ring[seq & mask].settled = true;
    if (seq != ro->wm)
        return;
    while ((s = &ro->ring[ro->wm & mask])->settled) {
        if (s->p != NULL) {
            HASH_DEL(ro->ids, s->p);
            s->p->next = NULL;
            *ro->ready_tail = s->p;
            ro->ready_tail = &s->p->next;
        }
        *s = (rslot){ NULL, false };
        ro->wm++;
    }
    atomic_store(&ro->wm_seen, ro->wm);
}

void oq__reorder_note_failed(oq__reorder *ro, int rc)
{
    int zero = 0;
    atomic_compare_exchange_strong(&ro->rc, &zero, rc);
}

/* A line that settles with no records: blank or dead-lettered. mu held. */
static void settle_tag_locked(oq__reorder *ro, uint64_t tag)
{
    uint64_t seq;
    int rc = line_of(ro, tag, &seq);

    if (rc == 0)
        settle_line(ro, seq);
    else
        oq__reorder_note_failed(ro, rc);
}

void oq__reorder_settle(oq__reorder *ro, uint64_t tag)
{
    pthread_mutex_lock(&ro->mu);
    settle_tag_locked(ro, tag);
    pthread_mutex_unlock(&ro->mu);
}

/* A duplicate of ev's id settles: the id's records, if they wait at a
 * later line, move to this one. */
void oq__reorder_dup(oq__reorder *ro, const oq_event *ev)
{
    uint64_t seq;
    pend *p;
    int rc;

    pthread_mutex_lock(&ro->mu);
    if ((rc = line_of(ro, ev->tag, &seq)) == 0) {
        HASH_FIND(hh, ro->ids, ev->id, ev->id_len, p);
        if (p != NULL && p->seq > seq) {
            ro->ring[p->seq & (ro->cap - 1)].p = NULL;
            ro->ring[seq & (ro->cap - 1)].p = p;
            p->seq = seq;
        }
        settle_line(ro, seq);
    } else {
        oq__reorder_note_failed(ro, rc);
    }
    pthread_mutex_unlock(&ro->mu);
}

static void rec_len(const void *data, size_t len, void *arg)
{
    (void)data;
    *(size_t *)arg += len + 1;
}

static void rec_copy(const void *data, size_t len, void *arg)
{
    pend *p = arg;
    char *o = p->buf + p->id_len + p->out_len;

    if (len)
        memcpy(o, data, len);
    o[len] = '\n';
    p->out_len += len + 1;
}

/* A processed event settles with txn's records. All or nothing: OQ_ENOMEM
 * leaves the buffer as it was (the pool retries the event). */
int oq__reorder_add(oq__reorder *ro, const oq_event *ev, const oq_txn *txn)
{
    size_t out_len = 0;
    pend *p = NULL;
    uint64_t seq;
    int rc;

    if (oq_txn_nrecords(txn) > 0) {
        oq_txn_foreach(txn, rec_len, NULL, &out_len);
        if ((p = oq__malloc(sizeof(*p) + ev->id_len + out_len)) == NULL)
            return OQ_ENOMEM;
        p->next = NULL;
        p->id_len = ev->id_len;
        p->out_len = 0;
        memcpy(p->buf, ev->id, ev->id_len);
        oq_txn_foreach(txn, rec_copy, NULL, p);
    }
    pthread_mutex_lock(&ro->mu);
    rc = line_of(ro, ev->tag, &seq);
    if (rc == 0 && p != NULL) {
        p->seq = seq;
        oq__hash_oom = 0;
        HASH_ADD_KEYPTR(hh, ro->ids, p->buf, p->id_len, p);
        if (oq__hash_oom)
            rc = OQ_ENOMEM;
        else
            ro->ring[seq & (ro->cap - 1)].p = p;
    }
    if (rc == 0)
        settle_line(ro, seq);
    pthread_mutex_unlock(&ro->mu);
    if (rc == 0)
        return 0;
    oq__free(p);
    if (rc == OQ_ENOMEM)
        return rc;
    oq__reorder_note_failed(ro, rc); /* a line settled twice: reported at the end */
    return 0;
}

/* The records the watermark passed, in order; the caller writes them. */
static pend *take_ready(oq__reorder *ro)
{
    pend *list;

    pthread_mutex_lock(&ro->mu);
    list = ro->ready;
    ro->ready = NULL;
    ro->ready_tail = &ro->ready;
    pthread_mutex_unlock(&ro->mu);
    return list;
}

/* Everything still in the ring, in line order (the run is over: lines not
 * settled after a signal are left out, as their events never ran). */
static pend *take_rest(oq__reorder *ro)
{
    pend *list = NULL, **tail = &list;

    pthread_mutex_lock(&ro->mu);
    HASH_CLEAR(hh, ro->ids);
    for (size_t i = 0; i < ro->cap; i++) {
        rslot *s = &ro->ring[(ro->wm + i) & (ro->cap - 1)];
        if (s->p != NULL) {
            s->p->next = NULL;
            *tail = s->p;
            tail = &s->p->next;
            s->p = NULL;
        }
    }
    pthread_mutex_unlock(&ro->mu);
    return list;
}

/* Writes the records of list to f and frees it. They are flushed: a
 * reader at the other end of a pipe gets them now, not when a buffer
 * fills. */
static void write_pends(FILE *f, pend *list)
{
    if (list == NULL)
        return;
    while (list != NULL) {
        pend *next = list->next;
        fwrite(list->buf + list->id_len, 1, list->out_len, f);
        oq__free(list);
        list = next;
    }
    fflush(f);
}

void oq__reorder_write_ready(oq__reorder *ro, FILE *f)
{
    write_pends(f, take_ready(ro));
}

void oq__reorder_write_rest(oq__reorder *ro, FILE *f)
{
    write_pends(f, take_rest(ro));
}

bool oq__reorder_full(oq__reorder *ro, uint64_t lines_read)
{
    /* The line the reader holds is not settled, so the watermark is at
     * most its number, and the reader waits for lines already sent. */
    return atomic_load(&ro->rc) == 0 &&
           atomic_load(&ro->wm_seen) + ro->window <= lines_read;
}

int oq__reorder_error(oq__reorder *ro)
{
    return atomic_load(&ro->rc);
}
