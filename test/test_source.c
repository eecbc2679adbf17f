/* Description: JSON-lines input. The reader splits lines correctly across
 * block boundaries (small blocks via oq__reader_set_block_size), strips CRLF,
 * accepts a last line without a newline, classifies blank and too-large
 * lines (keeping 4 KiB of the latter and reading the next line correctly),
 * numbers lines and offsets per file, reports progress, and refuses a
 * missing file or a directory at open. The decode hook accepts string and
 * integer ids, event_id, JSON pointers, and dead-letters every kind of bad
 * input with the right reason and message. Inputs live in a mkdtemp dir;
 * decode inputs sit in exact-size heap buffers so ASan sees any overread. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "oq_cli.h"

/* The test hook in source.c. */

static char tmpdir[64];

/* ------------------------------------------------------------- helpers */

static int rm_entry(const char *p, const struct stat *st, int flag,
                    struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(p);
}

static int group_setup(void **state)
{
    (void)state;
    strcpy(tmpdir, "/tmp/test_source.XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    oq__reader_set_block_size(0);
    return nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Writes data to tmpdir/name; returns the path (static, per name slot). */
static const char *put(const char *name, const void *data, size_t len)
{
    static char paths[8][256];
    static int next;
    char *p = paths[next++ % 8];
    FILE *f;

    snprintf(p, 256, "%s/%s", tmpdir, name);
    f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    return p;
}

static const char *puts_(const char *name, const char *s)
{
    return put(name, s, strlen(s));
}

typedef struct got {
    oq__line_kind kind;
    char *data;
    size_t len, full_len;
    unsigned file;
    uint64_t lineno, offset;
} got;

/* Reads every line of the inputs; returns how many (into *out). */
static size_t read_all(const char *const *paths, unsigned n, size_t max_line,
                       got **out)
{
    oq__reader *r;
    oq__line l;
    char err[256];
    size_t cnt = 0, cap = 16;
    got *g = malloc(cap * sizeof(*g));
    int rc;

    assert_int_equal(oq__reader_open(&r, paths, n, max_line, err,
                                     sizeof(err)), 0);
    while ((rc = oq__reader_next(r, &l, err, sizeof(err))) == 1) {
        if (cnt == cap)
            g = realloc(g, (cap *= 2) * sizeof(*g));
        g[cnt].kind = l.kind;
        g[cnt].data = malloc(l.len + 1);
        memcpy(g[cnt].data, l.data, l.len);
        g[cnt].data[l.len] = '\0';
        g[cnt].len = l.len;
        g[cnt].full_len = l.full_len;
        g[cnt].file = l.file;
        g[cnt].lineno = l.lineno;
        g[cnt].offset = l.offset;
        cnt++;
    }
    assert_int_equal(rc, 0);
    /* The end is sticky. */
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 0);
    oq__reader_close(r);
    *out = g;
    return cnt;
}

static void free_got(got *g, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(g[i].data);
    free(g);
}

static void check_line(const got *g, oq__line_kind kind, const char *data,
                       unsigned file, uint64_t lineno, uint64_t offset)
{
    assert_int_equal(g->kind, kind);
    assert_string_equal(g->data, data);
    assert_int_equal(g->len, strlen(data));
    assert_int_equal(g->full_len, strlen(data));
    assert_int_equal(g->file, file);
    assert_int_equal(g->lineno, lineno);
    assert_int_equal(g->offset, offset);
}

/* -------------------------------------------------------------- reader */

static void test_crlf_blank_last_line(void **state)
{
    (void)state;
    const char *p = puts_("a.jsonl", "a\r\nb\n\n  \t\r\n\r\nlast");
    got *g;
    size_t n = read_all(&p, 1, 1024, &g);

    assert_int_equal(n, 6);
    check_line(&g[0], OQ__LINE_EVENT, "a", 0, 1, 0);
    check_line(&g[1], OQ__LINE_EVENT, "b", 0, 2, 3);
    check_line(&g[2], OQ__LINE_BLANK, "", 0, 3, 5);
    check_line(&g[3], OQ__LINE_BLANK, "  \t", 0, 4, 6);
    check_line(&g[4], OQ__LINE_BLANK, "", 0, 5, 11);
    check_line(&g[5], OQ__LINE_EVENT, "last", 0, 6, 13);
    free_got(g, n);
}

static void test_only_one_cr_stripped(void **state)
{
    (void)state;
    const char *p = puts_("cr.jsonl", "x\r\r\n y\r");
    got *g;
    size_t n = read_all(&p, 1, 1024, &g);

    assert_int_equal(n, 2);
    check_line(&g[0], OQ__LINE_EVENT, "x\r", 0, 1, 0);
    /* A space first but not only spaces: an event. */
    check_line(&g[1], OQ__LINE_EVENT, " y", 0, 2, 4);
    free_got(g, n);
}

static void test_empty_file(void **state)
{
    (void)state;
    const char *p = put("empty.jsonl", "", 0);
    oq__reader *r;
    oq__line l;
    char err[256];
    uint64_t done = 1, total = 1;

    assert_int_equal(oq__reader_open(&r, &p, 1, 100, err, sizeof(err)), 0);
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 0);
    oq__reader_progress(r, &done, &total);
    assert_int_equal(done, 0);
    assert_int_equal(total, 0);
    oq__reader_close(r);
}

