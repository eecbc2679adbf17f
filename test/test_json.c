/* Description: the strict JSON scanner (src/json.c). Unit tests of the tape
 * (siblings, keys, strings with escapes and NULs, numbers as written, JSON
 * pointers, compact re-printing, quoting), and a differential fuzz against
 * cJSON: every text the scanner accepts, cJSON accepts too, with the same
 * tree (types, keys, strings byte for byte up to cJSON's first NUL, numbers
 * by value). The fuzz takes a seed (OQ_FUZZ_SEED, default: time) and prints
 * it; OQ_FUZZ_ITERS sets its length. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "oq_cli.h"

static oq__jtape tape;

/* Scans s; returns its document (valid until the next scan) or fails. */
static oq__jdoc scan_ok(const char *s)
{
    size_t at;
    const char *why = NULL;
    int rc = oq__json_scan(s, strlen(s), &tape, &at, &why);

    if (rc != 0)
        fail_msg("refused %s at %zu: %s", s, at, why ? why : "no memory");
    return (oq__jdoc){ s, strlen(s), tape.tok, tape.n };
}

static void test_tape_shape(void **state)
{
    (void)state;
    oq__jdoc d = scan_ok(" {\"a\": [1, {\"b\": null}, \"s\"], \"c\": true} ");
    uint32_t a, c, b;

    /* obj, "a", arr, 1, obj, "b", null, "s", "c", true */
    assert_int_equal(d.ntok, 10);
    assert_int_equal(d.tok[0].type, OQ__J_OBJ);
    assert_int_equal(d.tok[0].end, 10);
    a = oq__jget(&d, 0, "a", 1);
    assert_int_equal(a, 2);
    assert_int_equal(d.tok[a].type, OQ__J_ARR);
    assert_int_equal(d.tok[a].end, 8);
    b = oq__jpointer(&d, "/a/1/b");
    assert_int_equal(d.tok[b].type, OQ__J_NULL);
    assert_int_equal(oq__jpointer(&d, "/a/2"), 7);
    assert_int_equal(oq__jpointer(&d, "/a/3"), 0);
    assert_int_equal(oq__jpointer(&d, "/a/01"), 0);
    assert_int_equal(oq__jpointer(&d, "/c/x"), 0);
    c = oq__jget(&d, 0, "c", 1);
    assert_int_equal(d.tok[c].type, OQ__J_TRUE);
    assert_int_equal(oq__jget(&d, 0, "d", 1), 0);
    assert_int_equal(oq__jget(&d, a, "a", 1), 0); /* not an object */
    /* A container's text runs through its closing bracket. */
    assert_int_equal(d.tok[a].len, strlen("[1, {\"b\": null}, \"s\"]"));
}

static void test_strings_exact(void **state)
{
    (void)state;
    oq__jdoc d = scan_ok("{\"k\\u0000\":\"x\\u0000y\",\"k\":\"plain\","
                         "\"e\":\"\\u00e9\\ud83d\\ude00\\n\"}");
    char buf[64];
    size_t n;
    const char *v;
    uint32_t k0 = 1, v0 = 2;

    v = oq__jstr(&d, k0, buf, &n);
    assert_int_equal(n, 2);
    assert_memory_equal(v, "k\0", 2);
    v = oq__jstr(&d, v0, buf, &n);
    assert_int_equal(n, 3);
    assert_memory_equal(v, "x\0y", 3);
    /* "k" and "k\u0000" are two keys. */
    assert_int_equal(oq__jget(&d, 0, "k", 1), 4);
    assert_int_equal(oq__jget(&d, 0, "k\0", 2), 2);
    v = oq__jstr(&d, oq__jget(&d, 0, "e", 1), buf, &n);
    assert_int_equal(n, 7);
    assert_memory_equal(v, "\xc3\xa9\xf0\x9f\x98\x80\n", 7);
    /* Unescaped strings point into the text. */
    v = oq__jstr(&d, 4, buf, &n);
    assert_ptr_equal(v, d.text + d.tok[4].start);
}

