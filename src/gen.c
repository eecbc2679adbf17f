/*
 * onceq gen: synthetic JSON-lines event files for tests, demos and
 * benchmarks, deterministic for a given seed, and (--bad) a corpus of every
 * kind of bad input `onceq run` must account for.
 *
 * The content of unique event k is a pure function of (seed, k), so a
 * duplicate (an at-least-once redelivery) is produced by generating event k
 * again: nothing is stored per event, and 10^8 events take no memory.
 */
#include "oq_cli.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WORDS 10000000ULL
#define RECENT 1000 /* half the duplicates repeat one of the last RECENT */

typedef struct gen_opts {
    uint64_t events;     /* lines to write (unique events + duplicates) */
    double duplicates;   /* fraction of lines that repeat an earlier event */
    double poison;       /* fraction of unique events with "poison":true */
    double transient;    /* fraction with "transient":true */
    uint64_t words;      /* vocabulary size */
    uint64_t seed;
    uint64_t max_line;   /* --bad: the size of the too-large line */
    bool text;           /* a "text" field of several words */
    bool bad;            /* write the bad-input corpus */
    const char *out;     /* NULL: stdout */
} gen_opts;

/* An output buffer over a FILE, with sticky error checking. */
typedef struct outbuf {
    FILE *f;
    char buf[1 << 16];
    size_t len;
    bool failed;
} outbuf;

static void ob_flush(outbuf *o)
{
    if (o->len && !o->failed && fwrite(o->buf, 1, o->len, o->f) != o->len)
        o->failed = true;
    o->len = 0;
}

static void ob_put(outbuf *o, const void *s, size_t n)
{
    while (n > 0) {
        size_t k;
        if (o->len == sizeof(o->buf))
            ob_flush(o);
        k = OQ__MIN(n, sizeof(o->buf) - o->len);
        memcpy(o->buf + o->len, s, k);
        o->len += k;
        s = (const char *)s + k;
        n -= k;
    }
}

static void ob_str(outbuf *o, const char *s)
{
    ob_put(o, s, strlen(s));
}

static void ob_u64(outbuf *o, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    ob_put(o, tmp + i, sizeof(tmp) - i);
}

static void ob_fill(outbuf *o, char c, size_t n)
{
    char chunk[4096];
    memset(chunk, c, sizeof(chunk));
    while (n > 0) {
        size_t k = OQ__MIN(n, sizeof(chunk));
        ob_put(o, chunk, k);
        n -= k;
    }
}

/* ------------------------------------------------------------ generation */

/* A uniform double in [0, 1). */
static double uniform(uint64_t *rng)
{
    return (double)(oq__splitmix64(rng) >> 11) * 0x1.0p-53;
}

/* Zipf (s = 1) over words ranks: cdf[k] = P(rank <= k). */
static double *zipf_cdf(uint64_t words)
{
    double *cdf = malloc(words * sizeof(*cdf));
    double sum = 0;

    if (cdf == NULL)
        return NULL;
    for (uint64_t k = 0; k < words; k++)
        cdf[k] = (sum += 1.0 / (double)(k + 1));
    for (uint64_t k = 0; k < words; k++)
        cdf[k] /= sum;
    return cdf;
}

/* A word rank (1-based) drawn from the zipf distribution. */
static uint64_t draw_word(const double *cdf, uint64_t words, uint64_t *rng)
{
    double u = uniform(rng);
    uint64_t lo = 0, hi = words - 1;

    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (cdf[mid] > u)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo + 1;
}

/* Writes unique event k (0-based; its id is evt-<k+1>). Its content
 * depends only on the seed and k. */
static void write_event(outbuf *o, const gen_opts *g, const double *cdf,
                        uint64_t k)
{
    uint64_t rng = g->seed ^ (k * 0xd1b54a32d192ed03ULL);
    double u;

    (void)oq__splitmix64(&rng);
    ob_str(o, "{\"id\":\"evt-");
    ob_u64(o, k + 1);
    if (g->text) {
        unsigned n = 3 + (unsigned)(oq__splitmix64(&rng) % 6);
        ob_str(o, "\",\"text\":\"");
        for (unsigned i = 0; i < n; i++) {
            ob_str(o, i ? " w" : "w");
            ob_u64(o, draw_word(cdf, g->words, &rng));
        }
    } else {
        ob_str(o, "\",\"word\":\"w");
        ob_u64(o, draw_word(cdf, g->words, &rng));
    }
    ob_str(o, "\"");
    u = uniform(&rng);
    if (u < g->poison)
        ob_str(o, ",\"poison\":true");
    else if (u < g->poison + g->transient)
        ob_str(o, ",\"transient\":true");
    ob_str(o, "}\n");
}