/* Lines of every length from 0 to 40 (and some CRLF), read with block
 * sizes that put line ends at every position of a block. */
static void test_block_boundaries(void **state)
{
    (void)state;
    static const size_t blocks[] = { 1, 2, 3, 5, 7, 16, 64, 4096 };
    char *data = malloc(64 * 1024);
    size_t len = 0, nlines = 0;
    uint64_t offsets[2000];
    size_t lens[2000];
    const char *p;

    for (size_t i = 0; nlines < 2000 && len < 60 * 1024; i++) {
        size_t l = (i * 7) % 41;
        offsets[nlines] = len;
        lens[nlines++] = l;
        for (size_t k = 0; k < l; k++)
            data[len++] = (char)('a' + (i + k) % 26);
        if (i % 5 == 0)
            data[len++] = '\r';
        data[len++] = '\n';
    }
    p = put("blocks.jsonl", data, len);
    for (size_t b = 0; b < sizeof(blocks) / sizeof(blocks[0]); b++) {
        got *g;
        size_t n;

        oq__reader_set_block_size(blocks[b]);
        n = read_all(&p, 1, 64, &g);
        assert_int_equal(n, nlines);
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(g[i].kind, lens[i] ? OQ__LINE_EVENT
                                                 : OQ__LINE_BLANK);
            assert_int_equal(g[i].len, lens[i]);
            assert_int_equal(g[i].offset, offsets[i]);
            assert_int_equal(g[i].lineno, i + 1);
            assert_memory_equal(g[i].data, data + offsets[i], lens[i]);
        }
        free_got(g, n);
    }
    oq__reader_set_block_size(0);
    free(data);
}

/* A line over max_line, spanning many blocks: TOO_LARGE with its first
 * 4096 bytes, its real length, and the next line read correctly. */
static void test_too_large_streamed(void **state)
{
    (void)state;
    size_t big = 20000;
    char *data = malloc(big + 64);
    size_t len = 0;
    const char *p;
    got *g;
    size_t n;

    memcpy(data, "first\n", 6);
    len = 6;
    for (size_t i = 0; i < big; i++)
        data[len++] = (char)('a' + i % 26);
    memcpy(data + len, "\r\nnext\n", 7);
    len += 7;
    p = put("large.jsonl", data, len);

    oq__reader_set_block_size(1000);
    n = read_all(&p, 1, 3000, &g);
    oq__reader_set_block_size(0);
    assert_int_equal(n, 3);
    check_line(&g[0], OQ__LINE_EVENT, "first", 0, 1, 0);
    assert_int_equal(g[1].kind, OQ__LINE_TOO_LARGE);
    assert_int_equal(g[1].len, 4096);
    assert_int_equal(g[1].full_len, big);
    assert_memory_equal(g[1].data, data + 6, 4096);
    assert_int_equal(g[1].lineno, 2);
    assert_int_equal(g[1].offset, 6);
    check_line(&g[2], OQ__LINE_EVENT, "next", 0, 3, 6 + big + 2);
    free_got(g, n);
    free(data);
}

/* Too large but found whole in the buffer; and at max_line exactly. */
static void test_too_large_in_buffer(void **state)
{
    (void)state;
    /* max_line 10: 10 bytes ok, 10 + CR ok, 11 too large. */
    const char *p = puts_("edge.jsonl", "0123456789\n0123456789\r\n"
                                        "0123456789A\nok\n"
                                        "0123456789AB");
    got *g;
    size_t n = read_all(&p, 1, 10, &g);

    assert_int_equal(n, 5);
    check_line(&g[0], OQ__LINE_EVENT, "0123456789", 0, 1, 0);
    check_line(&g[1], OQ__LINE_EVENT, "0123456789", 0, 2, 11);
    check_line(&g[2], OQ__LINE_TOO_LARGE, "0123456789A", 0, 3, 23);
    check_line(&g[3], OQ__LINE_EVENT, "ok", 0, 4, 35);
    /* The last line, without a newline, too large. */
    check_line(&g[4], OQ__LINE_TOO_LARGE, "0123456789AB", 0, 5, 38);
    free_got(g, n);
}

/* A too-large last line without a newline, streamed to EOF. */
static void test_too_large_at_eof(void **state)
{
    (void)state;
    char data[9000];
    const char *p;
    got *g;
    size_t n;

    memset(data, 'z', sizeof(data));
    memcpy(data, "a\n", 2);
    data[sizeof(data) - 1] = '\r';
    p = put("largeeof.jsonl", data, sizeof(data));
    oq__reader_set_block_size(512);
    n = read_all(&p, 1, 100, &g);
    oq__reader_set_block_size(0);
    assert_int_equal(n, 2);
    assert_int_equal(g[1].kind, OQ__LINE_TOO_LARGE);
    assert_int_equal(g[1].full_len, sizeof(data) - 3);
    assert_int_equal(g[1].len, 4096);
    assert_int_equal(g[1].offset, 2);
    assert_int_equal(g[1].data[0], 'z');
    free_got(g, n);
}

