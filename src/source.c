/*
 * JSON-lines input: the line reader (reader thread) and the JSON decode hook
 * (worker threads).
 *
 * DESIGN
 * ------
 * The reader only splits lines: read(2) into one big block buffer, memchr
 * for '\n', and hand out lines that point into the buffer. It allocates
 * nothing per line and never parses JSON, so one reader thread keeps up with
 * several parsing workers. All inputs are opened (and fstat'ed) by
 * oq__reader_open, so an unreadable file or a directory is refused before
 * anything is processed.
 *
 * Buffer: buf[0..end) holds data read from the current file; buf[start..end)
 * is not yet handed out, and buf[0] is at file offset base. When no newline
 * is left in buf[start..end), the unfinished line is moved to the front and
 * more is read after it. The buffer starts at the block size and grows only
 * when one line needs it, up to max_line + 2 bytes (a line of max_line bytes,
 * a CR and one more byte to tell that it is too long). A longer line is
 * never buffered whole: its first 4 KiB are copied aside (r->big) and the
 * rest is read and dropped up to its newline.
 *
 * Threads: one thread calls oq__reader_next; oq__reader_progress may be
 * called from any thread (r->done is atomic, total never changes after
 * open).
 *
 * The decode hook (oq__json_decode) runs in the workers, concurrently, with
 * no shared state of its own: the strict scanner (json.c) and per-thread
 * buffers.
 */
#include "oq_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEFAULT_BLOCK ((size_t)1 << 20) /* bytes per read(2) */
#define DEFAULT_MAX_LINE ((size_t)1 << 20)
#define KEEP_LARGE 4096 /* bytes kept of a too-large line */

/* ================================================================= reader */

/*
 * Test hook: the block size of readers opened from now on (0: the default,
 * 1 MiB). Tests use a small block to put lines across block boundaries.
 * Not thread-safe; call it before oq__reader_open.
 */

static size_t block_size = DEFAULT_BLOCK;

void oq__reader_set_block_size(size_t bytes)
{
    block_size = bytes ? bytes : DEFAULT_BLOCK;
}

typedef struct input {
    const char *path;  /* as given; "-" is stdin */
    int fd;            /* -1 once closed */
    bool regular;      /* a regular file: reads never wait */
    uint64_t start_offset; /* resume: bytes skipped at the start */
    uint64_t start_lineno; /* resume: lines skipped at the start */
} input;

struct oq__reader {
    input *in;
    unsigned n;          /* inputs */
    unsigned cur;        /* index of the input being read; n at the end */
    size_t max_line;     /* bytes, without newline and CR */
    char *buf;
    size_t cap;          /* bytes allocated for buf */
    size_t max_cap;      /* buf never grows beyond this */
    size_t start, end;   /* buf[start..end): read, not handed out yet */
    size_t scanned;      /* buf[start..scanned) holds no '\n' */
    uint64_t base;       /* file offset of buf[0] in the current input */
    uint64_t lineno;     /* lines handed out from the current input */
    bool eof;            /* the current input has no more data */
    int err;             /* sticky read error (negative errno), or 0 */
    uint64_t done_prev;  /* bytes of the inputs before cur */
    _Atomic uint64_t done; /* bytes handed out so far, all inputs */
    uint64_t total;      /* sum of the regular files' sizes; 0 if unknown */
    int cancel[2];       /* pipe: oq__reader_cancel writes, fill polls */
    void (*idle)(void *arg); /* called before waiting for a slow input */
    void *idle_arg;
    char big[KEEP_LARGE]; /* the start of a too-large line */
};


static const char *shown_path(const char *path)
{
    return strcmp(path, "-") == 0 ? "<stdin>" : path;
}

/* Opens one input and finds whether it is a regular file and its size.
 * Returns 0, or a negative errno with err filled. */
