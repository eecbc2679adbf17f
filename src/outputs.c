/*
 * What `onceq run` writes and where: output files opened up front and
 * committed at the end (temp file and rename, or in place), the checks
 * that keep an output off the state and the inputs, and the one writer of
 * each kind of line (JSON strings and times, counts, dead letters).
 */
#include "oq_cli.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------- JSON output */

/* Writes s as it is when it is strict JSON text, else as a JSON string. */
static void write_json_or_string(FILE *f, const char *s, size_t n)
{
    if (s != NULL && oq__json_valid(s, n))
        fwrite(s, 1, n, f);
    else
        oq__json_write_string(f, s, n);
}

/* ------------------------------------------------------------ outputs */

/*
 * The outputs (-o, --dlq, --stats) are opened before the first event is
 * read, so that a path that cannot be written stops the run before any
 * work (exit 2) instead of losing every result at the end. A regular file
 * (or a path that does not exist yet) is written to a temporary file
 * beside it, PATH.tmp.PID, which is fsynced and renamed over PATH at the
 * end: a reader never sees half a file, and a run that stops early leaves
 * the previous file as it was. Something else (/dev/null, a pipe, a
 * terminal) is written in place; "-" is stdout. Every descriptor is
 * close-on-exec: exec children must not hold them.
 */

/* Removes PATH.tmp.PID files left by a run that died (kill -9, power
 * loss) before it renamed them: PID is a process that is gone. A live
 * process's temporary file is its own business. */
static void clean_stale_tmp(const char *path)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
    size_t blen = strlen(base);
    struct dirent *e;
    DIR *d;

    if (slash == NULL || (size_t)(slash - path) + 1 >= sizeof(dir)) {
        snprintf(dir, sizeof(dir), "%s", slash ? "/" : ".");
        if (slash)
            return; /* a directory name too long to be one */
    } else {
        memcpy(dir, path, (size_t)(slash - path) + 1);
        dir[slash - path + 1] = '\0';
    }
    if ((d = opendir(dir)) == NULL)
        return;
    while ((e = readdir(d)) != NULL) {
        const char *p = e->d_name + blen + 5;
        char *end;
        long pid;
        if (strncmp(e->d_name, base, blen) != 0 ||
            strncmp(e->d_name + blen, ".tmp.", 5) != 0 || *p < '1' ||
            *p > '9')
            continue;
        pid = strtol(p, &end, 10);
        if (*end != '\0' || pid <= 0 || pid == (long)getpid() ||
            pid > INT_MAX || kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
}

/* Opens o for writing. Returns 0, or -1 with err filled. */
int oq__out_begin(oq__outfile *o, const char *path, const char *what,
                     char *err, size_t errlen)
{
    struct stat st;

    memset(o, 0, sizeof(*o));
    o->path = path;
    o->what = what;
    if (path == NULL)
        return 0;
    if (strcmp(path, "-") == 0) {
        o->f = stdout;
        return 0;
    }
    /* Anything but a plain regular file is written in place: a device,
     * a pipe, and a symlink too (renaming over /dev/stdout -> fd 1, or a
     * user's link, would replace the link itself, not what it names). */
    if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        o->f = fopen(path, "we");
    } else {
        clean_stale_tmp(path);
        snprintf(o->tmp, sizeof(o->tmp), "%s.tmp.%ld", path, (long)getpid());
        o->f = fopen(o->tmp, "we");
    }
    if (o->f == NULL) {
        snprintf(err, errlen, "cannot write %s to '%.300s': %s", what, path,
                 strerror(errno));
        o->tmp[0] = '\0';
        return -1;
    }
    return 0;
}

/* Gives up o: its temporary file is removed, the file at its path stays
 * as it was; with remove, that file is removed too (a regular file only). */
void oq__out_discard(oq__outfile *o, bool remove)
{
    if (o->f == NULL)
        return;
    if (o->f == stdout)
        fflush(stdout);
    else
        fclose(o->f);
    o->f = NULL;
    if (o->tmp[0]) {
        unlink(o->tmp);
        if (remove)
            unlink(o->path);
    }
}

/* The cause of an earlier failed write on f, whose errno is long gone: a
 * newline written again fails the same way (a full disk, a closed pipe, a
 * descriptor not open for writing). What f holds is lost already; one
 * more byte changes nothing. */
static int why_failed(FILE *f)
{
    clearerr(f);
    errno = 0;
    if (fputc('\n', f) != EOF && fflush(f) == 0)
        return EIO;
    return errno ? errno : EIO;
}

/* Flushes f (stdout stays open; another file is fsynced when tmp is its
 * temporary file, closed, and tmp renamed over path): 0, or the errno of
 * the first failure (a temporary file is then removed). */
static int finish(FILE *f, const char *tmp, const char *path)
{
    int bad = ferror(f) ? why_failed(f) : 0;

    if (!bad && fflush(f) != 0)
        bad = errno ? errno : EIO;
    if (f == stdout)
        return bad;
    if (!bad && tmp[0] && fsync(fileno(f)) != 0)
        bad = errno;
    if (fclose(f) != 0 && !bad)
        bad = errno ? errno : EIO;
    if (!bad && tmp[0] && rename(tmp, path) != 0)
        bad = errno;
    if (bad && tmp[0])
        unlink(tmp);
    return bad;
}