static void test_multiple_files(void **state)
{
    (void)state;
    const char *paths[4];
    got *g;
    size_t n;
    oq__reader *r;
    oq__line l;
    char err[256];
    uint64_t done, total;

    paths[0] = puts_("m1.jsonl", "x\nyy\n");
    paths[1] = puts_("m2.jsonl", "z");
    paths[2] = put("m3.jsonl", "", 0);
    paths[3] = puts_("m4.jsonl", "\nw\n");
    n = read_all(paths, 4, 100, &g);
    assert_int_equal(n, 5);
    check_line(&g[0], OQ__LINE_EVENT, "x", 0, 1, 0);
    check_line(&g[1], OQ__LINE_EVENT, "yy", 0, 2, 2);
    check_line(&g[2], OQ__LINE_EVENT, "z", 1, 1, 0);
    check_line(&g[3], OQ__LINE_BLANK, "", 3, 1, 0);
    check_line(&g[4], OQ__LINE_EVENT, "w", 3, 2, 1);
    free_got(g, n);

    /* Progress: the total is known up front; done moves line by line. */
    assert_int_equal(oq__reader_open(&r, paths, 4, 100, err, sizeof(err)), 0);
    assert_string_equal(oq__reader_path(r, 1), paths[1]);
    oq__reader_progress(r, &done, &total);
    assert_int_equal(done, 0);
    assert_int_equal(total, 5 + 1 + 0 + 3);
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 1);
    oq__reader_progress(r, &done, &total);
    assert_int_equal(done, 2);
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 1);
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 1);
    oq__reader_progress(r, &done, &total);
    assert_int_equal(done, 6);
    while (oq__reader_next(r, &l, err, sizeof(err)) == 1)
        ;
    oq__reader_progress(r, &done, &total);
    assert_int_equal(done, 9);
    oq__reader_close(r);
}

static void test_open_errors(void **state)
{
    (void)state;
    char missing[300], err[512];
    const char *paths[2];
    oq__reader *r = (oq__reader *)1;

    snprintf(missing, sizeof(missing), "%s/nope.jsonl", tmpdir);
    paths[0] = puts_("good.jsonl", "{}\n");
    paths[1] = missing;
    assert_int_equal(oq__reader_open(&r, paths, 2, 100, err, sizeof(err)),
                     -ENOENT);
    assert_null(r);
    char want[400];
    snprintf(want, sizeof(want),
             "cannot open '%s': No such file or directory", missing);
    assert_string_equal(err, want);

    /* A directory: refused at open, not at the first read. */
    paths[1] = tmpdir;
    assert_int_equal(oq__reader_open(&r, paths, 2, 100, err, sizeof(err)),
                     -EISDIR);
    snprintf(want, sizeof(want), "cannot read '%s': Is a directory", tmpdir);
    assert_string_equal(err, want);

    /* Unreadable (root reads anything, so only as a normal user). */
    if (geteuid() != 0) {
        paths[1] = puts_("secret.jsonl", "{}\n");
        assert_int_equal(chmod(paths[1], 0), 0);
        assert_int_equal(oq__reader_open(&r, paths, 2, 100, err,
                                         sizeof(err)), -EACCES);
        assert_non_null(strstr(err, "Permission denied"));
    }
}

/* stdin ("-", or no paths): a pipe has no known size. */
static void test_stdin_pipe(void **state)
{
    (void)state;
    int fds[2], saved = dup(0);
    oq__reader *r;
    oq__line l;
    char err[256];
    uint64_t done, total;

    assert_int_equal(pipe(fds), 0);
    assert_int_equal(write(fds[1], "{\"id\":1}\nb", 10), 10);
    close(fds[1]);
    assert_int_equal(dup2(fds[0], 0), 0);
    close(fds[0]);
    assert_int_equal(oq__reader_open(&r, NULL, 0, 100, err, sizeof(err)), 0);
    assert_string_equal(oq__reader_path(r, 0), "<stdin>");
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 1);
    assert_int_equal(l.len, 8);
    assert_memory_equal(l.data, "{\"id\":1}", 8);
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 1);
    assert_int_equal(l.len, 1);
    assert_int_equal(l.lineno, 2);
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), 0);
    oq__reader_progress(r, &done, &total);
    assert_int_equal(done, 10);
    assert_int_equal(total, 0);
    oq__reader_close(r);
    /* The reader must not close stdin. */
    assert_int_equal(fcntl(0, F_GETFD), 0);
    dup2(saved, 0);
    close(saved);
}

/* A read error (reading /proc/self/mem at offset 0 gives EIO) is reported,
 * and stays reported. */
static void test_read_error(void **state)
{
    (void)state;
    const char *p = "/proc/self/mem";
    oq__reader *r;
    oq__line l;
    char err[256];

    if (oq__reader_open(&r, &p, 1, 100, err, sizeof(err)) != 0)
        skip();
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), -EIO);
    assert_string_equal(err,
                        "read error on '/proc/self/mem': Input/output error");
    err[0] = '\0';
    assert_int_equal(oq__reader_next(r, &l, err, sizeof(err)), -EIO);
    assert_non_null(strstr(err, "Input/output error"));
    oq__reader_close(r);
}

/* -------------------------------------------------------------- decode */

static const oq__idspec spec_default = { "id", true };

/* Decodes s[0..len) from an exact-size heap copy. Returns decode's rc; on
 * success the caller frees d->parsed. */
