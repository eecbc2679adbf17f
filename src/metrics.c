/*
 * Prometheus metrics for `onceq run` (every mode): the text exposition
 * format, written to a file (the node_exporter textfile collector
 * convention: a temp file renamed over the old one) every interval and at
 * the end, and served over HTTP at /metrics with libmicrohttpd.
 *
 * DESIGN
 * ------
 * The metrics know nothing of the run: a snapshot callback fills an
 * oq__metrics_snap from whatever the mode counts (the pool's and queue's
 * stats in memory, the committer's with --state, the Redis consumer's
 * counters). Threads: one writer thread (file mode) that sleeps the
 * interval; libmicrohttpd's own thread (HTTP mode). Both call the snapshot
 * callback, which must be thread-safe (the stats it reads are atomics or
 * taken under their own leaf locks). m->mu guards only the stop flag and
 * serializes the file writes (the final write at stop and the thread's).
 * Every number is an integer or a finite float; label values are fixed
 * names, so the text needs no escaping.
 */
#include "oq_cli.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct oq__metrics {
    oq__metrics_fn fn;
    void *arg;
    char *path;              /* NULL: no file */
    char *tmp;               /* path.tmp.PID */
    int64_t interval_ms;
    struct MHD_Daemon *http; /* NULL: no listener */

    pthread_mutex_t mu;      /* guards stopping and the file writes */
    pthread_cond_t cv;       /* stopping was set */
    bool stopping;
    bool thread_started;
    pthread_t thread;
    int write_err;           /* errno of the last failed file write */
};

static void counter(oq__buf *b, const char *name, const char *help,
                    uint64_t v)
{
    char line[256];
    int n = snprintf(line, sizeof(line), "# HELP %s %s\n# TYPE %s counter\n"
                     "%s %" PRIu64 "\n", name, help, name, name, v);
    oq__buf_add(b, line, (size_t)n);
}

static void gauge(oq__buf *b, const char *name, const char *help, double v)
{
    char line[256];
    int n = snprintf(line, sizeof(line), "# HELP %s %s\n# TYPE %s gauge\n"
                     "%s %.6g\n", name, help, name, name, v);
    oq__buf_add(b, line, (size_t)n);
}

static void labelled(oq__buf *b, const char *name, const char *label,
                     const char *value, uint64_t v)
{
    char line[256];
    int n = snprintf(line, sizeof(line), "%s{%s=\"%s\"} %" PRIu64 "\n",
                     name, label, value, v);
    oq__buf_add(b, line, (size_t)n);
}

int oq__metrics_text(oq__buf *b, const oq__metrics_snap *s)
{
    char line[256];
    uint64_t cum = 0;
    int n;

    b->len = 0;
    n = snprintf(line, sizeof(line), "# HELP onceq_events_total Events by "
                 "outcome (processed, duplicate and dead are final; retried "
                 "counts retries)\n# TYPE onceq_events_total counter\n");
    oq__buf_add(b, line, (size_t)n);
    labelled(b, "onceq_events_total", "outcome", "processed", s->processed);
    labelled(b, "onceq_events_total", "outcome", "duplicate", s->duplicates);
    labelled(b, "onceq_events_total", "outcome", "dead", s->dead);
    labelled(b, "onceq_events_total", "outcome", "retried", s->retried);
    n = snprintf(line, sizeof(line), "# HELP onceq_dead_letters_total Dead "
                 "letters by reason\n# TYPE onceq_dead_letters_total "
                 "counter\n");
    oq__buf_add(b, line, (size_t)n);
    for (int r = 0; r < OQ_DLQ__COUNT; r++)
        labelled(b, "onceq_dead_letters_total", "reason",
                 oq_dlq_reason_name((oq_dlq_reason)r), s->dead_by[r]);
    gauge(b, "onceq_queue_ready", "Messages ready for delivery",
          (double)s->ready);
    gauge(b, "onceq_queue_in_flight", "Messages delivered and not settled",
          (double)s->in_flight);
    gauge(b, "onceq_queue_oldest_ready_age_seconds",
          "Age of the oldest ready message", s->oldest_ready_age_s);
    counter(b, "onceq_lease_extensions_total",
            "Heartbeats that extended a running handler's lease",
            s->lease_extensions);
    counter(b, "onceq_fenced_total",
            "Commits or acks refused because the lease was lost", s->fenced);
    n = snprintf(line, sizeof(line), "# HELP onceq_handler_duration_seconds "
                 "Handler call durations\n# TYPE "
                 "onceq_handler_duration_seconds histogram\n");
    oq__buf_add(b, line, (size_t)n);
    for (int i = 0; i < OQ__HIST_BUCKETS; i++) {
        cum += s->hist[i];
        n = snprintf(line, sizeof(line), "onceq_handler_duration_seconds_"
                     "bucket{le=\"%g\"} %" PRIu64 "\n",
                     oq__metrics_buckets[i], cum);
        oq__buf_add(b, line, (size_t)n);
    }
    n = snprintf(line, sizeof(line), "onceq_handler_duration_seconds_bucket"
                 "{le=\"+Inf\"} %" PRIu64 "\nonceq_handler_duration_seconds_"
                 "sum %.6f\nonceq_handler_duration_seconds_count %" PRIu64
                 "\n", s->hist_count, s->hist_sum_s, s->hist_count);
    return oq__buf_add(b, line, (size_t)n);
}

