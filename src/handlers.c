/*
 * Handlers: the built-in handlers of `onceq run`, all behind oq_handler_fn,
 * and the parser of --handler SPEC.
 *
 * DESIGN
 * ------
 * A handler is called by several worker threads at once, with no lock held.
 * Every handler here but coproc: keeps its state in an argument that is
 * immutable once oq__handler_from_spec returned, so none takes a lock; all
 * per-event state lives on the caller's stack or in the caller's txn.
 * coproc: keeps one child per calling thread (below).
 *
 *   wordcount      counts the event's "word" (one word, verbatim) or the
 *                  words of its "text" (split on ASCII whitespace).
 *   count:FIELD    counts events by the value of FIELD (a top-level name, or
 *                  a JSON pointer when it starts with '/'). A string counts
 *                  under its bytes, any other value under its compact JSON
 *                  text: 42, 1.50, true, null, {"a":1}. So the string
 *                  "42" and the number 42 share a key. A missing field is a
 *                  permanent failure: the event is dead-lettered.
 *   noop           does nothing; with emit, records the event's raw line.
 *   exec:COMMAND   runs /bin/sh -c COMMAND per event (below).
 *   coproc:COMMAND keeps COMMAND running, one per worker thread, and
 *                  talks to it in JSON lines (below).
 *   plugin:PATH    calls a function loaded from a shared object.
 *
 * JSON handlers read the document the pool's decode hook scanned
 * (oq__event_doc, json.c): strings are byte strings with a length (an
 * escaped NUL included) and numbers their text as written; with no decode
 * hook they scan the payload themselves.
 *
 * exec: the child is started with posix_spawn (vfork-like in glibc) in a
 * process group of its own, with an empty signal mask and SIGPIPE at its
 * default action whatever the CLI blocks or ignores. A command of plain
 * words (no shell syntax, no builtin) runs without the shell, which saves
 * one exec per event (see plan_direct); anything else runs as
 * /bin/sh -c COMMAND. Its stdin, stdout and stderr are pipes whose parent
 * ends are O_CLOEXEC from birth (pipe2), so a child spawned by another
 * worker thread at the same moment cannot inherit them (a leaked write end
 * would keep our reader from ever seeing EOF). One poll() loop writes the
 * event's line to stdin and reads stdout and stderr, so no amount of output
 * deadlocks, and it watches the child's exit through a pidfd. The lease
 * deadline (ev->deadline_ms on ev->clock) bounds the loop: a command still
 * running then gets SIGTERM on its process group, SIGKILL after the grace
 * period, is reaped, and the event is retried with nothing staged.
 * oq__handler_cancel does the same to every running command at once (an
 * eventfd in every poll set). The child is always reaped: no zombies.
 * When the command exits, output its background jobs have not written yet
 * is not waited for (like xargs): what is in the pipes is drained, no more.
 * SIGPIPE is blocked in the calling thread while it writes to the child, so
 * a command that does not read its stdin gives EPIPE, not a dead process.
 * The child's environment is ours as it was when the handler was built,
 * plus ONCEQ_EVENT_ID, ONCEQ_ATTEMPT and ONCEQ_RECEIPT. Its stdout is kept
 * up to 64 MiB (more fails the event); of stderr, the last 512 bytes.
 *
 * coproc: COMMAND starts (as exec: runs it: without the shell when it is
 * plain words, in its own process group, empty signal mask, SIGPIPE
 * default, our environment) on a thread's first call, and stays. Each
 * event is one line on its stdin, {"id":ID,"attempt":N,"event":EVENT}
 * (ID through oq__json_quote: NUL escaped, invalid UTF-8 as U+FFFD), and
 * one line on its stdout answers it: {"status":"ok","output":V} stages V's
 * compact JSON as the record (absent or null: none), "retry" and "fail"
 * give OQ_RETRY and OQ_FAIL with "error" as the error text. The reply is
 * read with the strict scanner (json.c). A child that exits, closes a
 * pipe, writes a line that is no such reply, writes before it is asked
 * (caught by one poll before each request), or misses the lease deadline
 * is stopped (stdin closed, SIGTERM to its group, SIGKILL after the
 * grace, reaped) and the event retried; the next event starts a new child.
 * Its stderr is passed on to ours as "[coproc N] line" (N: the thread's
 * number, in the order threads first called), one write per line; it is
 * read while a call waits for the reply, and when the child stops.
 * It is started with fork, not posix_spawn, to set PR_SET_PDEATHSIG
 * (SIGKILL) in the child: if onceq dies (kill -9), so do the co-processes.
 *   Threads and locks. Per-thread state (cworker: the child, its buffers)
 * hangs off a pthread key of the handler instance, so a call touches only
 * its own thread's cworker and takes no lock on the event path. The
 * handler's ca->mu, a leaf, guards only the list of every cworker (for
 * cancel and free), the numbering, and each cworker's `live` pid, which
 * the owner sets after fork and clears before it reaps, so that
 * oq__handler_cancel may SIGTERM idle children from another thread
 * without ever signalling a reaped (reusable) pid. Running calls wake on
 * the cancel eventfd, as exec's do. When a thread that called the handler
 * ends, the key's destructor stops its child (stdin closed: a co-process
 * ends at EOF; SIGTERM after the grace) before the thread is gone, so the
 * death signal, tied to the thread that forked, does not fire then.
 * oq__handler_free stops the children of threads still alive (every call
 * must have returned, and every calling thread that is to end must have
 * ended or be joined, before it).
 *
 * plugin: dlopen(RTLD_NOW | RTLD_LOCAL) of the file (a bare name means
 * ./NAME), then OQ_PLUGIN_SYMBOL, and the optional oq_plugin_init,
 * oq_plugin_fini, oq_plugin_output and oq_plugin_count_key (documented in
 * examples/README.md). The plugin calls oq_txn_* from the executable, so
 * the executable must export them (link with -rdynamic).
 */
#include "oq_cli.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define KILL_GRACE_DEFAULT_MS 2000
#define STDERR_TAIL 512            /* bytes of stderr kept for the error */
#define EXEC_MAX_OUTPUT (64u << 20) /* stdout above this fails the event */
#define POLL_SLICE_MS 100          /* re-read the clock at least this often */
/* The descriptor an exec command writes heartbeat lines to (its number is
 * in ONCEQ_HEARTBEAT_FD): each line moves its attempt's end a --timeout
 * on (oq_txn_heartbeat). */
#define HEARTBEAT_FD 3
#define EX_TEMPFAIL_STATUS 75      /* sysexits.h EX_TEMPFAIL */


/* A copy through the allocation seam (strdup would bypass it). */
static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = oq__malloc(n);

    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

/* ------------------------------------------------------------ JSON events */

/* A transient failure: the event is retried with backoff. */
static int out_of_memory(oq_txn *txn)
{
    oq_txn_error(txn, "out of memory");
    return OQ_RETRY;
}

static int stage_count(oq_txn *txn, const char *key, size_t len)
{
    return oq_txn_count(txn, key, len, 1) == 0 ? OQ_OK : out_of_memory(txn);
}

/* The decoded bytes of string token i, in small (when they fit) or in *big
 * (to be freed by the caller). NULL when out of memory. */
static const char *string_of(const oq__jdoc *d, uint32_t i, char *small,
                             size_t smallcap, char **big, size_t *len)
{
    char *buf = small;

    *big = NULL;
    if (d->tok[i].esc && d->tok[i].len > smallcap) {
        if ((buf = *big = oq__malloc(d->tok[i].len)) == NULL)
            return NULL;
    }
    return oq__jstr(d, i, buf, len);
}

static bool is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' ||
           c == '\f';
}

/* ------------------------------------------------------------- wordcount */

/* Words are byte strings split on ASCII whitespace (a NUL is not one). */
static int count_words(oq_txn *txn, const char *s, size_t n)
{
    const char *end = s + n;

    for (;;) {
        const char *w;
        while (s < end && is_space((unsigned char)*s))
            s++;
        if (s == end)
            return OQ_OK;
        w = s;
        while (s < end && !is_space((unsigned char)*s))
            s++;
        if (stage_count(txn, w, (size_t)(s - w)) != OQ_OK)
            return OQ_RETRY;
    }
}

static int wordcount_fn(const oq_event *ev, oq_txn *txn, void *arg)
{
    char err[256], small[512], *big = NULL;
    void *own;
    const oq__jdoc *d = oq__event_doc(ev, &own, err, sizeof(err));
    const char *v;
    uint32_t f;
    size_t n;
    int rc;

    OQ__UNUSED(arg);
    if (d == NULL) {
        oq_txn_error(txn, "%s", err);
        return OQ_FAIL;
    }
    if ((f = oq__jget(d, 0, "word", 4)) != 0 && d->tok[f].type == OQ__J_STR) {
        /* One word, verbatim; an empty word counts nothing. */
        if ((v = string_of(d, f, small, sizeof(small), &big, &n)) == NULL)
            rc = out_of_memory(txn);
        else
            rc = n ? stage_count(txn, v, n) : OQ_OK;
    } else if ((f = oq__jget(d, 0, "text", 4)) != 0 &&
               d->tok[f].type == OQ__J_STR) {
        if ((v = string_of(d, f, small, sizeof(small), &big, &n)) == NULL)
            rc = out_of_memory(txn);
        else
            rc = count_words(txn, v, n);
    } else {
        oq_txn_error(txn, "no 'word' or 'text' string field");
        rc = OQ_FAIL;
    }
    oq__free(big);
    oq__json_free(own, NULL);
    return rc;
}

static int make_wordcount(const char *rest, const oq__handler_opts *o,
                          oq__handler *out, char *err, size_t errlen)
{
    OQ__UNUSED(rest);
    OQ__UNUSED(o);
    OQ__UNUSED(err);
    OQ__UNUSED(errlen);
    out->fn = wordcount_fn;
    out->never_blocks = true;
    out->output = OQ__OUT_COUNTS;
    out->count_key = "word";
    return 0;
}

