/*
 * A throwaway redis-server for the C tests (test_ledger, test_engine):
 * Debian's /usr/bin/redis-server on a free loopback port, without
 * persistence, stopped by the test. A test whose machine has no
 * redis-server skips its Redis cases (and says so) instead of failing.
 */
#ifndef OQ_TEST_REDIS_SERVER_H
#define OQ_TEST_REDIS_SERVER_H

#include <hiredis/hiredis.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TEST_REDIS_SERVER "/usr/bin/redis-server"

typedef struct test_redis {
    pid_t pid;
    int port;
    char url[64];
} test_redis;

/* 1 if the redis-server binary is there. */
static int test_redis_available(void)
{
    return access(TEST_REDIS_SERVER, X_OK) == 0;
}

/* A port the kernel hands out for a bound socket (free right now). */
static int test_redis_free_port(void)
{
    struct sockaddr_in a = { 0 };
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

    if (fd < 0)
        return -1;
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* A new connection to the server, or NULL. */
static redisContext *test_redis_connect(const test_redis *t)
{
    struct timeval tv = { 2, 0 };
    redisContext *c = redisConnectWithTimeout("127.0.0.1", t->port, tv);

    if (c != NULL && c->err) {
        redisFree(c);
        c = NULL;
    }
    return c;
}

/* Starts the server and waits until it answers PING. 0 or -1. */
static int test_redis_start(test_redis *t)
{
    char port[16];

    t->port = test_redis_free_port();
    if (t->port < 0)
        return -1;
    snprintf(port, sizeof(port), "%d", t->port);
    snprintf(t->url, sizeof(t->url), "redis://127.0.0.1:%d", t->port);
    t->pid = fork();
    if (t->pid < 0)
        return -1;
    if (t->pid == 0) {
        /* Its chatter would bury the test's own output. */
        if (freopen("/dev/null", "w", stdout) == NULL)
            _exit(127);
        execl(TEST_REDIS_SERVER, TEST_REDIS_SERVER, "--port", port, "--bind",
              "127.0.0.1", "--save", "", "--appendonly", "no", (char *)NULL);
        _exit(127);
    }
    /* The server takes a moment to listen: poll for it (up to 10 s). */
    for (int i = 0; i < 1000; i++) {
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        redisContext *c = test_redis_connect(t);
        if (c != NULL) {
            redisReply *r = redisCommand(c, "PING");
            int ok = r != NULL && r->type == REDIS_REPLY_STATUS;
            freeReplyObject(r);
            redisFree(c);
            if (ok)
                return 0;
        }
        if (waitpid(t->pid, NULL, WNOHANG) == t->pid) {
            t->pid = 0;
            return -1;
        }
        nanosleep(&ts, NULL);
    }
    return -1;
}

static void test_redis_stop(test_redis *t)
{
    if (t->pid > 0) {
        kill(t->pid, SIGTERM);
        waitpid(t->pid, NULL, 0);
    }
    t->pid = 0;
}

/* Empties the server between cases. 0 or -1. */
static int test_redis_flush(const test_redis *t)
{
    redisContext *c = test_redis_connect(t);
    redisReply *r;
    int ok;

    if (c == NULL)
        return -1;
    r = redisCommand(c, "FLUSHALL");
    ok = r != NULL && r->type == REDIS_REPLY_STATUS;
    freeReplyObject(r);
    redisFree(c);
    return ok ? 0 : -1;
}

/* A command that must succeed (cmocka's asserts: include cmocka.h before
 * this header). The reply is the caller's to free. */
static redisReply *test_redis_cmd(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    redisReply *r;

    va_start(ap, fmt);
    r = redisvCommand(c, fmt, ap);
    va_end(ap);
    assert_non_null(r);
    assert_int_not_equal(r->type, REDIS_REPLY_ERROR);
    return r;
}

#endif /* OQ_TEST_REDIS_SERVER_H */
