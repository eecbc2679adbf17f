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
 * Hash tables are uthash. Allocation goes through oq__malloc (uthash and
 * cJSON included), so running out of memory gives an error reply (code 13)
 * rather than a crash.
 */
#include "oq_internal.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

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
    int64_t next_msg_id;     /* the node's own message counter */
    wc_state wc;
    checkpoint *checkpoints; /* uthash by name */
    oq_queue *q;
    int64_t default_vt_ms;   /* the queue's visibility timeout */
    oq_delivery *dbuf;       /* receive buffer, RECEIVE_MAX_CAP entries */
    klog *logs;              /* uthash by key */
    sbuf body;               /* a handler's reply fields */
    sbuf tmp;                /* scratch: JSON text of a payload or msg */
    sbuf out;                /* the reply line being written */
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

/* The integer that the double d is exactly, if it is one in int64 range. */
static bool double_int64(double d, int64_t *out)
{
    /* 2^63 is exact in a double; -2^63 itself is rejected, harmlessly. */
    if (!(d > -9223372036854775808.0 && d < 9223372036854775808.0))
        return false;
    if ((double)(int64_t)d != d)
        return false;
    *out = (int64_t)d;
    return true;
}

/* The integer a JSON number's text names, if it is one in int64 range:
 * "-12" exactly (a double would round above 2^53); "1.0" or "1e3"
 * through their double value. */
static bool text_int64(const char *s, int64_t *out)
{
    bool neg = *s == '-';
    const char *p = s + neg;
    uint64_t u = 0;

    while (*p >= '0' && *p <= '9') {
        unsigned d = (unsigned)(*p++ - '0');
        if (u > (UINT64_MAX - d) / 10)
            return false;
        u = u * 10 + d;
    }
    if (*p != '\0')
        return double_int64(strtod(s, NULL), out);
    if (u > (uint64_t)INT64_MAX + neg)
        return false;
    *out = !neg ? (int64_t)u : u == 0 ? 0 : -(int64_t)(u - 1) - 1;
    return true;
}

/* A number node's value as an integer. Every number of a request carries
 * its JSON text in valuestring (see walk()). */
