/*
 * Request-reply in memory (`onceq run --replies DIR`): an event that carries
 * a `reply_to` (a stream name) is a request, and when it is settled its
 * reply is appended to DIR/<reply_to>.jsonl, exactly once per request, in
 * the same commit as the id (docs/REQUEST-REPLY.md).
 *
 * DESIGN
 * ------
 * A reply line is a head, {"correlation_id":C,"id":I, (oq__reply_head: the
 * copy's own), and a body, "status":...,"attempts":N} (oq__reply_body: the
 * settled outcome). The engine calls the stage hook after the handler (OK:
 * status "ok" with the handler's records as the result; FAIL: "failed"
 * with its error) and for a dying delivery ("dead", with the queue's
 * reason): the body is built there and kept in the txn. The memory ledger
 * commits it with the id: prepare (head and body joined into the line, and
 * a cache entry for the body: the only step that can fail), the sink's
 * apply, then publish (the line appended to its file and flushed, the body
 * cached by event id), all under the prepared claim. So a request whose
 * commit is fenced or fails has no reply, and one that commits has exactly
 * one. A duplicate of a settled request does not run again: the duplicate
 * hook appends its own head on the cached body to its own reply_to, so a
 * requester that retried, under a new correlation id and reply stream, can
 * match the answer it missed. The Redis ledger (redis.c) uses the same head
 * and body, in its COMMIT script.
 *
 * The correlation id is the request's `correlation_id` (any JSON string),
 * or its event id when it has none.
 *
 * Lock: r->mu guards the files, the cache and the counters; a leaf, held
 * only to link an entry and write a line.
 */
#include "oq_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "oq_uthash.h"

/* One reply_to stream's file. */
typedef struct rfile {
    UT_hash_handle hh;
    FILE *f;
    char name[];          /* the reply_to name (validated) */
} rfile;

/* A published reply, by event id: a duplicate is a copy of the same
 * event (one outcome per id), whatever its correlation id says. */
typedef struct cached {
    UT_hash_handle hh;
    size_t id_len, body_len;
    char *id;             /* into data */
    char *body;           /* into data: the reply's body (oq__reply_body),
                             with its newline */
    char data[];
} cached;

struct oq__replies {
    char dir[4096];
    pthread_mutex_t mu;   /* guards files, cache, counters, err; a leaf */
    rfile *files;
    cached *cache;
    uint64_t requests, replies, duplicate_replies;
    int err;              /* the first write error (errno), 0: none */
    char err_name[256];
};

/* The longest reply_to name: a file name with room for ".jsonl". */
#define NAME_MAX_LEN OQ__REPLY_TO_MAX

int oq__replies_open(oq__replies **out, const char *dir, char *err,
                     size_t errlen)
{
    struct stat st;
    oq__replies *r;

    if (stat(dir, &st) != 0) {
        snprintf(err, errlen, "--replies '%s': %s", dir,
                 errno == ENOENT ? "no such directory (create it first)"
                                 : strerror(errno));
        return OQ_EINVAL;
    }
    if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "--replies '%s': not a directory", dir);
        return OQ_EINVAL;
    }
    if (strlen(dir) >= sizeof(r->dir) - NAME_MAX_LEN - 8) {
        snprintf(err, errlen, "--replies '%s': path too long", dir);
        return OQ_EINVAL;
    }
    r = oq__calloc(1, sizeof(*r));
    if (r == NULL)
        return OQ_ENOMEM;
    snprintf(r->dir, sizeof(r->dir), "%s", dir);
    oq__mutex_init(&r->mu);
    *out = r;
    return 0;
}