static int write_error(const char *prefix, const char *path, int err)
{
    fprintf(stderr, "%s: write error on '%s': %s\n", prefix,
            path && strcmp(path, "-") != 0 ? path : "<stdout>",
            strerror(err));
    return 3;
}

/* Finishes o: flushed, fsynced and renamed over its path. Returns 0 or
 * an exit status (3, a write error, with a message). */
int oq__out_commit(oq__outfile *o, const char *prefix)
{
    int bad;

    if (o->f == NULL)
        return 0;
    bad = finish(o->f, o->tmp, o->path);
    o->f = NULL;
    return bad ? write_error(prefix, o->path, bad) : 0;
}

/* The queue's dead letters, copied out of it (a run takes them as it
 * goes when it writes records, and writes them all at the end). */
/* One result line of a counting handler: {"FIELD":"key","count":N}, or
 * {"value":"key","count":N} when FIELD is "count". */
void oq__write_count(const char *key, size_t len, int64_t v, void *arg)
{
    oq__count_out *c = arg;
    /* count:count would repeat the key "count": the value is "value". */
    const char *name = strcmp(c->key, "count") == 0 ? "value" : c->key;

    fputs("{", c->f);
    oq__json_write_string(c->f, name, strlen(name));
    fputs(":", c->f);
    oq__json_write_string(c->f, key, len);
    fprintf(c->f, ",\"count\":%" PRId64 "}\n", v);
}

int oq__out_whole(const char *path, const char *prefix, const char *what,
                  int (*fn)(FILE *f, void *arg), void *arg)
{
    oq__outfile o;
    char err[PATH_MAX + 128];
    int st;

    if (oq__out_begin(&o, path ? path : "-", what, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s\n", prefix, err);
        return 3;
    }
    if ((st = fn(o.f, arg)) != 0) {
        oq__out_discard(&o, false);
        return st;
    }
    return oq__out_commit(&o, prefix);
}

int oq__out_close(FILE *f, const char *path, const char *prefix)
{
    int bad = finish(f, "", path);
    return bad ? write_error(prefix, path, bad) : 0;
}

void oq__json_write_time(FILE *f, int64_t unix_ms)
{
    time_t secs;
    struct tm tm;
    char buf[32];

    /* Before 1970 (a time read from a stream entry added by hand) or past
     * year 9999: the nearest of the two, still an ISO time. */
    unix_ms = OQ__MAX(unix_ms, 0);
    unix_ms = OQ__MIN(unix_ms, INT64_C(253402300799999));
    secs = (time_t)(unix_ms / 1000);
    gmtime_r(&secs, &tm);
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(f, "\"%s.%03dZ\"", buf, (int)(unix_ms % 1000));
}

void oq__write_dead_row(FILE *f, const oq__dead_row *d, bool with_seq)
{
    bool json = strcmp(d->reason, "parse_error") != 0 &&
                strcmp(d->reason, "too_large") != 0;

    fputs("{", f);
    if (with_seq)
        fprintf(f, "\"seq\":%" PRId64 ",", d->seq);
    if (d->id) {
        fputs("\"id\":", f);
        oq__json_write_string(f, d->id, d->id_len);
        fputs(",", f);
    }
    fputs("\"source\":", f);
    oq__json_write_string(f, d->source, strlen(d->source));
    fputs(",\"reason\":", f);
    oq__json_write_string(f, d->reason, strlen(d->reason));
    fputs(",\"error\":", f);
    oq__json_write_string(f, d->error, strlen(d->error));
    fprintf(f, ",\"attempts\":%u,\"first_seen\":", d->attempts);
    oq__json_write_time(f, d->first_seen_ms);
    fputs(",\"last_seen\":", f);
    oq__json_write_time(f, d->dead_ms);
    if (d->history && strcmp(d->history, "[]") != 0) {
        /* Built by SQLite from stored text, which may hold any bytes. */
        fputs(",\"history\":", f);
        write_json_or_string(f, d->history, strlen(d->history));
    }
    fputs(",\"event\":", f);
    /* An event that is strict JSON text is written as it is. */
    if (json)
        write_json_or_string(f, d->event, d->event_len);
    else
        oq__json_write_string(f, d->event, d->event_len);
    if (d->dlq_id) {
        fputs(",\"dlq_id\":", f);
        oq__json_write_string(f, d->dlq_id, strlen(d->dlq_id));
    }
    fputs("}\n", f);
}

/* ----------------------------------------------- where outputs may go */

/* What a path leads to, to compare two paths: a regular file by device
 * and inode, a path with no file yet by its absolute name (its directory
 * resolved), and anything else (a device, a pipe: written in place, so
 * nothing is clobbered) not at all. */
typedef struct place {
    enum { P_NONE, P_FILE, P_NAME } kind;
    dev_t dev;
    ino_t ino;
    char name[PATH_MAX + 256];
} place;

static void place_of(const char *path, place *pl)
{
    const char *slash = strrchr(path, '/');
    char dir[PATH_MAX], real[PATH_MAX];
    struct stat st;

    memset(pl, 0, sizeof(*pl));
    if (stat(path, &st) == 0) {
        if (S_ISREG(st.st_mode)) {
            pl->kind = P_FILE;
            pl->dev = st.st_dev;
            pl->ino = st.st_ino;
        }
        return;
    }
    if (slash == NULL)
        snprintf(dir, sizeof(dir), ".");
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path + 1), path);
    pl->kind = P_NAME;
    snprintf(pl->name, sizeof(pl->name), "%s/%s",
             realpath(dir, real) ? real : dir, slash ? slash + 1 : path);
}