static int dec_n(const char *s, size_t len, const oq__idspec *spec,
                 oq_decoded *d, char **copy)
{
    oq_event ev;
    char *buf = malloc(len ? len : 1);
    int rc;

    memcpy(buf, s, len);
    memset(&ev, 0, sizeof(ev));
    memset(d, 0, sizeof(*d));
    ev.payload = buf;
    ev.payload_len = len;
    rc = oq__json_decode(&ev, d, (void *)(uintptr_t)spec);
    if (rc != 0)
        assert_null(d->parsed);
    *copy = buf; /* string ids point into parsed, not here, but keep it
                    until the caller is done anyway */
    return rc;
}

/* Expects success with the given id. */
static void ok_id(const char *json, const oq__idspec *spec, const char *id)
{
    oq_decoded d;
    char *copy;
    oq_event ev = { 0 };

    assert_int_equal(dec_n(json, strlen(json), spec, &d, &copy), 0);
    assert_int_equal(d.id_len, strlen(id));
    assert_memory_equal(d.id, id, d.id_len);
    ev.parsed = d.parsed;
    {
        void *own;
        const oq__jdoc *doc = oq__event_doc(&ev, &own, NULL, 0);
        assert_non_null(doc);
        assert_null(own);
        assert_int_equal(doc->tok[0].type, OQ__J_OBJ);
    }
    oq__json_free(d.parsed, NULL);
    free(copy);
}

/* Expects success with the id id[0..n) (which may hold NUL bytes). */
static void ok_id_n(const char *json, const char *id, size_t n)
{
    oq_decoded d;
    char *copy;

    assert_int_equal(dec_n(json, strlen(json), NULL, &d, &copy), 0);
    assert_int_equal(d.id_len, n);
    assert_memory_equal(d.id, id, n);
    oq__json_free(d.parsed, NULL);
    free(copy);
}

/* Expects a rejection with reason and exactly this message. */
static void bad_n(const char *json, size_t len, const oq__idspec *spec,
                  oq_dlq_reason reason, const char *msg)
{
    oq_decoded d;
    char *copy;

    assert_int_not_equal(dec_n(json, len, spec, &d, &copy), 0);
    assert_int_equal(d.reason, reason);
    assert_string_equal(d.error, msg);
    free(copy);
}

static void bad(const char *json, const oq__idspec *spec,
                oq_dlq_reason reason, const char *msg)
{
    bad_n(json, strlen(json), spec, reason, msg);
}

static void test_decode_string_id(void **state)
{
    (void)state;
    oq_decoded d;
    char *copy;
    oq_event ev = { 0 };
    const char *j = "{\"id\":\"abc\",\"word\":\"hello\"}";
    const oq__jdoc *doc;
    void *own;
    uint32_t w;
    size_t n;
    char buf[16];

    assert_int_equal(dec_n(j, strlen(j), NULL, &d, &copy), 0);
    assert_int_equal(d.id_len, 3);
    assert_memory_equal(d.id, "abc", 3);
    ev.parsed = d.parsed;
    doc = oq__event_doc(&ev, &own, NULL, 0);
    w = oq__jget(doc, 0, "word", 4);
    assert_int_not_equal(w, 0);
    assert_memory_equal(oq__jstr(doc, w, buf, &n), "hello", 5);
    assert_int_equal(n, 5);
    /* The id stays valid after the payload is gone: it lives in parsed. */
    free(copy);
    assert_memory_equal(d.id, "abc", 3);
    oq__json_free(d.parsed, NULL);

    /* Without a decode hook, the document is scanned from the payload. */
    ev.parsed = NULL;
    ev.payload = j;
    ev.payload_len = strlen(j);
    doc = oq__event_doc(&ev, &own, NULL, 0);
    assert_non_null(doc);
    assert_non_null(own);
    oq__json_free(own, NULL);
    ev.payload = "[1]";
    ev.payload_len = 3;
    assert_null(oq__event_doc(&ev, &own, buf, sizeof(buf)));
    oq__json_free(NULL, NULL);

    ok_id("  {\"id\" : \"x y\"}  \t\r\n", &spec_default, "x y");
    ok_id("{\"id\":\"caf\\u00e9\"}", &spec_default, "caf\xc3\xa9");
    ok_id("{\"id\":\"\xe2\x82\xac\xf0\x9f\x98\x80\"}", &spec_default,
          "\xe2\x82\xac\xf0\x9f\x98\x80");
    /* Ids are byte strings with a length: an escaped NUL is a byte. */
    ok_id_n("{\"id\":\"x\\u0000y\"}", "x\0y", 3);
    ok_id_n("{\"id\":\"x\\u0000z\"}", "x\0z", 3);
    ok_id_n("{\"id\":\"\\u0000\"}", "\0", 1);
    /* A key with an escaped NUL is not "id". */
    ok_id("{\"id\\u0000x\":\"no\",\"id\":\"yes\"}", &spec_default, "yes");
    /* Escapes of every kind, and a surrogate pair. */
    ok_id("{\"id\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\ud83d\\ude00\"}", &spec_default,
          "\"\\/\b\f\n\r\t\xf0\x9f\x98\x80");
    /* The same key twice: which would be the id? Not an event. */
    bad("{\"id\":\"first\",\"id\":\"second\"}", &spec_default,
        OQ_DLQ_PARSE_ERROR, "invalid JSON at byte 14: duplicate key in an "
        "object");
    bad("{\"id\":\"first\",\"i\\u0064\":\"second\"}", &spec_default,
        OQ_DLQ_PARSE_ERROR, "invalid JSON at byte 14: duplicate key in an "
        "object");
    /* A byte order mark is the reader's to skip (at a file's start): in an
     * event it is not JSON. */
    bad("\xef\xbb\xbf{\"id\":\"bom\"}", &spec_default, OQ_DLQ_PARSE_ERROR,
        "invalid JSON at byte 0: unexpected character");
}