int oq__replies_close(oq__replies *r, char *err, size_t errlen)
{
    rfile *f, *ft;
    cached *c, *ct;
    int rc = 0;

    if (r == NULL)
        return 0;
    HASH_ITER(hh, r->files, f, ft) {
        if ((fflush(f->f) != 0 || ferror(f->f)) && r->err == 0) {
            r->err = errno ? errno : EIO;
            snprintf(r->err_name, sizeof(r->err_name), "%s", f->name);
        }
        if (fclose(f->f) != 0 && r->err == 0) {
            r->err = errno ? errno : EIO;
            snprintf(r->err_name, sizeof(r->err_name), "%s", f->name);
        }
        HASH_DEL(r->files, f);
        oq__free(f);
    }
    HASH_ITER(hh, r->cache, c, ct) {
        HASH_DEL(r->cache, c);
        oq__free(c);
    }
    if (r->err) {
        snprintf(err, errlen, "cannot write replies to '%s/%s.jsonl': %s",
                 r->dir, r->err_name, strerror(r->err));
        rc = OQ_EIO;
    }
    pthread_mutex_destroy(&r->mu);
    oq__free(r);
    return rc;
}

void oq__replies_stats(oq__replies *r, uint64_t *requests, uint64_t *replies,
                       uint64_t *duplicates)
{
    pthread_mutex_lock(&r->mu);
    *requests = r->requests;
    *replies = r->replies;
    *duplicates = r->duplicate_replies;
    pthread_mutex_unlock(&r->mu);
}

/* A reply_to name that is safe as a file name: letters, digits, '.', '_',
 * '-', ':', not starting with '.'. */
bool oq__reply_to_ok(const char *s, size_t n)
{
    if (n == 0 || n > NAME_MAX_LEN || s[0] == '.')
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-' ||
              c == ':'))
            return false;
    }
    return true;
}

/*
 * Why a reply stream name may not be used (NULL: it may): it is the
 * stream S itself, or has the shape of a key onceq keeps for a stream
 * (S:counts, S:id:<id>, R:rq:<corr>, ...: any stream's, not only S's). A
 * reply there would forge the stream's events or outputs, or turn a key
 * into a stream and stop every later run of its queue.
 */
const char *oq__reply_to_reserved(const char *to, const char *stream)
{
    static const char *const suffix[] = { ":counts", ":results", ":dlq",
                                          ":delayed", ":stats", ":meta",
                                          ":gone" };
    static const char *const infix[] = { ":id:", ":dedup:", ":d:", ":dd:",
                                         ":rp:", ":rq:" };
    size_t n = strlen(to);

    if (strcmp(to, stream) == 0)
        return "names the stream the request came from";
    for (size_t i = 0; i < sizeof(suffix) / sizeof(suffix[0]); i++) {
        size_t k = strlen(suffix[i]);
        if (n >= k && strcmp(to + n - k, suffix[i]) == 0)
            return "has the name of a key onceq keeps for a stream (it "
                   "ends with :counts, :results, :dlq, :delayed, :stats, "
                   ":meta or :gone)";
    }
    for (size_t i = 0; i < sizeof(infix) / sizeof(infix[0]); i++)
        if (strstr(to, infix[i]) != NULL)
            return "has the name of a key onceq keeps for a stream (it "
                   "holds :id:, :dedup:, :d:, :dd:, :rp: or :rq:)";
    return NULL;
}

/* The request fields of a scanned event: reply_to (token), correlation_id
 * (token, or 0). 1 request, 0 not a request, -1 a bad one (err set); with
 * stream (the Redis stream the request came from), a reply_to that
 * oq__reply_to_reserved refuses is a bad one too. */