/* ----------------------------------------------------------- count:FIELD */

typedef struct count_arg {
    char *field;     /* as given: a member name, or a JSON pointer */
    const char *key; /* the output's key name: field without a leading '/' */
} count_arg;

static void count_cleanup(void *arg)
{
    count_arg *c = arg;

    if (c == NULL)
        return;
    oq__free(c->field);
    oq__free(c);
}

static int count_fn(const oq_event *ev, oq_txn *txn, void *arg)
{
    const count_arg *c = arg;
    char err[256], small[512], *big = NULL;
    void *own;
    const oq__jdoc *d = oq__event_doc(ev, &own, err, sizeof(err));
    const char *v;
    uint32_t f;
    size_t n;
    int rc;

    if (d == NULL) {
        oq_txn_error(txn, "%s", err);
        return OQ_FAIL;
    }
    if ((f = oq__jpointer(d, c->field)) == 0) {
        oq_txn_error(txn, "missing field '%s'", c->key);
        rc = OQ_FAIL;
    } else if (d->tok[f].type == OQ__J_STR) {
        if ((v = string_of(d, f, small, sizeof(small), &big, &n)) == NULL)
            rc = out_of_memory(txn);
        else
            rc = stage_count(txn, v, n);
        oq__free(big);
    } else {
        /* Any other value counts under its compact JSON text: numbers as
         * written, strings inside it re-escaped canonically. */
        oq__buf b = { 0 };
        if (oq__jcompact(d, f, &b) != 0)
            rc = out_of_memory(txn);
        else
            rc = stage_count(txn, b.data, b.len);
        oq__buf_free(&b);
    }
    oq__json_free(own, NULL);
    return rc;
}

static int make_count(const char *field, const oq__handler_opts *o,
                      oq__handler *out, char *err, size_t errlen)
{
    count_arg *c = oq__calloc(1, sizeof(*c));

    OQ__UNUSED(o);
    if (c == NULL || (c->field = dup_str(field)) == NULL) {
        count_cleanup(c);
        oq__set_err(err, errlen, "out of memory");
        return OQ_ENOMEM;
    }
    c->key = c->field[0] == '/' ? c->field + 1 : c->field;
    out->fn = count_fn;
    out->never_blocks = true;
    out->arg = c;
    out->cleanup = count_cleanup;
    out->output = OQ__OUT_COUNTS;
    out->count_key = c->key;
    return 0;
}

/* ------------------------------------------------------------------ noop */

static int noop_fn(const oq_event *ev, oq_txn *txn, void *arg)
{
    OQ__UNUSED(ev);
    OQ__UNUSED(txn);
    OQ__UNUSED(arg);
    return OQ_OK;
}

static int noop_emit_fn(const oq_event *ev, oq_txn *txn, void *arg)
{
    OQ__UNUSED(arg);
    if (oq_txn_record(txn, ev->payload, ev->payload_len) != 0) {
        oq_txn_error(txn, "out of memory");
        return OQ_RETRY;
    }
    return OQ_OK;
}

static int make_noop(const char *rest, const oq__handler_opts *o,
                     oq__handler *out, char *err, size_t errlen)
{
    OQ__UNUSED(rest);
    OQ__UNUSED(err);
    OQ__UNUSED(errlen);
    out->fn = o->emit ? noop_emit_fn : noop_fn;
    out->never_blocks = true;
    out->output = OQ__OUT_RECORDS;
    return 0;
}

/* ------------------------------------------------------------------ exec */

typedef struct exec_arg {
    char *argv[4];          /* "/bin/sh", "-c", COMMAND, NULL */
    char **direct_argv;     /* COMMAND's words when it needs no shell, or
                               NULL; they point into direct_buf */
    char *direct_buf;
    char *direct_path;      /* the program's path, found on PATH once */
    char **env;             /* the environment at construction, without
                               ONCEQ_* variables: nenv entries */
    size_t nenv;
    int64_t kill_grace_ms;  /* SIGTERM -> SIGKILL, in real ms */
    int cancel_fd;          /* eventfd, readable once cancelled (never
                               read: it wakes every running call) */
    _Atomic bool cancelled; /* set with cancel_fd, by oq__handler_cancel */
    posix_spawnattr_t attr; /* own process group, empty mask, SIGPIPE
                               default; read-only, shared by the threads */
} exec_arg;

/* One run of the command. */
typedef struct child {
    pid_t pid;
    int pidfd;          /* readable once the child exits; -1 if unavailable */
    int in, out, err;   /* the parent's pipe ends; -1 once closed */
    int hb;             /* heartbeats: read end of ONCEQ_HEARTBEAT_FD */
    bool exited;        /* reaped; status is valid */
    int status;         /* waitpid status; -1 when it could not be had */
    bool epipe;         /* a write to stdin raised SIGPIPE (blocked) */
} child;

/* The event's line on its way to the child's stdin: payload, then "\n". */
typedef struct feed {
    struct iovec iov[2];
    int n;              /* iovecs left; 0: all written */
} feed;

/* The child's stdout, kept whole; the first 4 KiB need no allocation. */
typedef struct outbuf {
    char *p;
    size_t len, cap;
    bool overflow;      /* over EXEC_MAX_OUTPUT: the rest was dropped */
    char small[4096];
} outbuf;

/* The last STDERR_TAIL bytes of the child's stderr. */
typedef struct tailbuf {
    char b[STDERR_TAIL];
    size_t len;
} tailbuf;

/* Frees what exec_init built in x (not x itself). */
static void exec_destroy(exec_arg *x)
{
    posix_spawnattr_destroy(&x->attr);
    if (x->cancel_fd >= 0)
        close(x->cancel_fd);
    for (size_t i = 0; i < x->nenv; i++)
        oq__free(x->env[i]);
    oq__free(x->env);
    oq__free(x->argv[2]);
    oq__free(x->direct_argv);
    oq__free(x->direct_buf);
    oq__free(x->direct_path);
}

static void exec_cleanup(void *arg)
{
    exec_arg *x = arg;

    if (x == NULL)
        return;
    exec_destroy(x);
    oq__free(x);
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* A pipe whose ends are close-on-exec from birth and above 2, so dup2 onto
 * 0, 1 and 2 in the child never meets one of them already in place (which
 * would leave its close-on-exec flag set). */
static int make_pipe(int p[2])
{
    if (pipe2(p, O_CLOEXEC) != 0)
        return -errno;
    for (int i = 0; i < 2; i++) {
        if (p[i] <= 2) {
            int fd = fcntl(p[i], F_DUPFD_CLOEXEC, 3);
            if (fd < 0) {
                int e = errno;
                close(p[0]);
                close(p[1]);
                return -e;
            }
            close(p[i]);
            p[i] = fd;
        }
    }
    return 0;
}

/* A child's pipes: stdin, stdout, stderr, and (exec:) the heartbeat pipe,
 * the child's end of each [0] for stdin and [1] for the others. */
typedef struct cpipes {
    int p[4][2];
    int n;          /* 3, or 4 with the heartbeat pipe */
} cpipes;

static void pipes_close(cpipes *cp)
{
    for (int i = 0; i < cp->n; i++) {
        close(cp->p[i][0]);
        close(cp->p[i][1]);
    }
    cp->n = 0;
}

/* Makes n pipes (close-on-exec, none on fd 0-2). 0 or -errno. */
static int pipes_open(cpipes *cp, int n)
{
    int rc;

    for (cp->n = 0; cp->n < n; cp->n++)
        if ((rc = make_pipe(cp->p[cp->n])) != 0) {
            pipes_close(cp);
            return rc;
        }
    return 0;
}

/* The child started: the parent keeps its ends (in c) and closes the
 * child's. */
static void pipes_keep(cpipes *cp, child *c)
{
    close(cp->p[0][0]);
    c->in = cp->p[0][1];
    for (int i = 1; i < cp->n; i++)
        close(cp->p[i][1]);
    c->out = cp->p[1][0];
    c->err = cp->p[2][0];
    c->hb = cp->n > 3 ? cp->p[3][0] : -1;
    cp->n = 0;
}

static int pidfd_of(pid_t pid)
{
#ifdef SYS_pidfd_open
    /* Always close-on-exec. Fails (ENOSYS, or ESRCH when SIGCHLD is ignored
     * and the child already vanished): then exits are polled. */
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    OQ__UNUSED(pid);
    return -1;
#endif
}

static int spawn_child(const exec_arg *x, char *const envp[], child *c,
                       size_t in_len)
{
    posix_spawn_file_actions_t fa;
    cpipes cp;
    int rc;

    if ((rc = pipes_open(&cp, 4)) != 0)
        return rc;
    if ((rc = posix_spawn_file_actions_init(&fa)) != 0) {
        pipes_close(&cp);
        return -rc;
    }
    rc = posix_spawn_file_actions_adddup2(&fa, cp.p[0][0], 0);
    if (rc == 0)
        rc = posix_spawn_file_actions_adddup2(&fa, cp.p[1][1], 1);
    if (rc == 0)
        rc = posix_spawn_file_actions_adddup2(&fa, cp.p[2][1], 2);
    /* The heartbeat pipe's write end, named in ONCEQ_HEARTBEAT_FD. */
    if (rc == 0)
        rc = posix_spawn_file_actions_adddup2(&fa, cp.p[3][1], HEARTBEAT_FD);
    /* Without a shell when the command needs none; if that fails (say, a
     * script without a #! line: ENOEXEC), the shell runs it. */
    if (rc == 0) {
        rc = -1;
        if (x->direct_argv != NULL)
            rc = posix_spawn(&c->pid, x->direct_path, &fa, &x->attr,
                             x->direct_argv, envp);
        if (rc != 0)
            rc = posix_spawn(&c->pid, x->argv[0], &fa, &x->attr, x->argv,
                             envp);
    }
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        pipes_close(&cp);
        return -rc;
    }
    pipes_keep(&cp, c);
    fcntl(c->hb, F_SETFL, O_NONBLOCK);
    c->pidfd = pidfd_of(c->pid);
    c->exited = false;
    c->status = -1;
    c->epipe = false;
    /* A line longer than the pipe's atomic size may not fit at once: write
     * it without blocking, as poll allows. A shorter one always fits. */
    if (in_len > PIPE_BUF)
        fcntl(c->in, F_SETFL, O_NONBLOCK);
    return 0;
}