static void test_decode_integer_id(void **state)
{
    (void)state;
    ok_id("{\"id\":7}", &spec_default, "7");
    ok_id("{\"id\":0}", &spec_default, "0");
    ok_id("{\"id\":-12,\"x\":1.5}", &spec_default, "-12");
    ok_id("{\"x\":1.5,\"id\":42}", &spec_default, "42");
    ok_id("{\"id\":9007199254740992}", &spec_default, "9007199254740992");
    ok_id("{\"id\":-9007199254740992}", &spec_default, "-9007199254740992");
    /* Above 2^53 an integer id is still its exact text. */
    ok_id("{\"id\":9007199254740993}", &spec_default, "9007199254740993");
    ok_id("{\"id\":9007199254740994}", &spec_default, "9007199254740994");
    ok_id("{\"id\":123456789012345678901234567890}", &spec_default,
          "123456789012345678901234567890");
    ok_id("{\"id\":-0}", &spec_default, "-0");
}

static void test_decode_event_id_fallback(void **state)
{
    (void)state;
    const oq__idspec nofb = { "id", false };
    const oq__idspec key = { "key", true };

    ok_id("{\"event_id\":\"e1\"}", NULL, "e1");
    ok_id("{\"event_id\":\"e1\"}", &spec_default, "e1");
    ok_id("{\"event_id\":\"e1\",\"id\":\"i1\"}", &spec_default, "i1");
    ok_id("{\"event_id\":33}", &spec_default, "33");
    bad("{\"event_id\":\"e1\"}", &nofb, OQ_DLQ_BAD_ID,
        "missing id field 'id'");
    /* The fallback is for the default field only. */
    ok_id("{\"key\":\"k\",\"id\":\"i\"}", &key, "k");
    bad("{\"event_id\":\"e1\"}", &key, OQ_DLQ_BAD_ID,
        "missing id field 'key'");
    /* An id present but bad does not fall back. */
    bad("{\"id\":null,\"event_id\":\"e1\"}", &spec_default, OQ_DLQ_BAD_ID,
        "id must be a string or an integer");
}

static void test_decode_json_pointer(void **state)
{
    (void)state;
    const oq__idspec meta = { "/meta/id", false };
    const oq__idspec slash = { "/a~1b", false };
    const oq__idspec tilde = { "/m~0n", false };
    const oq__idspec arr = { "/arr/1", false };
    const oq__idspec arr0 = { "/arr/01", false };
    const oq__idspec arr5 = { "/arr/5", false };
    const oq__idspec deep = { "/meta/x/1/id", false };
    const oq__idspec top = { "/id", false };
    const oq__idspec plain = { "a~1b", false };

    ok_id("{\"meta\":{\"id\":\"m1\"},\"id\":\"top\"}", &meta, "m1");
    ok_id("{\"a/b\":\"s1\",\"a\":{\"b\":\"no\"}}", &slash, "s1");
    ok_id("{\"m~n\":\"t1\"}", &tilde, "t1");
    ok_id("{\"arr\":[\"x\",\"y\"]}", &arr, "y");
    ok_id("{\"id\":\"t\"}", &top, "t");
    /* A plain field name has no escapes. */
    ok_id("{\"a/b\":\"no\",\"a~1b\":\"lit\"}", &plain, "lit");
    bad("{\"arr\":[\"x\",\"y\"]}", &arr0, OQ_DLQ_BAD_ID,
        "missing id field '/arr/01'");
    bad("{\"arr\":[\"x\",\"y\"]}", &arr5, OQ_DLQ_BAD_ID,
        "missing id field '/arr/5'");
    bad("{\"meta\":\"str\"}", &meta, OQ_DLQ_BAD_ID,
        "missing id field '/meta/id'");
    bad("{\"id\":\"x\"}", &meta, OQ_DLQ_BAD_ID,
        "missing id field '/meta/id'");
    /* Integer ids found through a pointer: the source text is located by
     * walking past strings holding brackets, commas and braces. */
    ok_id("{\"a\":{\"b\":\"1.5,}]\"},\"meta\":{\"pre\":[1.5,{\"x\":\"}\"}],"
          "\"id\":12}}", &meta, "12");
    ok_id("{\"meta\":{\"x\":[1.5,{\"q\":\"\\\"}\",\"id\":55}]}}", &deep, "55");
    bad("{\"meta\":{\"pre\":\"e\",\"id\":1e2}}", &meta, OQ_DLQ_BAD_ID,
        "id must be a string or an integer, not a number with a fraction "
        "or exponent");
    bad("{\"meta\":{\"x\":[0,{\"id\":2.0}]}}", &deep, OQ_DLQ_BAD_ID,
        "id must be a string or an integer, not a number with a fraction "
        "or exponent");
    /* At any depth (there used to be a limit of 32 levels). */
    {
        char doc[4096], ptr[1024];
        size_t n = 0, pn = 0;
        const int levels = 40;
        for (int i = 0; i < levels; i++) {
            n += (size_t)snprintf(doc + n, sizeof(doc) - n, "{\"a\":");
            pn += (size_t)snprintf(ptr + pn, sizeof(ptr) - pn, "/a");
        }
        n += (size_t)snprintf(doc + n, sizeof(doc) - n, "1.0");
        for (int i = 0; i < levels; i++)
            doc[n++] = '}';
        doc[n] = '\0';
        const oq__idspec p40 = { ptr, false };
        bad(doc, &p40, OQ_DLQ_BAD_ID, "id must be a string or an integer, "
            "not a number with a fraction or exponent");
        memcpy(doc + n - levels - 3, "7  ", 3);
        ok_id(doc, &p40, "7");
    }
}