static void test_numbers_as_written(void **state)
{
    (void)state;
    oq__jdoc d = scan_ok("[9007199254740993, -0, 1.50, 2e10, 0.30000000000000004]");
    oq__buf b = { 0 };

    assert_true(oq__jnum_is_integer(&d, 1));
    assert_true(oq__jnum_is_integer(&d, 2));
    assert_false(oq__jnum_is_integer(&d, 3));
    assert_false(oq__jnum_is_integer(&d, 4));
    assert_int_equal(oq__jcompact(&d, 0, &b), 0);
    assert_int_equal(b.len, strlen("[9007199254740993,-0,1.50,2e10,"
                                   "0.30000000000000004]"));
    assert_memory_equal(b.data, "[9007199254740993,-0,1.50,2e10,"
                        "0.30000000000000004]", b.len);
    oq__buf_free(&b);
}

static void test_compact_and_quote(void **state)
{
    (void)state;
    oq__jdoc d = scan_ok("{ \"a\" : { \"\\u0041\\t\" : [ ] } , \"b\":\"\\u0000\\\"\" }");
    oq__buf b = { 0 };
    const char *want = "{\"a\":{\"A\\t\":[]},\"b\":\"\\u0000\\\"\"}";

    assert_int_equal(oq__jcompact(&d, 0, &b), 0);
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.data, want, b.len);
    /* What it writes scans again. */
    b.len = 0;
    assert_int_equal(oq__json_quote(&b, "a\"\\\x01\x7f\xff\xc3\xa9", 8), 0);
    want = "\"a\\\"\\\\\\u0001\\u007f\\ufffd\xc3\xa9\"";
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.data, want, b.len);
    oq__buf_free(&b);
}

static void test_valid(void **state)
{
    (void)state;
    assert_true(oq__json_valid("{}", 2));
    assert_true(oq__json_valid(" [1,\"a\",null] ", 14));
    assert_false(oq__json_valid("{\"a\":1,\"a\":2}", 13));
    assert_false(oq__json_valid("\"a\x01\"", 4));
    assert_false(oq__json_valid("\"\xff\"", 3));
    assert_false(oq__json_valid("\"a\0\"", 4));
    assert_false(oq__json_valid("", 0));
    assert_false(oq__json_valid("\xef\xbb\xbf{}", 5));
    /* Many keys: the duplicate check sorts them. */
    {
        char big[4096];
        size_t n = 0;
        big[n++] = '{';
        for (int i = 0; i < 100; i++)
            n += (size_t)sprintf(big + n, "%s\"k%d\":%d", i ? "," : "", i, i);
        big[n++] = '}';
        assert_true(oq__json_valid(big, n));
        n--;
        n += (size_t)sprintf(big + n, ",\"k57\":0}");
        assert_false(oq__json_valid(big, n));
    }
}

/* ------------------------------------------------------ differential */

/* Do the tape at i and cJSON's c hold the same value? */
static bool same(const oq__jdoc *d, uint32_t i, const cJSON *c, bool *longnum)
{
    const oq__jtok *t = &d->tok[i];
    char buf[4096];
    size_t n;
    const char *v;

    switch (t->type) {
    case OQ__J_OBJ:
    case OQ__J_ARR: {
        bool obj = t->type == OQ__J_OBJ;
        const cJSON *k = c->child;
        if (obj ? !cJSON_IsObject(c) : !cJSON_IsArray(c))
            return false;
        for (uint32_t j = i + 1; j < t->end; k = k->next) {
            if (k == NULL)
                return false;
            if (obj) {
                v = oq__jstr(d, j, buf, &n);
                /* cJSON's keys end at their first NUL. */
                if (strncmp(k->string, v, n) != 0 ||
                    strlen(k->string) != (memchr(v, 0, n)
                        ? (size_t)((const char *)memchr(v, 0, n) - v) : n))
                    return false;
                j++;
            }
            if (!same(d, j, k, longnum))
                return false;
            j = d->tok[j].end;
        }
        return k == NULL;
    }
    case OQ__J_STR: {
        if (!cJSON_IsString(c))
            return false;
        v = oq__jstr(d, i, buf, &n);
        const char *z = memchr(v, 0, n);
        size_t upto = z ? (size_t)(z - v) : n;
        return strlen(c->valuestring) == upto &&
               memcmp(c->valuestring, v, upto) == 0;
    }
    case OQ__J_NUM:
        if (t->len >= 63)
            *longnum = true; /* cJSON reads numbers through a 64-byte copy */
        if (!cJSON_IsNumber(c))
            return false;
        memcpy(buf, d->text + t->start, t->len);
        buf[t->len] = '\0';
        return *longnum || strtod(buf, NULL) == c->valuedouble;
    case OQ__J_TRUE: return cJSON_IsTrue(c);
    case OQ__J_FALSE: return cJSON_IsFalse(c);
    case OQ__J_NULL: return cJSON_IsNull(c);
    }
    return false;
}