static int request_fields(const oq__jdoc *d, uint32_t *to, uint32_t *corr,
                          const char *stream, char *err, size_t errlen)
{
    char buf[NAME_MAX_LEN + 1];
    const char *name, *why;
    size_t n;

    *to = *corr = 0;
    if (d == NULL || d->tok[0].type != OQ__J_OBJ)
        return 0;
    *to = oq__jget(d, 0, "reply_to", 8);
    if (*to == 0)
        return 0; /* most events: one lookup */
    *corr = oq__jget(d, 0, "correlation_id", 14);
    if (d->tok[*to].type != OQ__J_STR) {
        snprintf(err, errlen, "reply_to is not a string");
        return -1;
    }
    if (*corr != 0 && d->tok[*corr].type != OQ__J_STR) {
        snprintf(err, errlen, "correlation_id is not a string");
        return -1;
    }
    if (d->tok[*to].len > NAME_MAX_LEN) {
        snprintf(err, errlen, "reply_to is longer than %d bytes",
                 NAME_MAX_LEN);
        return -1;
    }
    name = oq__jstr(d, *to, buf, &n);
    if (!oq__reply_to_ok(name, n)) {
        snprintf(err, errlen, "reply_to must be 1 to %d letters, digits, "
                 "'.', '_', '-' or ':', not starting with '.'",
                 NAME_MAX_LEN);
        return -1;
    }
    if (stream) {
        memmove(buf, name, n); /* name may be buf already */
        buf[n] = '\0';
        if ((why = oq__reply_to_reserved(buf, stream)) != NULL) {
            snprintf(err, errlen, "reply_to %s", why);
            return -1;
        }
    }
    return 1;
}

int oq__request_decode(const oq_event *ev, oq_decoded *out, void *idspec,
                       const char *stream)
{
    oq_event scanned = *ev;
    const oq__jdoc *d;
    void *own = NULL;
    char err[sizeof(out->error) - 16];
    uint32_t to = 0;

    if (oq__json_decode(ev, out, idspec) != 0)
        return -1;
    scanned.parsed = out->parsed;
    d = oq__event_doc(&scanned, &own, err, sizeof(err));
    if (request_fields(d, &to, &(uint32_t){ 0 }, stream, err,
                       sizeof(err)) < 0) {
        /* out->id and out->parsed stay: the id names the dead letter. */
        oq__json_free(own, idspec);
        out->reason = OQ_DLQ_REJECTED;
        snprintf(out->error, sizeof(out->error), "bad request: %s", err);
        return -1;
    }
    oq__json_free(own, idspec);
    return to != 0;
}

/* Appends string token i of d (decoded) as a JSON string. */
static int add_jstr(oq__buf *b, const oq__jdoc *d, uint32_t i)
{
    char small[256];
    char *buf = d->tok[i].len <= sizeof(small) ? small
                                               : oq__malloc(d->tok[i].len);
    const char *s;
    size_t n;
    int rc;

    if (buf == NULL)
        return OQ_ENOMEM;
    s = oq__jstr(d, i, buf, &n);
    rc = oq__json_quote(b, s, n);
    if (buf != small)
        oq__free(buf);
    return rc;
}

int oq__reply_head(const oq_event *ev, char *to, size_t *to_len,
                   oq__buf *head)
{
    const oq__jdoc *d;
    void *own = NULL;
    uint32_t t, corr;
    char err[128];
    const char *s;
    int rc = 0;

    d = oq__event_doc(ev, &own, err, sizeof(err));
    if (request_fields(d, &t, &corr, NULL, err, sizeof(err)) == 1) {
        s = oq__jstr(d, t, to, to_len);
        if (s != to)
            memcpy(to, s, *to_len);
        to[*to_len] = '\0';
        rc = 1;
        if (head) {
            int e = oq__buf_add(head, "{\"correlation_id\":", 18);
            if (e == 0)
                e = corr ? add_jstr(head, d, corr)
                         : oq__json_quote(head, ev->id, ev->id_len);
            if (e == 0)
                e = oq__buf_add(head, ",\"id\":", 6);
            if (e == 0)
                e = oq__json_quote(head, ev->id, ev->id_len);
            if (e == 0)
                e = oq__buf_add(head, ",", 1);
            if (e != 0)
                rc = e;
        }
    }
    oq__json_free(own, NULL);
    return rc;
}

typedef struct result_ctx {
    oq__buf *b;
    bool first;
    int rc;
} result_ctx;

/* A record of the result: as it is when it is strict JSON, else as a
 * JSON string. */
static void add_record(const void *data, size_t len, void *arg)
{
    result_ctx *c = arg;
    if (c->rc != 0)
        return;
    if (!c->first)
        c->rc = oq__buf_add(c->b, ",", 1);
    c->first = false;
    if (c->rc == 0)
        c->rc = oq__json_valid(data, len) ? oq__buf_add(c->b, data, len)
                                          : oq__json_quote(c->b, data, len);
}