static void test_decode_bad_id(void **state)
{
    (void)state;
    const char *ty = "id must be a string or an integer";
    const char *fl = "id must be a string or an integer, not a number with "
                     "a fraction or exponent";
    char big[1100];

    bad("{\"word\":\"x\"}", &spec_default, OQ_DLQ_BAD_ID,
        "missing id field 'id' or 'event_id'");
    bad("{}", NULL, OQ_DLQ_BAD_ID, "missing id field 'id' or 'event_id'");
    bad("{\"id\":null}", &spec_default, OQ_DLQ_BAD_ID, ty);
    bad("{\"id\":true}", &spec_default, OQ_DLQ_BAD_ID, ty);
    bad("{\"id\":false}", &spec_default, OQ_DLQ_BAD_ID, ty);
    bad("{\"id\":{\"a\":1}}", &spec_default, OQ_DLQ_BAD_ID, ty);
    bad("{\"id\":[\"a\"]}", &spec_default, OQ_DLQ_BAD_ID, ty);
    bad("{\"id\":1.5}", &spec_default, OQ_DLQ_BAD_ID, fl);
    bad("{\"id\":1.0}", &spec_default, OQ_DLQ_BAD_ID, fl);
    bad("{\"id\":1e3}", &spec_default, OQ_DLQ_BAD_ID, fl);
    bad("{\"id\":1E3}", &spec_default, OQ_DLQ_BAD_ID, fl);
    bad("{\"id\":1e300}", &spec_default, OQ_DLQ_BAD_ID, fl);
    bad("{\"id\":\"\"}", &spec_default, OQ_DLQ_BAD_ID, "empty id");

    /* 1024 bytes is the limit; 1025 is too long. */
    strcpy(big, "{\"id\":\"");
    memset(big + 7, 'i', 1024);
    strcpy(big + 7 + 1024, "\"}");
    {
        char id[1025];
        memset(id, 'i', 1024);
        id[1024] = '\0';
        ok_id(big, &spec_default, id);
    }
    strcpy(big, "{\"id\":\"");
    memset(big + 7, 'i', 1025);
    strcpy(big + 7 + 1025, "\"}");
    bad(big, &spec_default, OQ_DLQ_BAD_ID, "id longer than 1024 bytes");
}

