/*
 * queue_peer: the same job workload through beanstalkd (over loopback TCP)
 * or through the onceq library queue (in-process), for bench_peers.sh.
 *
 *   queue_peer --payloads FILE --jobs N [--ttr S] [--consumers C]
 *              [--window W] (--beanstalkd HOST:PORT | --onceq [--batch B])
 *
 * The job bodies are the first N lines of FILE (without the newline).
 * Phase 1, put: one producer sends the N jobs, each with a TTR of S seconds
 * (onceq: visibility timeout S s, dedup window off, no id; beanstalkd:
 * "put 0 0 S <bytes>"). The beanstalkd producer pipelines: it writes W put
 * commands in one write, then reads the W "INSERTED <id>" replies; onceq's
 * producer sends W messages per oq_queue_send_batch call.
 * Phase 2, consume: C consumer threads, each with its own connection, take
 * jobs until none is left. beanstalkd: a "reserve-with-timeout 0" round trip
 * (RESERVED <id> <bytes> + body; TIMED_OUT ends the consumer) and a
 * "delete <id>" round trip (DELETED) per job, no pipelining. onceq:
 * oq_queue_receive(max B) then, with B = 1, oq_queue_ack + oq_queue_release
 * per job; with B > 1, one oq_queue_settle (ack + release) per batch. The
 * queue is closed after phase 1, so a consumer ends at OQ_EOF.
 * Every body's length is checked on receipt, and the consumed total must be
 * N, or the program fails.
 *
 * Prints one CSV line: mode,jobs,put_per_s,consume_per_s,total_per_s
 */
#include "onceq.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static char **bodies;
static size_t *body_len;
static size_t njobs = 200000;
static unsigned ttr = 30;
static unsigned consumers = 2;
static size_t window = 1000;
static size_t batch = 1;
static const char *bs_host;
static int bs_port;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "queue_peer: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void load_payloads(const char *path)
{
    FILE *f = fopen(path, "r");
    char *line = NULL;
    size_t cap = 0, n = 0;
    ssize_t len;

    if (f == NULL)
        die("%s: %s", path, strerror(errno));
    bodies = calloc(njobs, sizeof(*bodies));
    body_len = calloc(njobs, sizeof(*body_len));
    if (!bodies || !body_len)
        die("out of memory");
    while (n < njobs && (len = getline(&line, &cap, f)) > 0) {
        if (line[len - 1] == '\n')
            line[--len] = '\0';
        bodies[n] = strdup(line);
        body_len[n] = (size_t)len;
        n++;
    }
    free(line);
    fclose(f);
    if (n < njobs)
        die("%s has %zu lines, need %zu", path, n, njobs);
}

/* ------------------------------------------------------------ beanstalkd */

typedef struct conn {
    int fd;
    char buf[1 << 16];
    size_t off, len;
} conn;

static conn *bs_connect(void)
{
    conn *c = calloc(1, sizeof(*c));
    struct sockaddr_in sa;
    int one = 1;

    if (c == NULL)
        die("out of memory");
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)bs_port);
    if (inet_pton(AF_INET, bs_host, &sa.sin_addr) != 1)
        die("bad address %s", bs_host);
    if ((c->fd = socket(AF_INET, SOCK_STREAM, 0)) < 0 ||
        connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
        die("connect %s:%d: %s", bs_host, bs_port, strerror(errno));
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return c;
}