/* Writes the file: temp file, then rename. 0 or an errno. */
static int write_file(oq__metrics *m)
{
    oq__metrics_snap s;
    oq__buf b = { 0 };
    FILE *f;
    int rc = 0;

    memset(&s, 0, sizeof(s));
    m->fn(&s, m->arg);
    if (oq__metrics_text(&b, &s) != 0) {
        oq__buf_free(&b);
        return ENOMEM;
    }
    if ((f = fopen(m->tmp, "we")) == NULL) {
        rc = errno;
    } else {
        if (fwrite(b.data, 1, b.len, f) != b.len)
            rc = errno ? errno : EIO;
        if (fclose(f) != 0 && rc == 0)
            rc = errno;
        if (rc == 0 && rename(m->tmp, m->path) != 0)
            rc = errno;
        if (rc != 0)
            unlink(m->tmp);
    }
    oq__buf_free(&b);
    return rc;
}

static void *writer_main(void *arg)
{
    oq__metrics *m = arg;

    pthread_mutex_lock(&m->mu);
    while (!m->stopping) {
        struct timespec until = oq__abstime_after(m->interval_ms);
        pthread_cond_timedwait(&m->cv, &m->mu, &until);
        if (!m->stopping)
            m->write_err = write_file(m);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

static enum MHD_Result serve(void *cls, struct MHD_Connection *conn,
                             const char *url, const char *method,
                             const char *version, const char *upload,
                             size_t *upload_len, void **ctx)
{
    oq__metrics *m = cls;
    struct MHD_Response *resp;
    enum MHD_Result ret;
    unsigned status = MHD_HTTP_OK;
    oq__buf b = { 0 };

    OQ__UNUSED(version);
    OQ__UNUSED(upload);
    OQ__UNUSED(upload_len);
    OQ__UNUSED(ctx);
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        status = MHD_HTTP_METHOD_NOT_ALLOWED;
        oq__buf_add(&b, "GET /metrics only\n", 18);
    } else if (strcmp(url, "/metrics") != 0) {
        status = MHD_HTTP_NOT_FOUND;
        oq__buf_add(&b, "not found: see /metrics\n", 24);
    } else {
        oq__metrics_snap s;
        memset(&s, 0, sizeof(s));
        m->fn(&s, m->arg);
        if (oq__metrics_text(&b, &s) != 0)
            status = MHD_HTTP_INTERNAL_SERVER_ERROR;
    }
    resp = MHD_create_response_from_buffer(b.len, b.data,
                                           MHD_RESPMEM_MUST_COPY);
    oq__buf_free(&b);
    if (resp == NULL)
        return MHD_NO;
    MHD_add_response_header(resp, "Content-Type",
                            "text/plain; version=0.0.4; charset=utf-8");
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* HOST:PORT (HOST a numeric IPv4 address, or empty for any). */
static int parse_listen(const char *s, struct sockaddr_in *sa)
{
    const char *colon = strrchr(s, ':');
    char host[64];
    uint64_t port;

    if (colon == NULL || (size_t)(colon - s) >= sizeof(host) ||
        oq__parse_count(colon + 1, 1, 65535, &port) != 0)
        return OQ_EINVAL;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    if (host[0] == '\0' || strcmp(host, "*") == 0)
        sa->sin_addr.s_addr = htonl(INADDR_ANY);
    else if (strcmp(host, "localhost") == 0)
        sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
        return OQ_EINVAL;
    return 0;
}

int oq__metrics_start(oq__metrics **out, const oq__metrics_opts *o,
                      char *err, size_t errlen)
{
    oq__metrics *m = oq__calloc(1, sizeof(*m));
    int rc;

    *out = NULL;
    if (m == NULL) {
        oq__set_err(err, errlen, "out of memory");
        return OQ_ENOMEM;
    }
    m->fn = o->fn;
    m->arg = o->arg;
    m->interval_ms = o->interval_ms > 0 ? o->interval_ms : 10000;
    pthread_mutex_init(&m->mu, NULL);
    oq__cond_init_monotonic(&m->cv);
    if (o->path) {
        size_t n = strlen(o->path) + 32;
        struct stat st;
        /* The file is replaced by a rename at every write: only ever a
         * regular file of its own (not a device, a FIFO or a symlink, which
         * the rename would replace, not write through). */
        if (lstat(o->path, &st) == 0 && !S_ISREG(st.st_mode)) {
            oq__set_err(err, errlen, "--metrics '%s' is not a regular file "
                        "(it is replaced by a rename at every write)",
                        o->path);
            rc = OQ_EINVAL;
            goto out_free;
        }
        m->path = oq__malloc(strlen(o->path) + 1);
        m->tmp = oq__malloc(n);
        if (m->path == NULL || m->tmp == NULL) {
            oq__set_err(err, errlen, "out of memory");
            rc = OQ_ENOMEM;
            goto out_free;
        }
        strcpy(m->path, o->path);
        snprintf(m->tmp, n, "%s.tmp.%ld", o->path, (long)getpid());
        /* A first write now: an unwritable path is refused before the
         * run starts, and the file exists from the start. */
        if ((rc = write_file(m)) != 0) {
            oq__set_err(err, errlen, "cannot write metrics to '%s': %s",
                        o->path, strerror(rc));
            rc = -rc;
            goto out_free;
        }
        if ((rc = -pthread_create(&m->thread, NULL, writer_main, m)) != 0) {
            oq__set_err(err, errlen, "cannot start the metrics writer: %s",
                        strerror(-rc));
            goto out_free;
        }
        m->thread_started = true;
    }
    if (o->listen) {
        struct sockaddr_in sa;
        if (parse_listen(o->listen, &sa) != 0) {
            oq__set_err(err, errlen, "--metrics-listen '%s': expected "
                        "HOST:PORT (HOST an IPv4 address, localhost, or "
                        "empty for any)", o->listen);
            rc = OQ_EINVAL;
            goto out_free;
        }
        /* No MHD_USE_ERROR_LOG: its lines ("Failed to bind to port 0")
         * would stand beside our own, clearer one. */
        m->http = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD, 0, NULL,
                                   NULL, serve, m,
                                   MHD_OPTION_SOCK_ADDR, &sa,
                                   /* 16 idle clients took it down
                                    * (10 s each): room for many, and an
                                    * idle one closed after 3 s. */
                                   MHD_OPTION_CONNECTION_LIMIT, 512u,
                                   MHD_OPTION_CONNECTION_TIMEOUT, 3u,
                                   MHD_OPTION_END);
        if (m->http == NULL) {
            oq__set_err(err, errlen, "cannot listen on '%s' for metrics "
                        "(in use, or not an address of this machine?)",
                        o->listen);
            rc = OQ_EIO;
            goto out_free;
        }
    }
    *out = m;
    return 0;

out_free:
    oq__metrics_stop(m);
    return rc;
}

int oq__metrics_stop(oq__metrics *m)
{
    int rc = 0;

    if (m == NULL)
        return 0;
    if (m->http)
        MHD_stop_daemon(m->http);
    pthread_mutex_lock(&m->mu);
    m->stopping = true;
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    if (m->thread_started) {
        pthread_join(m->thread, NULL);
        rc = write_file(m); /* the final figures */
    }
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
    oq__free(m->path);
    oq__free(m->tmp);
    oq__free(m);
    return rc;
}