static void test_decode_parse_errors(void **state)
{
    (void)state;
    const oq_dlq_reason pe = OQ_DLQ_PARSE_ERROR;
    char deep[2100];

    bad("{\"id\":\"a\"", &spec_default, pe,
        "invalid JSON at byte 9: expected ',' or '}'");
    bad("{\"id\":\"a\",}", &spec_default, pe,
        "invalid JSON at byte 10: expected a string key");
    bad("{\"id\":tru}", &spec_default, pe,
        "invalid JSON at byte 6: invalid literal");
    bad("", &spec_default, pe,
        "invalid JSON at byte 0: unexpected end of the text");
    bad("[1,2,3]", &spec_default, pe, "not a JSON object");
    bad("\"just a string\"", &spec_default, pe, "not a JSON object");
    bad("42", &spec_default, pe, "not a JSON object");
    bad("null", &spec_default, pe, "not a JSON object");
    bad("{\"id\":\"a\"} x", &spec_default, pe,
        "invalid JSON at byte 11: unexpected data after the value");
    bad("{\"id\":\"a\"}{}", &spec_default, pe,
        "invalid JSON at byte 10: unexpected data after the value");
    ok_id("{\"id\":\"a\"} \t\r", &spec_default, "a");
    bad("{\"id\":\"\\ud800\"}", &spec_default, pe,
        "invalid JSON at byte 7: lone high surrogate in a \\u escape");
    bad("{\"id\":\"\\udc00\"}", &spec_default, pe,
        "invalid JSON at byte 7: lone low surrogate in a \\u escape");
    bad("{\"id\":\"\\u12g4\"}", &spec_default, pe,
        "invalid JSON at byte 7: bad \\u escape");
    bad("{\"id\":\"\\x\"}", &spec_default, pe,
        "invalid JSON at byte 7: bad escape in a string");
    /* What cJSON tolerated and a strict parser refuses: raw control
     * characters in strings, other whitespace bytes, lax numbers. */
    bad("{\"id\":\"a\tb\"}", &spec_default, pe,
        "invalid JSON at byte 8: control character in a string");
    bad("{\"id\":\"a\x01\"}", &spec_default, pe,
        "invalid JSON at byte 8: control character in a string");
    bad("\f{\"id\":\"a\"}", &spec_default, pe,
        "invalid JSON at byte 0: unexpected character");
    bad("{\"id\":\"a\"}\v", &spec_default, pe,
        "invalid JSON at byte 10: unexpected data after the value");
    bad("{\"id\":01}", &spec_default, pe,
        "invalid JSON at byte 7: expected ',' or '}'");
    bad("{\"id\":1.}", &spec_default, pe,
        "invalid JSON at byte 8: bad number: no digit after '.'");
    bad("{\"id\":1e}", &spec_default, pe,
        "invalid JSON at byte 8: bad number: no digit in the exponent");
    bad("{\"id\":-}", &spec_default, pe, "invalid JSON at byte 7: bad number");
    bad("{\"id\":+1}", &spec_default, pe,
        "invalid JSON at byte 6: unexpected character");
    bad("{\"id\":\"a\",\"x\":NaN}", &spec_default, pe,
        "invalid JSON at byte 14: unexpected character");
    bad("{\"id\" \"a\"}", &spec_default, pe,
        "invalid JSON at byte 6: expected ':'");
    /* Nesting: 1000 levels are accepted, 1001 are not. */
    for (int levels = 999; levels <= 1000; levels++) {
        size_t n = (size_t)sprintf(deep, "{\"id\":\"d\",\"x\":");
        for (int i = 0; i < levels; i++)
            deep[n++] = '[';
        for (int i = 0; i < levels; i++)
            deep[n++] = ']';
        deep[n++] = '}';
        deep[n] = '\0';
        if (levels == 999)
            ok_id(deep, &spec_default, "d");
        else
            bad(deep, &spec_default, pe,
                "invalid JSON at byte 1013: nesting too deep");
    }
}

/* The estimate that sizes the processed set: lines from the inputs' size
 * and the first 64 KiB; 0 for a pipe; capped for a huge input. */
static uint64_t estimate(const char *const *paths, unsigned n)
{
    oq__reader *r;
    char err[256];
    uint64_t e;

    assert_int_equal(oq__reader_open(&r, paths, n, 1 << 20, err, sizeof(err)),
                     0);
    e = oq__reader_estimate_lines(r);
    oq__reader_close(r);
    return e;
}

static void test_estimate_lines(void **state)
{
    (void)state;
    enum { LINES = 10000 };
    static char text[LINES * 20];
    const char *paths[2];
    char big[256];
    int fd, pfd[2];

    /* 10,000 lines of 20 bytes (19 and a newline), twice. */
    for (int i = 0; i < LINES; i++) {
        char line[32];
        snprintf(line, sizeof(line), "{\"id\":\"e%07d\"}  \n", i);
        memcpy(text + i * 20, line, 20);
    }
    paths[0] = put("est1.jsonl", text, LINES * 20);
    assert_int_equal(estimate(paths, 1), LINES);
    paths[1] = put("est2.jsonl", text, LINES * 20);
    assert_int_equal(estimate(paths, 2), 2 * LINES);
    /* One long line with no newline in the sample: one line. */
    {
        static char one[100000];
        memset(one, 'x', sizeof(one));
        paths[0] = put("est3.jsonl", one, sizeof(one));
        assert_int_equal(estimate(paths, 1), 1);
    }
    /* 4 GiB of 20-byte lines (a sparse file): capped at 2^20. */
    snprintf(big, sizeof(big), "%s/est4.jsonl", tmpdir);
    fd = open(big, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, LINES * 20), (ssize_t)LINES * 20);
    assert_int_equal(ftruncate(fd, (off_t)4 << 30), 0);
    close(fd);
    paths[0] = big;
    assert_int_equal(estimate(paths, 1), (uint64_t)1 << 20);
    unlink(big);
    /* A pipe: unknown. */
    assert_int_equal(pipe(pfd), 0);
    {
        char dev[64];
        snprintf(dev, sizeof(dev), "/dev/fd/%d", pfd[0]);
        paths[0] = dev;
        assert_int_equal(estimate(paths, 1), 0);
    }
    close(pfd[0]);
    close(pfd[1]);
}