static int gen_events(outbuf *o, const gen_opts *g)
{
    uint64_t rng = g->seed;
    uint64_t unique = 0;
    double *cdf = zipf_cdf(g->words);

    if (cdf == NULL) {
        fprintf(stderr, "onceq gen: out of memory\n");
        return 1;
    }
    for (uint64_t i = 0; i < g->events && !o->failed; i++) {
        uint64_t k;
        if (unique > 0 && uniform(&rng) < g->duplicates) {
            /* A redelivery: half of them recent (within the producer's
             * dedup window), half from anywhere earlier (caught by the
             * processed set). */
            uint64_t r = oq__splitmix64(&rng);
            if (r & 1)
                k = unique - 1 - (r >> 1) % OQ__MIN(unique, (uint64_t)RECENT);
            else
                k = (r >> 1) % unique;
        } else {
            k = unique++;
        }
        write_event(o, g, cdf, k);
    }
    free(cdf);
    return 0;
}

/* A string literal with its length (some hold a NUL byte). */
typedef struct lit {
    const char *s;
    size_t n;
} lit;
#define L(s) { s, sizeof(s) - 1 }

/*
 * The bad-input corpus, in a fixed order (tests rely on it): 27 lines,
 * 5 processed, 1 duplicate, 3 blank, 18 dead-lettered (parse_error 8,
 * bad_id 9, too_large 1). The wordcount result is alpha, beta, delta,
 * epsilon and omega, 1 each.
 */
static void gen_bad(outbuf *o, const gen_opts *g)
{
    static const lit head[] = {
        L("{\"id\":\"good-1\",\"word\":\"alpha\"}\n"),    /* ok */
        L("{\"id\":\"malformed\",\"word\":\"x\"\n"),     /* parse_error */
        L("{\"id\":\"trailing\"} x\n"),                  /* parse_error */
        L("[1,2,3]\n"),                                  /* parse_error */
        L("\"just a string\"\n"),                        /* parse_error */
        L("42\n"),                                       /* parse_error */
        L("{\"word\":\"no-id\"}\n"),                     /* bad_id */
        L("{\"id\":null,\"word\":\"x\"}\n"),             /* bad_id */
        L("{\"id\":1.5,\"word\":\"x\"}\n"),              /* bad_id */
        L("{\"id\":true,\"word\":\"x\"}\n"),             /* bad_id */
        L("{\"id\":{\"a\":1},\"word\":\"x\"}\n"),        /* bad_id */
        L("{\"id\":[\"a\"],\"word\":\"x\"}\n"),          /* bad_id */
        L("{\"id\":\"\",\"word\":\"x\"}\n"),             /* bad_id */
        L("{\"id\":1e3,\"word\":\"x\"}\n"),              /* bad_id */
    };
    static const lit tail[] = {
        L("{\"id\":\"bad-utf8\",\"word\":\"\xff\xfe\"}\n"), /* parse_error */
        L("{\"id\":\"overlong\",\"word\":\"\xc0\xaf\"}\n"), /* parse_error */
        L("{\"id\":\"nul\",\"word\":\"a\0b\"}\n"),          /* parse_error */
        L("{\"id\":\"crlf\",\"word\":\"beta\"}\r\n"),       /* ok */
        L("\n"),                                            /* blank */
        L("   \t \n"),                                      /* blank */
        L("\r\n"),                                          /* blank */
        L("{\"id\":\"good-1\",\"word\":\"alpha\"}\n"),      /* duplicate */
        L("{\"id\":42,\"word\":\"delta\"}\n"),              /* ok: id "42" */
        L("{\"event_id\":\"ev-1\",\"word\":\"epsilon\"}\n"),/* ok */
        L("{\"id\":\"last\",\"word\":\"omega\"}"),          /* ok, no newline */
    };
    static const char too_large[] = "{\"id\":\"too-large\",\"word\":\"\"}";

    for (size_t i = 0; i < sizeof(head) / sizeof(head[0]); i++)
        ob_put(o, head[i].s, head[i].n);
    /* An id of OQ__MAX_ID_LEN + 1 bytes: bad_id. */
    ob_str(o, "{\"id\":\"");
    ob_fill(o, 'i', OQ__MAX_ID_LEN + 1);
    ob_str(o, "\",\"word\":\"x\"}\n");
    /* A line of max_line + 10 bytes (without its newline): too_large. */
    ob_put(o, too_large, sizeof(too_large) - 3);
    ob_fill(o, 'x', (size_t)g->max_line + 10 - (sizeof(too_large) - 1));
    ob_str(o, "\"}\n");
    for (size_t i = 0; i < sizeof(tail) / sizeof(tail[0]); i++)
        ob_put(o, tail[i].s, tail[i].n);
}

