/*
 * `onceq node`: the JSON-lines node protocol (Maelstrom style) on stdin and
 * stdout. docs/NODE.md is the protocol reference.
 *
 * DESIGN
 * ------
 * One thread. The loop reads a line with getline(), scans it with the
 * strict JSON scanner (json.c) onto one reused tape, looks the body's type
 * up in a table of {type, reply type, handler} and calls the handler, which
 * reads its fields from the tape (strings as their exact bytes, numbers as
 * their text), changes the state and appends its reply fields to one
 * reusable output buffer. The dispatcher writes the envelope and the
 * reply's type and in_reply_to after the call and closes it; on an error it
 * throws the partial reply away and writes an error reply instead. Every
 * reply is written with write(2) as one whole line before the next line is
 * read, so a client that waits for each reply never waits forever. Nothing
 * on stdout but replies; logs go to stderr. Every JSON string written goes
 * through oq__json_quote, the project's one string writer.
 *
 * State (all owned by struct node, touched by this thread only):
 *   - the word-count processor: counts (word -> count), the processed event
 *     ids, and the pending outputs, each of which points at the id and the
 *     word it added. The state is always "last commit + pending": commit
 *     forgets the pending list; rollback walks it backwards and undoes it.
 *     So no copy is made per commit. Checkpoints hold copies of the
 *     pending outputs only, by name: a restore rolls back to the last
 *     commit and applies again those whose event ids are not committed,
 *     so no committed output is ever undone or counted twice.
 *   - one oq_queue (the core visibility-timeout queue, with its producer
 *     dedup window and dead-letter list) for enqueue/receive/ack/nack.
 *   - the kafka-workload logs: per key an append-only array of messages
 *     (their JSON text) with offsets from 0, the committed offset, and a
 *     table message_id -> offset for duplicate sends on that key.
 *
 * Hash tables are uthash. Allocation goes through oq__malloc (uthash
 * included), so running out of memory gives an error reply (code 13)
 * rather than a crash.
 */
#include "oq_cli.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "oq_uthash.h"

/* Maelstrom error codes. */
enum {
    E_NOT_SUPPORTED = 10,
    E_MALFORMED = 12,
    E_CRASH = 13,            /* internal: out of memory and the like */
    E_NO_SUCH_KEY = 20,
    E_PRECONDITION = 22
};

#define RECEIVE_MAX_DEFAULT 10   /* messages per receive when max is absent */
#define RECEIVE_MAX_CAP 1000     /* larger max values are cut to this */
#define POLL_CAP 1000            /* messages per key per poll */
/* The longest delay or visibility timeout, in ms, that the node hands to
 * the queue: 2^62 ms, about 146 million years. Larger values (up to
 * INT64_MAX) are cut to it, so that the queue's now + ms cannot overflow
 * and a huge delay still means "not in this lifetime". */
#define MS_MAX ((int64_t)1 << 62)


/* ------------------------------------------------------------ out buffer */

/* A reply being built. On out of memory it sets oom and ignores further
 * appends; the dispatcher turns that into an error reply. */
typedef struct sbuf {
    oq__buf b;
    bool oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (!b->oom && oq__buf_add(&b->b, s, n) != 0)
        b->oom = true;
}