static const char *const status_name[] = {
    [OQ__REPLY_OK] = "ok", [OQ__REPLY_FAILED] = "failed",
    [OQ__REPLY_DEAD] = "dead",
};

int oq__reply_body(oq__buf *b, oq__reply_status st, const oq_txn *txn,
                   const char *error, unsigned attempts)
{
    char num[40];
    int rc = oq__buf_add(b, "\"status\":\"", 10);

    if (rc == 0)
        rc = oq__buf_add(b, status_name[st], strlen(status_name[st]));
    if (rc == 0 && st == OQ__REPLY_OK) {
        result_ctx c = { b, true, 0 };
        rc = oq__buf_add(b, "\",\"result\":[", 12);
        if (rc == 0)
            oq_txn_foreach(txn, add_record, NULL, &c);
        rc = rc ? rc : c.rc;
        if (rc == 0)
            rc = oq__buf_add(b, "]", 1);
    } else if (rc == 0) {
        rc = oq__buf_add(b, "\",\"error\":", 10);
        if (rc == 0)
            rc = oq__json_quote(b, error, strlen(error));
    }
    snprintf(num, sizeof(num), ",\"attempts\":%u}\n", attempts);
    if (rc == 0)
        rc = oq__buf_add(b, num, strlen(num));
    return rc;
}

int oq__replies_stage(const oq_event *ev, oq_txn *txn, oq__reply_status st,
                      void *arg)
{
    char to[OQ__REPLY_TO_MAX + 1];
    size_t to_len;
    oq__buf b = { 0 };
    int rc;

    (void)arg;
    /* Not a request (a bad one was refused at decode): nothing to stage. */
    if (oq__reply_head(ev, to, &to_len, NULL) != 1)
        return 0;
    rc = oq__reply_body(&b, st, txn, oq_txn_error_text(txn), ev->attempt);
    if (rc == 0)
        rc = oq__txn_set_reply(txn, b.data, b.len);
    oq__buf_free(&b);
    return rc;
}

/* A prepared reply: the whole line to write (head and body), the file's
 * name, and the body again, which publish keeps in the cache. */
typedef struct pending_reply {
    oq__buf line;
    cached *c;
} pending_reply;

void *oq__replies_prepare(const oq_event *ev, const oq_txn *txn, void *arg)
{
    char to[OQ__REPLY_TO_MAX + 1];
    size_t to_len = 0, len;
    const char *body = oq__txn_reply(txn, &len);
    pending_reply *p;

    (void)arg;
    if (body == NULL)
        return NULL;
    p = oq__calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    if (oq__reply_head(ev, to, &to_len, &p->line) != 1 ||
        oq__buf_add(&p->line, body, len) != 0 ||
        (p->c = oq__malloc(sizeof(*p->c) + ev->id_len + len + to_len +
                           1)) == NULL) {
        oq__buf_free(&p->line);
        oq__free(p);
        return NULL;
    }
    memset(p->c, 0, sizeof(*p->c));
    p->c->id = p->c->data;
    p->c->id_len = ev->id_len;
    if (ev->id_len)
        memcpy(p->c->id, ev->id, ev->id_len);
    p->c->body = p->c->data + ev->id_len;
    p->c->body_len = len;
    memcpy(p->c->body, body, len);
    /* The file's name rides after the body until publish finds it. */
    memcpy(p->c->body + len, to, to_len + 1);
    return p;
}

void oq__replies_abort(void *prepared, void *arg)
{
    pending_reply *p = prepared;

    (void)arg;
    oq__buf_free(&p->line);
    oq__free(p->c);
    oq__free(p);
}

/* The file of reply_to name, opened for appending on first use. r->mu
 * held. NULL (r->err set) if it cannot be. */