static void test_decode_utf8_and_nul(void **state)
{
    (void)state;
    const oq_dlq_reason pe = OQ_DLQ_PARSE_ERROR;

    bad_n("{\"id\":\"a\0\"}", 11, &spec_default, pe, "NUL byte at byte 8");
    bad_n("\0{}", 3, &spec_default, pe, "NUL byte at byte 0");
    /* Overlong forms. */
    bad("{\"id\":\"\xc0\xaf\"}", &spec_default, pe, "invalid UTF-8 at byte 7");
    bad("{\"id\":\"\xc1\xbf\"}", &spec_default, pe, "invalid UTF-8 at byte 7");
    bad("{\"id\":\"\xe0\x80\xaf\"}", &spec_default, pe,
        "invalid UTF-8 at byte 7");
    bad("{\"id\":\"\xf0\x80\x80\xaf\"}", &spec_default, pe,
        "invalid UTF-8 at byte 7");
    /* A surrogate, U+D800. */
    bad("{\"id\":\"\xed\xa0\x80\"}", &spec_default, pe,
        "invalid UTF-8 at byte 7");
    /* Truncated sequences, inside and at the end of the line. */
    bad("{\"id\":\"\xe2\x82\"}", &spec_default, pe, "invalid UTF-8 at byte 7");
    bad("{\"id\":\"a\"}\xe2\x82", &spec_default, pe,
        "invalid UTF-8 at byte 10");
    bad("{\"id\":\"a\"}\xf0", &spec_default, pe, "invalid UTF-8 at byte 10");
    /* Above U+10FFFF. */
    bad("{\"id\":\"\xf4\x90\x80\x80\"}", &spec_default, pe,
        "invalid UTF-8 at byte 7");
    bad("{\"id\":\"\xf5\x80\x80\x80\"}", &spec_default, pe,
        "invalid UTF-8 at byte 7");
    /* A lone continuation byte, and 0xFF. */
    bad("{\"id\":\"\x80\"}", &spec_default, pe, "invalid UTF-8 at byte 7");
    bad("{\"id\":\"ab\xff\"}", &spec_default, pe, "invalid UTF-8 at byte 9");
    /* The largest valid ones are accepted. */
    ok_id("{\"id\":\"\xf4\x8f\xbf\xbf\xed\x9f\xbf\xee\x80\x80\"}",
          &spec_default, "\xf4\x8f\xbf\xbf\xed\x9f\xbf\xee\x80\x80");
}

/* The 8-byte ASCII path must find a bad byte at any position. */
static void test_utf8_valid_positions(void **state)
{
    (void)state;
    char buf[64];

    for (size_t len = 0; len <= sizeof(buf); len++) {
        memset(buf, 'a', sizeof(buf));
        assert_true(oq__utf8_valid(buf, len));
        for (size_t at = 0; at < len; at++) {
            buf[at] = '\0';
            assert_false(oq__utf8_valid(buf, len));
            buf[at] = (char)0x80;
            assert_false(oq__utf8_valid(buf, len));
            buf[at] = (char)0xc3; /* the start of a 2-byte sequence */
            assert_int_equal(oq__utf8_valid(buf, len), 0);
            if (at + 1 < len) {
                buf[at + 1] = (char)0xa9; /* U+00E9 */
                assert_true(oq__utf8_valid(buf, len));
                buf[at + 1] = 'a';
            }
            buf[at] = 'a';
        }
    }
    assert_true(oq__utf8_valid("\x7f", 1));
    assert_true(oq__utf8_valid("\xc2\x80\xdf\xbf", 4));
    assert_true(oq__utf8_valid("\xe0\xa0\x80\xef\xbf\xbf", 6));
    assert_true(oq__utf8_valid("\xf0\x90\x80\x80", 4));
    assert_false(oq__utf8_valid("\xe0\x9f\xbf", 3));
    assert_false(oq__utf8_valid("\xed\xbf\xbf", 3));
    assert_false(oq__utf8_valid("\xf0\x8f\xbf\xbf", 4));
    assert_false(oq__utf8_valid("\xe2\x28\xa1", 3));
}

/* An allocation failure in decode rejects the event cleanly (no leak). A
 * thread that decoded before has its arena and tape and allocates nothing
 * per event, so this runs in a new thread. */
static void *decode_no_memory(void *arg)
{
    oq_decoded *d = arg;
    char *copy;
    const char *j = "{\"id\":\"a\"}";
    int rc;

    oq__alloc_fail_after(0);
    rc = dec_n(j, strlen(j), NULL, d, &copy);
    oq__alloc_fail_after(-1);
    free(copy);
    return (void *)(intptr_t)rc;
}

static void test_decode_alloc_failure(void **state)
{
    (void)state;
    oq_decoded d;
    pthread_t t;
    void *rc;

    assert_int_equal(pthread_create(&t, NULL, decode_no_memory, &d), 0);
    pthread_join(t, &rc);
    assert_int_not_equal((intptr_t)rc, 0);
    assert_int_equal(d.reason, OQ_DLQ_REJECTED);
    assert_string_equal(d.error, "out of memory");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crlf_blank_last_line),
        cmocka_unit_test(test_only_one_cr_stripped),
        cmocka_unit_test(test_empty_file),
        cmocka_unit_test(test_block_boundaries),
        cmocka_unit_test(test_too_large_streamed),
        cmocka_unit_test(test_too_large_in_buffer),
        cmocka_unit_test(test_too_large_at_eof),
        cmocka_unit_test(test_multiple_files),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_stdin_pipe),
        cmocka_unit_test(test_read_error),
        cmocka_unit_test(test_decode_string_id),
        cmocka_unit_test(test_decode_integer_id),
        cmocka_unit_test(test_decode_event_id_fallback),
        cmocka_unit_test(test_decode_json_pointer),
        cmocka_unit_test(test_decode_bad_id),
        cmocka_unit_test(test_decode_parse_errors),
        cmocka_unit_test(test_estimate_lines),
        cmocka_unit_test(test_decode_utf8_and_nul),
        cmocka_unit_test(test_utf8_valid_positions),
        cmocka_unit_test(test_decode_alloc_failure),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
