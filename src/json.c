/*
 * A strict JSON scanner: validates one JSON text (RFC 8259) and records its
 * values on a flat tape, with byte offsets into the text, so that strings,
 * keys and numbers are read back exactly as written: byte strings with a
 * length (an escaped NUL included) and numbers as their source text.
 *
 * DESIGN
 * ------
 * Why not cJSON alone: cJSON stores strings NUL-terminated (so "x\u0000y"
 * and "x\u0000z" read the same), numbers as doubles (so 2^53 + 1 reads as
 * 2^53), and it is lenient: raw control characters inside strings, every
 * byte <= 32 as whitespace, "01" and "1." as numbers. Every line onceq
 * accepts is copied into outputs that must parse with a strict parser, so
 * the acceptance test must be strict, and the values must be exact. jsmn
 * (Debian's libjsmn-dev) tokenises without validating (escapes, numbers,
 * control characters), so it could not be the acceptance test either.
 *
 * What is accepted: exactly one value with optional whitespace (space, tab,
 * CR, LF) around it; strings of bytes >= 0x20 other than '"' and '\\', and
 * the escapes \" \\ \/ \b \f \n \r \t \uXXXX, where a \u escape of a high
 * surrogate must be followed by one of a low surrogate (a lone surrogate
 * has no UTF-8 form); numbers -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?;
 * true, false, null; nesting up to OQ__JSON_MAX_DEPTH; no object with the
 * same key twice (I-JSON, RFC 7493: which of two "id"s would be the id?).
 * The bytes must be valid UTF-8 with no NUL: the caller checks that first
 * (oq__utf8_valid), the scanner only checks the structure.
 *
 * The tape: one token per value and per object key, in document order.
 * tok[i].end is the index just past value i's subtree, so siblings are
 * found without a walk: an object's members are (key, value) pairs from
 * i + 1 to tok[i].end, an array's elements likewise. No allocation but the
 * tape itself, which the caller keeps and reuses.
 *
 * Threads: none of its own; every function works on the caller's data.
 */
#include "oq_internal.h"

#include <stdlib.h>
#include <string.h>

/* Keys of an object with more members than this are checked for
 * duplicates by sorting, below it pairwise. */
#define PAIRWISE_KEYS 16

typedef struct scan {
    const char *s;
    size_t len;
    oq__jtape *t;
    size_t err_at;
    const char *why;
} scan;

/* Bytes that may stand in a string as they are: everything but '"', '\\'
 * and the control characters (UTF-8 was checked before). One table load a
 * byte instead of three compares. */
static const bool plain[256] = {
    [0x20 ... 0x21] = true, [0x23 ... 0x5B] = true, [0x5D ... 0xFF] = true,
};

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static size_t skip_ws(const scan *sc, size_t p)
{
    while (p < sc->len && is_ws(sc->s[p]))
        p++;
    return p;
}

static int fail(scan *sc, size_t at, const char *why)
{
    sc->err_at = at;
    sc->why = why;
    return -1;
}