static void place_of_fd(int fd, place *pl)
{
    struct stat st;

    memset(pl, 0, sizeof(*pl));
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        pl->kind = P_FILE;
        pl->dev = st.st_dev;
        pl->ino = st.st_ino;
    }
}

static bool same_place(const place *a, const place *b)
{
    if (a->kind != b->kind || a->kind == P_NONE)
        return false;
    return a->kind == P_FILE ? a->dev == b->dev && a->ino == b->ino
                             : strcmp(a->name, b->name) == 0;
}

/* Whether the output at o is the state or one of its side files (WAL,
 * shared memory, lock): what it is, its name in name (x: scratch), or
 * NULL. */
static const char *state_clash(const place *o, const char *state, place *x,
                               char *name, size_t nlen)
{
    static const char *const suffix[] = { "", "-wal", "-shm", ".lock" };
    static const char *const what[] = { "the state file", "the state's WAL",
                                        "the state's shared memory",
                                        "the state's lock file" };

    for (int k = 0; state && k < 4; k++) {
        snprintf(name, nlen, "%s%s", state, suffix[k]);
        place_of(name, x);
        if (same_place(o, x))
            return what[k];
    }
    return NULL;
}

static int refuse_clash(const char *opt, const char *path, const char *is,
                        const char *which, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s '%.150s' is %s '%.150s': it would be "
             "overwritten (choose another path)", opt, path, is, which);
    return OQ_EINVAL;
}

int oq__check_state_output(const char *opt, const char *path,
                           const char *state, char *err, size_t errlen)
{
    place *o = oq__malloc(2 * sizeof(*o));
    char name[PATH_MAX + 16];
    const char *is;
    int rc = 0;

    if (o == NULL) {
        snprintf(err, errlen, "%s", oq_strerror(OQ_ENOMEM));
        return OQ_ENOMEM;
    }
    if (path != NULL && strcmp(path, "-") != 0) {
        place_of(path, &o[0]);
        if ((is = state_clash(&o[0], state, &o[1], name, sizeof(name))))
            rc = refuse_clash(opt, path, is, name, err, errlen);
    }
    oq__free(o);
    return rc;
}

/* Refuses an output (-o, --dlq, --stats) that would be written over the
 * state, its WAL, shared-memory or lock file, an input, or another output:
 * the rename at the end would destroy it. Checked before anything runs. */
int oq__check_outputs(const oq__run_config *c, char *err, size_t errlen)
{
    const struct { const char *opt, *path; } out[] = {
        { "-o", c->out_path }, { "--dlq", c->dlq_path },
        { "--stats", c->stats_path }, { "--metrics", c->metrics_path },
    };
    enum { NOUT = sizeof(out) / sizeof(out[0]) };
    place *o = oq__calloc(NOUT, sizeof(*o)), *x = oq__malloc(sizeof(*x));
    char name[PATH_MAX + 16];
    int rc = 0;

    if (o == NULL || x == NULL) {
        snprintf(err, errlen, "%s", oq_strerror(OQ_ENOMEM));
        rc = OQ_ENOMEM;
        goto out;
    }
    for (int i = 0; i < NOUT && rc == 0; i++) {
        const char *is = NULL, *which = "";
        if (out[i].path == NULL || strcmp(out[i].path, "-") == 0)
            continue;
        place_of(out[i].path, &o[i]);
        for (int k = 0; k < i && is == NULL; k++)
            if (same_place(&o[i], &o[k]))
                is = "also", which = out[k].opt;
        if (is == NULL && (is = state_clash(&o[i], c->state_path, x, name,
                                            sizeof(name))))
            which = name;
        for (unsigned k = 0; k < OQ__MAX(c->ninputs, 1u) && is == NULL; k++) {
            const char *in = c->ninputs ? c->inputs[k] : "-";
            if (strcmp(in, "-") == 0)
                place_of_fd(STDIN_FILENO, x);
            else
                place_of(in, x);
            if (same_place(&o[i], x))
                is = "input", which = strcmp(in, "-") ? in : "<stdin>";
        }
        if (is != NULL)
            rc = refuse_clash(out[i].opt, out[i].path, is, which, err,
                              errlen);
    }
out:
    oq__free(o);
    oq__free(x);
    return rc;
}

/* Opens the outputs, before anything runs. */