/* Reaps the child: blocking (WNOHANG not in flags) or not. True once it is
 * reaped. */
static bool reap(child *c, int flags)
{
    int st;
    pid_t r;

    if (c->exited)
        return true;
    do
        r = waitpid(c->pid, &st, flags);
    while (r < 0 && errno == EINTR);
    if (r == 0)
        return false;
    c->exited = true;
    c->status = r == c->pid ? st : -1; /* -1: ECHILD, SIGCHLD ignored */
    close_fd(&c->pidfd);
    return true;
}

/* Waits up to ms (real time) for the child to exit, without reaping it: its
 * pid then still names its process group, which we may signal. */
static bool wait_exit(child *c, int64_t ms)
{
    int64_t until = oq_clock_now(NULL) + ms;

    for (;;) {
        siginfo_t si;
        int64_t left;

        if (c->exited)
            return true;
        memset(&si, 0, sizeof(si));
        if (waitid(P_PID, (id_t)c->pid, &si,
                   WEXITED | WNOHANG | WNOWAIT) != 0) {
            if (errno == EINTR)
                continue;
            return true; /* ECHILD: already gone */
        }
        if (si.si_pid != 0)
            return true;
        if ((left = until - oq_clock_now(NULL)) <= 0)
            return false;
        if (c->pidfd >= 0) {
            struct pollfd pf = { .fd = c->pidfd, .events = POLLIN };
            poll(&pf, 1, (int)OQ__MIN(left, INT_MAX));
        } else {
            struct timespec ts = { 0, 5 * 1000000L };
            nanosleep(&ts, NULL);
        }
    }
}

/* The deadline passed: SIGTERM to the process group, SIGKILL after the
 * grace period (to the group: also grandchildren that ignore SIGTERM), and
 * reap. Late output is discarded: the pipes are closed first. */
static void terminate(child *c, int64_t grace_ms)
{
    close_fd(&c->in);
    close_fd(&c->out);
    close_fd(&c->err);
    kill(-c->pid, SIGTERM);
    wait_exit(c, grace_ms);
    kill(-c->pid, SIGKILL);
    reap(c, 0);
}

static void feed_advance(feed *f, size_t n)
{
    while (f->n > 0 && n >= f->iov[0].iov_len) {
        n -= f->iov[0].iov_len;
        f->iov[0] = f->iov[1];
        f->n--;
    }
    if (f->n > 0) {
        f->iov[0].iov_base = (char *)f->iov[0].iov_base + n;
        f->iov[0].iov_len -= n;
    }
}

/* Writes what the pipe takes; closes stdin when all is written or the
 * child stopped reading. */
static void feed_write(child *c, feed *f)
{
    while (f->n > 0) {
        ssize_t w = writev(c->in, f->iov, f->n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            /* EPIPE: the command does not read its stdin; that is fine. */
            c->epipe |= errno == EPIPE;
            break;
        }
        feed_advance(f, (size_t)w);
    }
    close_fd(&c->in);
}

static void outbuf_init(outbuf *o)
{
    o->p = o->small;
    o->len = 0;
    o->cap = sizeof(o->small);
    o->overflow = false;
}

static void outbuf_free(outbuf *o)
{
    if (o->p != o->small)
        oq__free(o->p);
}

/* Room for at least 4 KiB more, or false (over the limit, or no memory). */
static bool outbuf_reserve(outbuf *o)
{
    size_t ncap;
    char *np;

    if (o->cap - o->len >= 4096)
        return true;
    if (o->overflow || o->cap >= EXEC_MAX_OUTPUT)
        return false;
    ncap = OQ__MIN((size_t)EXEC_MAX_OUTPUT, o->cap * 2);
    if (o->p == o->small) {
        if ((np = oq__malloc(ncap)) != NULL)
            memcpy(np, o->small, o->len);
    } else {
        np = oq__realloc(o->p, ncap);
    }
    if (np == NULL)
        return false;
    o->p = np;
    o->cap = ncap;
    return true;
}

static void read_stdout(child *c, outbuf *o)
{
    char sink[4096];
    ssize_t r;

    if (outbuf_reserve(o)) {
        r = read(c->out, o->p + o->len, o->cap - o->len);
        if (r > 0)
            o->len += (size_t)r;
    } else {
        o->overflow = true;
        r = read(c->out, sink, sizeof(sink));
    }
    if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN))
        close_fd(&c->out);
}

static void read_stderr(child *c, tailbuf *t)
{
    char buf[4096];
    ssize_t r = read(c->err, buf, sizeof(buf));

    if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) {
        close_fd(&c->err);
        return;
    }
    if (r < 0)
        return;
    if ((size_t)r >= STDERR_TAIL) {
        memcpy(t->b, buf + r - STDERR_TAIL, STDERR_TAIL);
        t->len = STDERR_TAIL;
    } else {
        size_t keep = OQ__MIN(t->len, STDERR_TAIL - (size_t)r);
        memmove(t->b, t->b + t->len - keep, keep);
        memcpy(t->b + keep, buf, (size_t)r);
        t->len = keep + (size_t)r;
    }
}

enum { PUMP_EXITED, PUMP_TIMED_OUT, PUMP_CANCELLED };

/*
 * Feeds stdin and collects stdout and the stderr tail until the child has
 * exited and what it left in the pipes is read (PUMP_EXITED), until the
 * deadline on ev->clock (PUMP_TIMED_OUT) or until the handler is cancelled
 * (PUMP_CANCELLED); in those two the child still runs. Negative: poll
 * failed.
 */
/* Reads the heartbeat pipe: each line written to it moves *deadline to
 * the attempt's new end. At EOF (the child closed it) it is closed. */
static void read_heartbeats(child *c, oq_txn *txn, int64_t *deadline)
{
    char buf[256];
    ssize_t r;
    bool beat = false;

    while ((r = read(c->hb, buf, sizeof(buf))) > 0)
        beat = beat || memchr(buf, '\n', (size_t)r) != NULL;
    if (r == 0)
        close_fd(&c->hb);
    if (beat) {
        int64_t end = oq_txn_heartbeat(txn);
        if (end > 0)
            *deadline = end;
    }
}

static int pump(child *c, const oq_event *ev, oq_txn *txn, int cancel_fd,
                feed *f, outbuf *o, tailbuf *t)
{
    int64_t deadline = ev->deadline_ms;

    for (;;) {
        struct pollfd pf[6];
        int ip = -1, op = -1, ep = -1, pp = -1, cp = -1, hp = -1;
        nfds_t n = 0;
        int timeout = 0, r;

        if (c->exited) {
            close_fd(&c->in);
            if (c->out < 0 && c->err < 0)
                return PUMP_EXITED;
        } else {
            int64_t left = deadline - oq_clock_now(ev->clock);
            if (left <= 0)
                return PUMP_TIMED_OUT;
            timeout = (int)OQ__MIN(left, POLL_SLICE_MS);
            if (c->pidfd < 0 && c->out < 0 && c->err < 0)
                timeout = OQ__MIN(timeout, 5); /* exit is polled */
        }
        if (!c->exited && c->hb >= 0)
            pf[hp = (int)n++] = (struct pollfd){ c->hb, POLLIN, 0 };
        if (c->in >= 0)
            pf[ip = (int)n++] = (struct pollfd){ c->in, POLLOUT, 0 };
        if (c->out >= 0)
            pf[op = (int)n++] = (struct pollfd){ c->out, POLLIN, 0 };
        if (c->err >= 0)
            pf[ep = (int)n++] = (struct pollfd){ c->err, POLLIN, 0 };
        if (c->pidfd >= 0)
            pf[pp = (int)n++] = (struct pollfd){ c->pidfd, POLLIN, 0 };
        if (!c->exited && cancel_fd >= 0)
            pf[cp = (int)n++] = (struct pollfd){ cancel_fd, POLLIN, 0 };
        r = poll(pf, n, timeout);
        if (r < 0 && errno != EINTR && errno != EAGAIN)
            return -errno;
        if (r == 0 && c->exited)
            return PUMP_EXITED; /* drained; background jobs not waited for */
        if (cp >= 0 && pf[cp].revents)
            return PUMP_CANCELLED;
        if (hp >= 0 && pf[hp].revents)
            read_heartbeats(c, txn, &deadline);
        if (r <= 0 && !c->exited && c->pidfd < 0)
            reap(c, WNOHANG);
        if (r <= 0)
            continue;
        if (ip >= 0 && pf[ip].revents)
            feed_write(c, f);
        if (op >= 0 && pf[op].revents)
            read_stdout(c, o);
        if (ep >= 0 && pf[ep].revents)
            read_stderr(c, t);
        if ((pp >= 0 && pf[pp].revents) ||
            (c->pidfd < 0 && c->out < 0 && c->err < 0))
            reap(c, WNOHANG);
    }
}

/* Room txn.c keeps for the error text (its buffer, less the NUL). */
#define ERROR_ROOM 511

/* "PREFIX: <stderr tail>", keeping the end of the tail when it must be cut,
 * newlines and other control bytes made spaces. */
static void error_with_tail(oq_txn *txn, const char *prefix, tailbuf *t)
{
    size_t plen = strlen(prefix) + 2;
    size_t start = 0, end = t->len;

    for (size_t i = 0; i < t->len; i++)
        if ((unsigned char)t->b[i] < 0x20 || t->b[i] == 0x7f)
            t->b[i] = ' ';
    while (end > 0 && t->b[end - 1] == ' ')
        end--;
    while (start < end && t->b[start] == ' ')
        start++;
    if (end - start + plen > ERROR_ROOM)
        start = end - (ERROR_ROOM - plen);
    /* Do not start inside a UTF-8 sequence. */
    while (start < end && ((unsigned char)t->b[start] & 0xC0) == 0x80)
        start++;
    if (start == end)
        oq_txn_error(txn, "%s", prefix);
    else
        oq_txn_error(txn, "%s: %.*s", prefix, (int)(end - start),
                     t->b + start);
}