/* Appends a token; its end is set by the caller. */
static int push(scan *sc, uint8_t type, size_t start, uint32_t *index)
{
    oq__jtape *t = sc->t;

    if (t->n == t->cap) {
        uint32_t ncap = t->cap ? t->cap * 2 : 64;
        oq__jtok *nt;
        if (t->cap > UINT32_MAX / 4)
            return fail(sc, start, "too many values");
        nt = oq__realloc(t->tok, (size_t)ncap * sizeof(*nt));
        if (nt == NULL) {
            sc->err_at = start;
            sc->why = NULL; /* out of memory, not a parse error */
            return -1;
        }
        t->tok = nt;
        t->cap = ncap;
    }
    *index = t->n;
    t->tok[t->n] = (oq__jtok){ (uint32_t)start, 0, t->n + 1, type, 0 };
    t->n++;
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The code unit of the \uXXXX escape at s[p] (on the backslash), or -1. */
static long u_escape(const char *s, size_t len, size_t p)
{
    long v = 0;

    if (p + 6 > len || s[p] != '\\' || s[p + 1] != 'u')
        return -1;
    for (size_t i = p + 2; i < p + 6; i++) {
        int h = hexval(s[i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

/* A string starting at s[p] (the opening quote). On success *pp is just
 * past the closing quote. */
static int scan_string(scan *sc, size_t *pp)
{
    const char *s = sc->s;
    size_t p = *pp + 1;
    uint32_t i;
    bool esc = false;

    if (push(sc, OQ__J_STR, p, &i) != 0)
        return -1;
    for (;;) {
        unsigned char c;
        /* The common run of plain bytes. */
        while (p < sc->len && plain[(unsigned char)s[p]])
            p++;
        if (p >= sc->len)
            return fail(sc, p, "unterminated string");
        c = (unsigned char)s[p];
        if (c == '"')
            break;
        if (c < 0x20)
            return fail(sc, p, "control character in a string");
        /* A backslash. */
        esc = true;
        if (p + 1 >= sc->len)
            return fail(sc, p, "unterminated string");
        switch (s[p + 1]) {
        case '"': case '\\': case '/': case 'b': case 'f': case 'n':
        case 'r': case 't':
            p += 2;
            break;
        case 'u': {
            long u = u_escape(s, sc->len, p);
            if (u < 0)
                return fail(sc, p, "bad \\u escape");
            if (u >= 0xDC00 && u <= 0xDFFF)
                return fail(sc, p, "lone low surrogate in a \\u escape");
            if (u >= 0xD800 && u <= 0xDBFF) {
                long lo = u_escape(s, sc->len, p + 6);
                if (lo < 0xDC00 || lo > 0xDFFF)
                    return fail(sc, p, "lone high surrogate in a \\u escape");
                p += 6;
            }
            p += 6;
            break;
        }
        default:
            return fail(sc, p, "bad escape in a string");
        }
    }
    sc->t->tok[i].len = (uint32_t)(p - (*pp + 1));
    sc->t->tok[i].esc = esc;
    *pp = p + 1;
    return 0;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int scan_number(scan *sc, size_t *pp)
{
    const char *s = sc->s;
    size_t b = *pp, p = b, n = sc->len;
    uint32_t i;

    if (p < n && s[p] == '-')
        p++;
    if (p < n && s[p] == '0') {
        p++;
    } else if (p < n && s[p] >= '1' && s[p] <= '9') {
        while (p < n && is_digit(s[p]))
            p++;
    } else {
        return fail(sc, p, "bad number");
    }
    if (p < n && s[p] == '.') {
        p++;
        if (p >= n || !is_digit(s[p]))
            return fail(sc, p, "bad number: no digit after '.'");
        while (p < n && is_digit(s[p]))
            p++;
    }
    if (p < n && (s[p] == 'e' || s[p] == 'E')) {
        p++;
        if (p < n && (s[p] == '+' || s[p] == '-'))
            p++;
        if (p >= n || !is_digit(s[p]))
            return fail(sc, p, "bad number: no digit in the exponent");
        while (p < n && is_digit(s[p]))
            p++;
    }
    if (push(sc, OQ__J_NUM, b, &i) != 0)
        return -1;
    sc->t->tok[i].len = (uint32_t)(p - b);
    *pp = p;
    return 0;
}

static int scan_literal(scan *sc, size_t *pp)
{
    static const struct { const char *text; uint8_t type; } lit[] = {
        { "true", OQ__J_TRUE }, { "false", OQ__J_FALSE }, { "null", OQ__J_NULL },
    };
    size_t p = *pp;

    for (size_t k = 0; k < sizeof(lit) / sizeof(lit[0]); k++) {
        size_t l = strlen(lit[k].text);
        uint32_t i;
        if (sc->len - p >= l && memcmp(sc->s + p, lit[k].text, l) == 0) {
            if (push(sc, lit[k].type, p, &i) != 0)
                return -1;
            sc->t->tok[i].len = (uint32_t)l;
            *pp = p + l;
            return 0;
        }
    }
    return fail(sc, p, "invalid literal");
}

/* ------------------------------------------------------ duplicate keys */

/* Compares the decoded bytes of two key tokens. */
static int key_cmp(const oq__jdoc *d, uint32_t a, uint32_t b)
{
    const oq__jtok *x = &d->tok[a], *y = &d->tok[b];

    if (!x->esc && !y->esc) {
        size_t n = OQ__MIN(x->len, y->len);
        int c = memcmp(d->text + x->start, d->text + y->start, n);
        return c ? c : (x->len > y->len) - (x->len < y->len);
    }
    {
        /* Decoded strings are never longer than their escaped form. */
        char sa[256], sb[256];
        char *pa = x->len <= sizeof(sa) ? sa : oq__malloc(x->len);
        char *pb = y->len <= sizeof(sb) ? sb : oq__malloc(y->len);
        size_t la = 0, lb = 0;
        int c = 0;
        if (pa && pb) {
            const char *va = oq__jstr(d, a, pa, &la);
            const char *vb = oq__jstr(d, b, pb, &lb);
            c = memcmp(va, vb, OQ__MIN(la, lb));
            c = c ? c : (la > lb) - (la < lb);
        }
        if (pa != sa)
            oq__free(pa);
        if (pb != sb)
            oq__free(pb);
        return c;
    }
}

static _Thread_local const oq__jdoc *sort_doc;

static int key_qcmp(const void *a, const void *b)
{
    return key_cmp(sort_doc, *(const uint32_t *)a, *(const uint32_t *)b);
}

/* 0, or -1 if the object at obj has a key twice (*dup: the second). */
static int check_keys(const oq__jdoc *d, uint32_t obj, uint32_t *dup)
{
    uint32_t keys[PAIRWISE_KEYS], nk = 0;
    uint32_t *all;
    int rc = 0;

    for (uint32_t i = obj + 1; i < d->tok[obj].end; i = d->tok[i + 1].end) {
        if (nk == PAIRWISE_KEYS)
            goto sorted;
        for (uint32_t k = 0; k < nk; k++)
            if (key_cmp(d, keys[k], i) == 0) {
                *dup = i;
                return -1;
            }
        keys[nk++] = i;
    }
    return 0;

sorted:
    nk = 0;
    for (uint32_t i = obj + 1; i < d->tok[obj].end; i = d->tok[i + 1].end)
        nk++;
    if ((all = oq__malloc(nk * sizeof(*all))) == NULL)
        return 0; /* cannot check: accept (the keys are still exact) */
    nk = 0;
    for (uint32_t i = obj + 1; i < d->tok[obj].end; i = d->tok[i + 1].end)
        all[nk++] = i;
    sort_doc = d;
    qsort(all, nk, sizeof(*all), key_qcmp);
    for (uint32_t k = 1; k < nk; k++)
        if (key_cmp(d, all[k - 1], all[k]) == 0) {
            *dup = OQ__MAX(all[k - 1], all[k]);
            rc = -1;
            break;
        }
    oq__free(all);
    return rc;
}

/* ------------------------------------------------------- the fast path */

/* Members of an object the fast path takes; more go the full way. */
#define FLAT_MAX 16

/* A plain string at s[p] (the opening quote): no escapes, no control
 * characters. Appends its token; *pp moves past the closing quote. false
 * for anything else (the full scan decides). Room for the token was made
 * by the caller. */
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
static inline bool flat_string(const char *s, size_t len, size_t *pp,
                               oq__jtape *t)
{
    size_t b = *pp + 1, p = b;

    while (p < len && plain[(unsigned char)s[p]])
        p++;
    if (p >= len || s[p] != '"')
        return false;
    t->tok[t->n] = (oq__jtok){ (uint32_t)b, (uint32_t)(p - b), t->n + 1,
                               OQ__J_STR, 0 };
    t->n++;
    *pp = p + 1;
    return true;
}

/*
 * The common event in one pass: one object, not nested, of at most
 * FLAT_MAX members whose keys and string values have no escapes and whose
 * values are strings, numbers or literals. Builds exactly the tape the full
 * scan would (test/test_json.c checks that on mutated texts) and returns 0;
 * returns 1, with the tape in any state, for every other text, valid or
 * not, which the full scan then reads. Numbers and literals go through the
 * full scan's own functions.
 */
int oq__json_scan_flat(const char *s, size_t len, oq__jtape *t)
{
    scan sc = { s, len, t, 0, NULL };
    size_t p = 0, open;
    uint32_t keys[FLAT_MAX], nk = 0;

    if (t->cap < 2 * FLAT_MAX + 1) {
        oq__jtok *nt = oq__realloc(t->tok, 64 * sizeof(*nt));
        if (nt == NULL)
            return 1;
        t->tok = nt;
        t->cap = 64;
    }
    t->n = 1;
    while (p < len && (unsigned char)s[p] <= ' ' && is_ws(s[p]))
        p++;
    if (p >= len || s[p] != '{')
        return 1;
    open = p++;
    while (p < len && (unsigned char)s[p] <= ' ' && is_ws(s[p]))
        p++;
    if (p < len && s[p] == '}')
        goto close;
    for (;;) {
        if (nk == FLAT_MAX || p >= len || s[p] != '"')
            return 1;
        keys[nk++] = t->n;
        if (!flat_string(s, len, &p, t))
            return 1;
        while (p < len && (unsigned char)s[p] <= ' ' && is_ws(s[p]))
            p++;
        if (p >= len || s[p] != ':')
            return 1;
        p++;
        while (p < len && (unsigned char)s[p] <= ' ' && is_ws(s[p]))
            p++;
        if (p >= len)
            return 1;
        if (s[p] == '"') {
            if (!flat_string(s, len, &p, t))
                return 1;
        } else if (s[p] == '-' || is_digit(s[p])) {
            if (scan_number(&sc, &p) != 0)
                return 1;
        } else if (s[p] == 't' || s[p] == 'f' || s[p] == 'n') {
            if (scan_literal(&sc, &p) != 0)
                return 1;
        } else {
            return 1;
        }
        while (p < len && (unsigned char)s[p] <= ' ' && is_ws(s[p]))
            p++;
        if (p < len && s[p] == ',') {
            p++;
            while (p < len && (unsigned char)s[p] <= ' ' && is_ws(s[p]))
                p++;
            continue;
        }
        if (p < len && s[p] == '}')
            break;
        return 1;
    }
close:
    /* A duplicate key is an error: the full scan words it. */
    for (uint32_t a = 1; a < nk; a++)
        for (uint32_t b = 0; b < a; b++) {
            const oq__jtok *x = &t->tok[keys[a]], *y = &t->tok[keys[b]];
            if (x->len == y->len &&
                memcmp(s + x->start, s + y->start, x->len) == 0)
                return 1;
        }
    t->tok[0] = (oq__jtok){ (uint32_t)open, (uint32_t)(p + 1 - open), t->n,
                            OQ__J_OBJ, 0 };
    for (p++; p < len && (unsigned char)s[p] <= ' ' && is_ws(s[p]); p++)
        ;
    return p < len ? 1 : 0;
}

/* ------------------------------------------------------------- the scan */

int oq__json_scan(const char *s, size_t len, oq__jtape *t, size_t *err_at,
                  const char **why)
{
    if (len < UINT32_MAX && oq__json_scan_flat(s, len, t) == 0)
        return 0;
    return oq__json_scan_full(s, len, t, err_at, why);
}

int oq__json_scan_full(const char *s, size_t len, oq__jtape *t,
                       size_t *err_at, const char **why)
{
    scan sc = { s, len, t, 0, NULL };
    uint32_t stack[OQ__JSON_MAX_DEPTH];
    unsigned depth = 0;
    size_t p;
    uint32_t i;

    t->n = 0;
    if (len >= UINT32_MAX) {
        fail(&sc, 0, "text too long");
        goto out_fail;
    }
    p = skip_ws(&sc, 0);

value:
    if (p >= len) {
        fail(&sc, p, "unexpected end of the text");
        goto out_fail;
    }
    switch (s[p]) {
    case '{':
    case '[':
        if (depth == OQ__JSON_MAX_DEPTH) {
            fail(&sc, p, "nesting too deep");
            goto out_fail;
        }
        if (push(&sc, s[p] == '{' ? OQ__J_OBJ : OQ__J_ARR, p, &i) != 0)
            goto out_fail;
        stack[depth++] = i;
        p = skip_ws(&sc, p + 1);
        if (p < len && s[p] == (s[t->tok[i].start] == '{' ? '}' : ']'))
            goto close;
        if (t->tok[i].type == OQ__J_ARR)
            goto value;
        goto key;
    case '"':
        if (scan_string(&sc, &p) != 0)
            goto out_fail;
        goto after;
    case 't': case 'f': case 'n':
        if (scan_literal(&sc, &p) != 0)
            goto out_fail;
        goto after;
    default:
        if (s[p] == '-' || is_digit(s[p])) {
            if (scan_number(&sc, &p) != 0)
                goto out_fail;
            goto after;
        }
        fail(&sc, p, "unexpected character");
        goto out_fail;
    }

key:
    if (p >= len || s[p] != '"') {
        fail(&sc, p, "expected a string key");
        goto out_fail;
    }
    if (scan_string(&sc, &p) != 0)
        goto out_fail;
    p = skip_ws(&sc, p);
    if (p >= len || s[p] != ':') {
        fail(&sc, p, "expected ':'");
        goto out_fail;
    }
    p = skip_ws(&sc, p + 1);
    goto value;

after:
    if (depth == 0) {
        p = skip_ws(&sc, p);
        if (p < len) {
            fail(&sc, p, "unexpected data after the value");
            goto out_fail;
        }
        return 0;
    }
    p = skip_ws(&sc, p);
    i = stack[depth - 1];
    if (p < len && s[p] == ',') {
        p = skip_ws(&sc, p + 1);
        if (t->tok[i].type == OQ__J_OBJ)
            goto key;
        goto value;
    }
    if (p < len && s[p] == (t->tok[i].type == OQ__J_OBJ ? '}' : ']'))
        goto close;
    fail(&sc, p, t->tok[i].type == OQ__J_OBJ ? "expected ',' or '}'"
                                              : "expected ',' or ']'");
    goto out_fail;

close:
    /* s[p] closes the container stack[depth - 1]. */
    i = stack[--depth];
    t->tok[i].len = (uint32_t)(p + 1 - t->tok[i].start);
    t->tok[i].end = t->n;
    if (t->tok[i].type == OQ__J_OBJ) {
        oq__jdoc d = { s, len, t->tok, t->n };
        uint32_t dup;
        if (check_keys(&d, i, &dup) != 0) {
            fail(&sc, t->tok[dup].start - 1, "duplicate key in an object");
            goto out_fail;
        }
    }
    p++;
    goto after;

out_fail:
    *err_at = sc.err_at;
    *why = sc.why;
    return sc.why ? -1 : OQ_ENOMEM;
}

void oq__jtape_free(oq__jtape *t)
{
    oq__free(t->tok);
    t->tok = NULL;
    t->n = t->cap = 0;
}

/* ------------------------------------------------------------ reading */

/* Appends code point cp as UTF-8; returns the bytes written. */
static size_t put_utf8(char *o, unsigned long cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

const char *oq__jstr(const oq__jdoc *d, uint32_t i, char *buf, size_t *len)
{
    const oq__jtok *t = &d->tok[i];
    const char *s = d->text + t->start;
    size_t n = t->len, o = 0;

    if (!t->esc) {
        *len = n;
        return s;
    }
    for (size_t p = 0; p < n;) {
        if (s[p] != '\\') {
            buf[o++] = s[p++];
            continue;
        }
        switch (s[p + 1]) {
        case 'b': buf[o++] = '\b'; break;
        case 'f': buf[o++] = '\f'; break;
        case 'n': buf[o++] = '\n'; break;
        case 'r': buf[o++] = '\r'; break;
        case 't': buf[o++] = '\t'; break;
        case 'u': {
            unsigned long cp = (unsigned long)u_escape(s, n, p);
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned long lo = (unsigned long)u_escape(s, n, p + 6);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            o += put_utf8(buf + o, cp);
            p += 6;
            continue;
        }
        default: buf[o++] = s[p + 1]; break; /* " \ / */
        }
        p += 2;
    }
    *len = o;
    return buf;
}

bool oq__jstr_eq(const oq__jdoc *d, uint32_t i, const char *s, size_t n)
{
    const oq__jtok *t = &d->tok[i];
    char small[256];
    char *buf;
    const char *v;
    size_t len;
    bool eq;

    if (!t->esc)
        return t->len == n && memcmp(d->text + t->start, s, n) == 0;
    if (t->len < n)
        return false; /* decoding never lengthens a string */
    buf = t->len <= sizeof(small) ? small : oq__malloc(t->len);
    if (buf == NULL)
        return false;
    v = oq__jstr(d, i, buf, &len);
    eq = len == n && memcmp(v, s, n) == 0;
    if (buf != small)
        oq__free(buf);
    return eq;
}

uint32_t oq__jget(const oq__jdoc *d, uint32_t obj, const char *key,
                  size_t keylen)
{
    if (d->tok[obj].type != OQ__J_OBJ)
        return 0;
    for (uint32_t i = obj + 1; i < d->tok[obj].end; i = d->tok[i + 1].end)
        if (oq__jstr_eq(d, i, key, keylen))
            return i + 1;
    return 0;
}

/* An RFC 6901 array index: "0" or digits without a leading zero. */
static bool array_index(const char *t, size_t n, uint32_t *out)
{
    uint64_t v = 0;

    if (n == 0 || n > 9 || (n > 1 && t[0] == '0'))
        return false;
    for (size_t k = 0; k < n; k++) {
        if (!is_digit(t[k]))
            return false;
        v = v * 10 + (uint64_t)(t[k] - '0');
    }
    *out = (uint32_t)v;
    return true;
}

uint32_t oq__jpointer(const oq__jdoc *d, const char *ptr)
{
    uint32_t node = 0;
    char tok[1024];

    if (ptr[0] != '/')
        return oq__jget(d, 0, ptr, strlen(ptr));
    while (*ptr == '/') {
        const char *t = ptr + 1;
        const char *slash = strchr(t, '/');
        size_t n = slash ? (size_t)(slash - t) : strlen(t), k = 0;

        if (n >= sizeof(tok))
            return 0;
        for (size_t j = 0; j < n; j++) {
            /* ~0 is '~' and ~1 is '/'; any other '~' matches nothing. */
            if (t[j] == '~') {
                if (j + 1 >= n || (t[j + 1] != '0' && t[j + 1] != '1'))
                    return 0;
                tok[k++] = t[++j] == '0' ? '~' : '/';
            } else {
                tok[k++] = t[j];
            }
        }
        if (d->tok[node].type == OQ__J_OBJ) {
            node = oq__jget(d, node, tok, k);
        } else if (d->tok[node].type == OQ__J_ARR) {
            uint32_t want, i = node + 1, at = 0;
            if (!array_index(tok, k, &want))
                return 0;
            while (i < d->tok[node].end && at < want) {
                i = d->tok[i].end;
                at++;
            }
            node = i < d->tok[node].end ? i : 0;
        } else {
            return 0;
        }
        if (node == 0)
            return 0;
        ptr = t + n;
    }
    return node;
}

bool oq__jnum_is_integer(const oq__jdoc *d, uint32_t i)
{
    const oq__jtok *t = &d->tok[i];

    if (t->type != OQ__J_NUM)
        return false;
    for (uint32_t k = 0; k < t->len; k++) {
        char c = d->text[t->start + k];
        if (c == '.' || c == 'e' || c == 'E')
            return false;
    }
    return true;
}

/* ------------------------------------------------------------- writing */

int oq__buf_reserve(oq__buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t ncap = b->cap ? b->cap : 64;
    while (ncap < b->len + more)
        ncap *= 2;
    char *np = oq__realloc(b->data, ncap);
    if (np == NULL)
        return OQ_ENOMEM;
    b->data = np;
    b->cap = ncap;
    return 0;
}

int oq__buf_add(oq__buf *b, const void *p, size_t n)
{
    if (oq__buf_reserve(b, n) != 0)
        return OQ_ENOMEM;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

void oq__buf_free(oq__buf *b)
{
    oq__free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/*
 * The one UTF-8 validator: the length of the well-formed sequence at s (n
 * bytes left, n > 0), 0 if none starts there. Strict (Unicode 3-7): no
 * overlong forms, no surrogates, nothing above U+10FFFF; an ASCII byte
 * (NUL too) is a sequence of 1.
 */
size_t oq__utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char lo = 0x80, hi = 0xBF; /* range of the 2nd byte */
    size_t len;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF) {
        len = 2;
    } else if (s[0] >= 0xE0 && s[0] <= 0xEF) {
        len = 3;
        if (s[0] == 0xE0)
            lo = 0xA0; /* overlong */
        else if (s[0] == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (s[0] >= 0xF0 && s[0] <= 0xF4) {
        len = 4;
        if (s[0] == 0xF0)
            lo = 0x90; /* overlong */
        else if (s[0] == 0xF4)
            hi = 0x8F; /* above U+10FFFF */
    } else {
        return 0; /* continuation byte, C0/C1, F5..FF */
    }
    if (len > n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t k = 2; k < len; k++)
        if ((s[k] & 0xC0) != 0x80)
            return 0;
    return len;
}

size_t oq__json_escape(char *out, size_t cap, const char *s, size_t n,
                       size_t *used)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    char *o = out;
    size_t i = 0;

    /* One input sequence never takes more than 6 bytes out. */
    while (i < n && (size_t)(o - out) + 6 <= cap) {
        unsigned char c = p[i];
        size_t l;
        if (c == '"' || c == '\\') {
            *o++ = '\\';
            *o++ = (char)c;
            i++;
        } else if (c == '\n') {
            *o++ = '\\', *o++ = 'n', i++;
        } else if (c == '\t') {
            *o++ = '\\', *o++ = 't', i++;
        } else if (c == '\r') {
            *o++ = '\\', *o++ = 'r', i++;
        } else if (c < 0x20 || c == 0x7F) {
            memcpy(o, "\\u00", 4);
            o[4] = hex[c >> 4];
            o[5] = hex[c & 15];
            o += 6, i++;
        } else if ((l = oq__utf8_seq(p + i, n - i)) == 0) {
            memcpy(o, "\\ufffd", 6); /* invalid UTF-8 */
            o += 6, i++;
        } else {
            memcpy(o, p + i, l);
            o += l, i += l;
        }
    }
    *used = i;
    return (size_t)(o - out);
}

int oq__json_quote(oq__buf *b, const char *s, size_t n)
{
    size_t used;

    /* At most 6 bytes out per byte in, plus the quotes. */
    if (n > (SIZE_MAX - 2) / 6 || oq__buf_reserve(b, n * 6 + 2) != 0)
        return OQ_ENOMEM;
    b->data[b->len++] = '"';
    b->len += oq__json_escape(b->data + b->len, n * 6, s, n, &used);
    b->data[b->len++] = '"';
    return 0;
}

void oq__json_write_string(FILE *f, const char *s, size_t n)
{
    char chunk[4096];

    putc('"', f);
    while (n > 0) {
        size_t used, k = oq__json_escape(chunk, sizeof(chunk), s, n, &used);
        fwrite(chunk, 1, k, f);
        s += used;
        n -= used;
    }
    putc('"', f);
}

int oq__jcompact(const oq__jdoc *d, uint32_t i, oq__buf *b)
{
    const oq__jtok *t = &d->tok[i];

    switch (t->type) {
    case OQ__J_STR: {
        char small[256];
        char *tmp = t->len <= sizeof(small) ? small : oq__malloc(t->len);
        size_t n;
        const char *v;
        int rc;
        if (tmp == NULL)
            return OQ_ENOMEM;
        v = oq__jstr(d, i, tmp, &n);
        rc = oq__json_quote(b, v, n);
        if (tmp != small)
            oq__free(tmp);
        return rc;
    }
    case OQ__J_OBJ:
    case OQ__J_ARR: {
        bool obj = t->type == OQ__J_OBJ;
        if (oq__buf_add(b, obj ? "{" : "[", 1) != 0)
            return OQ_ENOMEM;
        for (uint32_t k = i + 1; k < t->end;) {
            if (k > i + 1 && oq__buf_add(b, ",", 1) != 0)
                return OQ_ENOMEM;
            if (obj) {
                if (oq__jcompact(d, k, b) != 0 || oq__buf_add(b, ":", 1) != 0)
                    return OQ_ENOMEM;
                k++;
            }
            if (oq__jcompact(d, k, b) != 0)
                return OQ_ENOMEM;
            k = d->tok[k].end;
        }
        return oq__buf_add(b, obj ? "}" : "]", 1);
    }
    default:
        /* Numbers as written; true, false, null. */
        return oq__buf_add(b, d->text + t->start, t->len);
    }
}

int oq__json_valid(const char *s, size_t len)
{
    oq__jtape t = { 0 };
    size_t at;
    const char *why;
    int rc;

    if (!oq__utf8_valid(s, len))
        return 0;
    rc = oq__json_scan(s, len, &t, &at, &why);
    oq__jtape_free(&t);
    return rc == 0;
}

/* ================================================================== UTF-8 */

#define HIGH_BITS 0x8080808080808080ULL
#define LOW_BITS 0x0101010101010101ULL

/*
 * Strict UTF-8 (Unicode 3-7: no overlong forms, no surrogates, nothing
 * above U+10FFFF) and no NUL byte. Returns the offset of the first bad byte,
 * or len if all is well; *nul tells whether the bad byte is a NUL.
 */
size_t oq__utf8_check(const unsigned char *s, size_t len, bool *nul)
{
    size_t i = 0;

    *nul = false;
    while (i < len) {
        /* ASCII fast path: 8 bytes with no high bit and no zero byte. */
        while (i + 8 <= len) {
            uint64_t v;
            memcpy(&v, s + i, 8);
            if (((v | ((v - LOW_BITS) & ~v)) & HIGH_BITS) != 0)
                break;
            i += 8;
        }
        if (i >= len)
            break;
        if (i + 8 > len && len >= 8) {
            /* The tail: the last 8 bytes as one word (overlapping bytes
             * already checked). ASCII without NUL: the tail is too. */
            uint64_t v;
            memcpy(&v, s + len - 8, 8);
            if (((v | ((v - LOW_BITS) & ~v)) & HIGH_BITS) == 0)
                break;
        }
        unsigned char c = s[i];
        if (c == 0) {
            *nul = true;
            return i;
        }
        size_t l = oq__utf8_seq(s + i, len - i);
        if (l == 0)
            return i;
        i += l;
    }
    return len;
}

int oq__utf8_valid(const char *s, size_t len)
{
    bool nul;
    return oq__utf8_check((const unsigned char *)s, len, &nul) == len;
}