static void sb_puts(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_int(sbuf *b, int64_t v)
{
    char tmp[24];
    char *e = tmp + sizeof(tmp), *p = e;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;

    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--p = '-';
    sb_put(b, p, (size_t)(e - p));
}

/* Appends s as a JSON string (oq__json_quote: bytes that are not UTF-8
 * become U+FFFD, so the output is always valid JSON text). */
static void sb_str(sbuf *b, const char *s, size_t n)
{
    if (!b->oom && oq__json_quote(&b->b, s, n) != 0)
        b->oom = true;
}

static void sb_cstr(sbuf *b, const char *s)
{
    sb_str(b, s, strlen(s));
}

/* ',"key":' (key is a literal that needs no escaping). */
static void sb_key(sbuf *b, const char *key)
{
    sb_put(b, ",\"", 2);
    sb_puts(b, key);
    sb_put(b, "\":", 2);
}

/* Empties b for a new reply; it keeps its capacity. */
static void sb_reset(sbuf *b)
{
    b->b.len = 0;
    b->oom = false;
}

/* -------------------------------------------------- word-count processor */

typedef struct wc_word {
    UT_hash_handle hh;
    int64_t count;           /* > 0: a word whose count drops to 0 is freed */
    size_t len;
    char s[];                /* the word, NUL-terminated */
} wc_word;

typedef struct wc_id {
    UT_hash_handle hh;
    size_t len;
    char s[];                /* the event id, NUL-terminated */
} wc_id;

/* One pending output: what one non-duplicate process added. */
typedef struct wc_pending {
    wc_id *id;
    wc_word *word;
} wc_pending;

typedef struct wc_state {
    wc_word *words;          /* uthash by word */
    wc_id *ids;              /* uthash by event id */
    wc_pending *pending;     /* in processing order */
    size_t npending, cap;
} wc_state;

/* One saved pending output: its event id, then its word, each
 * NUL-terminated, in one allocation. */
typedef struct cp_out {
    char *id;
    size_t id_len, word_len;
} cp_out;

/* A checkpoint holds the pending outputs only: what is committed is never
 * taken back, so a restore keeps the committed state as it is now. */
typedef struct checkpoint {
    UT_hash_handle hh;
    cp_out *outs;            /* in processing order */
    size_t nouts;
    size_t len;
    char name[];
} checkpoint;

/* Allocates a hash entry of size hdr with a copy of s after it. */
static void *entry_new(size_t hdr, const char *s, size_t len)
{
    char *e = oq__malloc(hdr + len + 1);

    if (e == NULL)
        return NULL;
    memset(e, 0, hdr);
    memcpy(e + hdr, s, len);
    e[hdr + len] = '\0';
    return e;
}

static wc_id *id_add(wc_state *st, const char *s, size_t len)
{
    wc_id *e = entry_new(sizeof(wc_id), s, len);

    if (e == NULL)
        return NULL;
    e->len = len;
    oq__hash_oom = 0;
    HASH_ADD_KEYPTR(hh, st->ids, e->s, len, e);
    if (oq__hash_oom) {
        oq__free(e);
        return NULL;
    }
    return e;
}

static wc_word *word_add(wc_state *st, const char *s, size_t len,
                         int64_t count)
{
    wc_word *w = entry_new(sizeof(wc_word), s, len);

    if (w == NULL)
        return NULL;
    w->len = len;
    w->count = count;
    oq__hash_oom = 0;
    HASH_ADD_KEYPTR(hh, st->words, w->s, len, w);
    if (oq__hash_oom) {
        oq__free(w);
        return NULL;
    }
    return w;
}

static void word_drop(wc_state *st, wc_word *w)
{
    if (--w->count == 0) {
        HASH_DEL(st->words, w);
        oq__free(w);
    }
}

static bool pending_reserve(wc_state *st, size_t n)
{
    size_t cap;
    wc_pending *p;

    if (n <= st->cap)
        return true;
    cap = st->cap ? st->cap * 2 : 256;
    while (cap < n)
        cap *= 2;
    p = oq__realloc(st->pending, cap * sizeof(*p));
    if (p == NULL)
        return false;
    st->pending = p;
    st->cap = cap;
    return true;
}

static void wc_free(wc_state *st)
{
    wc_word *w, *wt;
    wc_id *e, *et;

    HASH_ITER(hh, st->words, w, wt) {
        HASH_DEL(st->words, w);
        oq__free(w);
    }
    HASH_ITER(hh, st->ids, e, et) {
        HASH_DEL(st->ids, e);
        oq__free(e);
    }
    oq__free(st->pending);
    memset(st, 0, sizeof(*st));
}

static void cp_outs_free(cp_out *outs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        oq__free(outs[i].id);
    oq__free(outs);
}

/* A copy of the pending outputs of st. 0 or OQ_ENOMEM. */
static int cp_outs_copy(const wc_state *st, cp_out **out)
{
    cp_out *o = oq__calloc(st->npending ? st->npending : 1, sizeof(*o));

    if (o == NULL)
        return OQ_ENOMEM;
    for (size_t i = 0; i < st->npending; i++) {
        const wc_pending *p = &st->pending[i];
        char *s = oq__malloc(p->id->len + p->word->len + 2);

        if (s == NULL) {
            cp_outs_free(o, i);
            return OQ_ENOMEM;
        }
        memcpy(s, p->id->s, p->id->len + 1);
        memcpy(s + p->id->len + 1, p->word->s, p->word->len + 1);
        o[i] = (cp_out){ s, p->id->len, p->word->len };
    }
    *out = o;
    return 0;
}

/* Adds one output for a new event id. NULL (and no change) when out of
 * memory. */
static wc_word *wc_apply(wc_state *st, const char *eid, size_t eid_len,
                         const char *word, size_t word_len)
{
    wc_id *id;
    wc_word *w;

    if (!pending_reserve(st, st->npending + 1))
        return NULL;
    id = id_add(st, eid, eid_len);
    if (id == NULL)
        return NULL;
    HASH_FIND(hh, st->words, word, word_len, w);
    if (w)
        w->count++;
    else if ((w = word_add(st, word, word_len, 1)) == NULL) {
        HASH_DEL(st->ids, id);
        oq__free(id);
        return NULL;
    }
    st->pending[st->npending++] = (wc_pending){ id, w };
    return w;
}

/* Undoes every pending output, newest first. Returns how many. */
static size_t wc_rollback(wc_state *st)
{
    size_t n = st->npending;

    while (st->npending > 0) {
        wc_pending *p = &st->pending[--st->npending];
        HASH_DEL(st->ids, p->id);
        oq__free(p->id);
        word_drop(st, p->word);
    }
    return n;
}

/* ---------------------------------------------------------------- kafka */

typedef struct klog {
    UT_hash_handle hh;
    char **msgs;             /* JSON text of each message; index = offset */
    size_t len, cap;
    int64_t committed;       /* valid when has_committed */
    bool has_committed;
    unsigned long listed;    /* lineno of the last list that named it */
    struct kmid *mids;       /* uthash by message_id JSON text */
    size_t keylen;
    char key[];
} klog;

/* A message_id seen by send on one key, keyed by its JSON text as sent
 * (so 5, 5.0 and "5" differ). */
typedef struct kmid {
    UT_hash_handle hh;
    int64_t offset;
    size_t len;
    char s[];
} kmid;

static klog *klog_get(klog **logs, const char *key, size_t len, bool create)
{
    klog *l;

    HASH_FIND(hh, *logs, key, len, l);
    if (l || !create)
        return l;
    l = entry_new(sizeof(klog), key, len);
    if (l == NULL)
        return NULL;
    l->keylen = len;
    oq__hash_oom = 0;
    HASH_ADD_KEYPTR(hh, *logs, l->key, len, l);
    if (oq__hash_oom) {
        oq__free(l);
        return NULL;
    }
    return l;
}

static bool grow_log(klog *l)
{
    size_t cap = l->cap ? l->cap * 2 : 16;
    char **m = oq__realloc(l->msgs, cap * sizeof(*m));

    if (m == NULL)
        return false;
    l->msgs = m;
    l->cap = cap;
    return true;
}

static void kafka_free(klog **logs)
{
    klog *l, *lt;
    kmid *m, *mt;

    HASH_ITER(hh, *logs, l, lt) {
        HASH_DEL(*logs, l);
        for (size_t i = 0; i < l->len; i++)
            oq__free(l->msgs[i]);
        HASH_ITER(hh, l->mids, m, mt) {
            HASH_DEL(l->mids, m);
            oq__free(m);
        }
        oq__free(l->msgs);
        oq__free(l);
    }
}

/* ----------------------------------------------------------------- node */

typedef struct node {
    char *node_id;           /* NULL until init */
    size_t node_id_len;
    int64_t next_msg_id;     /* the node's own message counter */
    wc_state wc;
    checkpoint *checkpoints; /* uthash by name */
    oq_queue *q;
    int64_t default_vt_ms;   /* the queue's visibility timeout */
    oq_delivery *dbuf;       /* receive buffer, RECEIVE_MAX_CAP entries */
    klog *logs;              /* uthash by key */
    /* The request being answered. */
    oq__jtape tape;          /* its tokens (the tape is reused) */
    oq__jdoc d;              /* the line as scanned; d.text is the line */
    oq__buf fixed;           /* the line with U+FFFD for bytes not UTF-8 */
    oq__buf strs;            /* its strings that had escapes, decoded */
    const char *src, *dest;  /* its src and dest ("" when it has none) */
    size_t src_len, dest_len;
    sbuf body;               /* a handler's reply fields */
    sbuf out;                /* the reply line being written */
    oq__buf tmp;             /* scratch: JSON text of a payload or msg */
    unsigned long lineno;
    bool quiet;
} node;

/* What a failed handler reports. */
typedef struct nerr {
    int code;
    char text[200];
} nerr;

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int fail(nerr *e, int code, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(e->text, sizeof(e->text), fmt, ap);
    va_end(ap);
    e->code = code;
    return code;
}

static int bad_field(nerr *e, const char *field, const char *want)
{
    return fail(e, E_MALFORMED, "missing or invalid field '%s' (expected %s)",
                field, want);
}

static int no_memory(nerr *e)
{
    return fail(e, E_CRASH, "out of memory");
}

/* A length for "%.*s" in an error text: at most max bytes of a name. */
static int clip(size_t len, int max)
{
    return len < (size_t)max ? (int)len : max;
}

/* ------------------------------------------------------- request fields */

/* The members of object o: k is each key's token, k + 1 its value. */
#define FOR_MEMBERS(n, o, k)                                                 \
    for (uint32_t k = (o) + 1; k < (n)->d.tok[o].end; k = (n)->d.tok[k + 1].end)
/* The elements of array a. */
#define FOR_ELEMENTS(n, a, k)                                                \
    for (uint32_t k = (a) + 1; k < (n)->d.tok[a].end; k = (n)->d.tok[k].end)

/* The value of member name of object obj in the request, or 0 (absent). */
static uint32_t member(const node *n, uint32_t obj, const char *name)
{
    return oq__jget(&n->d, obj, name, strlen(name));
}

/* Whether token i (0: absent) is a value of type (OQ__J_*). */
static bool is_a(const node *n, uint32_t i, int type)
{
    return i != 0 && n->d.tok[i].type == type;
}

/* String token i's bytes: a pointer into the line, or, when it has escapes,
 * decoded into n->strs. NULL if n->strs is full: handle_line makes it as
 * large as the line, decoding never lengthens a string and no string token
 * is read twice per request, so it never is. */
static const char *str_at(node *n, uint32_t i, size_t *len)
{
    const oq__jtok *t = &n->d.tok[i];
    const char *s;

    if (t->esc && t->len > n->strs.cap - n->strs.len)
        return NULL;
    s = oq__jstr(&n->d, i, n->strs.data + n->strs.len, len);
    if (t->esc)
        n->strs.len += *len;
    return s;
}

/* The integer that number token i (0: absent) names, if it is one in int64
 * range: "-12" exactly, from its digits (a double would round above 2^53);
 * "1.0" or "1e3" through their double value. */
static bool num_int64(const node *n, uint32_t i, int64_t *out)
{
    const oq__jtok *t;
    const char *s;
    bool neg;
    uint64_t u = 0;

    if (!is_a(n, i, OQ__J_NUM))
        return false;
    t = &n->d.tok[i];
    s = n->d.text + t->start;
    neg = *s == '-';
    if (!oq__jnum_is_integer(&n->d, i)) {
        /* No byte after a number can continue it: strtod stops there. */
        double d = strtod(s, NULL);
        /* 2^63 is exact in a double; -2^63 itself is refused, harmlessly. */
        if (!(d > -9223372036854775808.0 && d < 9223372036854775808.0) ||
            (double)(int64_t)d != d)
            return false;
        *out = (int64_t)d;
        return true;
    }
    for (uint32_t k = neg; k < t->len; k++) {
        unsigned dg = (unsigned)(s[k] - '0');
        if (u > (UINT64_MAX - dg) / 10)
            return false;
        u = u * 10 + dg;
    }
    if (u > (uint64_t)INT64_MAX + neg)
        return false;
    *out = !neg ? (int64_t)u : u == 0 ? 0 : -(int64_t)(u - 1) - 1;
    return true;
}

static int get_string(node *n, uint32_t obj, const char *field,
                      const char **out, size_t *len, nerr *e)
{
    uint32_t v = member(n, obj, field);

    if (!is_a(n, v, OQ__J_STR))
        return bad_field(e, field, "a string");
    if ((*out = str_at(n, v, len)) == NULL)
        return no_memory(e);
    return 0;
}

/* An integer >= 0; when absent, *out = dflt if dflt >= 0, else an error. */
static int get_count(const node *n, uint32_t obj, const char *field,
                     int64_t dflt, int64_t *out, nerr *e)
{
    uint32_t v = member(n, obj, field);

    if (v == 0 && dflt >= 0) {
        *out = dflt;
        return 0;
    }
    if (!num_int64(n, v, out) || *out < 0)
        return bad_field(e, field, "an integer >= 0");
    return 0;
}

/* A delay or timeout in ms (get_count), cut to MS_MAX. */
static int get_ms(const node *n, uint32_t obj, const char *field,
                  int64_t dflt, int64_t *out, nerr *e)
{
    if (get_count(n, obj, field, dflt, out, e))
        return e->code;
    *out = OQ__MIN(*out, MS_MAX);
    return 0;
}

/* An object whose every value is an integer >= 0 (kafka offsets). */
static int get_offsets(const node *n, uint32_t body, uint32_t *out, nerr *e)
{
    uint32_t o = member(n, body, "offsets");
    int64_t off;

    if (!is_a(n, o, OQ__J_OBJ))
        return bad_field(e, "offsets", "an object");
    FOR_MEMBERS(n, o, k) {
        if (!num_int64(n, k + 1, &off) || off < 0)
            return bad_field(e, "offsets", "an object of integers >= 0");
    }
    *out = o;
    return 0;
}

/* Value i of the request as compact JSON text in n->tmp (numbers as
 * written). 0 or OQ_ENOMEM. */
static int json_text(node *n, uint32_t i)
{
    n->tmp.len = 0;
    return oq__jcompact(&n->d, i, &n->tmp);
}

/* ------------------------------------------------------------- handlers */

/* A handler validates body, updates state and appends its reply fields to
 * n->body (the dispatcher adds the envelope, type and in_reply_to).
 * Returns 0, or an error code with e filled in; then its output is
 * discarded. */
typedef int (*handler_fn)(node *n, uint32_t body, nerr *e);

static int h_init(node *n, uint32_t body, nerr *e)
{
    uint32_t ids = member(n, body, "node_ids");
    const char *id = NULL;
    size_t len;
    char *copy;

    if (get_string(n, body, "node_id", &id, &len, e))
        return e->code;
    if (!is_a(n, ids, OQ__J_ARR))
        return bad_field(e, "node_ids", "an array of strings");
    FOR_ELEMENTS(n, ids, k) {
        if (!is_a(n, k, OQ__J_STR))
            return bad_field(e, "node_ids", "an array of strings");
    }
    copy = entry_new(0, id, len);
    if (copy == NULL)
        return no_memory(e);
    oq__free(n->node_id);
    n->node_id = copy;
    n->node_id_len = len;
    sb_key(&n->body, "msg_id");
    sb_int(&n->body, n->next_msg_id++);
    return 0;
}

static void put_processed(node *n, const char *word, size_t len,
                          int64_t count, bool dup)
{
    sb_key(&n->body, "word");
    sb_str(&n->body, word, len);
    sb_key(&n->body, "count");
    sb_int(&n->body, count);
    sb_key(&n->body, "was_duplicate");
    sb_puts(&n->body, dup ? "true" : "false");
}

static int h_process(node *n, uint32_t body, nerr *e)
{
    wc_state *st = &n->wc;
    const char *eid = NULL, *word = NULL;
    size_t eid_len, word_len;
    wc_id *id;
    wc_word *w;

    if (get_string(n, body, "event_id", &eid, &eid_len, e) ||
        get_string(n, body, "word", &word, &word_len, e))
        return e->code;
    HASH_FIND(hh, st->ids, eid, eid_len, id);
    if (id) {
        HASH_FIND(hh, st->words, word, word_len, w);
        put_processed(n, word, word_len, w ? w->count : 0, true);
        return 0;
    }
    w = wc_apply(st, eid, eid_len, word, word_len);
    if (w == NULL)
        return no_memory(e);
    put_processed(n, word, word_len, w->count, false);
    return 0;
}

static int h_checkpoint(node *n, uint32_t body, nerr *e)
{
    const char *name = NULL;
    size_t len;
    checkpoint *cp;
    cp_out *outs;

    if (get_string(n, body, "checkpoint_id", &name, &len, e))
        return e->code;
    if (cp_outs_copy(&n->wc, &outs) != 0)
        return no_memory(e);
    HASH_FIND(hh, n->checkpoints, name, len, cp);
    if (cp == NULL) {
        cp = entry_new(sizeof(checkpoint), name, len);
        if (cp == NULL)
            goto out_nomem;
        cp->len = len;
        oq__hash_oom = 0;
        HASH_ADD_KEYPTR(hh, n->checkpoints, cp->name, len, cp);
        if (oq__hash_oom) {
            oq__free(cp);
            goto out_nomem;
        }
    } else {
        cp_outs_free(cp->outs, cp->nouts);
    }
    cp->outs = outs;
    cp->nouts = n->wc.npending;
    sb_key(&n->body, "checkpoint_id");
    sb_str(&n->body, name, len);
    return 0;

out_nomem:
    cp_outs_free(outs, n->wc.npending);
    return no_memory(e);
}

/* The state becomes the last commit plus the checkpoint's pending outputs
 * whose event ids are not committed since: an output counts once, however
 * often it is restored and committed. Out of memory half way leaves the
 * last commit plus the outputs restored so far (a consistent state). */
static int h_restore(node *n, uint32_t body, nerr *e)
{
    const char *name = NULL;
    size_t len;
    checkpoint *cp;
    const wc_word *w, *wt;
    const wc_id *id;
    bool first = true;

    if (get_string(n, body, "checkpoint_id", &name, &len, e))
        return e->code;
    HASH_FIND(hh, n->checkpoints, name, len, cp);
    if (cp == NULL)
        return fail(e, E_NO_SUCH_KEY, "no checkpoint named '%.*s'",
                    clip(len, 120), name);
    wc_rollback(&n->wc);
    for (size_t i = 0; i < cp->nouts; i++) {
        const cp_out *o = &cp->outs[i];

        HASH_FIND(hh, n->wc.ids, o->id, o->id_len, id);
        if (id == NULL && wc_apply(&n->wc, o->id, o->id_len,
                                   o->id + o->id_len + 1, o->word_len) == NULL)
            return no_memory(e);
    }
    sb_key(&n->body, "counts");
    sb_put(&n->body, "{", 1);
    HASH_ITER(hh, n->wc.words, w, wt) {
        if (!first)
            sb_put(&n->body, ",", 1);
        first = false;
        sb_str(&n->body, w->s, w->len);
        sb_put(&n->body, ":", 1);
        sb_int(&n->body, w->count);
    }
    sb_put(&n->body, "}", 1);
    return 0;
}

static int h_commit(node *n, uint32_t body, nerr *e)
{
    size_t moved = n->wc.npending;

    OQ__UNUSED(body);
    OQ__UNUSED(e);
    /* The outputs are committed: they can no longer be rolled back. */
    n->wc.npending = 0;
    sb_key(&n->body, "output_count");
    sb_int(&n->body, (int64_t)moved);
    return 0;
}

static int h_rollback(node *n, uint32_t body, nerr *e)
{
    OQ__UNUSED(body);
    OQ__UNUSED(e);
    sb_key(&n->body, "discarded_count");
    sb_int(&n->body, (int64_t)wc_rollback(&n->wc));
    return 0;
}

/* ---------------------------------------------------- queue operations */

static int h_enqueue(node *n, uint32_t body, nerr *e)
{
    uint32_t payload = member(n, body, "payload");
    const char *id = NULL;
    size_t id_len;
    int64_t delay;
    int rc;

    if (get_string(n, body, "id", &id, &id_len, e))
        return e->code;
    if (id_len == 0)
        return bad_field(e, "id", "a non-empty string");
    if (payload == 0)
        return bad_field(e, "payload", "a JSON value");
    if (get_ms(n, body, "delay_ms", 0, &delay, e))
        return e->code;
    if (json_text(n, payload) != 0)
        return no_memory(e);
    rc = oq_queue_send(n->q, id, id_len, n->tmp.data, n->tmp.len, delay);
    if (rc != 0 && rc != OQ_EEXIST)
        return fail(e, E_CRASH, "enqueue: %s", oq_strerror(rc));
    sb_key(&n->body, "duplicate");
    sb_puts(&n->body, rc == OQ_EEXIST ? "true" : "false");
    return 0;
}

static void put_delivery(sbuf *b, const oq_delivery *d)
{
    sb_put(b, "{\"id\":", 6);
    sb_str(b, d->id, d->id_len);
    sb_key(b, "payload");
    sb_put(b, d->payload, d->payload_len);
    sb_key(b, "receipt");
    sb_int(b, (int64_t)d->receipt);
    sb_key(b, "attempts");
    sb_int(b, d->receive_count);
    sb_put(b, "}", 1);
}

static int h_receive(node *n, uint32_t body, nerr *e)
{
    int64_t max, vt;
    int got;

    if (get_count(n, body, "max", RECEIVE_MAX_DEFAULT, &max, e) ||
        get_ms(n, body, "visibility_timeout_ms", n->default_vt_ms, &vt, e))
        return e->code;
    max = OQ__MIN(max, RECEIVE_MAX_CAP);
    got = oq_queue_receive(n->q, n->dbuf, (size_t)max, 0);
    if (got < 0)
        return fail(e, E_CRASH, "receive: %s", oq_strerror(got));
    /* The queue's timeout is per queue; set this call's per delivery. */
    for (int i = 0; vt != n->default_vt_ms && i < got; i++)
        oq_queue_extend(n->q, n->dbuf[i].receipt, vt);
    sb_key(&n->body, "messages");
    sb_put(&n->body, "[", 1);
    for (int i = 0; i < got; i++) {
        if (i)
            sb_put(&n->body, ",", 1);
        put_delivery(&n->body, &n->dbuf[i]);
    }
    sb_put(&n->body, "]", 1);
    oq_queue_release(n->q, n->dbuf, (size_t)got);
    return 0;
}

static int settle_result(int rc, const char *what, int64_t receipt, nerr *e)
{
    if (rc == OQ_ESTALE)
        return fail(e, E_PRECONDITION, "%s: receipt %lld is not current",
                    what, (long long)receipt);
    if (rc != 0)
        return fail(e, E_CRASH, "%s: %s", what, oq_strerror(rc));
    return 0;
}

static int h_ack(node *n, uint32_t body, nerr *e)
{
    int64_t receipt;

    if (get_count(n, body, "receipt", -1, &receipt, e))
        return e->code;
    return settle_result(oq_queue_ack(n->q, (uint64_t)receipt), "ack",
                         receipt, e);
}

static int h_nack(node *n, uint32_t body, nerr *e)
{
    int64_t receipt, delay;

    if (get_count(n, body, "receipt", -1, &receipt, e) ||
        get_ms(n, body, "delay_ms", 0, &delay, e))
        return e->code;
    return settle_result(oq_queue_nack(n->q, (uint64_t)receipt, delay),
                         "nack", receipt, e);
}

typedef struct dl_ctx {
    sbuf *b;
    size_t n;
} dl_ctx;

/* Called under the queue lock: it only writes to the buffer. */
static void put_dead(const oq_dead_letter *dl, void *arg)
{
    dl_ctx *c = arg;

    if (c->n++)
        sb_put(c->b, ",", 1);
    sb_put(c->b, "{\"id\":", 6);
    sb_str(c->b, dl->id, dl->id_len);
    sb_key(c->b, "reason");
    sb_cstr(c->b, oq_dlq_reason_name(dl->reason));
    sb_key(c->b, "attempts");
    sb_int(c->b, dl->attempts);
    sb_put(c->b, "}", 1);
}

static int h_dead_letters(node *n, uint32_t body, nerr *e)
{
    dl_ctx c = { &n->body, 0 };

    OQ__UNUSED(body);
    OQ__UNUSED(e);
    sb_key(&n->body, "messages");
    sb_put(&n->body, "[", 1);
    oq_queue_dead_letters(n->q, 0, put_dead, &c);
    sb_put(&n->body, "]", 1);
    return 0;
}

/* --------------------------------------------------------- kafka workload */

/* Appends message msg to l under the message_id text mtext (or none). */
static int send_append(node *n, klog *l, uint32_t msg, const char *mtext,
                       size_t mlen, nerr *e)
{
    kmid *m = NULL;
    char *text;

    if (json_text(n, msg) != 0)
        return no_memory(e);
    if (mtext && (m = entry_new(sizeof(kmid), mtext, mlen)) == NULL)
        return no_memory(e);
    text = entry_new(0, n->tmp.data, n->tmp.len);
    if (text == NULL || (l->len == l->cap && !grow_log(l)))
        goto out_nomem;
    if (m) {
        m->len = mlen;
        m->offset = (int64_t)l->len;
        oq__hash_oom = 0;
        HASH_ADD_KEYPTR(hh, l->mids, m->s, m->len, m);
        if (oq__hash_oom)
            goto out_nomem;
    }
    l->msgs[l->len] = text;
    sb_key(&n->body, "offset");
    sb_int(&n->body, (int64_t)l->len++);
    return 0;

out_nomem:
    oq__free(text);
    oq__free(m);
    return no_memory(e);
}

/* A message_id makes a send idempotent on its key: the same message_id on
 * another key is another message. */
static int h_send(node *n, uint32_t body, nerr *e)
{
    uint32_t msg = member(n, body, "msg");
    uint32_t mid = member(n, body, "message_id");
    const char *key = NULL;
    size_t key_len;
    char *mtext = NULL;
    size_t mlen = 0;
    kmid *dup = NULL;
    klog *l;
    int rc;

    if (get_string(n, body, "key", &key, &key_len, e))
        return e->code;
    if (msg == 0)
        return bad_field(e, "msg", "a JSON value");
    if (mid && !is_a(n, mid, OQ__J_STR) && !is_a(n, mid, OQ__J_NUM))
        return bad_field(e, "message_id", "a string or a number");
    l = klog_get(&n->logs, key, key_len, true);
    if (l == NULL)
        return no_memory(e);
    if (mid) {
        if (json_text(n, mid) != 0 ||
            (mtext = entry_new(0, n->tmp.data, n->tmp.len)) == NULL)
            return no_memory(e);
        mlen = n->tmp.len;
        HASH_FIND(hh, l->mids, mtext, mlen, dup);
    }
    if (dup) {
        sb_key(&n->body, "offset");
        sb_int(&n->body, dup->offset);
        sb_key(&n->body, "duplicate");
        sb_puts(&n->body, "true");
        rc = 0;
    } else {
        rc = send_append(n, l, msg, mtext, mlen, e);
    }
    oq__free(mtext);
    return rc;
}

static int h_poll(node *n, uint32_t body, nerr *e)
{
    uint32_t offsets;
    bool first = true;

    if (get_offsets(n, body, &offsets, e))
        return e->code;
    sb_key(&n->body, "msgs");
    sb_put(&n->body, "{", 1);
    FOR_MEMBERS(n, offsets, k) {
        size_t key_len;
        const char *key = str_at(n, k, &key_len);
        const klog *l;
        int64_t off = 0;
        size_t from, end;

        if (key == NULL)
            return no_memory(e);
        l = klog_get(&n->logs, key, key_len, false);
        if (!first)
            sb_put(&n->body, ",", 1);
        first = false;
        num_int64(n, k + 1, &off);   /* checked by get_offsets */
        from = (size_t)off;
        sb_str(&n->body, key, key_len);
        sb_put(&n->body, ":[", 2);
        end = l ? l->len : 0;
        if (from < end && end - from > POLL_CAP)
            end = from + POLL_CAP;
        for (size_t i = from; i < end; i++) {
            if (i > from)
                sb_put(&n->body, ",", 1);
            sb_put(&n->body, "[", 1);
            sb_int(&n->body, (int64_t)i);
            sb_put(&n->body, ",", 1);
            sb_puts(&n->body, l->msgs[i]);
            sb_put(&n->body, "]", 1);
        }
        sb_put(&n->body, "]", 1);
    }
    sb_put(&n->body, "}", 1);
    return 0;
}

static int h_commit_offsets(node *n, uint32_t body, nerr *e)
{
    uint32_t offsets;

    if (get_offsets(n, body, &offsets, e))
        return e->code;
    FOR_MEMBERS(n, offsets, k) {
        size_t key_len;
        const char *key = str_at(n, k, &key_len);
        klog *l = key ? klog_get(&n->logs, key, key_len, true) : NULL;
        int64_t off = 0;

        num_int64(n, k + 1, &off);   /* checked by get_offsets */
        if (l == NULL)
            return no_memory(e);
        /* Committed offsets only move forward. */
        if (!l->has_committed || off > l->committed)
            l->committed = off;
        l->has_committed = true;
    }
    return 0;
}

static int h_list_committed(node *n, uint32_t body, nerr *e)
{
    uint32_t keys = member(n, body, "keys");
    bool first = true;

    if (!is_a(n, keys, OQ__J_ARR))
        return bad_field(e, "keys", "an array of strings");
    FOR_ELEMENTS(n, keys, k) {
        if (!is_a(n, k, OQ__J_STR))
            return bad_field(e, "keys", "an array of strings");
    }
    sb_key(&n->body, "offsets");
    sb_put(&n->body, "{", 1);
    FOR_ELEMENTS(n, keys, k) {
        size_t key_len;
        const char *key = str_at(n, k, &key_len);
        klog *l;

        if (key == NULL)
            return no_memory(e);
        l = klog_get(&n->logs, key, key_len, false);
        /* A key named twice is answered once. */
        if (l == NULL || !l->has_committed || l->listed == n->lineno)
            continue;
        l->listed = n->lineno;
        if (!first)
            sb_put(&n->body, ",", 1);
        first = false;
        sb_str(&n->body, key, key_len);
        sb_put(&n->body, ":", 1);
        sb_int(&n->body, l->committed);
    }
    sb_put(&n->body, "}", 1);
    return 0;
}

/* ------------------------------------------------------------- dispatch */

typedef struct route {
    const char *type;
    const char *reply;
    handler_fn fn;
} route;

/* The hot message first: lookup is a linear scan of a short table. */
static const route routes[] = {
    { "process", "processed", h_process },
    { "init", "init_ok", h_init },
    { "checkpoint", "checkpoint_saved", h_checkpoint },
    { "restore", "restored", h_restore },
    { "commit", "committed", h_commit },
    { "rollback", "rolled_back", h_rollback },
    { "enqueue", "enqueue_ok", h_enqueue },
    { "receive", "receive_ok", h_receive },
    { "ack", "ack_ok", h_ack },
    { "nack", "nack_ok", h_nack },
    { "dead_letters", "dead_letters_ok", h_dead_letters },
    { "send", "send_ok", h_send },
    { "poll", "poll_ok", h_poll },
    { "commit_offsets", "commit_offsets_ok", h_commit_offsets },
    { "list_committed_offsets", "list_committed_offsets_ok",
      h_list_committed },
};

#define NROUTES (sizeof(routes) / sizeof(routes[0]))

static const route *find_route(const char *type, size_t len)
{
    for (size_t i = 0; i < NROUTES; i++)
        if (strlen(routes[i].type) == len &&
            memcmp(type, routes[i].type, len) == 0)
            return &routes[i];
    return NULL;
}

/* {"src":..,"dest":..,"body":{"type":T,"in_reply_to":N  (left open).
 * Written after the handler ran, so that init_ok comes from the new id. */
static void put_head(node *n, const char *type, bool has_id, int64_t id)
{
    sbuf *b = &n->out;

    sb_put(b, "{\"src\":", 7);
    if (n->node_id)
        sb_str(b, n->node_id, n->node_id_len);
    else
        sb_str(b, n->dest, n->dest_len);
    sb_put(b, ",\"dest\":", 8);
    sb_str(b, n->src, n->src_len);
    sb_put(b, ",\"body\":{\"type\":", 16);
    sb_cstr(b, type);
    sb_key(b, "in_reply_to");
    if (has_id)
        sb_int(b, id);
    else
        sb_puts(b, "null");
}

static void put_error(node *n, bool has_id, int64_t id, const nerr *e)
{
    put_head(n, "error", has_id, id);
    sb_key(&n->out, "code");
    sb_int(&n->out, e->code);
    sb_key(&n->out, "text");
    sb_cstr(&n->out, e->text);
    sb_put(&n->out, "}}\n", 3);
}

/* Writes the whole buffer. false when stdout is gone. */
static bool flush_out(node *n)
{
    size_t off = 0;

    while (off < n->out.b.len) {
        ssize_t w = write(STDOUT_FILENO, n->out.b.data + off,
                          n->out.b.len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "onceq node: write: %s\n", strerror(errno));
            return false;
        }
        off += (size_t)w;
    }
    n->out.b.len = 0;
    return true;
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void log_skip(const node *n, const char *fmt, ...)
{
    va_list ap;

    if (n->quiet)
        return;
    fprintf(stderr, "onceq node: line %lu: ", n->lineno);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("; skipped\n", stderr);
}

/* Answers the request whose body is token body (n->src and n->dest are
 * set); refused: why it is refused before any handler runs (code 0: it is
 * not). */
static void answer(node *n, uint32_t body, const nerr *refused)
{
    uint32_t type = member(n, body, "type");
    const route *r = NULL;
    const char *ts;
    size_t tlen;
    int64_t id = 0;
    bool has_id = num_int64(n, member(n, body, "msg_id"), &id);
    nerr e = { 0, "" };

    if (refused->code != 0) {
        e = *refused;
    } else if (!has_id) {
        bad_field(&e, "msg_id", "an integer");
    } else if (!is_a(n, type, OQ__J_STR)) {
        bad_field(&e, "type", "a string");
    } else if ((ts = str_at(n, type, &tlen)) == NULL) {
        no_memory(&e);
    } else if ((r = find_route(ts, tlen)) == NULL) {
        fail(&e, E_NOT_SUPPORTED, "unsupported message type '%.*s'",
             clip(tlen, 120), ts);
    }
    if (r) {
        sb_reset(&n->body);
        if (r->fn(n, body, &e) == 0 && !n->body.oom) {
            put_head(n, r->reply, true, id);
            sb_put(&n->out, n->body.b.data, n->body.b.len);
            sb_put(&n->out, "}}\n", 3);
            if (!n->out.oom)
                return;
        }
        if (e.code == 0)
            no_memory(&e);
        /* Discard the partial reply; the buffer keeps its capacity, so
         * the short error reply fits. */
        sb_reset(&n->out);
    }
    put_error(n, has_id, id, &e);
}

/* -------------------------------------------------------------- reading */

/* The line s[0..*len) with each byte that is not part of well-formed UTF-8
 * replaced by U+FFFD, in n->fixed (NUL-terminated; a NUL byte stays, for
 * the scanner to refuse), or NULL when out of memory. For a line that
 * oq__utf8_valid refused. */
static char *utf8_fix(node *n, const char *s, size_t *len)
{
    oq__buf *f = &n->fixed;

    f->len = 0;
    if (*len > (SIZE_MAX - 1) / 3 || oq__buf_reserve(f, *len * 3 + 1) != 0)
        return NULL;
    for (size_t i = 0; i < *len;) {
        size_t k = oq__utf8_seq((const unsigned char *)s + i, *len - i);

        if (k != 0) {
            memcpy(f->data + f->len, s + i, k);
            f->len += k;
            i += k;
        } else {
            memcpy(f->data + f->len, "\xEF\xBF\xBD", 3);
            f->len += 3;
            i++;
        }
    }
    f->data[f->len] = '\0';
    *len = f->len;
    return f->data;
}

/* 'h' if s[p..] is a \u escape of a high surrogate, 'l' of a low one, else
 * 0. */
static int surrogate_at(const char *s, size_t len, size_t p)
{
    char c;

    if (len < 6 || p > len - 6 || s[p] != '\\' || s[p + 1] != 'u' ||
        (s[p + 2] != 'd' && s[p + 2] != 'D') ||
        !isxdigit((unsigned char)s[p + 4]) ||
        !isxdigit((unsigned char)s[p + 5]))
        return 0;
    c = (char)tolower((unsigned char)s[p + 3]);
    if ((c >= '8' && c <= '9') || c == 'a' || c == 'b')
        return 'h';
    return c >= 'c' && c <= 'f' ? 'l' : 0;
}

/*
 * Rewrites in place, keeping the length, what strict JSON allows but
 * oq__json_scan refuses: a \u escape of a lone surrogate becomes \ufffd,
 * and a value nested deeper than OQ__JSON_MAX_DEPTH becomes 0 and blanks
 * (its inside is not checked). Tracks strings and brackets only, so a text
 * that is not JSON stays not JSON. true if it changed anything.
 */
static bool tame(char *s, size_t len)
{
    size_t depth = 0, deep_at = 0;
    bool in_str = false, changed = false;

    for (size_t p = 0; p < len; p++) {
        char c = s[p];
        int k;

        if (in_str) {
            if (c == '"') {
                in_str = false;
            } else if (c == '\\') {
                k = surrogate_at(s, len, p);
                if (k == 'h' && surrogate_at(s, len, p + 6) == 'l') {
                    p += 11;
                } else if (k != 0) {
                    memcpy(s + p + 2, "fffd", 4);
                    changed = true;
                    p += 5;
                } else {
                    p++;
                }
            }
        } else if (c == '"') {
            in_str = true;
        } else if (c == '{' || c == '[') {
            if (++depth == OQ__JSON_MAX_DEPTH + 1)
                deep_at = p;
        } else if ((c == '}' || c == ']') && depth > 0 &&
                   depth-- == OQ__JSON_MAX_DEPTH + 1) {
            s[deep_at] = '0';
            memset(s + deep_at + 1, ' ', p - deep_at);
            changed = true;
        }
    }
    return changed;
}

/* Repeated keys dropped from one line to check the rest of it; past this
 * the rest is not checked (each drop costs a scan of the line). */
#define MAX_DROPS 16

/* The token of the string whose opening quote is text[at], or 0. */
static uint32_t string_at(const node *n, size_t at)
{
    for (uint32_t i = n->tape.n; i-- > 0;)
        if (n->tape.tok[i].type == OQ__J_STR && n->tape.tok[i].start == at + 1)
            return i;
    return 0;
}

/* Blanks member key (a repeated one, never an object's first) and the comma
 * before it, so that the line can be scanned again. false if it cannot. */
static bool drop_member(node *n, char *text, uint32_t key)
{
    const oq__jtok *v;
    size_t from, to;

    if (key == 0 || key + 1 >= n->tape.n)
        return false;
    v = &n->tape.tok[key + 1];
    from = n->tape.tok[key].start - 1;       /* the key's opening quote */
    to = v->start + v->len + (v->type == OQ__J_STR);  /* past the value */
    while (from > 0 && memchr(" \t\r\n", text[from - 1], 4) != NULL)
        from--;
    if (from == 0 || text[from - 1] != ',')
        return false;
    memset(text + from - 1, ' ', to - from + 1);
    return true;
}

/* Too many repeated keys: the request is answered as far as it was read.
 * The containers still open end at the last token, so that src, dest and
 * body.msg_id are found; what follows is not checked. */
static void close_open(node *n)
{
    oq__jtok *t = n->tape.tok;

    for (uint32_t i = 0; i < n->tape.n; i++)
        if ((t[i].type == OQ__J_OBJ || t[i].type == OQ__J_ARR) && t[i].len == 0)
            t[i].end = n->tape.n;
}

/* Scans text[0..len) (n->d), reading around what strict JSON allows but
 * the scanner refuses (refused is then set). 0, or -1 when the line gets no
 * reply (logged). */
static int scan_line(node *n, char *text, size_t len, nerr *refused)
{
    size_t at = 0;
    const char *why = NULL;
    int rc = oq__json_scan(text, len, &n->tape, &at, &why);

    if (rc == -1 && tame(text, len)) {
        fail(refused, E_MALFORMED, "unsupported JSON in the request: a \\u "
             "escape of a lone surrogate, or nesting deeper than %d levels",
             OQ__JSON_MAX_DEPTH);
        rc = oq__json_scan(text, len, &n->tape, &at, &why);
    }
    for (int drops = 0;
         rc == -1 && strcmp(why, "duplicate key in an object") == 0; drops++) {
        uint32_t key = string_at(n, at);
        const char *name = NULL;
        size_t name_len = 0;

        n->d = (oq__jdoc){ text, len, n->tape.tok, n->tape.n };
        if (drops == 0) {
            if (key != 0)
                name = str_at(n, key, &name_len);
            fail(refused, E_MALFORMED, "repeated key '%.*s' in an object",
                 clip(name_len, 80), name ? name : "");
        }
        if (drops == MAX_DROPS || !drop_member(n, text, key)) {
            close_open(n);
            return 0;
        }
        rc = oq__json_scan(text, len, &n->tape, &at, &why);
    }
    n->d = (oq__jdoc){ text, len, n->tape.tok, n->tape.n };
    if (rc == -1)
        log_skip(n, "not JSON (%s at byte %zu)", why, at);
    else if (rc != 0)
        log_skip(n, "out of memory");
    return rc == 0 ? 0 : -1;
}

static void handle_line(node *n, char *line, size_t len)
{
    nerr refused = { 0, "" };
    uint32_t src, dest, body;
    char *text = line;

    while (len > 0 && (line[len - 1] == ' ' || line[len - 1] == '\t' ||
                       line[len - 1] == '\r' || line[len - 1] == '\n'))
        line[--len] = '\0';
    if (len == 0)
        return;
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) {
        text += 3;           /* a byte order mark */
        len -= 3;
    }
    n->strs.len = 0;
    if ((!oq__utf8_valid(text, len) && (text = utf8_fix(n, text, &len)) == NULL) ||
        oq__buf_reserve(&n->strs, len + 1) != 0) {
        log_skip(n, "out of memory");
        return;
    }
    if (scan_line(n, text, len, &refused) != 0)
        return;
    src = member(n, 0, "src");
    dest = member(n, 0, "dest");
    body = member(n, 0, "body");
    if (!is_a(n, src, OQ__J_STR) || !is_a(n, body, OQ__J_OBJ)) {
        log_skip(n, "no \"src\" string or no \"body\" object");
        return;
    }
    n->src = str_at(n, src, &n->src_len);
    n->dest = "";
    n->dest_len = 0;
    if (is_a(n, dest, OQ__J_STR))
        n->dest = str_at(n, dest, &n->dest_len);
    if (n->src == NULL || n->dest == NULL) {
        log_skip(n, "out of memory");
        return;
    }
    answer(n, body, &refused);
}