/* What the exit status means for the event. */
static int verdict(const child *c, outbuf *o, tailbuf *t, oq_txn *txn)
{
    char prefix[96];
    int st = c->status;

    if (c->status == -1) {
        oq_txn_error(txn, "no exit status (is SIGCHLD ignored?)");
        return OQ_FAIL;
    }
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
        size_t len = o->len;
        if (o->overflow) {
            oq_txn_error(txn, "stdout over %u MiB", EXEC_MAX_OUTPUT >> 20);
            return OQ_FAIL;
        }
        if (len > 0 && o->p[len - 1] == '\n')
            len--;
        if (len > 0 && oq_txn_record(txn, o->p, len) != 0) {
            oq_txn_error(txn, "out of memory");
            return OQ_RETRY;
        }
        return OQ_OK;
    }
    if (WIFEXITED(st)) {
        snprintf(prefix, sizeof(prefix), "exit %d", WEXITSTATUS(st));
        error_with_tail(txn, prefix, t);
        return WEXITSTATUS(st) == EX_TEMPFAIL_STATUS ? OQ_RETRY : OQ_FAIL;
    }
    {
        int sig = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
        const char *abbrev = sigabbrev_np(sig);
        snprintf(prefix, sizeof(prefix), "killed by signal %d (SIG%s)", sig,
                 abbrev ? abbrev : "?");
        error_with_tail(txn, prefix, t);
        return OQ_FAIL;
    }
}

/* The child's environment: ours, then the event's three variables. */
typedef struct envbuf {
    char **envp;
    char *stack_envp[256];
    char *id_var;
    char id_small[1100];
    char attempt_var[32];
    char receipt_var[48];
} envbuf;

static char heartbeat_var[] = "ONCEQ_HEARTBEAT_FD=" OQ__STR(HEARTBEAT_FD);

static int env_build(envbuf *e, const exec_arg *x, const oq_event *ev)
{
    size_t need = sizeof("ONCEQ_EVENT_ID=") + ev->id_len;

    e->envp = e->stack_envp;
    e->id_var = e->id_small;
    if (x->nenv + 5 > sizeof(e->stack_envp) / sizeof(e->stack_envp[0]) &&
        (e->envp = oq__malloc((x->nenv + 5) * sizeof(char *))) == NULL)
        return OQ_ENOMEM;
    if (need > sizeof(e->id_small) && (e->id_var = oq__malloc(need)) == NULL)
        return OQ_ENOMEM;
    snprintf(e->id_var, need, "ONCEQ_EVENT_ID=%.*s", (int)ev->id_len,
             ev->id ? ev->id : "");
    snprintf(e->attempt_var, sizeof(e->attempt_var), "ONCEQ_ATTEMPT=%" PRIu32,
             ev->attempt);
    snprintf(e->receipt_var, sizeof(e->receipt_var),
             "ONCEQ_RECEIPT=%" PRIu64, ev->receipt);
    memcpy(e->envp, x->env, x->nenv * sizeof(char *));
    e->envp[x->nenv] = e->id_var;
    e->envp[x->nenv + 1] = e->attempt_var;
    e->envp[x->nenv + 2] = e->receipt_var;
    e->envp[x->nenv + 3] = heartbeat_var;
    e->envp[x->nenv + 4] = NULL;
    return 0;
}

static void env_free(envbuf *e)
{
    if (e->envp != e->stack_envp)
        oq__free(e->envp);
    if (e->id_var != e->id_small)
        oq__free(e->id_var);
}

/* Runs the started child to its end and decides the event's fate. */
static int exec_run(const exec_arg *x, const oq_event *ev, oq_txn *txn,
                    child *c)
{
    feed f = { .iov = { { (void *)(uintptr_t)ev->payload, ev->payload_len },
                        { (void *)"\n", 1 } },
               .n = 2 };
    outbuf ob;
    outbuf *o = &ob;
    tailbuf t = { .len = 0 };
    int rc;

    outbuf_init(o);
    feed_write(c, &f); /* usually all of it: the pipe is empty */
    rc = pump(c, ev, txn, x->cancel_fd, &f, o, &t);
    if (rc == PUMP_EXITED) {
        rc = verdict(c, o, &t, txn);
    } else {
        /* Timed out, cancelled, or poll failed: whatever it wrote is
         * discarded, and the event is retried (redelivered). */
        terminate(c, rc > 0 ? x->kill_grace_ms : 0);
        if (rc == PUMP_TIMED_OUT)
            oq_txn_error(txn, "timed out at the attempt's deadline");
        else if (rc == PUMP_CANCELLED)
            oq_txn_error(txn, "cancelled: onceq is stopping");
        else
            oq_txn_error(txn, "poll: %s", strerror(-rc));
        rc = rc == PUMP_CANCELLED ? OQ__CANCELLED : OQ_RETRY;
    }
    outbuf_free(o);
    return rc;
}

static int exec_call(const oq_event *ev, oq_txn *txn, void *arg)
{
    const exec_arg *x = arg;
    child c = { .pid = -1, .pidfd = -1, .in = -1, .out = -1, .err = -1,
                .hb = -1 };
    sigset_t pipe_set, old_mask;
    envbuf env;
    int rc;

    if (oq_clock_now(ev->clock) >= ev->deadline_ms) {
        oq_txn_error(txn, "timed out at the attempt's deadline");
        return OQ_RETRY;
    }
    if (atomic_load(&((exec_arg *)arg)->cancelled)) {
        oq_txn_error(txn, "cancelled: onceq is stopping");
        return OQ__CANCELLED;
    }
    if (env_build(&env, x, ev) != 0) {
        env_free(&env);
        oq_txn_error(txn, "out of memory");
        return OQ_RETRY;
    }
    /* A write to a command that does not read its stdin must give EPIPE,
     * not kill the process, whatever the application does with SIGPIPE. */
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask);
    rc = spawn_child(x, env.envp, &c, ev->payload_len + 1);
    env_free(&env);
    if (rc != 0) {
        oq_txn_error(txn, "cannot run /bin/sh: %s", strerror(-rc));
        rc = OQ_RETRY;
    } else {
        rc = exec_run(x, ev, txn, &c);
        close_fd(&c.in);
        close_fd(&c.out);
        close_fd(&c.err);
        close_fd(&c.hb);
        close_fd(&c.pidfd);
    }
    if (c.epipe) {
        /* Take the SIGPIPE the failed write left pending on this thread. */
        struct timespec zero = { 0, 0 };
        sigtimedwait(&pipe_set, NULL, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    return rc;
}

/* A retry met while onceq is stopping (the command killed, its pipes
 * closed, or not started) is the stop's doing: OQ__CANCELLED, not an
 * attempt of the event's. */
static int cancelled_or(int rc, oq_txn *txn, exec_arg *x)
{
    if (rc != OQ_RETRY || !atomic_load(&x->cancelled))
        return rc;
    oq_txn_error(txn, "cancelled: onceq is stopping");
    return OQ__CANCELLED;
}

static int exec_fn(const oq_event *ev, oq_txn *txn, void *arg)
{
    return cancelled_or(exec_call(ev, txn, arg), txn, arg);
}

static bool is_onceq_var(const char *e)
{
    return strncmp(e, "ONCEQ_EVENT_ID=", 15) == 0 ||
           strncmp(e, "ONCEQ_ATTEMPT=", 14) == 0 ||
           strncmp(e, "ONCEQ_RECEIPT=", 14) == 0 ||
           strncmp(e, "ONCEQ_HEARTBEAT_FD=", 19) == 0;
}

static int init_attr(posix_spawnattr_t *a)
{
    sigset_t none, def;

    /* The child starts as if from a shell: no blocked signals (the CLI
     * blocks SIGINT and SIGTERM in its threads, and a blocked SIGTERM would
     * defeat the timeout), and SIGPIPE at its default action (the CLI
     * ignores it, and an ignored signal stays ignored across exec). */
    sigemptyset(&none);
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE);
    if (posix_spawnattr_init(a) != 0)
        return OQ_ENOMEM;
    posix_spawnattr_setsigmask(a, &none);
    posix_spawnattr_setsigdefault(a, &def);
    posix_spawnattr_setpgroup(a, 0);
    posix_spawnattr_setflags(a, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK |
                                    POSIX_SPAWN_SETSIGDEF);
    return 0;
}

/*
 * The shell-less fast path (GNU make's): a command made only of plain words
 * (letters, digits and / . _ - + , : = @ %, separated by spaces), whose first
 * word is no shell builtin or keyword and no assignment, means the same run
 * directly as through /bin/sh -c, and saves one exec per event (twice the
 * jobs/s for a short command). Anything else (quotes, $, globs, redirections,
 * pipes, ;, &, ~, #, backslashes, tabs, newlines, non-ASCII) goes to the
 * shell. One difference remains: a program killed by a signal is reported
 * as such, where sh would report exit 128+N.
 */
static const char *const shell_words[] = {
    ".", ":", "[", "alias", "bg", "break", "cd", "chdir", "command",
    "continue", "echo", "eval", "exec", "exit", "export", "false", "fc", "fg",
    "getopts", "hash", "jobs", "kill", "local", "printf", "pwd", "read",
    "readonly", "return", "set", "shift", "test", "times", "trap", "true",
    "type", "ulimit", "umask", "unalias", "unset", "wait", "case", "do",
    "done", "elif", "else", "esac", "fi", "for", "if", "in", "then", "until",
    "while", "function", "select", "time",
};

static bool plain_command(const char *cmd)
{
    for (const char *p = cmd; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || strchr("/._-+,:=@% ", c) != NULL))
            return false;
    }
    return true;
}