/* ------------------------------------------------------------- arguments */

static void usage(FILE *f)
{
    fprintf(f,
"usage: onceq gen [OPTIONS]\n"
"\n"
"Writes synthetic JSON-lines events, one per line:\n"
"  {\"id\":\"evt-1\",\"word\":\"w3\"}\n"
"Deterministic for a given --seed.\n"
"\n"
"Options:\n"
"  -n, --events N       lines to write, duplicates included (default 1000)\n"
"      --duplicates F   fraction of lines that repeat an earlier event, id\n"
"                       and content, like an at-least-once redelivery: half\n"
"                       from the last %d events, half from anywhere\n"
"                       (default 0)\n"
"      --poison F       fraction of events with \"poison\":true (default 0)\n"
"      --transient F    fraction of events with \"transient\":true (default 0)\n"
"      --words N        vocabulary size; words w1..wN are drawn with a zipf\n"
"                       distribution, w1 the most frequent (default 1000)\n"
"      --text           a \"text\" field of 3 to 8 words instead of \"word\"\n"
"      --seed S         PRNG seed (default 1)\n"
"      --bad            write instead a corpus of every kind of bad input:\n"
"                       malformed JSON, trailing garbage, non-object lines,\n"
"                       missing/null/float/bool/object/array/empty/1025-byte\n"
"                       ids, a line of --max-line + 10 bytes, invalid UTF-8,\n"
"                       a NUL byte, CRLF, blank lines, a duplicate, an\n"
"                       integer id, an event_id, and a last line without a\n"
"                       newline (27 lines: 5 processed, 1 duplicate,\n"
"                       3 blank, 18 dead-lettered)\n"
"      --max-line BYTES size the too-large line of --bad for this limit\n"
"                       (suffix K, M or G; default 1M; 2048 to 4G)\n"
"  -o, --out FILE       write to FILE instead of stdout\n"
"  -h, --help           show this help\n"
"\n"
"Fractions are in [0,1]; --poison + --transient must not exceed 1.\n"
"\n"
"Examples:\n"
"  onceq gen --events 1000000 --duplicates 0.1 --poison 0.01 --seed 7 \\\n"
"      > events.jsonl\n"
"  onceq gen --bad > bad.jsonl && onceq run bad.jsonl\n"
"\n"
"Exit status: 0 success, 2 bad usage, 3 write error.\n",
            RECENT);
}

/* A fraction in [0,1]: DIGITS[.DIGITS], nothing else (strtod alone would
 * take whitespace, a sign, hex, exponents, nan and inf). */
static bool parse_fraction(const char *s, double *out)
{
    const char *p = s;
    double v;

    if (*p < '0' || *p > '9')
        return false;
    while (*p >= '0' && *p <= '9')
        p++;
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return false;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p != '\0')
        return false;
    v = strtod(s, NULL);
    if (!(v >= 0.0 && v <= 1.0))
        return false;
    *out = v;
    return true;
}

enum {
    OPT_DUP = 256, OPT_POISON, OPT_TRANSIENT, OPT_WORDS, OPT_SEED, OPT_TEXT,
    OPT_BAD, OPT_MAX_LINE
};