/* ------------------------------------------------------------ lifecycle */

typedef struct node_opts {
    oq_queue_opts q;
    bool quiet;
} node_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: onceq node [OPTIONS]\n"
            "\n"
            "Speaks the JSON-lines node protocol on stdin and stdout: one\n"
            "message per line in, one reply per line out (see docs/NODE.md).\n"
            "Exits 0 at end of input.\n"
            "\n"
            "Options (for the queue operations):\n"
            "  --visibility-timeout MS  default visibility timeout (30000)\n"
            "  --max-receives N         dead-letter after N receives (0: never)\n"
            "  --ttl MS                 dead-letter messages older than MS (0: off)\n"
            "  --dedup-window N         producer dedup window, ids (10000; 0: off)\n"
            "  -q, --quiet              do not log skipped lines\n"
            "  -h, --help               show this help and exit\n");
}

/* A whole non-negative decimal number, or -1. */
static int64_t parse_count(const char *s)
{
    char *end;
    long long v;

    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < 0)
        return -1;
    return v;
}

/* 0 to run, 1 for --help, 2 for bad usage. */
static int parse_opts(int argc, char **argv, node_opts *o)
{
    static const struct option longopts[] = {
        { "visibility-timeout", required_argument, NULL, 'v' },
        { "max-receives", required_argument, NULL, 'm' },
        { "ttl", required_argument, NULL, 't' },
        { "dedup-window", required_argument, NULL, 'd' },
        { "quiet", no_argument, NULL, 'q' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int c;
    int64_t v;

    memset(o, 0, sizeof(*o));
    oq_queue_opts_defaults(&o->q);
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":qh", longopts, NULL)) != -1) {
        if (c == 'q') {
            o->quiet = true;
            continue;
        }
        if (c == 'h')
            return 1;
        if (c == '?' || c == ':')
            return oq__getopt_error("node", c, argv) + 1;
        v = parse_count(optarg);
        if (v < 0 || (c == 'm' && v > UINT32_MAX) || (c == 'v' && v == 0)) {
            fprintf(stderr, "onceq node: bad value '%s' for --%s\n", optarg,
                    longopts[c == 'v' ? 0 : c == 'm' ? 1 : c == 't' ? 2 : 3]
                        .name);
            return 2;
        }
        if (c == 'v')
            o->q.visibility_timeout_ms = OQ__MIN(v, MS_MAX);
        else if (c == 'm')
            o->q.max_receives = (uint32_t)v;
        else if (c == 't')
            o->q.ttl_ms = v;
        else
            o->q.dedup_count = (size_t)v;
    }
    if (optind < argc) {
        fprintf(stderr, "onceq node: unexpected argument '%s'\n",
                argv[optind]);
        return 2;
    }
    return 0;
}