/* The executable file name would run, searched on PATH like the shell
 * does; NULL if none (the shell then reports "not found"). */
static char *find_program(const char *name)
{
    const char *path = getenv("PATH");

    if (strchr(name, '/') != NULL)
        return access(name, X_OK) == 0 ? dup_str(name) : NULL;
    for (const char *d = path; d != NULL && *d;) {
        const char *end = strchr(d, ':');
        size_t dlen = end ? (size_t)(end - d) : strlen(d);
        size_t n = dlen + strlen(name) + 3;
        char *f = oq__malloc(n);
        struct stat st;
        if (f == NULL)
            return NULL;
        snprintf(f, n, "%.*s/%s", (int)(dlen ? dlen : 1), dlen ? d : ".",
                 name);
        if (stat(f, &st) == 0 && S_ISREG(st.st_mode) && access(f, X_OK) == 0)
            return f;
        oq__free(f);
        d = end ? end + 1 : NULL;
    }
    return NULL;
}

/* Sets x->direct_* when cmd can run without a shell. Failing to (no
 * memory, not found) only leaves the shell to run it. */
static void plan_direct(exec_arg *x, const char *cmd)
{
    size_t nwords = 0;
    char *p;

    if (!plain_command(cmd) || (x->direct_buf = dup_str(cmd)) == NULL)
        return;
    for (p = x->direct_buf; *p;) {
        while (*p == ' ')
            p++;
        if (*p == '\0')
            break;
        nwords++;
        while (*p && *p != ' ')
            p++;
    }
    if (nwords == 0 ||
        (x->direct_argv = oq__calloc(nwords + 1, sizeof(char *))) == NULL)
        goto out_none;
    nwords = 0;
    for (p = x->direct_buf; *p;) {
        while (*p == ' ')
            *p++ = '\0';
        if (*p == '\0')
            break;
        x->direct_argv[nwords++] = p;
        while (*p && *p != ' ')
            p++;
    }
    if (strchr(x->direct_argv[0], '=') != NULL)
        goto out_none;
    for (size_t i = 0; i < sizeof(shell_words) / sizeof(shell_words[0]); i++)
        if (strcmp(x->direct_argv[0], shell_words[i]) == 0)
            goto out_none;
    if ((x->direct_path = find_program(x->direct_argv[0])) != NULL)
        return;

out_none:
    oq__free(x->direct_argv);
    oq__free(x->direct_buf);
    x->direct_argv = NULL;
    x->direct_buf = NULL;
}

/* With SIGCHLD ignored (a disposition that survives exec, so a parent may
 * have left it so), exited children are reaped by the kernel and their
 * exit status is lost: every command would look failed. The exec handler
 * needs the statuses, so it puts SIGCHLD back to its default (which also
 * ignores it, but keeps zombies for waitpid). */
static void keep_exit_statuses(void)
{
    struct sigaction sa;

    if (sigaction(SIGCHLD, NULL, &sa) == 0 &&
        (sa.sa_handler == SIG_IGN || (sa.sa_flags & SA_NOCLDWAIT))) {
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = SIG_DFL;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGCHLD, &sa, NULL);
    }
}

/* Builds x (zeroed by the caller) for cmd: the spawn attributes, the
 * cancel eventfd, the environment and the shell-less plan. On failure x
 * is destroyed, err is filled and a negative code returned. */
static int exec_init(exec_arg *x, const char *cmd, const oq__handler_opts *o,
                     char *err, size_t errlen)
{
    size_t n = 0;

    x->cancel_fd = -1;
    if (init_attr(&x->attr) != 0) {
        oq__set_err(err, errlen, "out of memory");
        return OQ_ENOMEM;
    }
    atomic_init(&x->cancelled, false);
    keep_exit_statuses();
    if ((x->cancel_fd = eventfd(0, EFD_CLOEXEC)) < 0) {
        int e = errno;
        exec_destroy(x);
        oq__set_err(err, errlen, "eventfd: %s", strerror(e));
        return -e;
    }
    x->kill_grace_ms = o->kill_grace_ms >= 0 ? o->kill_grace_ms
                                            : KILL_GRACE_DEFAULT_MS;
    x->argv[0] = (char *)(uintptr_t)"/bin/sh";
    x->argv[1] = (char *)(uintptr_t)"-c";
    if ((x->argv[2] = dup_str(cmd)) == NULL)
        goto out_free;
    for (char **e = environ; e && *e; e++)
        n++;
    if ((x->env = oq__calloc(n + 1, sizeof(*x->env))) == NULL)
        goto out_free;
    for (char **e = environ; e && *e; e++) {
        if (is_onceq_var(*e))
            continue;
        if ((x->env[x->nenv] = dup_str(*e)) == NULL)
            goto out_free;
        x->nenv++;
    }
    plan_direct(x, cmd);
    return 0;

out_free:
    exec_destroy(x);
    oq__set_err(err, errlen, "out of memory");
    return OQ_ENOMEM;
}

static int make_exec(const char *cmd, const oq__handler_opts *o,
                     oq__handler *out, char *err, size_t errlen)
{
    exec_arg *x = oq__calloc(1, sizeof(*x));
    int rc;

    if (x == NULL) {
        oq__set_err(err, errlen, "out of memory");
        return OQ_ENOMEM;
    }
    if ((rc = exec_init(x, cmd, o, err, errlen)) != 0) {
        oq__free(x);
        return rc;
    }
    out->fn = exec_fn;
    out->arg = x;
    out->cleanup = exec_cleanup;
    out->output = OQ__OUT_RECORDS;
    return 0;
}

/* ---------------------------------------------------------------- coproc */

#define COPROC_MAX_REPLY (64u << 20) /* a longer reply line is invalid */
#define COPROC_ERR_LINE 4000         /* stderr lines are passed on in pieces
                                        of at most this many bytes */

typedef struct coproc_arg coproc_arg;

/* One worker thread's co-process. Every field but next, pprev and live is
 * used by its thread only (or by coproc_cleanup once no thread calls). */
typedef struct cworker {
    coproc_arg *ca;
    struct cworker *next, **pprev; /* in ca->all; under ca->mu */
    pid_t live;           /* the child's pid while it may be signalled (not
                             reaped yet), else 0; under ca->mu */
    unsigned no;          /* 1, 2, ...: in the order threads first called */
    bool running;         /* c holds a started child */
    bool restart;         /* the child spoke out of turn: restart it first */
    child c;
    char *rbuf;           /* stdout bytes read and not consumed */
    size_t rlen, rcap;
    char ebuf[COPROC_ERR_LINE]; /* a partial stderr line */
    size_t elen;
    oq__buf req;          /* the request line */
    oq__buf out;          /* the reply's output as compact JSON */
    oq__jtape tape;       /* the reply, scanned */
} cworker;

struct coproc_arg {
    exec_arg x;           /* the command, environment, grace, cancel_fd */
    pthread_key_t key;    /* the calling thread's cworker */
    pthread_mutex_t mu;   /* guards all, next_no and every cworker's live */
    cworker *all;         /* every thread's cworker */
    unsigned next_no;
};

/* Passes complete lines of w->ebuf to our stderr, "[coproc N] line\n",
 * each with one write so that lines of several workers do not mix; with
 * all, the last partial line too. */
static void err_flush(cworker *w, bool all)
{
    size_t start = 0;

    for (;;) {
        char *nl = memchr(w->ebuf + start, '\n', w->elen - start);
        size_t end = nl ? (size_t)(nl - w->ebuf) : w->elen;
        char line[COPROC_ERR_LINE + 32];
        int pre;

        if (nl == NULL && !(all && end > start) &&
            !(start == 0 && w->elen == sizeof(w->ebuf)))
            break;
        pre = snprintf(line, 32, "[coproc %u] ", w->no);
        memcpy(line + pre, w->ebuf + start, end - start);
        line[(size_t)pre + end - start] = '\n';
        if (write(STDERR_FILENO, line, (size_t)pre + end - start + 1) < 0) {
            /* Nowhere to report it: the co-process's words are lost. */
        }
        start = nl ? end + 1 : end;
    }
    memmove(w->ebuf, w->ebuf + start, w->elen - start);
    w->elen -= start;
}

/* Reads what the child's stderr has (non-blocking) and passes on its
 * lines. False at EOF or on an error (then the pipe is closed). */