static int open_input(input *in, const char *path, bool *regular,
                      uint64_t *size, char *err, size_t errlen)
{
    struct stat st;

    in->path = path;
    if (strcmp(path, "-") == 0) {
        in->fd = STDIN_FILENO;
    } else {
        in->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (in->fd < 0) {
            int e = errno;
            oq__set_err(err, errlen, "cannot open '%s': %s", path, strerror(e));
            return -e;
        }
    }
    if (fstat(in->fd, &st) != 0) {
        int e = errno;
        oq__set_err(err, errlen, "cannot stat '%s': %s", shown_path(path),
                strerror(e));
        return -e;
    }
    if (S_ISDIR(st.st_mode)) {
        oq__set_err(err, errlen, "cannot read '%s': %s", shown_path(path),
                strerror(EISDIR));
        return -EISDIR;
    }
    *regular = S_ISREG(st.st_mode);
    *size = *regular ? (uint64_t)st.st_size : 0;
    if (*regular)
        (void)posix_fadvise(in->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    return 0;
}

static void close_input(input *in)
{
    if (in->fd >= 0 && in->fd != STDIN_FILENO)
        close(in->fd);
    in->fd = -1;
}

int oq__reader_open(oq__reader **out, const char *const *paths, unsigned n,
                    size_t max_line, char *err, size_t errlen)
{
    static const char *const stdin_path[] = { "-" };
    oq__reader *r;
    bool all_regular = true;
    int rc;

    *out = NULL;
    if (n == 0) {
        paths = stdin_path;
        n = 1;
    }
    r = oq__calloc(1, sizeof(*r));
    if (r == NULL)
        goto out_nomem;
    r->cancel[0] = r->cancel[1] = -1;
    r->in = oq__calloc(n, sizeof(*r->in));
    if (r->in == NULL)
        goto out_nomem;
    for (unsigned i = 0; i < n; i++)
        r->in[i].fd = -1;
    if (pipe2(r->cancel, O_CLOEXEC | O_NONBLOCK) != 0)
        goto out_nomem;
    r->n = n;
    r->max_line = max_line ? max_line : DEFAULT_MAX_LINE;
    r->max_cap = OQ__MAX(block_size, r->max_line + 2);
    r->cap = OQ__MIN(block_size, r->max_cap);
    r->buf = oq__malloc(r->cap);
    if (r->buf == NULL)
        goto out_nomem;
    for (unsigned i = 0; i < n; i++) {
        bool regular = false;
        uint64_t size = 0;

        rc = open_input(&r->in[i], paths[i], &regular, &size, err, errlen);
        if (rc != 0)
            goto out_close;
        all_regular = all_regular && regular;
        r->in[i].regular = regular;
        r->total += size;
    }
    if (!all_regular)
        r->total = 0;
    *out = r;
    return 0;

out_nomem:
    rc = OQ_ENOMEM;
    if (err && errlen)
        snprintf(err, errlen, "cannot open inputs: %s", strerror(ENOMEM));
out_close:
    oq__reader_close(r);
    return rc;
}

/* The sample read for the estimate, and the largest estimate made: the
 * set is sized (and its tables written) at start, so a wrong guess (short
 * lines first, long ones after, or few distinct ids: lines are not ids)
 * costs at most a table for this many ids, about 32 MiB resident. Past
 * it, the tables grow as before. */
#define ESTIMATE_SAMPLE (64 * 1024)
#define ESTIMATE_MAX ((uint64_t)1 << 20)

uint64_t oq__reader_estimate_lines(const oq__reader *r)
{
    char buf[ESTIMATE_SAMPLE];
    uint64_t lines = 0, upto = 0;
    ssize_t got = -1;

    if (r->total == 0)
        return 0;
    for (unsigned i = 0; i < r->n && got <= 0; i++)
        if (r->in[i].fd >= 0)
            got = pread(r->in[i].fd, buf, sizeof(buf), 0);
    if (got <= 0)
        return 0;
    for (const char *p = buf; (p = memchr(p, '\n', (size_t)(buf + got - p)));
         p++) {
        lines++;
        upto = (uint64_t)(p - buf) + 1;
    }
    /* The sample's whole lines, scaled to the inputs' size (no overflow:
     * lines <= 2^16). No newline in the sample: lines of 64 KiB or more,
     * one per sample. */
    lines = lines ? r->total * lines / upto : r->total / (uint64_t)got;
    return OQ__MIN(lines, ESTIMATE_MAX);
}

void oq__reader_close(oq__reader *r)
{
    if (r == NULL)
        return;
    if (r->in)
        for (unsigned i = 0; i < r->n; i++)
            close_input(&r->in[i]);
    oq__free(r->in);
    oq__free(r->buf);
    if (r->cancel[0] >= 0) {
        close(r->cancel[0]);
        close(r->cancel[1]);
    }
    oq__free(r);
}

void oq__reader_set_idle(oq__reader *r, void (*fn)(void *arg), void *arg)
{
    r->idle = fn;
    r->idle_arg = arg;
}

void oq__reader_cancel(oq__reader *r)
{
    char one = 1;
    ssize_t rc = write(r->cancel[1], &one, 1);
    (void)rc; /* full pipe: a byte is there already */
}

const char *oq__reader_path(const oq__reader *r, unsigned file)
{
    if (file >= r->n)
        return "?";
    return shown_path(r->in[file].path);
}

void oq__reader_progress(const oq__reader *r, uint64_t *done, uint64_t *total)
{
    *done = atomic_load_explicit(&r->done, memory_order_relaxed);
    *total = r->total;
}

/* read(2) into buf[at..cap), retrying on EINTR. Returns bytes read (0 at
 * EOF) or a negative errno with err filled (and kept sticky). */
static ssize_t fill(oq__reader *r, size_t at, char *err, size_t errlen)
{
    ssize_t got;

    /* A pipe or terminal may not deliver for ever: wait for data or for
     * oq__reader_cancel, whichever comes first. */
    for (int wait_ms = 0; !r->in[r->cur].regular; wait_ms = -1) {
        struct pollfd pf[2] = { { r->in[r->cur].fd, POLLIN, 0 },
                                { r->cancel[0], POLLIN, 0 } };
        int n = poll(pf, 2, wait_ms);
        if (n == 0) {
            /* Nothing yet: let the caller pass on what it holds. */
            if (r->idle)
                r->idle(r->idle_arg);
            continue;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break; /* let read report it */
        }
        if (pf[1].revents) {
            r->err = -ECANCELED;
            oq__set_err(err, errlen, "reading '%s' was cancelled",
                    shown_path(r->in[r->cur].path));
            return r->err;
        }
        if (pf[0].revents)
            break;
    }
    do {
        got = read(r->in[r->cur].fd, r->buf + at, r->cap - at);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        r->err = -errno;
        oq__set_err(err, errlen, "read error on '%s': %s",
                shown_path(r->in[r->cur].path), strerror(-r->err));
        return r->err;
    }
    if (got == 0)
        r->eof = true;
    return got;
}

static bool is_blank(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

/* Fills *line for the line buf[start..start+len) (len without the newline)
 * and moves start past it and its newline (if any). */
static void emit(oq__reader *r, oq__line *line, size_t len, bool newline)
{
    const char *s = r->buf + r->start;
    size_t full = len;

    if (full > 0 && s[full - 1] == '\r')
        full--;
    /* A UTF-8 byte order mark marks the file, not its first event. */
    if (r->base + r->start == 0 && full >= 3 &&
        memcmp(s, "\xEF\xBB\xBF", 3) == 0) {
        s += 3;
        full -= 3;
    }
    line->data = s;
    line->full_len = full;
    line->file = r->cur;
    line->lineno = ++r->lineno;
    line->offset = r->base + r->start;
    if (full > r->max_line) {
        line->kind = OQ__LINE_TOO_LARGE;
        line->len = OQ__MIN(full, (size_t)KEEP_LARGE);
    } else {
        /* Most lines start with '{': test one byte before the loop. */
        line->kind = (full == 0 || ((s[0] == ' ' || s[0] == '\t' ||
                                     s[0] == '\r') && is_blank(s, full)))
                         ? OQ__LINE_BLANK : OQ__LINE_EVENT;
        line->len = full;
    }
    r->start += len + (newline ? 1 : 0);
    r->scanned = r->start;
    /* A last line without a newline may still grow (the file is being
     * written): its end is its start, so a durable run's watermark stays
     * before it and a rerun reads it again, whole. */
    line->end = newline ? r->base + r->start : line->offset;
}

/* Keeps up to KEEP_LARGE bytes of a too-large line in r->big. */
static void keep(oq__reader *r, size_t *kept, const char *s, size_t n)
{
    size_t k = OQ__MIN(n, KEEP_LARGE - *kept);
    memcpy(r->big + *kept, s, k);
    *kept += k;
}

/*
 * buf[start..end) is the start of a line longer than max_line, with no
 * newline yet. Streams through the rest of it without buffering it, keeping
 * its first 4 KiB, and fills *line. Returns 1 or a negative errno.
 */
static int skip_large(oq__reader *r, oq__line *line, char *err, size_t errlen)
{
    uint64_t offset = r->base + r->start;
    uint64_t count = r->end - r->start; /* bytes of the line so far */
    char last = r->buf[r->end - 1];
    size_t kept = 0;
    bool found = false;

    keep(r, &kept, r->buf + r->start, r->end - r->start);
    r->base += r->end;
    r->start = r->end = r->scanned = 0;
    while (!found) {
        ssize_t got = fill(r, 0, err, errlen);
        char *nl;
        size_t n;

        if (got < 0)
            return (int)got;
        if (got == 0)
            break;
        nl = memchr(r->buf, '\n', (size_t)got);
        n = nl ? (size_t)(nl - r->buf) : (size_t)got;
        keep(r, &kept, r->buf, n);
        count += n;
        if (n > 0)
            last = r->buf[n - 1];
        if (nl) {
            found = true;
            r->start = r->scanned = n + 1;
            r->end = (size_t)got;
        } else {
            r->base += (uint64_t)got;
        }
    }
    if (last == '\r')
        count--;
    line->kind = OQ__LINE_TOO_LARGE;
    line->data = r->big;
    line->full_len = (size_t)count;
    line->len = OQ__MIN(kept, (size_t)count);
    line->file = r->cur;
    line->lineno = ++r->lineno;
    line->offset = offset;
    line->end = found ? r->base + r->start : offset; /* see emit() */
    return 1;
}

/* Makes room after buf[end) for the current unfinished line: moves it to
 * the front, or grows the buffer. Returns 1, 0 when the line is already
 * known to be too large (it holds more than max_line + 1 bytes), or
 * OQ_ENOMEM (err filled). */
static int make_room(oq__reader *r, char *err, size_t errlen)
{
    size_t pending = r->end - r->start;

    if (pending > r->max_line + 1)
        return 0;
    if (r->start > 0) {
        memmove(r->buf, r->buf + r->start, pending);
        r->base += r->start;
        r->scanned -= r->start;
        r->start = 0;
        r->end = pending;
    }
    if (r->end == r->cap && r->cap < r->max_cap) {
        size_t ncap = OQ__MIN(OQ__MAX(r->cap * 2, (size_t)4096), r->max_cap);
        char *nbuf = oq__realloc(r->buf, ncap);

        if (nbuf == NULL) {
            if (err && errlen)
                snprintf(err, errlen, "reading '%s': %s",
                         shown_path(r->in[r->cur].path), strerror(ENOMEM));
            return OQ_ENOMEM;
        }
        r->buf = nbuf;
        r->cap = ncap;
    }
    return 1; /* end < cap: the checks above make sure of it */
}

/* Moves to the next input (and to its resume point, if it has one). */
static void next_input(oq__reader *r)
{
    r->done_prev += r->base + r->end;
    close_input(&r->in[r->cur]);
    r->cur++;
    r->start = r->end = r->scanned = 0;
    r->base = r->cur < r->n ? r->in[r->cur].start_offset : 0;
    r->lineno = r->cur < r->n ? r->in[r->cur].start_lineno : 0;
    r->eof = false;
}

int oq__reader_start_at(oq__reader *r, unsigned file, uint64_t offset,
                        uint64_t lineno)
{
    input *in;

    if (file >= r->n || !r->in[file].regular || r->cur > file ||
        (r->cur == file && (r->base + r->end) > 0))
        return OQ_EINVAL;
    in = &r->in[file];
    /* Only the descriptor's position moves: the skipped bytes are never
     * read, let alone parsed. */
    if (lseek(in->fd, (off_t)offset, SEEK_SET) < 0)
        return -errno;
    in->start_offset = offset;
    in->start_lineno = lineno;
    if (r->cur == file) {
        r->base = offset;
        r->lineno = lineno;
    }
    return 0;
}

int oq__reader_fd(const oq__reader *r, unsigned file)
{
    return file < r->n ? r->in[file].fd : -1;
}

unsigned oq__reader_count(const oq__reader *r)
{
    return r->n;
}

int oq__reader_next(oq__reader *r, oq__line *line, char *err, size_t errlen)
{
    int rc = 1;

    if (r->err) {
        oq__set_err(err, errlen, "read error on '%s': %s",
                oq__reader_path(r, r->cur), strerror(-r->err));
        return r->err;
    }
    for (;;) {
        char *nl;

        if (r->cur >= r->n)
            return 0;
        nl = memchr(r->buf + r->scanned, '\n', r->end - r->scanned);
        if (nl) {
            emit(r, line, (size_t)(nl - (r->buf + r->start)), true);
            break;
        }
        r->scanned = r->end;
        if (r->eof) {
            if (r->start < r->end) { /* a last line without a newline */
                emit(r, line, r->end - r->start, false);
                break;
            }
            next_input(r);
            continue;
        }
        rc = make_room(r, err, errlen);
        if (rc < 0)
            return rc;
        if (rc == 0) {
            rc = skip_large(r, line, err, errlen);
            break;
        }
        ssize_t got = fill(r, r->end, err, errlen);
        if (got < 0)
            return (int)got;
        r->end += (size_t)got;
    }
    if (rc > 0)
        atomic_store_explicit(&r->done, r->done_prev + r->base + r->start,
                              memory_order_relaxed);
    return rc;
}

/* =========================================================== JSON decode */

/*
 * What out->parsed points to: the event's tape from the strict scanner
 * (json.c) and the id's bytes, in one allocation. Handlers read the event
 * through oq__event_doc(); its text is the payload, so parsed must not
 * outlive the delivery when a handler reads it, but the id may be read
 * after the delivery is released (a sink's duplicate callback does).
 *
 * Note: the integer id 7 and the string id "7" are the same id. Ids are
 * compared as bytes, and an integer id is its exact decimal text as
 * written (so 9007199254740993 stays itself; -0 is "-0", not "0").
 */
typedef struct parsed {
    oq__jdoc doc;
    oq__jtok tok[];   /* doc.ntok of them, then the decoded id's bytes */
} parsed;

static const oq__idspec default_spec = { "id", true };

/*
 * Parsing allocates nothing per event but the parsed form: it comes from a
 * per-thread bump arena while the thread holds parsed events (freeing is a
 * no-op, and the arena is reset when the thread's last parsed event is
 * freed: the pool frees them in the thread that decoded them, after each
 * batch), and from oq__malloc outside that window or when it does not fit.
 * The scanner's tape is a per-thread scratch buffer, copied out at the
 * exact size; both are freed when their thread exits (pthread keys).
 */
#define ARENA_BYTES (512 * 1024)

typedef struct arena {
    char *base;
    size_t used;
    unsigned live; /* parsed events of this thread not yet freed */
} arena;

static _Thread_local arena tl_arena;
static _Thread_local oq__jtape tl_tape;
static pthread_once_t keys_once = PTHREAD_ONCE_INIT;
static pthread_key_t arena_key, tape_key;

static bool in_arena(const void *p)
{
    const char *c = p;
    return tl_arena.base && c >= tl_arena.base &&
           c < tl_arena.base + ARENA_BYTES;
}

static void *arena_alloc(size_t n)
{
    arena *a = &tl_arena;
    if (a->live > 0 && a->base) {
        size_t need = (n + 15) & ~(size_t)15;
        if (need <= ARENA_BYTES - a->used) {
            void *p = a->base + a->used;
            a->used += need;
            return p;
        }
    }
    return oq__malloc(n);
}

static void arena_free(void *p)
{
    if (!in_arena(p))
        oq__free(p);
}

static void arena_destroy(void *base)
{
    oq__free(base);
}

static void make_keys(void)
{
    pthread_key_create(&arena_key, arena_destroy);
    pthread_key_create(&tape_key, arena_destroy);
}

/* Opens this thread's arena window for one more parsed event. */
static void arena_enter(void)
{
    arena *a = &tl_arena;
    if (a->base == NULL) {
        a->base = oq__malloc(ARENA_BYTES);
        if (a->base)
            pthread_setspecific(arena_key, a->base);
    }
    a->live++;
}

static void arena_leave(void)
{
    arena *a = &tl_arena;
    if (a->live > 0 && --a->live == 0)
        a->used = 0;
}

static int reject(oq_decoded *out, oq_dlq_reason reason, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int reject(oq_decoded *out, oq_dlq_reason reason, const char *fmt, ...)
{
    va_list ap;

    out->reason = reason;
    va_start(ap, fmt);
    vsnprintf(out->error, sizeof(out->error), fmt, ap);
    va_end(ap);
    return -1;
}

/* Scans s onto this thread's scratch tape; fills out's reason on failure. */
static int scan_event(const char *s, size_t len, oq_decoded *out)
{
    oq__jtok *before = tl_tape.tok;
    size_t bad, at;
    const char *why;
    bool nul;
    int rc;

    bad = oq__utf8_check((const unsigned char *)s, len, &nul);
    if (bad < len)
        return reject(out, OQ_DLQ_PARSE_ERROR, "%s at byte %zu",
                      nul ? "NUL byte" : "invalid UTF-8", bad);
    pthread_once(&keys_once, make_keys);
    rc = oq__json_scan(s, len, &tl_tape, &at, &why);
    if (tl_tape.tok != before)
        pthread_setspecific(tape_key, tl_tape.tok);
    if (rc == OQ_ENOMEM)
        return reject(out, OQ_DLQ_REJECTED, "out of memory");
    if (rc != 0)
        return reject(out, OQ_DLQ_PARSE_ERROR, "invalid JSON at byte %zu: %s",
                      at, why);
    if (tl_tape.tok[0].type != OQ__J_OBJ)
        return reject(out, OQ_DLQ_PARSE_ERROR, "not a JSON object");
    return 0;
}

/* Copies the scratch tape out, with extra bytes after it. */
static parsed *keep_tape(const char *s, size_t len, size_t extra)
{
    size_t toks = (size_t)tl_tape.n * sizeof(oq__jtok);
    parsed *pd;

    arena_enter();
    pd = arena_alloc(sizeof(*pd) + toks + extra);
    if (pd == NULL) {
        arena_leave();
        return NULL;
    }
    memcpy(pd->tok, tl_tape.tok, toks);
    pd->doc = (oq__jdoc){ s, len, pd->tok, tl_tape.n };
    return pd;
}

/* The id value the spec names, or 0. */
static uint32_t find_id(const oq__jdoc *d, const oq__idspec *spec)
{
    const char *field = spec->field ? spec->field : "id";
    uint32_t v = oq__jpointer(d, field);

    if (v == 0 && spec->fallback && strcmp(field, "id") == 0)
        v = oq__jget(d, 0, "event_id", 8);
    return v;
}

int oq__json_decode(const oq_event *ev, oq_decoded *out, void *arg)
{
    const oq__idspec *spec = arg ? arg : &default_spec;
    const char *s = ev->payload;
    size_t len = ev->payload_len;
    oq__jdoc d;
    const oq__jtok *t;
    parsed *pd;
    char *idbuf;
    uint32_t v;
    size_t n;

    out->parsed = NULL;
    if (scan_event(s, len, out) != 0)
        return -1;
    d = (oq__jdoc){ s, len, tl_tape.tok, tl_tape.n };
    if ((v = find_id(&d, spec)) == 0) {
        if (spec->fallback && strcmp(spec->field ? spec->field : "id",
                                     "id") == 0)
            return reject(out, OQ_DLQ_BAD_ID,
                          "missing id field 'id' or 'event_id'");
        return reject(out, OQ_DLQ_BAD_ID, "missing id field '%.200s'",
                      spec->field);
    }
    t = &d.tok[v];
    if (t->type == OQ__J_NUM && !oq__jnum_is_integer(&d, v))
        return reject(out, OQ_DLQ_BAD_ID, "id must be a string or an "
                      "integer, not a number with a fraction or exponent");
    if (t->type != OQ__J_STR && t->type != OQ__J_NUM)
        return reject(out, OQ_DLQ_BAD_ID, "id must be a string or an integer");
    if (t->len == 0)
        return reject(out, OQ_DLQ_BAD_ID, "empty id");
    /* The id is copied into parsed: a sink may look at it after the
     * delivery (and its payload) is released. */
    pd = keep_tape(s, len, t->len);
    if (pd == NULL)
        return reject(out, OQ_DLQ_REJECTED, "out of memory");
    idbuf = (char *)(pd->tok + pd->doc.ntok);
    if (t->type == OQ__J_STR) {
        const char *v0 = oq__jstr(&pd->doc, v, idbuf, &n);
        if (v0 != idbuf)
            memcpy(idbuf, v0, n);
    } else {
        memcpy(idbuf, s + t->start, t->len);
        n = t->len;
    }
    out->id = idbuf;
    if (n == 0 || n > OQ__MAX_ID_LEN) {
        oq__json_free(pd, NULL);
        return n == 0 ? reject(out, OQ_DLQ_BAD_ID, "empty id")
                      : reject(out, OQ_DLQ_BAD_ID, "id longer than %d bytes",
                               OQ__MAX_ID_LEN);
    }
    out->id_len = n;
    out->parsed = pd;
    return 0;
}

void oq__json_free(void *p, void *arg)
{
    OQ__UNUSED(arg);
    if (p == NULL)
        return;
    arena_free(p);
    arena_leave();
}

const oq__jdoc *oq__event_doc(const oq_event *ev, void **own,
                              char *err, size_t errlen)
{
    oq_decoded dec;
    parsed *pd;

    *own = NULL;
    if (ev->parsed != NULL)
        return &((const parsed *)ev->parsed)->doc;
    /* No decode hook ran (a library pool): parse the payload here. */
    memset(&dec, 0, sizeof(dec));
    if (scan_event(ev->payload, ev->payload_len, &dec) != 0) {
        oq__set_err(err, errlen, "%s", dec.error);
        return NULL;
    }
    if ((pd = keep_tape(ev->payload, ev->payload_len, 0)) == NULL) {
        oq__set_err(err, errlen, "out of memory");
        return NULL;
    }
    *own = pd;
    return &pd->doc;
}
