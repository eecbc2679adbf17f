/*
 * `onceq node`: the JSON-lines node protocol (Maelstrom style) on stdin and
 * stdout. docs/NODE.md is the protocol reference.
 *
 * DESIGN
 * ------
 * One thread. The loop reads a line with getline(), parses it with cJSON,
 * looks the body's type up in a table of {type, reply type, handler} and
 * calls the handler, which validates its fields, changes the state and
 * appends its reply fields to one reusable output buffer. The dispatcher
 * wrote the envelope and the reply's type and in_reply_to before the call
 * and closes it after; on an error it throws the partial reply away and
 * writes an error reply instead. Every reply is written with write(2) as
 * one whole line before the next line is read, so a client that waits for
 * each reply never waits forever. Nothing on stdout but replies; logs go to
 * stderr.
 *
 * State (all owned by struct node, touched by this thread only):
 *   - the word-count processor: counts (word -> count), the processed event
 *     ids, and the pending outputs, each of which points at the id and the
 *     word it added. The state is always "last commit + pending": commit
 *     forgets the pending list; rollback walks it backwards and undoes it.
 *     So no copy is made per commit, and a rollback after a restore goes
 *     back to the commit point as of that checkpoint. Checkpoints are
 *     whole copies (counts, ids, pending), by name.
 *   - one oq_queue (the core visibility-timeout queue, with its producer
 *     dedup window and dead-letter list) for enqueue/receive/ack/nack.
 *   - the kafka-workload logs: per key an append-only array of messages
 *     (their JSON text) with offsets from 0, the committed offset, and a
 *     table message_id -> offset for duplicate sends.
 *
 * Hash tables are uthash. Allocation goes through oq__malloc (uthash and
 * cJSON included), so running out of memory gives an error reply (code 13)
 * rather than a crash.
 */
#include "oq_internal.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#define uthash_malloc(sz) oq__malloc(sz)
#define uthash_free(ptr, sz) oq__free(ptr)
#define HASH_NONFATAL_OOM 1
/* Set when uthash could not grow a bucket array (the add did not happen).
 * Read right after each add. */
static int hash_oom;
#define uthash_nonfatal_oom(obj) (hash_oom = 1)
#include <uthash.h>

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

/* ------------------------------------------------------------ out buffer */

/* A growable byte buffer for replies. On out of memory it sets oom and
 * ignores further appends; the dispatcher turns that into an error reply. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static bool sb_reserve(sbuf *b, size_t extra)
{
    size_t need, cap;
    char *p;

    if (b->oom)
        return false;
    need = b->len + extra;
    if (need <= b->cap)
        return true;
    cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    p = oq__realloc(b->p, cap);
    if (p == NULL) {
        b->oom = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (!sb_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
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

/* Length of the well-formed UTF-8 sequence at s (RFC 3629), or 0. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    unsigned char lo = 0x80, hi = 0xBF;
    size_t k;

    if (c >= 0xC2 && c <= 0xDF)
        k = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        k = 3;
    else if (c >= 0xF0 && c <= 0xF4)
        k = 4;
    else
        return 0;
    if (c == 0xE0)
        lo = 0xA0;
    else if (c == 0xED)
        hi = 0x9F;
    else if (c == 0xF0)
        lo = 0x90;
    else if (c == 0xF4)
        hi = 0x8F;
    if (n < k || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < k; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return k;
}

/* Appends s as a JSON string. Bytes that are not UTF-8 become U+FFFD, so
 * the output is always valid JSON text. */
static void sb_str(sbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    char *o;
    size_t i = 0;

    if (!sb_reserve(b, n * 6 + 2))
        return;
    o = b->p + b->len;
    *o++ = '"';
    while (i < n) {
        unsigned char c = u[i];
        size_t k;

        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            *o++ = (char)c;
            i++;
            continue;
        }
        if (c >= 0x80) {
            k = utf8_len(u + i, n - i);
            if (k == 0) {
                memcpy(o, "\\ufffd", 6);
                o += 6;
                i++;
            } else {
                memcpy(o, s + i, k);
                o += k;
                i += k;
            }
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        default:
            memcpy(o, "u00", 3);
            o[3] = hex[c >> 4];
            o[4] = hex[c & 15];
            o += 5;
            break;
        }
        i++;
    }
    *o++ = '"';
    b->len = (size_t)(o - b->p);
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