static bool err_pump(cworker *w)
{
    while (w->c.err >= 0) {
        ssize_t r = read(w->c.err, w->ebuf + w->elen,
                         sizeof(w->ebuf) - w->elen);
        if (r > 0) {
            w->elen += (size_t)r;
            err_flush(w, false);
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            return true;
        err_flush(w, true);
        close_fd(&w->c.err);
    }
    return false;
}

static void set_live(cworker *w, pid_t pid)
{
    pthread_mutex_lock(&w->ca->mu);
    w->live = pid;
    pthread_mutex_unlock(&w->ca->mu);
}

/* Waits up to ms (real time) for the child's exit, passing its stderr on
 * meanwhile; does not reap. True once it exited. */
static bool coproc_wait_exit(cworker *w, int64_t ms)
{
    int64_t until = oq_clock_now(NULL) + ms;

    for (;;) {
        struct pollfd pf[2];
        nfds_t n = 0;
        int64_t left;

        if (wait_exit(&w->c, 0))
            return true;
        if ((left = until - oq_clock_now(NULL)) <= 0)
            return false;
        if (w->c.pidfd >= 0)
            pf[n++] = (struct pollfd){ w->c.pidfd, POLLIN, 0 };
        if (w->c.err >= 0)
            pf[n++] = (struct pollfd){ w->c.err, POLLIN, 0 };
        if (poll(pf, n, (int)OQ__MIN(left, w->c.pidfd >= 0 ? POLL_SLICE_MS
                                                          : 5)) > 0)
            err_pump(w);
    }
}

/*
 * Ends w's child: closes its stdin (a co-process ends at EOF), waits up to
 * wait_ms for it to exit, then SIGTERM to its process group, SIGKILL after
 * the grace period, and reaps it. Its stderr is passed on to the end (what
 * is there: a grandchild that keeps the pipe is not waited for). Writes
 * how it ended into why (may be NULL).
 */
static void coproc_stop(cworker *w, int64_t wait_ms, char *why, size_t len)
{
    child *c = &w->c;
    int st;

    if (!w->running)
        return;
    close_fd(&c->in);
    close_fd(&c->out);
    if (!coproc_wait_exit(w, wait_ms)) {
        kill(-c->pid, SIGTERM);
        if (!coproc_wait_exit(w, w->ca->x.kill_grace_ms))
            kill(-c->pid, SIGKILL);
    }
    set_live(w, 0); /* no longer signalled by oq__handler_cancel */
    reap(c, 0);
    err_pump(w);
    if (w->elen > 0)
        err_flush(w, true);
    close_fd(&c->err);
    close_fd(&c->pidfd);
    st = c->status;
    if (why == NULL)
        ;
    else if (st == -1)
        snprintf(why, len, "no exit status");
    else if (WIFEXITED(st))
        snprintf(why, len, "exit %d", WEXITSTATUS(st));
    else {
        const char *abbrev = sigabbrev_np(WTERMSIG(st));
        snprintf(why, len, "killed by signal %d (SIG%s)", WTERMSIG(st),
                 abbrev ? abbrev : "?");
    }
    w->running = false;
    w->restart = false;
    w->rlen = 0;
}

/* In the child, between fork and exec: only async-signal-safe calls. */
static void coproc_exec(const exec_arg *x, const int pin[2],
                        const int pout[2], const int perr[2], pid_t parent)
{
    struct sigaction sa;
    sigset_t none;

    setpgid(0, 0);
    /* Dies with the thread that started it, which outlives it unless
     * onceq itself dies (kill -9): then no co-process outlives onceq. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPIPE, &sa, NULL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (dup2(pin[0], 0) < 0 || dup2(pout[1], 1) < 0 || dup2(perr[1], 2) < 0)
        _exit(127);
    if (x->direct_argv != NULL)
        execve(x->direct_path, x->direct_argv, x->env);
    execve(x->argv[0], x->argv, x->env);
    _exit(127);
}

/*
 * Starts w's child: pipes whose parent ends are close-on-exec from birth
 * (as for exec:), a process group of its own, and a parent-death signal.
 * fork, not posix_spawn: the death signal must be set in the child. It
 * happens once per worker, and again only after a failure.
 */
static int coproc_start(cworker *w)
{
    const exec_arg *x = &w->ca->x;
    child *c = &w->c;
    pid_t parent = getpid(), pid;
    cpipes cp;
    int rc;

    if ((rc = pipes_open(&cp, 3)) != 0)
        return rc;
    if ((pid = fork()) < 0) {
        rc = -errno;
        pipes_close(&cp);
        return rc;
    }
    if (pid == 0)
        coproc_exec(x, cp.p[0], cp.p[1], cp.p[2], parent);
    setpgid(pid, pid); /* also here: kill(-pid) must find the group */
    *c = (child){ .pid = pid, .pidfd = pidfd_of(pid), .status = -1 };
    pipes_keep(&cp, c);
    fcntl(c->in, F_SETFL, O_NONBLOCK);
    fcntl(c->out, F_SETFL, O_NONBLOCK);
    fcntl(c->err, F_SETFL, O_NONBLOCK);
    w->running = true;
    w->restart = false;
    w->rlen = 0;
    set_live(w, pid);
    return 0;
}

static void cworker_free(cworker *w)
{
    coproc_stop(w, w->ca->x.kill_grace_ms, NULL, 0);
    oq__free(w->rbuf);
    oq__buf_free(&w->req);
    oq__buf_free(&w->out);
    oq__jtape_free(&w->tape);
    oq__free(w);
}

static void cworker_unlink(cworker *w)
{
    pthread_mutex_lock(&w->ca->mu);
    if (w->pprev != NULL) {
        *w->pprev = w->next;
        if (w->next != NULL)
            w->next->pprev = w->pprev;
        w->pprev = NULL;
    }
    pthread_mutex_unlock(&w->ca->mu);
}

/* The key's destructor: a worker thread ends, and so does its child. */
static void cworker_thread_end(void *arg)
{
    cworker *w = arg;

    cworker_unlink(w);
    cworker_free(w);
}

/* The calling thread's cworker, made on its first call; NULL: no memory. */
static cworker *cworker_get(coproc_arg *ca)
{
    cworker *w = pthread_getspecific(ca->key);

    if (w != NULL)
        return w;
    if ((w = oq__calloc(1, sizeof(*w))) == NULL)
        return NULL;
    w->ca = ca;
    w->c = (child){ .pid = -1, .pidfd = -1, .in = -1, .out = -1, .err = -1,
                    .hb = -1 };
    if (pthread_setspecific(ca->key, w) != 0) {
        oq__free(w);
        return NULL;
    }
    pthread_mutex_lock(&ca->mu);
    w->no = ++ca->next_no;
    w->next = ca->all;
    if (w->next != NULL)
        w->next->pprev = &w->next;
    w->pprev = &ca->all;
    ca->all = w;
    pthread_mutex_unlock(&ca->mu);
    return w;
}

/* The request line: {"id":ID,"attempt":N,"event":EVENT}\n. The event is
 * strict JSON (the decode hook checked it); a CR or LF in it can only be
 * whitespace between tokens, and becomes a space so the line stays one. */
static int build_request(cworker *w, const oq_event *ev)
{
    oq__buf *b = &w->req;
    char num[40];
    size_t at;
    int n;

    b->len = 0;
    if (oq__buf_add(b, "{\"id\":", 6) != 0 ||
        oq__json_quote(b, ev->id ? ev->id : "", ev->id_len) != 0)
        return OQ_ENOMEM;
    n = snprintf(num, sizeof(num), ",\"attempt\":%" PRIu32 ",\"event\":",
                 ev->attempt);
    if (oq__buf_add(b, num, (size_t)n) != 0)
        return OQ_ENOMEM;
    at = b->len;
    if (oq__buf_add(b, ev->payload, ev->payload_len) != 0 ||
        oq__buf_add(b, "}\n", 2) != 0)
        return OQ_ENOMEM;
    for (size_t i = at; i < at + ev->payload_len; i++)
        if (b->data[i] == '\n' || b->data[i] == '\r')
            b->data[i] = ' ';
    return 0;
}

/* Reads what stdout has into w->rbuf. 1: read something; 0: nothing now;
 * -1: EOF or error; -2: the reply is over COPROC_MAX_REPLY. */
static int read_reply(cworker *w)
{
    for (;;) {
        ssize_t r;
        if (w->rcap - w->rlen < 4096) {
            size_t ncap = w->rcap ? w->rcap * 2 : 16384;
            char *np;
            if (w->rcap >= COPROC_MAX_REPLY + 4096)
                return -2;
            if ((np = oq__realloc(w->rbuf, ncap)) == NULL)
                return -1;
            w->rbuf = np;
            w->rcap = ncap;
        }
        r = read(w->c.out, w->rbuf + w->rlen, w->rcap - w->rlen);
        if (r > 0) {
            w->rlen += (size_t)r;
            return 1;
        }
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 && errno == EAGAIN ? 0 : -1;
    }
}

/* Something of the child's before we ask: stderr is passed on; anything on
 * stdout (or its end) means the child must be restarted before this
 * event is sent. One poll, without waiting. */
static void coproc_precheck(cworker *w)
{
    struct pollfd pf[2] = { { w->c.out, POLLIN, 0 },
                            { w->c.err, POLLIN, 0 } };

    if (w->rlen > 0)
        w->restart = true;
    if (poll(pf, w->c.err >= 0 ? 2 : 1, 0) <= 0)
        return;
    if (pf[1].revents && w->c.err >= 0)
        err_pump(w);
    if (pf[0].revents)
        w->restart = true;
}

enum { ASK_REPLY, ASK_TIMED_OUT, ASK_CANCELLED, ASK_GONE, ASK_TOO_LONG,
       ASK_EARLY };

/* Writes the request and waits for one reply line in w->rbuf; *line_len is
 * its length (without the newline). ASK_GONE: the child closed its stdout
 * or stdin (exited). Negative: poll failed. */
static int coproc_ask(cworker *w, const oq_event *ev, size_t *line_len,
                      bool *epipe)
{
    const char *p = w->req.data;
    size_t left_out = w->req.len, scanned = 0;
    int cancel_fd = w->ca->x.cancel_fd;

    for (;;) {
        struct pollfd pf[4];
        int ip = -1, op, ep = -1, cp, r;
        nfds_t n = 0;
        int64_t left;
        char *nl;

        if (left_out > 0) {
            ssize_t wr = write(w->c.in, p, left_out);
            if (wr > 0) {
                p += wr;
                left_out -= (size_t)wr;
            } else if (wr < 0 && errno != EAGAIN && errno != EINTR) {
                *epipe = errno == EPIPE;
                return ASK_GONE; /* it stopped reading */
            }
        }
        if (w->rlen > scanned &&
            (nl = memchr(w->rbuf + scanned, '\n', w->rlen - scanned))) {
            *line_len = (size_t)(nl - w->rbuf);
            return left_out == 0 ? ASK_REPLY : ASK_EARLY;
        }
        scanned = w->rlen;
        left = ev->deadline_ms - oq_clock_now(ev->clock);
        if (left <= 0)
            return ASK_TIMED_OUT;
        if (left_out > 0)
            pf[ip = (int)n++] = (struct pollfd){ w->c.in, POLLOUT, 0 };
        pf[op = (int)n++] = (struct pollfd){ w->c.out, POLLIN, 0 };
        if (w->c.err >= 0)
            pf[ep = (int)n++] = (struct pollfd){ w->c.err, POLLIN, 0 };
        pf[cp = (int)n++] = (struct pollfd){ cancel_fd, POLLIN, 0 };
        r = poll(pf, n, (int)OQ__MIN(left, POLL_SLICE_MS));
        if (r < 0 && errno != EINTR && errno != EAGAIN)
            return -errno;
        if (r <= 0)
            continue;
        if (pf[cp].revents)
            return ASK_CANCELLED;
        if (ep >= 0 && pf[ep].revents)
            err_pump(w);
        if (ip >= 0 && (pf[ip].revents & (POLLERR | POLLHUP)))
            return ASK_GONE;
        if (pf[op].revents) {
            int got = read_reply(w);
            if (got == -2)
                return ASK_TOO_LONG;
            if (got < 0)
                return ASK_GONE;
        }
    }
}

/*
 * The reply {"status":"ok","output":V} / {"status":"retry","error":E} /
 * {"status":"fail","error":E} (other members ignored) in line[0..len),
 * with the strict scanner. ok stages V's compact JSON text as the record
 * (absent or null: nothing); E (a string, else its JSON text) becomes the
 * error. Returns OQ_OK, OQ_RETRY or OQ_FAIL, or -1 for a line that is not
 * such a reply (why is set), or OQ_ENOMEM.
 */
/* Is the reply's "id" (token v of d) the request's: the id bytes as the
 * request carried them (invalid UTF-8 as U+FFFD)? */
static bool same_id(const oq__jdoc *d, uint32_t v, const oq_event *ev)
{
    oq__buf q = { 0 };
    oq__jtape t = { 0 };
    oq__jdoc qd;
    size_t at, n, m;
    const char *why;
    char *a = NULL, *b = NULL;
    const char *x, *y;
    bool same = false;

    if (d->tok[v].type != OQ__J_STR)
        return false;
    if (!d->tok[v].esc && oq__utf8_valid(ev->id, ev->id_len))
        return d->tok[v].len == ev->id_len &&
               memcmp(d->text + d->tok[v].start, ev->id, ev->id_len) == 0;
    /* The slow way: both sides decoded as the child saw them. */
    if (oq__json_quote(&q, ev->id,
                                                      ev->id_len) != 0 ||
        oq__json_scan(q.data, q.len, &t, &at, &why) != 0)
        goto out;
    qd = (oq__jdoc){ q.data, q.len, t.tok, t.n };
    a = oq__malloc(d->tok[v].len + 1);
    b = oq__malloc(q.len + 1);
    if (a && b) {
        x = oq__jstr(d, v, a, &n);
        y = oq__jstr(&qd, 0, b, &m);
        same = n == m && memcmp(x, y, n) == 0;
    }
out:
    oq__free(a);
    oq__free(b);
    oq__jtape_free(&t);
    oq__buf_free(&q);
    return same;
}

static int parse_reply(cworker *w, const char *line, size_t len,
                       const oq_event *ev, oq_txn *txn, const char **why)
{
    oq__jdoc d;
    size_t at;
    uint32_t st, v;
    int verdict;

    if (!oq__utf8_valid(line, len)) {
        *why = "not UTF-8 text without NUL";
        return -1;
    }
    if ((verdict = oq__json_scan(line, len, &w->tape, &at, why)) != 0)
        return verdict == -1 ? -1 : OQ_ENOMEM;
    d = (oq__jdoc){ line, len, w->tape.tok, w->tape.n };
    if (d.tok[0].type != OQ__J_OBJ) {
        *why = "not an object";
        return -1;
    }
    /* An "id", when the child sends one, must be this event's: a late or
     * extra line is then never taken for the next event's reply. */
    if ((v = oq__jget(&d, 0, "id", 2)) != 0 && !same_id(&d, v, ev)) {
        *why = "its \"id\" is not the event's";
        return -1;
    }
    st = oq__jget(&d, 0, "status", 6);
    if (st == 0 || d.tok[st].type != OQ__J_STR) {
        *why = "no \"status\" string";
        return -1;
    }
    if (oq__jstr_eq(&d, st, "ok", 2))
        verdict = OQ_OK;
    else if (oq__jstr_eq(&d, st, "retry", 5))
        verdict = OQ_RETRY;
    else if (oq__jstr_eq(&d, st, "fail", 4))
        verdict = OQ_FAIL;
    else {
        *why = "\"status\" is not \"ok\", \"retry\" or \"fail\"";
        return -1;
    }
    v = oq__jget(&d, 0, verdict == OQ_OK ? "output" : "error",
                 verdict == OQ_OK ? 6 : 5);
    if (verdict == OQ_OK) {
        if (v == 0 || d.tok[v].type == OQ__J_NULL)
            return OQ_OK;
        w->out.len = 0;
        if (oq__jcompact(&d, v, &w->out) != 0 ||
            oq_txn_record(txn, w->out.data, w->out.len) != 0)
            return OQ_ENOMEM;
        return OQ_OK;
    }
    if (v == 0) {
        oq_txn_error(txn, "co-process answered %s",
                     verdict == OQ_RETRY ? "retry" : "fail");
    } else if (d.tok[v].type == OQ__J_STR) {
        char small[ERROR_ROOM + 1], *big = NULL;
        size_t n;
        const char *s = string_of(&d, v, small, sizeof(small), &big, &n);
        if (s == NULL)
            return OQ_ENOMEM;
        oq_txn_error(txn, "%.*s", (int)OQ__MIN(n, (size_t)ERROR_ROOM), s);
        oq__free(big);
    } else {
        w->out.len = 0;
        if (oq__jcompact(&d, v, &w->out) != 0)
            return OQ_ENOMEM;
        oq_txn_error(txn, "%.*s", (int)OQ__MIN(w->out.len, (size_t)ERROR_ROOM),
                     w->out.data);
    }
    return verdict;
}

/* The child failed this event: it is stopped (restarted for the next
 * one) and the event retried. */
static int coproc_lost(cworker *w, oq_txn *txn, const char *what,
                       int64_t wait_ms)
{
    char why[64];

    coproc_stop(w, wait_ms, why, sizeof(why));
    oq_txn_error(txn, "co-process %s (%s); restarted for the next event",
                 what, why);
    return OQ_RETRY;
}

static int coproc_call(const oq_event *ev, oq_txn *txn, void *arg)
{
    coproc_arg *ca = arg;
    cworker *w;
    sigset_t pipe_set, old_mask;
    const char *why = NULL;
    size_t line_len = 0;
    bool epipe = false;
    int rc;

    if (oq_clock_now(ev->clock) >= ev->deadline_ms) {
        oq_txn_error(txn, "timed out at the attempt's deadline");
        return OQ_RETRY;
    }
    if ((w = cworker_get(ca)) == NULL)
        return out_of_memory(txn);
    if (atomic_load(&ca->x.cancelled)) {
        coproc_stop(w, 0, NULL, 0);
        oq_txn_error(txn, "cancelled: onceq is stopping");
        return OQ__CANCELLED;
    }
    if (ev->parsed == NULL && !oq__json_valid(ev->payload, ev->payload_len)) {
        oq_txn_error(txn, "event is not strict JSON");
        return OQ_FAIL;
    }
    if (build_request(w, ev) != 0)
        return out_of_memory(txn);
    if (w->running) {
        coproc_precheck(w);
        if (w->restart)
            coproc_stop(w, 0, NULL, 0);
    }
    if (!w->running && (rc = coproc_start(w)) != 0) {
        oq_txn_error(txn, "cannot start co-process: %s", strerror(-rc));
        return OQ_RETRY;
    }
    /* A write to a child that has exited must give EPIPE, not kill us. */
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask);
    rc = coproc_ask(w, ev, &line_len, &epipe);
    if (epipe) {
        /* Take the SIGPIPE the failed write left pending on this thread. */
        struct timespec zero = { 0, 0 };
        sigtimedwait(&pipe_set, NULL, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    /* Whatever the call met when onceq's stop killed the children (its
     * pipe closed, a poll woken) is the stop's doing, not the event's. */
    if (rc != ASK_REPLY && atomic_load(&ca->x.cancelled))
        rc = ASK_CANCELLED;
    switch (rc) {
    case ASK_REPLY:
        break;
    case ASK_TIMED_OUT:
        coproc_stop(w, 0, NULL, 0);
        oq_txn_error(txn, "timed out at the attempt's deadline; co-process "
                     "restarted for the next event");
        return OQ_RETRY;
    case ASK_CANCELLED:
        coproc_stop(w, 0, NULL, 0);
        oq_txn_error(txn, "cancelled: onceq is stopping");
        return OQ__CANCELLED;
    case ASK_GONE:
        return coproc_lost(w, txn, "exited or closed its stdout",
                           ca->x.kill_grace_ms);
    case ASK_TOO_LONG:
        return coproc_lost(w, txn, "gave a reply over 64 MiB", 0);
    case ASK_EARLY:
        return coproc_lost(w, txn, "replied before reading the whole event",
                           0);
    default:
        coproc_stop(w, 0, NULL, 0);
        oq_txn_error(txn, "poll: %s", strerror(-rc));
        return OQ_RETRY;
    }
    rc = parse_reply(w, w->rbuf, line_len, ev, txn, &why);
    /* Bytes after the reply line were not asked for: the next event
     * restarts the child (coproc_precheck) rather than take them. */
    memmove(w->rbuf, w->rbuf + line_len + 1, w->rlen - line_len - 1);
    w->rlen -= line_len + 1;
    if (rc == OQ_ENOMEM) {
        oq__txn_reset(txn);
        return out_of_memory(txn);
    }
    if (rc == -1) {
        char what[160];
        oq__txn_reset(txn);
        snprintf(what, sizeof(what), "gave an invalid reply: %s", why);
        return coproc_lost(w, txn, what, 0);
    }
    return rc;
}

static int coproc_fn(const oq_event *ev, oq_txn *txn, void *arg)
{
    return cancelled_or(coproc_call(ev, txn, arg), txn,
                        &((coproc_arg *)arg)->x);
}

static void coproc_cleanup(void *arg)
{
    coproc_arg *ca = arg;
    cworker *w;

    if (ca == NULL)
        return;
    /* No thread calls the handler any more: end the children of threads
     * that are still alive (their key destructors will not run). */
    pthread_mutex_lock(&ca->mu);
    w = ca->all;
    ca->all = NULL;
    for (cworker *v = w; v != NULL; v = v->next)
        v->pprev = NULL;
    pthread_mutex_unlock(&ca->mu);
    while (w != NULL) {
        cworker *next = w->next;
        cworker_free(w);
        w = next;
    }
    pthread_key_delete(ca->key);
    pthread_mutex_destroy(&ca->mu);
    exec_destroy(&ca->x);
    oq__free(ca);
}

/* oq__handler_cancel: running calls wake on cancel_fd; idle children get
 * SIGTERM now (their threads finish them off: SIGKILL after the grace). */
static void coproc_cancel(coproc_arg *ca)
{
    pthread_mutex_lock(&ca->mu);
    for (cworker *w = ca->all; w != NULL; w = w->next)
        if (w->live > 0)
            kill(-w->live, SIGTERM);
    pthread_mutex_unlock(&ca->mu);
}

static int make_coproc(const char *cmd, const oq__handler_opts *o,
                       oq__handler *out, char *err, size_t errlen)
{
    coproc_arg *ca = oq__calloc(1, sizeof(*ca));
    int rc;

    if (ca == NULL) {
        oq__set_err(err, errlen, "out of memory");
        return OQ_ENOMEM;
    }
    if ((rc = exec_init(&ca->x, cmd, o, err, errlen)) != 0) {
        oq__free(ca);
        return rc;
    }
    if ((rc = pthread_key_create(&ca->key, cworker_thread_end)) != 0) {
        exec_destroy(&ca->x);
        oq__free(ca);
        oq__set_err(err, errlen, "pthread_key_create: %s", strerror(rc));
        return -rc;
    }
    pthread_mutex_init(&ca->mu, NULL);
    out->fn = coproc_fn;
    out->arg = ca;
    out->cleanup = coproc_cleanup;
    out->output = OQ__OUT_RECORDS;
    return 0;
}

/* ---------------------------------------------------------------- plugin */

typedef struct plugin {
    void *dl;                /* dlopen handle */
    oq_handler_fn fn;        /* OQ_PLUGIN_SYMBOL */
    void *arg;               /* what oq_plugin_init gave, or NULL */
    void (*fini)(void *arg); /* oq_plugin_fini, or NULL */
} plugin;

static int plugin_fn(const oq_event *ev, oq_txn *txn, void *arg)
{
    const plugin *p = arg;
    int rc = p->fn(ev, txn, p->arg);

    /* Only onceq's own handlers say "cancelled" (not an attempt): from a
     * plugin it is an unknown status, a failure like any other. */
    if (rc == OQ__CANCELLED) {
        oq_txn_error(txn, "handler returned %d", rc);
        return OQ_FAIL;
    }
    return rc;
}

static void plugin_cleanup(void *arg)
{
    plugin *p = arg;

    if (p == NULL)
        return;
    if (p->fini != NULL)
        p->fini(p->arg);
    if (p->dl != NULL)
        dlclose(p->dl);
    oq__free(p);
}

/* dlsym into a function pointer without an object-to-function cast. */
static void *sym(void *dl, const char *name)
{
    dlerror();
    return dlsym(dl, name);
}

#define SYM_AS(fp, p) memcpy(&(fp), &(p), sizeof(fp))

static int load_plugin(plugin *p, const char *path, oq__handler *out,
                       char *err, size_t errlen)
{
    int (*init)(void **arg) = NULL;
    void *s;
    const int *output;
    const char *const *count_key;

    if ((p->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL)) == NULL) {
        oq__set_err(err, errlen, "cannot load plugin: %s", dlerror());
        return OQ_EINVAL;
    }
    if ((s = sym(p->dl, OQ_PLUGIN_SYMBOL)) == NULL) {
        const char *e = dlerror();
        oq__set_err(err, errlen, "plugin %s: %s", path,
                e ? e : "symbol " OQ_PLUGIN_SYMBOL " is NULL");
        return OQ_EINVAL;
    }
    SYM_AS(p->fn, s);
    if ((s = sym(p->dl, "oq_plugin_fini")) != NULL)
        SYM_AS(p->fini, s);
    if ((s = sym(p->dl, "oq_plugin_init")) != NULL) {
        int rc;
        SYM_AS(init, s);
        if ((rc = init(&p->arg)) != 0) {
            p->fini = NULL; /* init failed: nothing to finish */
            oq__set_err(err, errlen, "plugin %s: oq_plugin_init returned %d",
                    path, rc);
            return OQ_EINVAL;
        }
    }
    output = sym(p->dl, "oq_plugin_output");
    count_key = sym(p->dl, "oq_plugin_count_key");
    out->output = output != NULL && *output == OQ__OUT_COUNTS
                      ? OQ__OUT_COUNTS
                      : OQ__OUT_RECORDS;
    out->count_key = out->output != OQ__OUT_COUNTS ? NULL
                     : count_key != NULL && *count_key != NULL ? *count_key
                                                              : "key";
    return 0;
}

static int make_plugin(const char *path, const oq__handler_opts *o,
                       oq__handler *out, char *err, size_t errlen)
{
    plugin *p = oq__calloc(1, sizeof(*p));
    char *rel = NULL;
    int rc;

    OQ__UNUSED(o);
    if (p == NULL) {
        oq__set_err(err, errlen, "out of memory");
        return OQ_ENOMEM;
    }
    /* A bare name is a file here, not a library on the search path. */
    if (strchr(path, '/') == NULL) {
        size_t n = strlen(path) + 3;
        if ((rel = oq__malloc(n)) == NULL) {
            oq__free(p);
            oq__set_err(err, errlen, "out of memory");
            return OQ_ENOMEM;
        }
        snprintf(rel, n, "./%s", path);
        path = rel;
    }
    rc = load_plugin(p, path, out, err, errlen);
    oq__free(rel);
    if (rc != 0) {
        plugin_cleanup(p);
        return rc;
    }
    out->fn = plugin_fn;
    out->arg = p;
    out->cleanup = plugin_cleanup;
    return 0;
}

/* ------------------------------------------------------------------ spec */

typedef int (*make_fn)(const char *rest, const oq__handler_opts *o,
                       oq__handler *out, char *err, size_t errlen);

static const struct kind {
    const char *name;
    const char *arg;   /* what follows "name:", or NULL: takes none */
    make_fn make;
} kinds[] = {
    { "wordcount", NULL, make_wordcount },
    { "count", "FIELD", make_count },
    { "noop", NULL, make_noop },
    { "exec", "COMMAND", make_exec },
    { "coproc", "COMMAND", make_coproc },
    { "plugin", "PATH.so", make_plugin },
};

#define KNOWN \
    "wordcount, count:FIELD, noop, exec:COMMAND, coproc:COMMAND or plugin:PATH.so"

int oq__handler_from_spec(const char *spec, const oq__handler_opts *o,
                          oq__handler *out, char *err, size_t errlen)
{
    static const oq__handler_opts defaults = {
        .kill_grace_ms = KILL_GRACE_DEFAULT_MS };
    const char *colon;
    size_t nlen;
    int rc;

    if (out == NULL)
        return OQ_EINVAL;
    memset(out, 0, sizeof(*out));
    if (spec == NULL)
        spec = "";
    if (o == NULL)
        o = &defaults;
    colon = strchr(spec, ':');
    nlen = colon ? (size_t)(colon - spec) : strlen(spec);
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        const struct kind *k = &kinds[i];
        if (strlen(k->name) != nlen || memcmp(k->name, spec, nlen) != 0)
            continue;
        if (k->arg == NULL && colon != NULL) {
            oq__set_err(err, errlen, "handler '%s' takes no argument (got '%s')",
                    k->name, spec);
            return OQ_EINVAL;
        }
        if (k->arg != NULL &&
            (colon == NULL || colon[1 + strspn(colon + 1, " \t")] == '\0')) {
            oq__set_err(err, errlen, "handler '%s' needs a %s: %s:%s", k->name,
                    k->arg, k->name, k->arg);
            return OQ_EINVAL;
        }
        rc = k->make(colon ? colon + 1 : "", o, out, err, errlen);
        if (rc != 0) {
            memset(out, 0, sizeof(*out));
            return rc;
        }
        out->name = k->name;
        return 0;
    }
    oq__set_err(err, errlen, "unknown handler '%.*s' (expected " KNOWN ")",
            (int)OQ__MIN(nlen, 200), spec);
    return OQ_EINVAL;
}


/*
 * Makes running and future calls of h return OQ_RETRY soon, for a graceful
 * stop (SIGINT/SIGTERM): exec commands get SIGTERM on their process group,
 * then SIGKILL after the grace period, and no new one starts; coproc
 * children, running or idle, get SIGTERM, and their threads stop them
 * (SIGKILL after the grace) at their next call, at their end, or in
 * oq__handler_free. Their events stay unprocessed and are redelivered by a later run. Any thread may call
 * it, at any time before oq__handler_free; the other handlers run to their
 * end, which is short.
 */
void oq__handler_cancel(oq__handler *h)
{
    if (h != NULL &&
        (h->cleanup == exec_cleanup || h->cleanup == coproc_cleanup)) {
        exec_arg *x = h->arg; /* a coproc_arg starts with its exec_arg */
        uint64_t one = 1;
        if (h->cleanup == coproc_cleanup)
            coproc_cancel(h->arg);
        atomic_store(&x->cancelled, true);
        if (write(x->cancel_fd, &one, sizeof(one)) < 0) {
            /* The counter cannot overflow from our writes of 1: ignore. */
        }
    }
}

void oq__handler_free(oq__handler *h)
{
    if (h == NULL)
        return;
    if (h->cleanup != NULL)
        h->cleanup(h->arg);
    memset(h, 0, sizeof(*h));
}
