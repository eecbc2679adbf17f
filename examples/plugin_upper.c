/*
 * An example onceq handler plugin: for each event it stages one output
 * record with the event's id and its "word" (or, without one, its "text")
 * upper-cased:
 *
 *   {"id":"e1","word":"hello"}  ->  {"id":"e1","upper":"HELLO"}
 *
 * It uses nothing but include/onceq.h and libc: it finds the field with a
 * small scanner over the raw line instead of a JSON library. Only ASCII
 * letters change case; escape sequences (\n, \u00e9, ...) are copied as they
 * are, so the output is valid JSON whenever the input was.
 *
 * Build and run (see examples/README.md):
 *   cc -shared -fPIC -I include -o plugin_upper.so examples/plugin_upper.c
 *   onceq run --handler plugin:./plugin_upper.so examples/events.jsonl
 *
 * The handler is called from several worker threads at once, so it keeps
 * no state outside its stack.
 */
#include "onceq.h"

#include <stdlib.h>
#include <string.h>

/* The span of the JSON text from p to end. */
typedef struct span {
    const char *p, *end;
} span;

static void skip_ws(span *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' ||
                             *s->p == '\r' || *s->p == '\n'))
        s->p++;
}

/* Skips a string at s->p (on its opening quote); its contents, without the
 * quotes and still escaped, go to *in. Returns 0, or -1 if malformed. */
static int skip_string(span *s, span *in)
{
    if (s->p >= s->end || *s->p != '"')
        return -1;
    in->p = ++s->p;
    while (s->p < s->end && *s->p != '"')
        s->p += *s->p == '\\' && s->end - s->p > 1 ? 2 : 1;
    if (s->p >= s->end)
        return -1;
    in->end = s->p++;
    return 0;
}

/* Skips any value (a string, a literal, a nested object or array): stops
 * on the ',' or '}' that follows it in the enclosing object. */
static int skip_value(span *s)
{
    span in;
    int depth = 0;

    while (s->p < s->end) {
        char c = *s->p;
        if (c == '"') {
            if (skip_string(s, &in) != 0)
                return -1;
            continue;
        }
        if (depth == 0 && (c == ',' || c == '}'))
            return 0;
        if (c == '{' || c == '[')
            depth++;
        else if (c == '}' || c == ']')
            depth--;
        s->p++;
    }
    return -1;
}

/* Finds the string value of top-level key name in the object line. */
static int find_string(const char *line, size_t len, const char *name,
                       span *out)
{
    span s = { line, line + len }, key;
    size_t nlen = strlen(name);

    skip_ws(&s);
    if (s.p >= s.end || *s.p++ != '{')
        return -1;
    for (;;) {
        skip_ws(&s);
        if (skip_string(&s, &key) != 0)
            return -1;
        skip_ws(&s);
        if (s.p >= s.end || *s.p++ != ':')
            return -1;
        skip_ws(&s);
        if ((size_t)(key.end - key.p) == nlen &&
            memcmp(key.p, name, nlen) == 0 && s.p < s.end && *s.p == '"')
            return skip_string(&s, out);
        if (skip_value(&s) != 0)
            return -1;
        skip_ws(&s);
        if (s.p >= s.end || *s.p != ',')
            return -1; /* '}' (not found) or malformed */
        s.p++;
    }
}

/* Appends the id as a JSON string body (it arrives unescaped). */
static char *put_id(char *d, const char *id, size_t len)
{
    static const char hex[] = "0123456789abcdef";

    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)id[i];
        if (c == '"' || c == '\\') {
            *d++ = '\\';
            *d++ = (char)c;
        } else if (c < 0x20) {
            memcpy(d, "\\u00", 4);
            d[4] = hex[c >> 4];
            d[5] = hex[c & 15];
            d += 6;
        } else {
            *d++ = (char)c;
        }
    }
    return d;
}

/* Appends the still-escaped string body v, ASCII letters upper-cased and
 * escape sequences left alone. */
static char *put_upper(char *d, span v)
{
    for (const char *p = v.p; p < v.end; p++) {
        if (*p == '\\') {
            size_t n = p + 1 < v.end && p[1] == 'u' ? 6 : 2;
            n = (size_t)(v.end - p) < n ? (size_t)(v.end - p) : n;
            memcpy(d, p, n);
            d += n;
            p += n - 1;
        } else if (*p >= 'a' && *p <= 'z') {
            *d++ = (char)(*p - 'a' + 'A');
        } else {
            *d++ = *p;
        }
    }
    return d;
}

/* The handler: its name is OQ_PLUGIN_SYMBOL ("oq_plugin_handle"). */
int oq_plugin_handle(const oq_event *ev, oq_txn *txn, void *arg);

int oq_plugin_handle(const oq_event *ev, oq_txn *txn, void *arg)
{
    span v;
    char *rec, *d;
    int rc;

    (void)arg;
    if (find_string(ev->payload, ev->payload_len, "word", &v) != 0 &&
        find_string(ev->payload, ev->payload_len, "text", &v) != 0) {
        oq_txn_error(txn, "no 'word' or 'text' string field");
        return OQ_FAIL; /* permanent: dead-letter the event */
    }
    rec = malloc(ev->id_len * 6 + (size_t)(v.end - v.p) + 32);
    if (rec == NULL) {
        oq_txn_error(txn, "out of memory");
        return OQ_RETRY; /* transient: try again later */
    }
    d = rec;
    memcpy(d, "{\"id\":\"", 7);
    d = put_id(d + 7, ev->id, ev->id_len);
    memcpy(d, "\",\"upper\":\"", 11);
    d = put_upper(d + 11, v);
    memcpy(d, "\"}", 2);
    d += 2;
    rc = oq_txn_record(txn, rec, (size_t)(d - rec));
    free(rec);
    if (rc != 0) {
        oq_txn_error(txn, "out of memory");
        return OQ_RETRY;
    }
    return OQ_OK;
}