typedef struct checkpoint {
    UT_hash_handle hh;
    wc_state st;
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
    hash_oom = 0;
    HASH_ADD_KEYPTR(hh, st->ids, e->s, len, e);
    if (hash_oom) {
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
    hash_oom = 0;
    HASH_ADD_KEYPTR(hh, st->words, w->s, len, w);
    if (hash_oom) {
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

/* dst = a deep copy of src (dst starts empty). 0 or OQ_ENOMEM. */
static int wc_copy(wc_state *dst, const wc_state *src)
{
    const wc_word *w, *wt;
    const wc_id *e, *et;

    memset(dst, 0, sizeof(*dst));
    HASH_ITER(hh, src->words, w, wt) {
        if (word_add(dst, w->s, w->len, w->count) == NULL)
            goto out_free;
    }
    HASH_ITER(hh, src->ids, e, et) {
        if (id_add(dst, e->s, e->len) == NULL)
            goto out_free;
    }
    if (!pending_reserve(dst, src->npending))
        goto out_free;
    for (size_t i = 0; i < src->npending; i++) {
        const wc_pending *p = &src->pending[i];
        wc_pending *q = &dst->pending[i];
        HASH_FIND(hh, dst->ids, p->id->s, p->id->len, q->id);
        HASH_FIND(hh, dst->words, p->word->s, p->word->len, q->word);
    }
    dst->npending = src->npending;
    return 0;

out_free:
    wc_free(dst);
    return OQ_ENOMEM;
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
    size_t keylen;
    char key[];
} klog;

/* A message_id seen by send, keyed by its JSON text (so 5 and "5" differ). */
typedef struct kmid {
    UT_hash_handle hh;
    int64_t offset;
    size_t len;
    char s[];
} kmid;

static klog *klog_get(klog **logs, const char *key, bool create)
{
    size_t len = strlen(key);
    klog *l;

    HASH_FIND(hh, *logs, key, len, l);
    if (l || !create)
        return l;
    l = entry_new(sizeof(klog), key, len);
    if (l == NULL)
        return NULL;
    l->keylen = len;
    hash_oom = 0;
    HASH_ADD_KEYPTR(hh, *logs, l->key, len, l);
    if (hash_oom) {
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

static void kafka_free(klog **logs, kmid **mids)
{
    klog *l, *lt;
    kmid *m, *mt;

    HASH_ITER(hh, *logs, l, lt) {
        HASH_DEL(*logs, l);
        for (size_t i = 0; i < l->len; i++)
            cJSON_free(l->msgs[i]);
        oq__free(l->msgs);
        oq__free(l);
    }
    HASH_ITER(hh, *mids, m, mt) {
        HASH_DEL(*mids, m);
        oq__free(m);
    }
}

/* ----------------------------------------------------------------- node */

typedef struct node {
    char *node_id;           /* NULL until init */
    int64_t next_msg_id;     /* the node's own message counter */
    wc_state wc;
    checkpoint *checkpoints; /* uthash by name */
    oq_queue *q;
    int64_t default_vt_ms;   /* the queue's visibility timeout */
    oq_delivery *dbuf;       /* receive buffer, RECEIVE_MAX_CAP entries */
    klog *logs;              /* uthash by key */
    kmid *mids;              /* uthash by message_id JSON text */
    sbuf out;
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

static bool is_int64(const cJSON *v, int64_t *out)
{
    double d;

    if (!cJSON_IsNumber(v))
        return false;
    d = v->valuedouble;
    /* 2^63 is exact in a double; -2^63 itself is rejected, harmlessly. */
    if (!(d > -9223372036854775808.0 && d < 9223372036854775808.0))
        return false;
    if ((double)(int64_t)d != d)
        return false;
    *out = (int64_t)d;
    return true;
}

static int get_string(const cJSON *body, const char *field, const char **out,
                      nerr *e)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, field);

    if (!cJSON_IsString(v) || v->valuestring == NULL)
        return bad_field(e, field, "a string");
    *out = v->valuestring;
    return 0;
}

/* An integer >= 0; when absent, *out = dflt if dflt >= 0, else an error. */
static int get_count(const cJSON *body, const char *field, int64_t dflt,
                     int64_t *out, nerr *e)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, field);

    if (v == NULL && dflt >= 0) {
        *out = dflt;
        return 0;
    }
    if (!is_int64(v, out) || *out < 0)
        return bad_field(e, field, "an integer >= 0");
    return 0;
}

static int get_object(const cJSON *body, const char *field,
                      const cJSON **out, nerr *e)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(body, field);

    if (!cJSON_IsObject(v))
        return bad_field(e, field, "an object");
    *out = v;
    return 0;
}

/* An object whose every value is an integer >= 0 (kafka offsets). */
static int get_offsets(const cJSON *body, const cJSON **out, nerr *e)
{
    const cJSON *o, *kv;
    int64_t off;

    if (get_object(body, "offsets", &o, e))
        return e->code;
    cJSON_ArrayForEach(kv, o) {
        if (!is_int64(kv, &off) || off < 0)
            return bad_field(e, "offsets", "an object of integers >= 0");
    }
    *out = o;
    return 0;
}

/* JSON text of any value (cJSON_free it). */
static char *json_text(const cJSON *v)
{
    return cJSON_PrintUnformatted(v);
}

/* ------------------------------------------------------------- handlers */

/* A handler validates body, updates state and appends its reply fields to
 * n->out (the envelope, type and in_reply_to are already there). Returns 0,
 * or an error code with e filled in; then its output is discarded. */
typedef int (*handler_fn)(node *n, const cJSON *body, nerr *e);

static int h_init(node *n, const cJSON *body, nerr *e)
{
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(body, "node_ids");
    const cJSON *it;
    const char *id = NULL;
    char *copy;

    if (get_string(body, "node_id", &id, e))
        return e->code;
    if (!cJSON_IsArray(ids))
        return bad_field(e, "node_ids", "an array of strings");
    cJSON_ArrayForEach(it, ids) {
        if (!cJSON_IsString(it))
            return bad_field(e, "node_ids", "an array of strings");
    }
    copy = entry_new(0, id, strlen(id));
    if (copy == NULL)
        return no_memory(e);
    oq__free(n->node_id);
    n->node_id = copy;
    sb_key(&n->out, "msg_id");
    sb_int(&n->out, n->next_msg_id++);
    return 0;
}

static void put_processed(node *n, const char *word, size_t len,
                          int64_t count, bool dup)
{
    sb_key(&n->out, "word");
    sb_str(&n->out, word, len);
    sb_key(&n->out, "count");
    sb_int(&n->out, count);
    sb_key(&n->out, "was_duplicate");
    sb_puts(&n->out, dup ? "true" : "false");
}

static int h_process(node *n, const cJSON *body, nerr *e)
{
    wc_state *st = &n->wc;
    const char *eid = NULL, *word = NULL;
    size_t eid_len, word_len;
    wc_id *id;
    wc_word *w;

    if (get_string(body, "event_id", &eid, e) ||
        get_string(body, "word", &word, e))
        return e->code;
    eid_len = strlen(eid);
    word_len = strlen(word);
    HASH_FIND(hh, st->words, word, word_len, w);
    HASH_FIND(hh, st->ids, eid, eid_len, id);
    if (id) {
        put_processed(n, word, word_len, w ? w->count : 0, true);
        return 0;
    }
    if (!pending_reserve(st, st->npending + 1))
        return no_memory(e);
    id = id_add(st, eid, eid_len);
    if (id == NULL)
        return no_memory(e);
    if (w)
        w->count++;
    else if ((w = word_add(st, word, word_len, 1)) == NULL) {
        HASH_DEL(st->ids, id);
        oq__free(id);
        return no_memory(e);
    }
    st->pending[st->npending++] = (wc_pending){ id, w };
    put_processed(n, word, word_len, w->count, false);
    return 0;
}

static int h_checkpoint(node *n, const cJSON *body, nerr *e)
{
    const char *name = NULL;
    size_t len;
    checkpoint *cp;
    wc_state copy;

    if (get_string(body, "checkpoint_id", &name, e))
        return e->code;
    len = strlen(name);
    if (wc_copy(&copy, &n->wc) != 0)
        return no_memory(e);
    HASH_FIND(hh, n->checkpoints, name, len, cp);
    if (cp == NULL) {
        cp = entry_new(sizeof(checkpoint), name, len);
        if (cp == NULL)
            goto out_nomem;
        cp->len = len;
        hash_oom = 0;
        HASH_ADD_KEYPTR(hh, n->checkpoints, cp->name, len, cp);
        if (hash_oom) {
            oq__free(cp);
            goto out_nomem;
        }
    } else {
        wc_free(&cp->st);
    }
    cp->st = copy;
    sb_key(&n->out, "checkpoint_id");
    sb_str(&n->out, name, len);
    return 0;

out_nomem:
    wc_free(&copy);
    return no_memory(e);
}

static int h_restore(node *n, const cJSON *body, nerr *e)
{
    const char *name = NULL;
    checkpoint *cp;
    wc_state copy;
    const wc_word *w, *wt;
    bool first = true;

    if (get_string(body, "checkpoint_id", &name, e))
        return e->code;
    HASH_FIND(hh, n->checkpoints, name, strlen(name), cp);
    if (cp == NULL)
        return fail(e, E_NO_SUCH_KEY, "no checkpoint named '%s'", name);
    if (wc_copy(&copy, &cp->st) != 0)
        return no_memory(e);
    wc_free(&n->wc);
    n->wc = copy;
    sb_key(&n->out, "counts");
    sb_put(&n->out, "{", 1);
    HASH_ITER(hh, n->wc.words, w, wt) {
        if (!first)
            sb_put(&n->out, ",", 1);
        first = false;
        sb_str(&n->out, w->s, w->len);
        sb_put(&n->out, ":", 1);
        sb_int(&n->out, w->count);
    }
    sb_put(&n->out, "}", 1);
    return 0;
}

static int h_commit(node *n, const cJSON *body, nerr *e)
{
    size_t moved = n->wc.npending;

    OQ__UNUSED(body);
    OQ__UNUSED(e);
    /* The outputs are committed: they can no longer be rolled back. */
    n->wc.npending = 0;
    sb_key(&n->out, "output_count");
    sb_int(&n->out, (int64_t)moved);
    return 0;
}

static int h_rollback(node *n, const cJSON *body, nerr *e)
{
    OQ__UNUSED(body);
    OQ__UNUSED(e);
    sb_key(&n->out, "discarded_count");
    sb_int(&n->out, (int64_t)wc_rollback(&n->wc));
    return 0;
}

/* ---------------------------------------------------- queue operations */

static int h_enqueue(node *n, const cJSON *body, nerr *e)
{
    const cJSON *payload = cJSON_GetObjectItemCaseSensitive(body, "payload");
    const char *id = NULL;
    int64_t delay;
    char *text;
    int rc;

    if (get_string(body, "id", &id, e))
        return e->code;
    if (*id == '\0')
        return bad_field(e, "id", "a non-empty string");
    if (payload == NULL)
        return bad_field(e, "payload", "a JSON value");
    if (get_count(body, "delay_ms", 0, &delay, e))
        return e->code;
    text = json_text(payload);
    if (text == NULL)
        return no_memory(e);
    rc = oq_queue_send(n->q, id, strlen(id), text, strlen(text), delay);
    cJSON_free(text);
    if (rc != 0 && rc != OQ_EEXIST)
        return fail(e, E_CRASH, "enqueue: %s", oq_strerror(rc));
    sb_key(&n->out, "duplicate");
    sb_puts(&n->out, rc == OQ_EEXIST ? "true" : "false");
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

static int h_receive(node *n, const cJSON *body, nerr *e)
{
    int64_t max, vt;
    int got;

    if (get_count(body, "max", RECEIVE_MAX_DEFAULT, &max, e) ||
        get_count(body, "visibility_timeout_ms", n->default_vt_ms, &vt, e))
        return e->code;
    max = OQ__MIN(max, RECEIVE_MAX_CAP);
    got = oq_queue_receive(n->q, n->dbuf, (size_t)max, 0);
    if (got < 0)
        return fail(e, E_CRASH, "receive: %s", oq_strerror(got));
    /* The queue's timeout is per queue; set this call's per delivery. */
    for (int i = 0; vt != n->default_vt_ms && i < got; i++)
        oq_queue_extend(n->q, n->dbuf[i].receipt, vt);
    sb_key(&n->out, "messages");
    sb_put(&n->out, "[", 1);
    for (int i = 0; i < got; i++) {
        if (i)
            sb_put(&n->out, ",", 1);
        put_delivery(&n->out, &n->dbuf[i]);
    }
    sb_put(&n->out, "]", 1);
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

static int h_ack(node *n, const cJSON *body, nerr *e)
{
    int64_t receipt;

    if (get_count(body, "receipt", -1, &receipt, e))
        return e->code;
    return settle_result(oq_queue_ack(n->q, (uint64_t)receipt), "ack",
                         receipt, e);
}

static int h_nack(node *n, const cJSON *body, nerr *e)
{
    int64_t receipt, delay;

    if (get_count(body, "receipt", -1, &receipt, e) ||
        get_count(body, "delay_ms", 0, &delay, e))
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

static int h_dead_letters(node *n, const cJSON *body, nerr *e)
{
    dl_ctx c = { &n->out, 0 };

    OQ__UNUSED(body);
    OQ__UNUSED(e);
    sb_key(&n->out, "messages");
    sb_put(&n->out, "[", 1);
    oq_queue_dead_letters(n->q, 0, put_dead, &c);
    sb_put(&n->out, "]", 1);
    return 0;
}

/* --------------------------------------------------------- kafka workload */

static int send_dup(node *n, const cJSON *mid, char **mtext, kmid **found,
                    nerr *e)
{
    *mtext = NULL;
    *found = NULL;
    if (mid == NULL)
        return 0;
    if (!cJSON_IsString(mid) && !cJSON_IsNumber(mid))
        return bad_field(e, "message_id", "a string or a number");
    *mtext = json_text(mid);
    if (*mtext == NULL)
        return no_memory(e);
    HASH_FIND(hh, n->mids, *mtext, strlen(*mtext), *found);
    return 0;
}

static int send_remember(node *n, const char *mtext, int64_t offset)
{
    kmid *m = entry_new(sizeof(kmid), mtext, strlen(mtext));

    if (m == NULL)
        return OQ_ENOMEM;
    m->len = strlen(mtext);
    m->offset = offset;
    hash_oom = 0;
    HASH_ADD_KEYPTR(hh, n->mids, m->s, m->len, m);
    if (hash_oom) {
        oq__free(m);
        return OQ_ENOMEM;
    }
    return 0;
}

static int h_send(node *n, const cJSON *body, nerr *e)
{
    const cJSON *msg = cJSON_GetObjectItemCaseSensitive(body, "msg");
    const char *key = NULL;
    char *mtext = NULL, *text = NULL;
    kmid *dup;
    klog *l;
    int rc = 0;

    if (get_string(body, "key", &key, e))
        return e->code;
    if (msg == NULL)
        return bad_field(e, "msg", "a JSON value");
    if (send_dup(n, cJSON_GetObjectItemCaseSensitive(body, "message_id"),
                 &mtext, &dup, e))
        return e->code;
    if (dup) {
        sb_key(&n->out, "offset");
        sb_int(&n->out, dup->offset);
        sb_key(&n->out, "duplicate");
        sb_puts(&n->out, "true");
        goto out;
    }
    l = klog_get(&n->logs, key, true);
    text = json_text(msg);
    if (l == NULL || text == NULL || (l->len == l->cap && !grow_log(l)) ||
        (mtext && send_remember(n, mtext, (int64_t)l->len) != 0)) {
        rc = no_memory(e);
        goto out;
    }
    l->msgs[l->len] = text;
    text = NULL;
    sb_key(&n->out, "offset");
    sb_int(&n->out, (int64_t)l->len++);
out:
    cJSON_free(text);
    cJSON_free(mtext);
    return rc;
}

static int h_poll(node *n, const cJSON *body, nerr *e)
{
    const cJSON *offsets, *kv;
    bool first = true;

    if (get_offsets(body, &offsets, e))
        return e->code;
    sb_key(&n->out, "msgs");
    sb_put(&n->out, "{", 1);
    cJSON_ArrayForEach(kv, offsets) {
        const klog *l = klog_get(&n->logs, kv->string, false);
        size_t from = (size_t)kv->valuedouble, end;

        if (!first)
            sb_put(&n->out, ",", 1);
        first = false;
        sb_cstr(&n->out, kv->string);
        sb_put(&n->out, ":[", 2);
        end = l ? l->len : 0;
        if (from < end && end - from > POLL_CAP)
            end = from + POLL_CAP;
        for (size_t i = from; i < end; i++) {
            if (i > from)
                sb_put(&n->out, ",", 1);
            sb_put(&n->out, "[", 1);
            sb_int(&n->out, (int64_t)i);
            sb_put(&n->out, ",", 1);
            sb_puts(&n->out, l->msgs[i]);
            sb_put(&n->out, "]", 1);
        }
        sb_put(&n->out, "]", 1);
    }
    sb_put(&n->out, "}", 1);
    return 0;
}

static int h_commit_offsets(node *n, const cJSON *body, nerr *e)
{
    const cJSON *offsets, *kv;

    if (get_offsets(body, &offsets, e))
        return e->code;
    cJSON_ArrayForEach(kv, offsets) {
        klog *l = klog_get(&n->logs, kv->string, true);
        int64_t off = (int64_t)kv->valuedouble;

        if (l == NULL)
            return no_memory(e);
        /* Committed offsets only move forward. */
        if (!l->has_committed || off > l->committed)
            l->committed = off;
        l->has_committed = true;
    }
    return 0;
}

static int h_list_committed(node *n, const cJSON *body, nerr *e)
{
    const cJSON *keys = cJSON_GetObjectItemCaseSensitive(body, "keys");
    const cJSON *k;
    bool first = true;

    if (!cJSON_IsArray(keys))
        return bad_field(e, "keys", "an array of strings");
    cJSON_ArrayForEach(k, keys) {
        if (!cJSON_IsString(k))
            return bad_field(e, "keys", "an array of strings");
    }
    sb_key(&n->out, "offsets");
    sb_put(&n->out, "{", 1);
    cJSON_ArrayForEach(k, keys) {
        const klog *l = klog_get(&n->logs, k->valuestring, false);

        if (l == NULL || !l->has_committed)
            continue;
        if (!first)
            sb_put(&n->out, ",", 1);
        first = false;
        sb_cstr(&n->out, k->valuestring);
        sb_put(&n->out, ":", 1);
        sb_int(&n->out, l->committed);
    }
    sb_put(&n->out, "}", 1);
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

static const route *find_route(const char *type)
{
    for (size_t i = 0; i < NROUTES; i++)
        if (strcmp(type, routes[i].type) == 0)
            return &routes[i];
    return NULL;
}

/* {"src":..,"dest":..,"body":{"type":T,"in_reply_to":N  (left open) */
static void put_head(node *n, const char *src, const char *dest,
                     const char *type, const cJSON *msg_id, int64_t id)
{
    sbuf *b = &n->out;

    sb_put(b, "{\"src\":", 7);
    sb_cstr(b, n->node_id ? n->node_id : dest);
    sb_put(b, ",\"dest\":", 8);
    sb_cstr(b, src);
    sb_put(b, ",\"body\":{\"type\":", 16);
    sb_cstr(b, type);
    sb_key(b, "in_reply_to");
    if (msg_id)
        sb_int(b, id);
    else
        sb_puts(b, "null");
}

static void put_error(node *n, const char *src, const char *dest,
                      const cJSON *msg_id, int64_t id, const nerr *e)
{
    put_head(n, src, dest, "error", msg_id, id);
    sb_key(&n->out, "code");
    sb_int(&n->out, e->code);
    sb_key(&n->out, "text");
    sb_cstr(&n->out, e->text);
}

/* Writes the whole buffer. false when stdout is gone. */
static bool flush_out(node *n)
{
    size_t off = 0;

    while (off < n->out.len) {
        ssize_t w = write(STDOUT_FILENO, n->out.p + off, n->out.len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "onceq node: write: %s\n", strerror(errno));
            return false;
        }
        off += (size_t)w;
    }
    n->out.len = 0;
    return true;
}

static void log_skip(const node *n, const char *why)
{
    if (!n->quiet)
        fprintf(stderr, "onceq node: line %lu: %s; skipped\n", n->lineno,
                why);
}

/* Answers one parsed message (already known to have src and body). */
static void answer(node *n, const char *src, const char *dest,
                   const cJSON *body)
{
    const cJSON *mid = cJSON_GetObjectItemCaseSensitive(body, "msg_id");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(body, "type");
    const route *r = NULL;
    int64_t id = 0;
    nerr e = { 0, "" };

    if (!is_int64(mid, &id)) {
        mid = NULL;
        bad_field(&e, "msg_id", "an integer");
    } else if (!cJSON_IsString(type)) {
        bad_field(&e, "type", "a string");
    } else if ((r = find_route(type->valuestring)) == NULL) {
        fail(&e, E_NOT_SUPPORTED, "unsupported message type '%.120s'",
             type->valuestring);
    }
    if (r) {
        put_head(n, src, dest, r->reply, mid, id);
        if (r->fn(n, body, &e) == 0 && !n->out.oom) {
            sb_put(&n->out, "}}\n", 3);
            if (!n->out.oom)
                return;
        }
        if (e.code == 0)
            no_memory(&e);
        /* Discard the partial reply; the buffer keeps its capacity, so
         * the short error reply fits. */
        n->out.len = 0;
        n->out.oom = false;
    }
    put_error(n, src, dest, mid, id, &e);
    sb_put(&n->out, "}}\n", 3);
}

static void handle_line(node *n, char *line, size_t len)
{
    const char *end = NULL;
    cJSON *msg;
    const cJSON *src, *dest, *body;

    /* cJSON stops right after the value: trailing blanks go first. */
    while (len > 0 && strchr(" \t\r\n", line[len - 1]) != NULL)
        line[--len] = '\0';
    if (len == 0)
        return;
    msg = cJSON_ParseWithLengthOpts(line, len, &end, 0);
    if (msg == NULL || end != line + len) {
        log_skip(n, msg ? "trailing bytes after the JSON value"
                        : "not JSON");
        cJSON_Delete(msg);
        return;
    }
    src = cJSON_GetObjectItemCaseSensitive(msg, "src");
    dest = cJSON_GetObjectItemCaseSensitive(msg, "dest");
    body = cJSON_GetObjectItemCaseSensitive(msg, "body");
    if (!cJSON_IsString(src) || !cJSON_IsObject(body))
        log_skip(n, "no \"src\" string or no \"body\" object");
    else
        answer(n, src->valuestring,
               cJSON_IsString(dest) ? dest->valuestring : "", body);
    cJSON_Delete(msg);
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
    while ((c = getopt_long(argc, argv, "qh", longopts, NULL)) != -1) {
        if (c == 'q') {
            o->quiet = true;
            continue;
        }
        if (c == 'h')
            return 1;
        if (c == '?')
            return 2;
        v = parse_count(optarg);
        if (v < 0 || (c == 'm' && v > UINT32_MAX) || (c == 'v' && v == 0)) {
            fprintf(stderr, "onceq node: bad value '%s' for --%s\n", optarg,
                    longopts[c == 'v' ? 0 : c == 'm' ? 1 : c == 't' ? 2 : 3]
                        .name);
            return 2;
        }
        if (c == 'v')
            o->q.visibility_timeout_ms = v;
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
        wc_free(&cp->st);
        oq__free(cp);
    }
    kafka_free(&n->logs, &n->mids);
    oq_queue_free(n->q);
    oq__free(n->dbuf);
    oq__free(n->out.p);
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

    rc = parse_opts(argc, argv, &o);
    if (rc != 0) {
        usage(rc == 1 ? stdout : stderr);
        return rc == 1 ? 0 : 2;
    }
    memset(&n, 0, sizeof(n));
    n.quiet = o.quiet;
    n.default_vt_ms = o.q.visibility_timeout_ms;
    oq__json_hooks_install();
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
        if (n.out.len > 0 && !flush_out(&n)) {
            status = 1;
            break;
        }
    }
    free(line);
    node_free(&n);
    return status;
}