static void write_all(conn *c, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(c->fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("write: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

static void fill(conn *c)
{
    ssize_t r;
    if (c->off > 0) {
        memmove(c->buf, c->buf + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
    }
    if (c->len == sizeof(c->buf))
        die("reply too long");
    do
        r = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);
    while (r < 0 && errno == EINTR);
    if (r <= 0)
        die("read: %s", r == 0 ? "connection closed" : strerror(errno));
    c->len += (size_t)r;
}

/* Reads one "\r\n"-terminated line into out (NUL-terminated, no CRLF). */
static void read_line(conn *c, char *out, size_t cap)
{
    for (;;) {
        char *s = c->buf + c->off;
        size_t avail = c->len - c->off;
        char *nl = memchr(s, '\n', avail);
        if (nl != NULL) {
            size_t n = (size_t)(nl - s);
            if (n > 0 && s[n - 1] == '\r')
                n--;
            if (n >= cap)
                die("reply line too long");
            memcpy(out, s, n);
            out[n] = '\0';
            c->off += (size_t)(nl - s) + 1;
            return;
        }
        fill(c);
    }
}

/* Consumes n bytes of body plus the trailing "\r\n". */
static void skip_body(conn *c, size_t n)
{
    n += 2;
    while (n > 0) {
        size_t avail = c->len - c->off;
        size_t k;
        if (avail == 0) {
            fill(c);
            continue;
        }
        k = avail < n ? avail : n;
        c->off += k;
        n -= k;
    }
}

static void bs_put_all(void)
{
    conn *c = bs_connect();
    size_t cap = window * 1024 + 4096, used;
    char *out = malloc(cap), line[256];

    if (out == NULL)
        die("out of memory");
    for (size_t base = 0; base < njobs; base += window) {
        size_t k = njobs - base < window ? njobs - base : window;
        used = 0;
        for (size_t i = base; i < base + k; i++) {
            if (used + body_len[i] + 64 > cap) {
                cap = (used + body_len[i] + 64) * 2;
                if ((out = realloc(out, cap)) == NULL)
                    die("out of memory");
            }
            used += (size_t)sprintf(out + used, "put 0 0 %u %zu\r\n", ttr,
                                    body_len[i]);
            memcpy(out + used, bodies[i], body_len[i]);
            used += body_len[i];
            memcpy(out + used, "\r\n", 2);
            used += 2;
        }
        write_all(c, out, used);
        for (size_t i = 0; i < k; i++) {
            read_line(c, line, sizeof(line));
            if (strncmp(line, "INSERTED ", 9) != 0)
                die("put: %s", line);
        }
    }
    free(out);
    close(c->fd);
    free(c);
}

static void *bs_consumer(void *arg)
{
    size_t *count = arg;
    conn *c = bs_connect();
    char line[256], cmd[64];
    static const char reserve[] = "reserve-with-timeout 0\r\n";

    for (;;) {
        unsigned long long id;
        size_t bytes;
        int n;
        write_all(c, reserve, sizeof(reserve) - 1);
        read_line(c, line, sizeof(line));
        if (strcmp(line, "TIMED_OUT") == 0)
            break;
        if (sscanf(line, "RESERVED %llu %zu", &id, &bytes) != 2)
            die("reserve: %s", line);
        if (bytes == 0 || bytes > 4096)
            die("reserve: odd body length %zu", bytes);
        skip_body(c, bytes);
        n = snprintf(cmd, sizeof(cmd), "delete %llu\r\n", id);
        write_all(c, cmd, (size_t)n);
        read_line(c, line, sizeof(line));
        if (strcmp(line, "DELETED") != 0)
            die("delete: %s", line);
        (*count)++;
    }
    close(c->fd);
    free(c);
    return NULL;
}

/* ----------------------------------------------------------------- onceq */

static oq_queue *q;

static void oq_put_all(void)
{
    oq_message *m = calloc(window, sizeof(*m));

    if (m == NULL)
        die("out of memory");
    for (size_t base = 0; base < njobs; base += window) {
        size_t k = njobs - base < window ? njobs - base : window;
        int rc;
        for (size_t i = 0; i < k; i++) {
            m[i].payload = bodies[base + i];
            m[i].payload_len = body_len[base + i];
        }
        rc = oq_queue_send_batch(q, m, k, NULL);
        if (rc != (int)k)
            die("send_batch: %d of %zu", rc, k);
    }
    free(m);
    oq_queue_close(q);
}

static void *oq_consumer(void *arg)
{
    size_t *count = arg;
    oq_delivery *d = calloc(batch, sizeof(*d));
    oq_settle *ops = calloc(batch, sizeof(*ops));

    if (!d || !ops)
        die("out of memory");
    for (;;) {
        int n = oq_queue_receive(q, d, batch, -1);
        if (n == OQ_EOF)
            break;
        if (n < 0)
            die("receive: %s", oq_strerror(n));
        for (int i = 0; i < n; i++)
            if (d[i].payload_len == 0 || d[i].payload_len > 4096)
                die("receive: odd body length %zu", d[i].payload_len);
        if (batch == 1) {
            int rc = oq_queue_ack(q, d[0].receipt);
            if (rc != 0)
                die("ack: %s", oq_strerror(rc));
            oq_queue_release(q, d, 1);
        } else {
            for (int i = 0; i < n; i++)
                ops[i] = (oq_settle){ .d = &d[i], .op = OQ_SETTLE_ACK,
                                      .release = 1 };
            if (oq_queue_settle(q, ops, (size_t)n) != n)
                die("settle: not every ack succeeded");
        }
        *count += (size_t)n;
    }
    free(d);
    free(ops);
    return NULL;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    const char *payloads = NULL;
    int onceq = 0;
    pthread_t th[64];
    size_t counts[64] = { 0 }, total = 0;
    double t0, t1, t2;
    char mode[64];

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--onceq") == 0) {
            onceq = 1;
            continue;
        }
        if (v == NULL)
            die("%s needs a value", a);
        i++;
        if (strcmp(a, "--payloads") == 0)
            payloads = v;
        else if (strcmp(a, "--jobs") == 0)
            njobs = strtoull(v, NULL, 10);
        else if (strcmp(a, "--ttr") == 0)
            ttr = (unsigned)atoi(v);
        else if (strcmp(a, "--consumers") == 0)
            consumers = (unsigned)atoi(v);
        else if (strcmp(a, "--window") == 0)
            window = strtoull(v, NULL, 10);
        else if (strcmp(a, "--batch") == 0)
            batch = strtoull(v, NULL, 10);
        else if (strcmp(a, "--beanstalkd") == 0) {
            static char host[64];
            const char *colon = strrchr(v, ':');
            if (colon == NULL || (size_t)(colon - v) >= sizeof(host))
                die("--beanstalkd HOST:PORT");
            memcpy(host, v, (size_t)(colon - v));
            bs_host = host;
            bs_port = atoi(colon + 1);
        } else
            die("unknown option %s", a);
    }
    if (payloads == NULL || njobs == 0 || consumers < 1 || consumers > 64 ||
        window < 1 || batch < 1 || ttr < 1 || (onceq == (bs_host != NULL)))
        die("usage: queue_peer --payloads FILE --jobs N [--ttr S] "
            "[--consumers C] [--window W] (--beanstalkd HOST:PORT | "
            "--onceq [--batch B])");
    load_payloads(payloads);

    if (onceq) {
        oq_queue_opts o;
        oq_queue_opts_defaults(&o);
        o.visibility_timeout_ms = (int64_t)ttr * 1000;
        o.dedup_count = 0;
        if (oq_queue_new(&q, &o) != 0)
            die("oq_queue_new failed");
    }
    t0 = now_s();
    if (onceq)
        oq_put_all();
    else
        bs_put_all();
    t1 = now_s();
    for (unsigned i = 0; i < consumers; i++)
        if (pthread_create(&th[i], NULL, onceq ? oq_consumer : bs_consumer,
                           &counts[i]) != 0)
            die("pthread_create failed");
    for (unsigned i = 0; i < consumers; i++) {
        pthread_join(th[i], NULL);
        total += counts[i];
    }
    t2 = now_s();
    if (total != njobs)
        die("consumed %zu jobs, put %zu", total, njobs);
    if (onceq) {
        oq_queue_stats st;
        oq_queue_stats_get(q, &st);
        if (st.acked != njobs || st.redelivered != 0)
            die("onceq acked %llu, redelivered %llu",
                (unsigned long long)st.acked,
                (unsigned long long)st.redelivered);
        oq_queue_free(q);
        snprintf(mode, sizeof(mode), "onceq_batch%zu", batch);
    } else
        snprintf(mode, sizeof(mode), "beanstalkd");
    printf("%s,%zu,%.0f,%.0f,%.0f\n", mode, njobs, njobs / (t1 - t0),
           njobs / (t2 - t1), njobs / (t2 - t0));
    for (size_t i = 0; i < njobs; i++)
        free(bodies[i]);
    free(bodies);
    free(body_len);
    return 0;
}