static void node_free(node *n)
{
    checkpoint *cp, *ct;

    wc_free(&n->wc);
    HASH_ITER(hh, n->checkpoints, cp, ct) {
        HASH_DEL(n->checkpoints, cp);
        cp_outs_free(cp->outs, cp->nouts);
        oq__free(cp);
    }
    kafka_free(&n->logs);
    oq_queue_free(n->q);
    oq__free(n->dbuf);
    oq__jtape_free(&n->tape);
    oq__buf_free(&n->fixed);
    oq__buf_free(&n->strs);
    oq__buf_free(&n->body.b);
    oq__buf_free(&n->out.b);
    oq__buf_free(&n->tmp);
    oq__free(n->node_id);
}

int oq__cmd_node(int argc, char **argv)
{
    node_opts o;
    node n;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int rc, status = 0;

    /* 1: --help; 2: a bad value or argument (said); 3: a bad option
     * (said, one line like every command's). */
    rc = parse_opts(argc, argv, &o);
    if (rc == 1) {
        usage(stdout);
        return 0;
    }
    if (rc != 0)
        return 2;
    memset(&n, 0, sizeof(n));
    n.quiet = o.quiet;
    n.default_vt_ms = o.q.visibility_timeout_ms;
    rc = oq_queue_new(&n.q, &o.q);
    n.dbuf = oq__calloc(RECEIVE_MAX_CAP, sizeof(*n.dbuf));
    if (rc != 0 || n.dbuf == NULL) {
        fprintf(stderr, "onceq node: %s\n",
                oq_strerror(rc ? rc : OQ_ENOMEM));
        node_free(&n);
        return 1;
    }
    /* A closed reader must not kill us with SIGPIPE: write() reports it. */
    signal(SIGPIPE, SIG_IGN);
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        n.lineno++;
        handle_line(&n, line, (size_t)len);
        if (n.out.b.len > 0 && !flush_out(&n)) {
            status = 1;
            break;
        }
    }
    free(line);
    node_free(&n);
    return status;
}