static const struct option longopts[] = {
    { "events", required_argument, NULL, 'n' },
    { "duplicates", required_argument, NULL, OPT_DUP },
    { "poison", required_argument, NULL, OPT_POISON },
    { "transient", required_argument, NULL, OPT_TRANSIENT },
    { "words", required_argument, NULL, OPT_WORDS },
    { "seed", required_argument, NULL, OPT_SEED },
    { "text", no_argument, NULL, OPT_TEXT },
    { "bad", no_argument, NULL, OPT_BAD },
    { "max-line", required_argument, NULL, OPT_MAX_LINE },
    { "out", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
};

static int bad_usage(const char *what, const char *arg)
{
    if (arg)
        fprintf(stderr, "onceq gen: %s '%s' (try 'onceq gen --help')\n",
                what, arg);
    else
        fprintf(stderr, "onceq gen: %s (try 'onceq gen --help')\n", what);
    return 2;
}

/* Parses argv into g. Returns -1 to go on, or an exit status. */
static int parse_args(int argc, char **argv, gen_opts *g)
{
    int c;

    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":n:o:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'n':
            if (oq__parse_count(optarg, 0, UINT64_MAX, &g->events) != 0)
                return bad_usage("--events wants a count >= 0, not", optarg);
            break;
        case OPT_DUP:
            if (!parse_fraction(optarg, &g->duplicates))
                return bad_usage("--duplicates wants a fraction in [0,1], not",
                                 optarg);
            break;
        case OPT_POISON:
            if (!parse_fraction(optarg, &g->poison))
                return bad_usage("--poison wants a fraction in [0,1], not",
                                 optarg);
            break;
        case OPT_TRANSIENT:
            if (!parse_fraction(optarg, &g->transient))
                return bad_usage("--transient wants a fraction in [0,1], not",
                                 optarg);
            break;
        case OPT_WORDS:
            if (oq__parse_count(optarg, 1, MAX_WORDS, &g->words) != 0)
                return bad_usage("--words wants a count in [1,10000000], not",
                                 optarg);
            break;
        case OPT_SEED:
            if (oq__parse_count(optarg, 0, UINT64_MAX, &g->seed) != 0)
                return bad_usage("--seed wants an unsigned integer, not",
                                 optarg);
            break;
        case OPT_TEXT:
            g->text = true;
            break;
        case OPT_BAD:
            g->bad = true;
            break;
        case OPT_MAX_LINE:
            if (oq__parse_size(optarg, 2048, (uint64_t)1 << 32,
                               &g->max_line) != 0)
                return bad_usage("--max-line wants a size in [2048,4G], not",
                                 optarg);
            break;
        case 'o':
            g->out = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case ':':
            return bad_usage("missing value for", argv[optind - 1]);
        default:
            return bad_usage("unknown option", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return bad_usage("unexpected argument", argv[optind]);
    if (g->poison + g->transient > 1.0)
        return bad_usage("--poison + --transient exceed 1", NULL);
    return -1;
}

int oq__cmd_gen(int argc, char **argv)
{
    gen_opts g = {
        .events = 1000, .words = 1000, .seed = 1, .max_line = 1 << 20,
    };
    outbuf *o;
    int rc = parse_args(argc, argv, &g);

    if (rc >= 0)
        return rc;
    o = calloc(1, sizeof(*o));
    if (o == NULL) {
        fprintf(stderr, "onceq gen: out of memory\n");
        return 1;
    }
    o->f = stdout;
    if (g.out && (o->f = fopen(g.out, "we")) == NULL) {
        fprintf(stderr, "onceq gen: cannot create '%s': %s\n", g.out,
                strerror(errno));
        free(o);
        return 2;
    }
    if (g.bad)
        gen_bad(o, &g);
    else
        rc = gen_events(o, &g);
    ob_flush(o);
    if (fflush(o->f) != 0 || ferror(o->f))
        o->failed = true;
    if (o->f != stdout && fclose(o->f) != 0)
        o->failed = true;
    if (o->failed) {
        fprintf(stderr, "onceq gen: write error on '%s': %s\n",
                g.out ? g.out : "<stdout>", strerror(errno));
        rc = 3;
    }
    free(o);
    return rc < 0 ? 0 : rc;
}