static const char *const seeds[] = {
    "{\"id\":\"e1\",\"word\":\"hello\"}",
    "{\"id\":17,\"text\":\"a b\\tc\",\"n\":-1.5e3,\"ok\":true,\"z\":null}",
    "{\"a\":[1,[2,[3,{}]],{\"b\":\"\\u00e9\\\\\\\"\"}],\"c\":false}",
    "[\"\\ud83d\\ude00\",0,-0.0,1E+2,\"\\u0000x\"]",
    "{\"meta\":{\"id\":\"m\",\"tags\":[\"x\",\"y\"]},\"v\":0.5}",
    " { } ",
    "\"just\"",
    "{\"id\":\"evt-1\",\"word\":\"w1\"}",
    "{ \"id\" : 42 , \"n\":-0.5e-3,\"t\":true,\"f\":false,\"z\":null }",
    "{\"id\":\"\xc3\xa9v\",\"text\":\"one two three\",\"k\":\"\"}",
};

/* Bytes a mutation inserts: JSON syntax, escapes, odd whitespace. */
static const char alphabet[] = "{}[]\":,\\/ubfnrt0123456789.eE+-aAzZ \t\r\n\x0b\x0c\x01\x7f\xc3\xa9";

static size_t mutate(char *buf, size_t len, size_t cap, uint64_t *rng)
{
    int edits = 1 + (int)(oq__splitmix64(rng) % 3);

    for (int e = 0; e < edits; e++) {
        uint64_t r = oq__splitmix64(rng);
        size_t at = len ? (size_t)(r >> 8) % (len + 1) : 0;
        char ch = alphabet[(r >> 40) % (sizeof(alphabet) - 1)];
        switch (r % 4) {
        case 0: /* replace */
            if (at < len)
                buf[at] = ch;
            break;
        case 1: /* insert */
            if (len + 1 < cap) {
                memmove(buf + at + 1, buf + at, len - at);
                buf[at] = ch;
                len++;
            }
            break;
        case 2: /* delete */
            if (at < len) {
                memmove(buf + at, buf + at + 1, len - at - 1);
                len--;
            }
            break;
        default: /* duplicate a span */
            if (len > 0 && len * 2 < cap) {
                size_t from = (size_t)(r >> 16) % len;
                size_t n = OQ__MIN(len - from, (size_t)(r >> 48) % 16 + 1);
                char span[16];
                memcpy(span, buf + from, n);
                memmove(buf + at + n, buf + at, len - at);
                memcpy(buf + at, span, n);
                len += n;
            }
            break;
        }
    }
    return len;
}

/* The next fuzz case in buf: a text of pool, mutated if mut; false when
 * it is not valid UTF-8 (the scanner's callers check that first). */
static bool next_case(const char *const *pool, size_t n, bool mut, char *buf,
                      size_t cap, uint64_t *rng, size_t *len)
{
    const char *s0 = pool[oq__splitmix64(rng) % n];

    *len = strlen(s0);
    memcpy(buf, s0, *len);
    if (mut)
        *len = mutate(buf, *len, cap - 1, rng);
    return oq__utf8_valid(buf, *len);
}

/* A fuzz's seed (OQ_FUZZ_SEED, default: the time) and length
 * (OQ_FUZZ_ITERS, default 200,000), printed. */
static long fuzz_params(const char *what, uint64_t *seed)
{
    const char *es = getenv("OQ_FUZZ_SEED"), *ei = getenv("OQ_FUZZ_ITERS");
    long iters = ei ? atol(ei) : 200000;

    *seed = es ? strtoull(es, NULL, 10) : (uint64_t)time(NULL);
    printf("test_json: %s seed %llu (OQ_FUZZ_SEED), %ld iterations\n", what,
           (unsigned long long)*seed, iters);
    return iters;
}