static bool is_int64(const cJSON *v, int64_t *out)
{
    if (!cJSON_IsNumber(v))
        return false;
    if (v->valuestring != NULL)
        return text_int64(v->valuestring, out);
    return double_int64(v->valuedouble, out);
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

/* A delay or timeout in ms (get_count), cut to MS_MAX. */
static int get_ms(const cJSON *body, const char *field, int64_t dflt,
                  int64_t *out, nerr *e)
{
    if (get_count(body, field, dflt, out, e))
        return e->code;
    *out = OQ__MIN(*out, MS_MAX);
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

/* ------------------------------------------------------------ JSON text */

/* cJSON keeps a number as a double only, and it accepts some text that is
 * not JSON ("01", "1.", "-.5", control bytes in strings, any byte <= 32 as
 * a blank). So after cJSON has parsed a line, walk() goes over the line's
 * text beside the tree: it refuses what is not strict JSON (RFC 8259),
 * gives each number node its exact text (in valuestring: cJSON_Delete
 * frees it), and replaces bytes that are not well-formed UTF-8 in strings
 * and keys by U+FFFD, so that the node only ever holds valid UTF-8 and two
 * strings that print the same are the same string. The node answers
 * numbers with their text (put_value), never with a re-printed double.
 *
 * A line that is JSON but that cJSON refuses (a lone surrogate escape,
 * nesting deeper than CJSON_NESTING_LIMIT) is read by salvage_scan(), a
 * strict scanner without a tree, for the few fields an error reply needs. */

enum { WALK_OK, WALK_NOT_JSON, WALK_NOMEM };

/* Strict JSON number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool number_ok(const char *s, size_t n)
{
    size_t i = 0;

#define DIGIT(i) ((i) < n && s[i] >= '0' && s[i] <= '9')
    if (i < n && s[i] == '-')
        i++;
    if (i < n && s[i] == '0')
        i++;
    else if (DIGIT(i))
        while (DIGIT(i))
            i++;
    else
        return false;
    if (i < n && s[i] == '.') {
        if (!DIGIT(i + 1))
            return false;
        for (i++; DIGIT(i); i++)
            ;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        if (!DIGIT(i))
            return false;
        while (DIGIT(i))
            i++;
    }
#undef DIGIT
    return i == n;
}

/* Length of the run of bytes that cJSON reads as a number. In a line that
 * cJSON accepted, that run is exactly the number. */
static size_t number_run(const char *p, const char *end)
{
    const char *q = p;

    while (q < end && *q != '\0' && strchr("0123456789+-.eE", *q) != NULL)
        q++;
    return (size_t)(q - p);
}

/* *s with every byte that is not well-formed UTF-8 replaced by U+FFFD.
 * The string is replaced only when it has such bytes. */
static int fix_utf8(char **s)
{
    const unsigned char *u = (const unsigned char *)*s;
    size_t n = strlen(*s), bad = 0, i, k;
    char *r, *o;

    for (i = 0; i < n; i += k) {
        k = u[i] < 0x80 ? 1 : utf8_len(u + i, n - i);
        if (k == 0) {
            bad++;
            k = 1;
        }
    }
    if (bad == 0)
        return WALK_OK;
    r = cJSON_malloc(n + 2 * bad + 1);
    if (r == NULL)
        return WALK_NOMEM;
    for (i = 0, o = r; i < n; i += k) {
        k = u[i] < 0x80 ? 1 : utf8_len(u + i, n - i);
        if (k == 0) {
            memcpy(o, "\xEF\xBF\xBD", 3);
            o += 3;
            k = 1;
        } else {
            memcpy(o, u + i, k);
            o += k;
        }
    }
    *o = '\0';
    cJSON_free(*s);
    *s = r;
    return WALK_OK;
}

typedef struct walker {
    const char *p, *end;     /* the line, from where the walk is */
    nerr refused;            /* code 0, or why the request is refused */
} walker;

static int walk_ws(walker *w)
{
    while (w->p < w->end && (unsigned char)*w->p <= 32) {
        if (*w->p != ' ' && *w->p != '\t' && *w->p != '\r' && *w->p != '\n')
            return WALK_NOT_JSON;
        w->p++;
    }
    return WALK_OK;
}

/* Steps over the string at w->p (cJSON has checked its escapes). */
static int walk_string(walker *w)
{
    const char *p = w->p + 1;

    while (p < w->end && *p != '"') {
        if ((unsigned char)*p < 0x20)
            return WALK_NOT_JSON;
        p += *p == '\\' ? 2 : 1;
    }
    w->p = p + 1;
    return WALK_OK;
}

static int cmp_cstr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* An object with a repeated key (after the U+FFFD replacement; cJSON
 * reads only the first) is refused: the node would answer it with a
 * repeated key, or act on one value and ignore the other. */
static int check_keys(const cJSON *obj, walker *w)
{
    const cJSON *c, *d;
    const char *dup = NULL;
    const char **v;
    size_t n = 0, i;

    if (w->refused.code != 0)
        return WALK_OK;
    for (c = obj->child; c; c = c->next)
        n++;
    if (n <= 16) {
        for (c = obj->child; c && !dup; c = c->next)
            for (d = c->next; d && !dup; d = d->next)
                if (strcmp(c->string, d->string) == 0)
                    dup = c->string;
    } else {
        v = oq__malloc(n * sizeof(*v));
        if (v == NULL)
            return WALK_NOMEM;
        for (c = obj->child, i = 0; c; c = c->next)
            v[i++] = c->string;
        qsort(v, n, sizeof(*v), cmp_cstr);
        for (i = 1; i < n && !dup; i++)
            if (strcmp(v[i - 1], v[i]) == 0)
                dup = v[i];
        oq__free(v);
    }
    if (dup)
        fail(&w->refused, E_MALFORMED, "repeated key '%.80s' in an object",
             dup);
    return WALK_OK;
}

/* Walks the text of v, which cJSON parsed from w->p. */
static int walk(walker *w, cJSON *v)
{
    bool obj = cJSON_IsObject(v);
    cJSON *c;
    size_t len;
    int rc;

    if ((rc = walk_ws(w)) != WALK_OK)
        return rc;
    switch (v->type & 0xFF) {
    case cJSON_Object:
    case cJSON_Array:
        w->p++;              /* '{' or '[' */
        for (c = v->child; c; c = c->next) {
            if (obj) {
                if ((rc = walk_ws(w)) || (rc = walk_string(w)) ||
                    (rc = walk_ws(w)) || (rc = fix_utf8(&c->string)))
                    return rc;
                w->p++;      /* ':' */
            }
            if ((rc = walk(w, c)) || (rc = walk_ws(w)))
                return rc;
            w->p++;          /* ',' or the closing bracket */
        }
        if (v->child == NULL) {
            if ((rc = walk_ws(w)))
                return rc;
            w->p++;
        }
        return obj ? check_keys(v, w) : WALK_OK;
    case cJSON_String:
        if ((rc = walk_string(w)))
            return rc;
        return fix_utf8(&v->valuestring);
    case cJSON_Number:
        len = number_run(w->p, w->end);
        if (!number_ok(w->p, len))
            return WALK_NOT_JSON;
        v->valuestring = cJSON_malloc(len + 1);
        if (v->valuestring == NULL)
            return WALK_NOMEM;
        memcpy(v->valuestring, w->p, len);
        v->valuestring[len] = '\0';
        w->p += len;
        return WALK_OK;
    case cJSON_False:
        w->p += 5;
        return WALK_OK;
    case cJSON_True:
    case cJSON_NULL:
        w->p += 4;
        return WALK_OK;
    }
    return WALK_NOT_JSON;
}

/* Appends v as compact JSON: strings through sb_str, numbers as the text
 * they had in the request. */
static void put_value(sbuf *b, const cJSON *v)
{
    bool obj = cJSON_IsObject(v);
    const cJSON *c;

    switch (v->type & 0xFF) {
    case cJSON_Object:
    case cJSON_Array:
        sb_put(b, obj ? "{" : "[", 1);
        for (c = v->child; c; c = c->next) {
            if (c != v->child)
                sb_put(b, ",", 1);
            if (obj) {
                sb_cstr(b, c->string);
                sb_put(b, ":", 1);
            }
            put_value(b, c);
        }
        sb_put(b, obj ? "}" : "]", 1);
        return;
    case cJSON_String:
        sb_cstr(b, v->valuestring);
        return;
    case cJSON_Number:
        if (v->valuestring != NULL) {
            sb_puts(b, v->valuestring);
        } else {
            char t[32];
            snprintf(t, sizeof(t), "%.17g", v->valuedouble);
            sb_puts(b, isfinite(v->valuedouble) ? t : "null");
        }
        return;
    case cJSON_True:
        sb_puts(b, "true");
        return;
    case cJSON_False:
        sb_puts(b, "false");
        return;
    default:
        sb_puts(b, "null");
        return;
    }
}

/* What salvage_scan() found: spans of the line, NULL when absent. */
typedef struct salvage {
    const char *src, *dest;  /* string contents, without the quotes */
    size_t src_len, dest_len;
    const char *mid;         /* the body's msg_id, when a number */
    size_t mid_len;
    bool body;               /* the first "body" is an object */
} salvage;

static const char *scan_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'))
        p++;
    return p;
}

/* The end of the JSON string at p (after its closing quote), or NULL. */
static const char *scan_string(const char *p, const char *end)
{
    for (p++; p < end && *p != '"'; p++) {
        if ((unsigned char)*p < 0x20)
            return NULL;
        if (*p != '\\')
            continue;
        if (++p == end || strchr("\"\\/bfnrtu", *p) == NULL || *p == '\0')
            return NULL;
        if (*p == 'u') {
            for (int i = 0; i < 4; i++)
                if (++p == end || !isxdigit((unsigned char)*p))
                    return NULL;
        }
    }
    return p < end ? p + 1 : NULL;
}

static unsigned hex4(const char *p)
{
    unsigned v = 0;

    for (int i = 0; i < 4; i++)
        v = v * 16 + (unsigned)(isdigit((unsigned char)p[i])
                                    ? p[i] - '0'
                                    : (tolower((unsigned char)p[i]) - 'a' + 10));
    return v;
}

/* The contents of a JSON string already checked by scan_string, decoded
 * (oq__free it; a lone surrogate becomes U+FFFD, \u0000 ends it), or NULL
 * when out of memory. Decoding never makes the text longer. */
static char *decode_string(const char *s, size_t n)
{
    char *r = oq__malloc(n + 1), *o = r;
    const char *end = s + n;

    if (r == NULL)
        return NULL;
    while (s < end) {
        unsigned c;

        if (*s != '\\') {
            *o++ = *s++;
            continue;
        }
        s++;
        switch (*s++) {
        case 'b': *o++ = '\b'; continue;
        case 'f': *o++ = '\f'; continue;
        case 'n': *o++ = '\n'; continue;
        case 'r': *o++ = '\r'; continue;
        case 't': *o++ = '\t'; continue;
        case 'u': break;
        default: *o++ = s[-1]; continue;
        }
        c = hex4(s);
        s += 4;
        if (c >= 0xD800 && c <= 0xDBFF && end - s >= 6 && s[0] == '\\' &&
            s[1] == 'u' && hex4(s + 2) >= 0xDC00 && hex4(s + 2) <= 0xDFFF) {
            c = 0x10000 + ((c - 0xD800) << 10) + (hex4(s + 2) - 0xDC00);
            s += 6;
        } else if (c >= 0xD800 && c <= 0xDFFF) {
            c = 0xFFFD;
        }
        if (c == 0)
            break;
        if (c < 0x80) {
            *o++ = (char)c;
        } else if (c < 0x800) {
            *o++ = (char)(0xC0 | c >> 6);
            *o++ = (char)(0x80 | (c & 0x3F));
        } else if (c < 0x10000) {
            *o++ = (char)(0xE0 | c >> 12);
            *o++ = (char)(0x80 | ((c >> 6) & 0x3F));
            *o++ = (char)(0x80 | (c & 0x3F));
        } else {
            *o++ = (char)(0xF0 | c >> 18);
            *o++ = (char)(0x80 | ((c >> 12) & 0x3F));
            *o++ = (char)(0x80 | ((c >> 6) & 0x3F));
            *o++ = (char)(0x80 | (c & 0x3F));
        }
    }
    *o = '\0';
    return r;
}

enum { F_NONE, F_SRC, F_DEST, F_BODY, F_MSG_ID };

/* Which field the key at s names, at depth (1: the message, 2: the body). */
static int key_field(const char *s, size_t n, size_t depth, unsigned *seen)
{
    static const char *const names[] = { "", "src", "dest", "body", "msg_id" };
    char *k = decode_string(s, n);
    int f = F_NONE;

    if (k == NULL)
        return F_NONE;
    for (int i = depth == 1 ? F_SRC : F_MSG_ID;
         i <= (depth == 1 ? F_BODY : F_MSG_ID); i++) {
        /* Only the first occurrence counts, as with cJSON's lookups. */
        if (strcmp(k, names[i]) == 0 && !(*seen & (1u << i))) {
            *seen |= 1u << i;
            f = i;
        }
    }
    oq__free(k);
    return f;
}

/* Scans s..end as strict JSON without building a tree (no depth limit),
 * keeping the spans of src, dest and body.msg_id. true if it is JSON. */
static bool salvage_scan(const char *p, const char *end, salvage *sv)
{
    char *stack = NULL;      /* '{' or '[' per open container */
    size_t depth = 0, cap = 0, body_depth = 0;
    unsigned seen = 0;
    int field = F_NONE;
    const char *q;
    bool ok = false;

    memset(sv, 0, sizeof(*sv));
    if (end - p >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0)
        p += 3;
value:
    p = scan_ws(p, end);
    if (p == end)
        goto out;
    if (*p == '{' || *p == '[') {
        if (depth == cap) {
            char *s = oq__realloc(stack, cap ? cap * 2 : 64);
            if (s == NULL)
                goto out;
            stack = s;
            cap = cap ? cap * 2 : 64;
        }
        if (field == F_BODY && *p == '{') {
            sv->body = true;
            body_depth = depth + 1;
        }
        field = F_NONE;
        stack[depth++] = *p++;
        p = scan_ws(p, end);
        if (p < end && *p == (stack[depth - 1] == '{' ? '}' : ']')) {
            p++;
            depth--;
            goto after;
        }
        if (stack[depth - 1] == '{')
            goto key;
        goto value;
    }
    q = p;
    if (*p == '"') {
        if ((p = scan_string(p, end)) == NULL)
            goto out;
        if (field == F_SRC) {
            sv->src = q + 1;
            sv->src_len = (size_t)(p - q - 2);
        } else if (field == F_DEST) {
            sv->dest = q + 1;
            sv->dest_len = (size_t)(p - q - 2);
        }
    } else if (*p == '-' || (*p >= '0' && *p <= '9')) {
        p += number_run(p, end);
        if (!number_ok(q, (size_t)(p - q)))
            goto out;
        if (field == F_MSG_ID) {
            sv->mid = q;
            sv->mid_len = (size_t)(p - q);
        }
    } else if (end - p >= 4 && (memcmp(p, "true", 4) == 0 ||
                                memcmp(p, "null", 4) == 0)) {
        p += 4;
    } else if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
        p += 5;
    } else {
        goto out;
    }
    field = F_NONE;
after:
    if (body_depth > depth)
        body_depth = 0;
    p = scan_ws(p, end);
    if (depth == 0) {
        ok = p == end;
        goto out;
    }
    if (p < end && *p == ',') {
        p++;
        if (stack[depth - 1] == '{')
            goto key;
        goto value;
    }
    if (p < end && *p == (stack[depth - 1] == '{' ? '}' : ']')) {
        p++;
        depth--;
        goto after;
    }
    goto out;
key:
    p = scan_ws(p, end);
    if (p == end || *p != '"')
        goto out;
    q = p;
    if ((p = scan_string(p, end)) == NULL)
        goto out;
    if ((depth == 1 && stack[0] == '{') ||
        (body_depth != 0 && depth == body_depth))
        field = key_field(q + 1, (size_t)(p - q - 2), depth == 1 ? 1 : 2,
                          &seen);
    p = scan_ws(p, end);
    if (p == end || *p != ':')
        goto out;
    p++;
    goto value;
out:
    oq__free(stack);
    return ok;
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

static int h_checkpoint(node *n, const cJSON *body, nerr *e)
{
    const char *name = NULL;
    size_t len;
    checkpoint *cp;
    cp_out *outs;

    if (get_string(body, "checkpoint_id", &name, e))
        return e->code;
    len = strlen(name);
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
static int h_restore(node *n, const cJSON *body, nerr *e)
{
    const char *name = NULL;
    checkpoint *cp;
    const wc_word *w, *wt;
    const wc_id *id;
    bool first = true;

    if (get_string(body, "checkpoint_id", &name, e))
        return e->code;
    HASH_FIND(hh, n->checkpoints, name, strlen(name), cp);
    if (cp == NULL)
        return fail(e, E_NO_SUCH_KEY, "no checkpoint named '%s'", name);
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

static int h_commit(node *n, const cJSON *body, nerr *e)
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

static int h_rollback(node *n, const cJSON *body, nerr *e)
{
    OQ__UNUSED(body);
    OQ__UNUSED(e);
    sb_key(&n->body, "discarded_count");
    sb_int(&n->body, (int64_t)wc_rollback(&n->wc));
    return 0;
}

/* ---------------------------------------------------- queue operations */

static int h_enqueue(node *n, const cJSON *body, nerr *e)
{
    const cJSON *payload = cJSON_GetObjectItemCaseSensitive(body, "payload");
    const char *id = NULL;
    int64_t delay;
    int rc;

    if (get_string(body, "id", &id, e))
        return e->code;
    if (*id == '\0')
        return bad_field(e, "id", "a non-empty string");
    if (payload == NULL)
        return bad_field(e, "payload", "a JSON value");
    if (get_ms(body, "delay_ms", 0, &delay, e))
        return e->code;
    n->tmp.len = 0;
    n->tmp.oom = false;
    put_value(&n->tmp, payload);
    if (n->tmp.oom)
        return no_memory(e);
    rc = oq_queue_send(n->q, id, strlen(id), n->tmp.p, n->tmp.len, delay);
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

static int h_receive(node *n, const cJSON *body, nerr *e)
{
    int64_t max, vt;
    int got;

    if (get_count(body, "max", RECEIVE_MAX_DEFAULT, &max, e) ||
        get_ms(body, "visibility_timeout_ms", n->default_vt_ms, &vt, e))
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
        get_ms(body, "delay_ms", 0, &delay, e))
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

/* Appends one message to l under the message_id text mtext (or none). */
static int send_append(node *n, klog *l, const cJSON *msg, const char *mtext,
                       size_t mlen, nerr *e)
{
    kmid *m = NULL;
    char *text;

    n->tmp.len = 0;
    n->tmp.oom = false;
    put_value(&n->tmp, msg);
    if (n->tmp.oom)
        return no_memory(e);
    if (mtext && (m = entry_new(sizeof(kmid), mtext, mlen)) == NULL)
        return no_memory(e);
    text = entry_new(0, n->tmp.p, n->tmp.len);
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
static int h_send(node *n, const cJSON *body, nerr *e)
{
    const cJSON *msg = cJSON_GetObjectItemCaseSensitive(body, "msg");
    const cJSON *mid = cJSON_GetObjectItemCaseSensitive(body, "message_id");
    const char *key = NULL;
    char *mtext = NULL;
    size_t mlen = 0;
    kmid *dup = NULL;
    klog *l;
    int rc;

    if (get_string(body, "key", &key, e))
        return e->code;
    if (msg == NULL)
        return bad_field(e, "msg", "a JSON value");
    if (mid && !cJSON_IsString(mid) && !cJSON_IsNumber(mid))
        return bad_field(e, "message_id", "a string or a number");
    l = klog_get(&n->logs, key, true);
    if (l == NULL)
        return no_memory(e);
    if (mid) {
        n->tmp.len = 0;
        n->tmp.oom = false;
        put_value(&n->tmp, mid);
        if (n->tmp.oom || (mtext = entry_new(0, n->tmp.p, n->tmp.len)) == NULL)
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

static int h_poll(node *n, const cJSON *body, nerr *e)
{
    const cJSON *offsets, *kv;
    bool first = true;

    if (get_offsets(body, &offsets, e))
        return e->code;
    sb_key(&n->body, "msgs");
    sb_put(&n->body, "{", 1);
    cJSON_ArrayForEach(kv, offsets) {
        const klog *l = klog_get(&n->logs, kv->string, false);
        int64_t off = 0;
        size_t from, end;

        if (!first)
            sb_put(&n->body, ",", 1);
        first = false;
        is_int64(kv, &off);      /* checked by get_offsets */
        from = (size_t)off;
        sb_cstr(&n->body, kv->string);
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

static int h_commit_offsets(node *n, const cJSON *body, nerr *e)
{
    const cJSON *offsets, *kv;

    if (get_offsets(body, &offsets, e))
        return e->code;
    cJSON_ArrayForEach(kv, offsets) {
        klog *l = klog_get(&n->logs, kv->string, true);
        int64_t off = 0;

        is_int64(kv, &off);      /* checked by get_offsets */
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
    sb_key(&n->body, "offsets");
    sb_put(&n->body, "{", 1);
    cJSON_ArrayForEach(k, keys) {
        klog *l = klog_get(&n->logs, k->valuestring, false);

        /* A key named twice is answered once. */
        if (l == NULL || !l->has_committed || l->listed == n->lineno)
            continue;
        l->listed = n->lineno;
        if (!first)
            sb_put(&n->body, ",", 1);
        first = false;
        sb_cstr(&n->body, k->valuestring);
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

static const route *find_route(const char *type)
{
    for (size_t i = 0; i < NROUTES; i++)
        if (strcmp(type, routes[i].type) == 0)
            return &routes[i];
    return NULL;
}

/* {"src":..,"dest":..,"body":{"type":T,"in_reply_to":N  (left open).
 * Written after the handler ran, so that init_ok comes from the new id. */
static void put_head(node *n, const char *src, const char *dest,
                     const char *type, bool has_id, int64_t id)
{
    sbuf *b = &n->out;

    sb_put(b, "{\"src\":", 7);
    sb_cstr(b, n->node_id ? n->node_id : dest);
    sb_put(b, ",\"dest\":", 8);
    sb_cstr(b, src);
    sb_put(b, ",\"body\":{\"type\":", 16);
    sb_cstr(b, type);
    sb_key(b, "in_reply_to");
    if (has_id)
        sb_int(b, id);
    else
        sb_puts(b, "null");
}

static void put_error(node *n, const char *src, const char *dest,
                      bool has_id, int64_t id, const nerr *e)
{
    put_head(n, src, dest, "error", has_id, id);
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

/* Answers one parsed message (already known to have src and body);
 * refused: why the request is refused before any handler runs, or NULL. */
static void answer(node *n, const char *src, const char *dest,
                   const cJSON *body, const nerr *refused)
{
    const cJSON *mid = cJSON_GetObjectItemCaseSensitive(body, "msg_id");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(body, "type");
    const route *r = NULL;
    int64_t id = 0;
    bool has_id = is_int64(mid, &id);
    nerr e = { 0, "" };

    if (refused != NULL && refused->code != 0) {
        e = *refused;
    } else if (!has_id) {
        bad_field(&e, "msg_id", "an integer");
    } else if (!cJSON_IsString(type)) {
        bad_field(&e, "type", "a string");
    } else if ((r = find_route(type->valuestring)) == NULL) {
        fail(&e, E_NOT_SUPPORTED, "unsupported message type '%.120s'",
             type->valuestring);
    }
    if (r) {
        n->body.len = 0;
        n->body.oom = false;
        if (r->fn(n, body, &e) == 0 && !n->body.oom) {
            put_head(n, src, dest, r->reply, true, id);
            sb_put(&n->out, n->body.p, n->body.len);
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
    put_error(n, src, dest, has_id, id, &e);
}

/* A line that is JSON but that cJSON could not take: answered with error
 * 12 when it has a src and a body, like any other request. */
static void answer_salvaged(node *n, const char *line, size_t len)
{
    salvage sv;
    char *src = NULL, *dest = NULL, *mtext = NULL;
    int64_t id = 0;
    bool has_id = false;
    nerr e;

    if (!salvage_scan(line, line + len, &sv)) {
        log_skip(n, "not JSON");
        return;
    }
    if (sv.src == NULL || !sv.body) {
        log_skip(n, "no \"src\" string or no \"body\" object");
        return;
    }
    src = decode_string(sv.src, sv.src_len);
    dest = sv.dest ? decode_string(sv.dest, sv.dest_len) : NULL;
    mtext = sv.mid ? entry_new(0, sv.mid, sv.mid_len) : NULL;
    if (src == NULL || (sv.dest && dest == NULL) || (sv.mid && mtext == NULL)) {
        log_skip(n, "out of memory");
        goto out;
    }
    has_id = mtext && text_int64(mtext, &id);
    fail(&e, E_MALFORMED, "unsupported JSON in the request: a \\u escape of "
         "a lone surrogate, or nesting deeper than %d levels",
         CJSON_NESTING_LIMIT);
    put_error(n, src, dest ? dest : "", has_id, id, &e);
out:
    oq__free(src);
    oq__free(dest);
    oq__free(mtext);
}

static void handle_line(node *n, char *line, size_t len)
{
    const char *end = NULL;
    cJSON *msg;
    const cJSON *src, *dest, *body;
    walker w;
    int rc;

    /* cJSON stops right after the value: trailing blanks go first. */
    while (len > 0 && strchr(" \t\r\n", line[len - 1]) != NULL)
        line[--len] = '\0';
    if (len == 0)
        return;
    msg = cJSON_ParseWithLengthOpts(line, len, &end, 0);
    if (msg == NULL) {
        answer_salvaged(n, line, len);
        return;
    }
    if (end != line + len) {
        log_skip(n, "trailing bytes after the JSON value");
        goto out;
    }
    memset(&w, 0, sizeof(w));
    w.p = line;
    w.end = line + len;
    if (len >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0)
        w.p += 3;        /* cJSON skips a byte order mark */
    rc = walk(&w, msg);
    if (rc == WALK_OK && (rc = walk_ws(&w)) == WALK_OK && w.p != w.end)
        rc = WALK_NOT_JSON;
    if (rc == WALK_NOT_JSON) {
        log_skip(n, "not JSON");
        goto out;
    }
    if (rc == WALK_NOMEM)
        no_memory(&w.refused);
    src = cJSON_GetObjectItemCaseSensitive(msg, "src");
    dest = cJSON_GetObjectItemCaseSensitive(msg, "dest");
    body = cJSON_GetObjectItemCaseSensitive(msg, "body");
    if (!cJSON_IsString(src) || !cJSON_IsObject(body))
        log_skip(n, "no \"src\" string or no \"body\" object");
    else
        answer(n, src->valuestring,
               cJSON_IsString(dest) ? dest->valuestring : "", body,
               &w.refused);
out:
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
    oq__free(n->out.p);
    oq__free(n->body.p);
    oq__free(n->tmp.p);
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