static rfile *file_of(oq__replies *r, const char *name)
{
    size_t n = strlen(name);
    char path[sizeof(r->dir) + NAME_MAX_LEN + 16];
    rfile *f;
    int fd;

    HASH_FIND(hh, r->files, name, n, f);
    if (f)
        return f;
    snprintf(path, sizeof(path), "%s/%s.jsonl", r->dir, name);
    f = oq__malloc(sizeof(*f) + n + 1);
    fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (f == NULL || fd < 0 || (f->f = fdopen(fd, "a")) == NULL) {
        if (r->err == 0) {
            r->err = f == NULL ? ENOMEM : errno;
            snprintf(r->err_name, sizeof(r->err_name), "%s", name);
        }
        if (fd >= 0)
            close(fd);
        oq__free(f);
        return NULL;
    }
    memcpy(f->name, name, n + 1);
    oq__hash_oom = 0;
    HASH_ADD(hh, r->files, name[0], n, f);
    if (oq__hash_oom) {
        fclose(f->f);
        oq__free(f);
        if (r->err == 0)
            r->err = ENOMEM;
        return NULL;
    }
    return f;
}

/* Writes a reply line and flushes it: a requester reading the file gets
 * it now, not when the run ends (a responder fed from a pipe may run for
 * days). A failed write is remembered and reported when the replies are
 * closed (the run then exits 3). r->mu held. */
/* Writes one reply line (r->mu held); a reply is counted once written.
 * The first failure is kept, and the run stops on it (oq__replies_failed):
 * every later reply would be lost too. */
static void write_line(oq__replies *r, rfile *f, const char *line, size_t n)
{
    if (f == NULL)
        return;
    if (fwrite(line, 1, n, f->f) == n && fflush(f->f) == 0) {
        r->replies++;
    } else if (r->err == 0) {
        r->err = errno ? errno : EIO;
        snprintf(r->err_name, sizeof(r->err_name), "%s", f->name);
    }
}

bool oq__replies_failed(oq__replies *r)
{
    bool failed;

    pthread_mutex_lock(&r->mu);
    failed = r->err != 0;
    pthread_mutex_unlock(&r->mu);
    return failed;
}

void oq__replies_publish(void *prepared, void *arg)
{
    oq__replies *r = arg;
    pending_reply *p = prepared;
    cached *c = p->c, *old;

    pthread_mutex_lock(&r->mu);
    write_line(r, file_of(r, c->body + c->body_len), p->line.data,
               p->line.len);
    r->requests++;
    /* One settled outcome per id, so one reply body per id: an entry
     * found here would be a redriven event's earlier reply; the newer
     * wins. */
    HASH_FIND(hh, r->cache, c->id, c->id_len, old);
    if (old) {
        HASH_DEL(r->cache, old);
        oq__free(old);
    }
    oq__hash_oom = 0;
    HASH_ADD_KEYPTR(hh, r->cache, c->id, c->id_len, c);
    if (oq__hash_oom)
        oq__free(c); /* written; only a duplicate's copy is lost */
    pthread_mutex_unlock(&r->mu);
    oq__buf_free(&p->line);
    oq__free(p);
}

void oq__replies_duplicate(const oq_event *ev, void *arg)
{
    oq__replies *r = arg;
    char to[NAME_MAX_LEN + 1];
    size_t to_len = 0;
    oq__buf line = { 0 };
    cached *c;

    /* Only a copy that is itself a request gets the reply again: its own
     * head (correlation id) on the settled copy's body, in its own
     * reply_to's file. */
    if (oq__reply_head(ev, to, &to_len, &line) != 1) {
        oq__buf_free(&line);
        return;
    }
    pthread_mutex_lock(&r->mu);
    HASH_FIND(hh, r->cache, ev->id_len ? ev->id : "", ev->id_len, c);
    if (c && oq__buf_add(&line, c->body, c->body_len) == 0) {
        write_line(r, file_of(r, to), line.data, line.len);
        r->duplicate_replies++;
    }
    pthread_mutex_unlock(&r->mu);
    oq__buf_free(&line);
}