static void test_differential_fuzz(void **state)
{
    (void)state;
    uint64_t seed, rng;
    long iters = fuzz_params("fuzz", &seed);
    long accepted = 0, refused_by_us = 0;
    char buf[512];

    rng = seed;
    for (long it = 0; it < iters; it++) {
        size_t len, at;
        const char *why;
        if (!next_case(seeds, sizeof(seeds) / sizeof(seeds[0]), true, buf,
                       sizeof(buf), &rng, &len))
            continue;
        int ours = oq__json_scan(buf, len, &tape, &at, &why);
        assert_true(ours == 0 || ours == -1);
        if (ours != 0) {
            refused_by_us++;
            continue;
        }
        accepted++;
        cJSON *c = cJSON_ParseWithLength(buf, len);
        oq__jdoc d = { buf, len, tape.tok, tape.n };
        bool longnum = false;
        if (c == NULL || !same(&d, 0, c, &longnum)) {
            if (!longnum)
                fail_msg("seed %llu iteration %ld: accepted '%.*s' but cJSON "
                         "%s", (unsigned long long)seed, it, (int)len, buf,
                         c ? "reads it differently" : "refuses it");
        }
        cJSON_Delete(c);
    }
    printf("test_json: %ld accepted (all as cJSON reads them), %ld refused\n",
           accepted, refused_by_us);
    assert_true(accepted > 0);
}

/* The fast path (oq__json_scan_flat) against the full scan, on mutated
 * events: whatever the fast path takes, the full scan takes too, with the
 * very same tape (every token's offsets, lengths, types and links); what it
 * declines is left to the full scan. Takes OQ_FUZZ_SEED and OQ_FUZZ_ITERS
 * like the fuzz above. */
static void test_fast_path_same_tape(void **state)
{
    (void)state;
    static const char *const flat[] = {
        "{\"id\":\"evt-1\",\"word\":\"w1\"}",
        "{ \"id\" : 42 , \"n\":-0.5e-3,\"t\":true,\"f\":false,\"z\":null }",
        "{\"id\":\"\xc3\xa9v\",\"text\":\"one two three\",\"k\":\"\"}",
        ("{\"a\":1,\"b\":2,\"c\":3,\"d\":4,\"e\":5,\"f\":6,\"g\":7,\"h\":8,"
         "\"i\":9,\"j\":10,\"k\":11,\"l\":12,\"m\":13,\"n\":14,\"o\":15,\"p\":16}"),
        "{}",
    };
    uint64_t seed, rng;
    long iters = fuzz_params("fast path", &seed);
    long taken = 0, declined = 0;
    oq__jtape full = { 0 };
    char buf[512];

    rng = seed;
    for (long it = 0; it < iters; it++) {
        size_t len, at;
        const char *why;
        /* An eighth unmutated. */
        if (!next_case(flat, sizeof(flat) / sizeof(flat[0]), it % 8 != 0, buf,
                       sizeof(buf), &rng, &len))
            continue;
        int fast = oq__json_scan_flat(buf, len, &tape);
        int rc = oq__json_scan_full(buf, len, &full, &at, &why);
        if (fast != 0) {
            declined++;
            continue;
        }
        taken++;
        if (rc != 0)
            fail_msg("seed %llu iteration %ld: the fast path took '%.*s', "
                     "the full scan refuses it (%s)", (unsigned long long)seed,
                     it, (int)len, buf, why ? why : "out of memory");
        assert_int_equal(tape.n, full.n);
        for (uint32_t i = 0; i < full.n; i++) {
            const oq__jtok *x = &tape.tok[i], *y = &full.tok[i];
            if (x->start != y->start || x->len != y->len || x->end != y->end ||
                x->type != y->type || x->esc != y->esc)
                fail_msg("seed %llu iteration %ld: '%.*s': token %u differs",
                         (unsigned long long)seed, it, (int)len, buf, i);
        }
    }
    printf("test_json: fast path took %ld (same tape), declined %ld\n", taken,
           declined);
    /* Both kinds were seen, in numbers. */
    assert_true(taken > iters / 10);
    assert_true(declined > iters / 10);
    oq__jtape_free(&full);
}

static int teardown(void **state)
{
    (void)state;
    oq__jtape_free(&tape);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tape_shape),
        cmocka_unit_test(test_strings_exact),
        cmocka_unit_test(test_numbers_as_written),
        cmocka_unit_test(test_compact_and_quote),
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_differential_fuzz),
        cmocka_unit_test(test_fast_path_same_tape),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
