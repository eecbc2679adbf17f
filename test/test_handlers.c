/* Description: the handlers of `onceq run` (src/handlers.c). wordcount and count:FIELD stage the right counter deltas (top-level names, JSON pointers, non-string values) and dead-letter events without the field; noop stages nothing, or the raw line with emit; bad specs give one-line errors; exec runs /bin/sh -c per event with the line on stdin and ONCEQ_* in its environment, stages stdout on exit 0, retries on exit 75, fails with the status and stderr tail otherwise, moves 1 MB each way without deadlock, kills a command at its deadline (SIGTERM, then SIGKILL for one that ignores it, grandchildren too), stages nothing then and leaves no zombie, and keeps concurrent spawns from 4 threads apart (each gets its own output, no fd leaks); coproc keeps one child per thread across calls, stages ok outputs as compact JSON, retries and fails with the reply's error, restarts a child that writes an invalid reply, exits, or misses its deadline (SIGTERM, SIGKILL after the grace) and retries its event, stops running calls on cancel, ends children with their threads or with free (no zombie, no fd), sends ids with NUL or invalid UTF-8 as valid JSON, and passes stderr on as [coproc N] lines; plugin loads examples/plugin_upper.c and a plugin with init/fini/counts, and refuses a missing file or symbol. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "oq_cli.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ------------------------------------------------------------- helpers */

/* Where the group setup builds the test plugins. */
static char plugin_dir[64];

/* Real-time waits stretch under sanitizers (OQ_TIME_MULT). */
static int64_t time_mult(void)
{
    const char *s = getenv("OQ_TIME_MULT");
    long m = s ? strtol(s, NULL, 10) : 1;
    return m > 0 ? m : 1;
}

/* What a txn staged, flattened. */
typedef struct staged {
    char *rec[8];
    size_t rec_len[8];
    size_t nrec;
    char key[64][64];
    size_t key_len[64];
    int64_t delta[64];
    size_t ncount;
} staged;

static void on_record(const void *data, size_t len, void *arg)
{
    staged *s = arg;
    assert_true(s->nrec < 8);
    s->rec[s->nrec] = malloc(len + 1);
    memcpy(s->rec[s->nrec], data, len);
    s->rec[s->nrec][len] = '\0';
    s->rec_len[s->nrec++] = len;
}

static void on_count(const char *key, size_t len, int64_t delta, void *arg)
{
    staged *s = arg;
    assert_true(s->ncount < 64 && len < 64);
    memcpy(s->key[s->ncount], key, len);
    s->key[s->ncount][len] = '\0';
    s->key_len[s->ncount] = len;
    s->delta[s->ncount++] = delta;
}

static void staged_of(const oq_txn *t, staged *s)
{
    memset(s, 0, sizeof(*s));
    oq_txn_foreach(t, on_record, on_count, s);
}

static void staged_free(staged *s)
{
    for (size_t i = 0; i < s->nrec; i++)
        free(s->rec[i]);
}

/* An event as the pool hands it over, decoded by source.c's hook. */
typedef struct event {
    oq_event ev;
    oq_decoded dec;
    char *line;
} event;

static void event_init(event *e, const char *line)
{
    memset(e, 0, sizeof(*e));
    e->line = strdup(line);
    e->ev.payload = e->line;
    e->ev.payload_len = strlen(line);
    e->ev.attempt = 1;
    e->ev.receipt = 42;
    e->ev.clock = oq_clock_monotonic();
    e->ev.deadline_ms = oq_clock_now(e->ev.clock) + 30000 * time_mult();
    assert_int_equal(oq__json_decode(&e->ev, &e->dec, NULL), 0);
    e->ev.id = e->dec.id;
    e->ev.id_len = e->dec.id_len;
    e->ev.parsed = e->dec.parsed;
}

static void event_destroy(event *e)
{
    oq__json_free(e->dec.parsed, NULL);
    free(e->line);
}

/* Builds the handler for spec, runs it once on line, and collects what it
 * staged. Returns the handler's verdict. */
static int run_spec_opts(const char *spec, const oq__handler_opts *o,
                         const char *line, staged *s, char *err,
                         size_t errlen)
{
    oq__handler h;
    char msg[256] = "";
    event e;
    oq_txn *t = oq__txn_new();
    int rc;

    assert_non_null(t);
    rc = oq__handler_from_spec(spec, o, &h, msg, sizeof(msg));
    if (rc != 0)
        fail_msg("handler '%s': %d %s", spec, rc, msg);
    event_init(&e, line);
    rc = h.fn(&e.ev, t, h.arg);
    staged_of(t, s);
    if (err)
        snprintf(err, errlen, "%s", oq_txn_error_text(t));
    event_destroy(&e);
    oq__txn_free(t);
    oq__handler_free(&h);
    return rc;
}

static int run_spec(const char *spec, const char *line, staged *s, char *err,
                    size_t errlen)
{
    return run_spec_opts(spec, NULL, line, s, err, errlen);
}

/* Every child was reaped: waitpid(-1) finds none. */
static void assert_no_children(void)
{
    errno = 0;
    assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
    assert_int_equal(errno, ECHILD);
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;

    assert_non_null(d);
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n;
}

/* ------------------------------------------------------------ wordcount */

static void test_wordcount_word(void **state)
{
    staged s;

    assert_int_equal(run_spec("wordcount", "{\"id\":\"1\",\"word\":\"hello\"}",
                              &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 1);
    assert_string_equal(s.key[0], "hello");
    assert_int_equal(s.delta[0], 1);
    assert_int_equal(s.nrec, 0);
}

static void test_wordcount_text_splits_on_ascii_whitespace(void **state)
{
    staged s;

    assert_int_equal(run_spec("wordcount",
                              "{\"id\":\"1\",\"text\":\"  a b\\ta\\nc\\r\\n"
                              "caf\\u00e9  \"}", &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 5);
    assert_string_equal(s.key[0], "a");
    assert_string_equal(s.key[1], "b");
    assert_string_equal(s.key[2], "a");
    assert_string_equal(s.key[3], "c");
    assert_string_equal(s.key[4], "caf\xc3\xa9");
}

static void test_wordcount_word_wins_over_text(void **state)
{
    staged s;

    assert_int_equal(run_spec("wordcount", "{\"id\":\"1\",\"word\":\"w\","
                              "\"text\":\"x y\"}", &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 1);
    assert_string_equal(s.key[0], "w");
}

static void test_wordcount_neither_fails(void **state)
{
    staged s;
    char err[512];

    assert_int_equal(run_spec("wordcount", "{\"id\":\"1\",\"word\":7}", &s,
                              err, sizeof(err)), OQ_FAIL);
    assert_int_equal(s.ncount, 0);
    assert_string_equal(err, "no 'word' or 'text' string field");
}

static void test_wordcount_without_decode_hook(void **state)
{
    /* With no decode hook (ev.parsed NULL) the handler parses the line. */
    oq__handler h;
    oq_event ev = { 0 };
    oq_txn *t = oq__txn_new();
    const char *line = "{\"id\":\"1\",\"text\":\"x y\"}";
    staged s;

    assert_int_equal(oq__handler_from_spec("wordcount", NULL, &h, NULL, 0), 0);
    ev.payload = line;
    ev.payload_len = strlen(line);
    assert_int_equal(h.fn(&ev, t, h.arg), OQ_OK);
    staged_of(t, &s);
    assert_int_equal(s.ncount, 2);
    assert_string_equal(s.key[1], "y");
    oq__txn_reset(t);
    ev.payload = "[1]";
    ev.payload_len = 3;
    assert_int_equal(h.fn(&ev, t, h.arg), OQ_FAIL);
    assert_string_equal(oq_txn_error_text(t), "not a JSON object");
    oq__txn_reset(t);
    ev.payload = "{\"id\":\"1\",\"text\":\"a\tb\"}"; /* a raw tab */
    ev.payload_len = strlen(ev.payload);
    assert_int_equal(h.fn(&ev, t, h.arg), OQ_FAIL);
    assert_string_equal(oq_txn_error_text(t), "invalid JSON at byte 19: "
                        "control character in a string");
    oq__txn_free(t);
    oq__handler_free(&h);
}

/* ---------------------------------------------------------------- count */

static void test_count_string_field(void **state)
{
    staged s;

    assert_int_equal(run_spec("count:country",
                              "{\"id\":\"1\",\"country\":\"fr\"}", &s, NULL,
                              0), OQ_OK);
    assert_int_equal(s.ncount, 1);
    assert_string_equal(s.key[0], "fr");
    assert_int_equal(s.delta[0], 1);
}

static void test_count_non_string_values_as_json_text(void **state)
{
    static const struct {
        const char *line, *key;
    } cases[] = {
        { "{\"id\":\"1\",\"v\":42}", "42" },
        { "{\"id\":\"1\",\"v\":-1.5}", "-1.5" },
        { "{\"id\":\"1\",\"v\":true}", "true" },
        { "{\"id\":\"1\",\"v\":null}", "null" },
        { "{\"id\":\"1\",\"v\":[1, \"a\"]}", "[1,\"a\"]" },
        { "{\"id\":\"1\",\"v\":{ \"k\" : 1 }}", "{\"k\":1}" },
        /* Numbers are their text as written, not a double's. */
        { "{\"id\":\"1\",\"v\":9007199254740993}", "9007199254740993" },
        { "{\"id\":\"1\",\"v\":0.30000000000000004}", "0.30000000000000004" },
        { "{\"id\":\"1\",\"v\":1.50}", "1.50" },
        /* Strings inside are re-escaped canonically. */
        { "{\"id\":\"1\",\"v\":[\"\\u0041\\/\"]}", "[\"A/\"]" },
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        staged s;
        assert_int_equal(run_spec("count:v", cases[i].line, &s, NULL, 0),
                         OQ_OK);
        assert_int_equal(s.ncount, 1);
        assert_string_equal(s.key[0], cases[i].key);
    }
}

/* Words and count keys are byte strings with a length: an escaped NUL
 * does not cut them short. */
static void test_keys_with_nul(void **state)
{
    staged s;

    (void)state;
    assert_int_equal(run_spec("wordcount", "{\"id\":\"1\",\"word\":\"a\\u0000b\"}",
                              &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 1);
    assert_int_equal(s.key_len[0], 3);
    assert_memory_equal(s.key[0], "a\0b", 3);
    assert_int_equal(run_spec("wordcount",
                              "{\"id\":\"1\",\"text\":\"x\\u0000y z\\u0000\"}",
                              &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 2);
    assert_int_equal(s.key_len[0], 3);
    assert_memory_equal(s.key[0], "x\0y", 3);
    assert_int_equal(s.key_len[1], 2);
    assert_memory_equal(s.key[1], "z\0", 2);
    assert_int_equal(run_spec("count:c", "{\"id\":\"1\",\"c\":\"r\\u0000d\"}",
                              &s, NULL, 0), OQ_OK);
    assert_int_equal(s.key_len[0], 3);
    assert_memory_equal(s.key[0], "r\0d", 3);
}

static void test_count_json_pointer(void **state)
{
    oq__handler h;
    staged s;

    assert_int_equal(run_spec("count:/meta/type",
                              "{\"id\":\"1\",\"meta\":{\"type\":\"click\"}}",
                              &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 1);
    assert_string_equal(s.key[0], "click");
    /* The output's key name is FIELD without its leading '/'. */
    assert_int_equal(oq__handler_from_spec("count:/meta/type", NULL, &h,
                                           NULL, 0), 0);
    assert_string_equal(h.count_key, "meta/type");
    assert_int_equal(h.output, OQ__OUT_COUNTS);
    oq__handler_free(&h);
}

static void test_count_json_pointer_array_and_escapes(void **state)
{
    staged s;

    assert_int_equal(run_spec("count:/a~1b/1/c~0d",
                              "{\"id\":\"1\",\"a/b\":[{},{\"c~d\":\"hit\"}]}",
                              &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 1);
    assert_string_equal(s.key[0], "hit");
}

static void test_count_missing_field_fails(void **state)
{
    staged s;
    char err[512];

    assert_int_equal(run_spec("count:country", "{\"id\":\"1\",\"c\":\"fr\"}",
                              &s, err, sizeof(err)), OQ_FAIL);
    assert_int_equal(s.ncount, 0);
    assert_string_equal(err, "missing field 'country'");
    assert_int_equal(run_spec("count:/a/5", "{\"id\":\"1\",\"a\":[1]}", &s,
                              err, sizeof(err)), OQ_FAIL);
    assert_string_equal(err, "missing field 'a/5'");
}

/* ----------------------------------------------------------------- noop */

static void test_noop_stages_nothing(void **state)
{
    staged s;

    assert_int_equal(run_spec("noop", "{\"id\":\"1\"}", &s, NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 0);
    assert_int_equal(s.ncount, 0);
}

static void test_noop_emit_records_the_line(void **state)
{
    oq__handler_opts o = { .emit = true };
    const char *line = "{\"id\":\"1\", \"x\": [1, 2]}";
    staged s;

    assert_int_equal(run_spec_opts("noop", &o, line, &s, NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], line);
    assert_int_equal(s.ncount, 0);
    staged_free(&s);
}

/* ----------------------------------------------------------------- spec */

static void test_spec_kinds(void **state)
{
    static const struct {
        const char *spec, *name;
        int output;
        const char *count_key;
    } cases[] = {
        { "wordcount", "wordcount", OQ__OUT_COUNTS, "word" },
        { "count:country", "count", OQ__OUT_COUNTS, "country" },
        { "noop", "noop", OQ__OUT_RECORDS, NULL },
        { "exec:cat", "exec", OQ__OUT_RECORDS, NULL },
        { "exec:echo a:b", "exec", OQ__OUT_RECORDS, NULL },
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        oq__handler h;
        char err[256] = "";
        assert_int_equal(oq__handler_from_spec(cases[i].spec, NULL, &h, err,
                                               sizeof(err)), 0);
        assert_non_null(h.fn);
        assert_string_equal(h.name, cases[i].name);
        assert_int_equal(h.output, cases[i].output);
        if (cases[i].count_key)
            assert_string_equal(h.count_key, cases[i].count_key);
        oq__handler_free(&h);
    }
}

static void test_spec_errors(void **state)
{
    static const struct {
        const char *spec, *msg;
    } cases[] = {
        { "foo", "unknown handler 'foo' (expected wordcount, count:FIELD, "
                 "noop, exec:COMMAND, coproc:COMMAND or plugin:PATH.so)" },
        { "", "unknown handler '' (expected wordcount, count:FIELD, noop, "
              "exec:COMMAND, coproc:COMMAND or plugin:PATH.so)" },
        { "Exec:ls", "unknown handler 'Exec' (expected wordcount, "
                     "count:FIELD, noop, exec:COMMAND, coproc:COMMAND or "
                     "plugin:PATH.so)" },
        { "count", "handler 'count' needs a FIELD: count:FIELD" },
        { "count:", "handler 'count' needs a FIELD: count:FIELD" },
        { "exec:", "handler 'exec' needs a COMMAND: exec:COMMAND" },
        { "exec:  ", "handler 'exec' needs a COMMAND: exec:COMMAND" },
        { "plugin:", "handler 'plugin' needs a PATH.so: plugin:PATH.so" },
        { "noop:x", "handler 'noop' takes no argument (got 'noop:x')" },
        { "wordcount:", "handler 'wordcount' takes no argument (got "
                        "'wordcount:')" },
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        oq__handler h;
        char err[256] = "";
        assert_int_equal(oq__handler_from_spec(cases[i].spec, NULL, &h, err,
                                               sizeof(err)), OQ_EINVAL);
        assert_string_equal(err, cases[i].msg);
        assert_null(h.fn);
        oq__handler_free(&h); /* harmless on a failed spec */
    }
}

static void test_spec_allocation_failures(void **state)
{
    /* Each allocation failing in turn: OQ_ENOMEM and a message, nothing
     * leaked (ASan), until enough succeed. */
    char spec[160];
    const char *specs[] = { "count:/a/b~1c", "count:x", "exec:cat -u",
                            "exec:echo a; exit 3", spec };

    snprintf(spec, sizeof(spec), "plugin:%s/plugin_upper.so", plugin_dir);
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++) {
        for (long n = 0;; n++) {
            oq__handler h;
            char err[256] = "";
            int rc;
            oq__alloc_fail_after(n);
            rc = oq__handler_from_spec(specs[i], NULL, &h, err, sizeof(err));
            oq__alloc_fail_after(-1);
            if (rc == 0) {
                oq__handler_free(&h);
                break;
            }
            assert_int_equal(rc, OQ_ENOMEM);
            assert_string_equal(err, "out of memory");
            assert_null(h.fn);
            assert_true(n < 10000);
        }
    }
}

static void test_handler_allocation_failure_retries(void **state)
{
    oq__handler h;
    event e;
    oq_txn *t = oq__txn_new();

    assert_int_equal(oq__handler_from_spec("wordcount", NULL, &h, NULL, 0), 0);
    event_init(&e, "{\"id\":\"1\",\"text\":\"a b\"}");
    oq__alloc_fail_after(0);
    assert_int_equal(h.fn(&e.ev, t, h.arg), OQ_RETRY);
    oq__alloc_fail_after(-1);
    assert_string_equal(oq_txn_error_text(t), "out of memory");
    event_destroy(&e);
    oq__txn_free(t);
    oq__handler_free(&h);
}

/* ----------------------------------------------------------------- exec */

static const char *ev_line = "{\"id\":\"e1\",\"word\":\"hi\"}";

static void test_exec_stdout_is_the_record(void **state)
{
    staged s;

    assert_int_equal(run_spec("exec:tr a-z A-Z", ev_line, &s, NULL, 0),
                     OQ_OK);
    assert_int_equal(s.nrec, 1);
    /* The line went in with a newline; one trailing newline is stripped. */
    assert_string_equal(s.rec[0], "{\"ID\":\"E1\",\"WORD\":\"HI\"}");
    staged_free(&s);
    assert_no_children();
}

static void test_exec_empty_stdout_stages_nothing(void **state)
{
    staged s;

    assert_int_equal(run_spec("exec:true", ev_line, &s, NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 0);
    assert_no_children();
}

static void test_exec_environment(void **state)
{
    oq__handler h;
    event e;
    oq_txn *t = oq__txn_new();
    staged s;

    /* A stale ONCEQ_EVENT_ID in our environment must not reach the child. */
    setenv("ONCEQ_EVENT_ID", "stale", 1);
    setenv("OQ_TEST_PARENT_VAR", "inherited", 1);
    assert_int_equal(oq__handler_from_spec(
        "exec:printf %s \"$ONCEQ_EVENT_ID:$ONCEQ_ATTEMPT:$ONCEQ_RECEIPT:"
        "$OQ_TEST_PARENT_VAR\"", NULL, &h, NULL, 0), 0);
    unsetenv("ONCEQ_EVENT_ID");
    event_init(&e, ev_line);
    e.ev.attempt = 3;
    e.ev.receipt = 18446744073709551615u;
    assert_int_equal(h.fn(&e.ev, t, h.arg), OQ_OK);
    staged_of(t, &s);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], "e1:3:18446744073709551615:inherited");
    staged_free(&s);
    event_destroy(&e);
    oq__txn_free(t);
    oq__handler_free(&h);
}

static void test_exec_exit_75_retries(void **state)
{
    staged s;
    char err[512];

    assert_int_equal(run_spec("exec:echo out; echo busy >&2; exit 75",
                              ev_line, &s, err, sizeof(err)), OQ_RETRY);
    assert_int_equal(s.nrec, 0);
    assert_string_equal(err, "exit 75: busy");
    assert_no_children();
}

static void test_exec_exit_3_fails_with_stderr_tail(void **state)
{
    staged s;
    char err[512];

    assert_int_equal(run_spec("exec:echo partial; echo one >&2; "
                              "echo two >&2; exit 3",
                              ev_line, &s, err, sizeof(err)), OQ_FAIL);
    assert_int_equal(s.nrec, 0);
    assert_string_equal(err, "exit 3: one two");
    assert_int_equal(run_spec("exec:exit 9", ev_line, &s, err, sizeof(err)),
                     OQ_FAIL);
    assert_string_equal(err, "exit 9");
    assert_no_children();
}

static void test_exec_stderr_tail_keeps_the_end(void **state)
{
    staged s;
    char err[512];

    /* 3000 bytes of x, then END: the error keeps the last bytes only. */
    assert_int_equal(run_spec("exec:head -c 3000 /dev/zero | tr '\\0' x >&2;"
                              " echo END >&2; exit 1",
                              ev_line, &s, err, sizeof(err)), OQ_FAIL);
    assert_true(strncmp(err, "exit 1: xxx", 11) == 0);
    assert_true(strlen(err) <= 511);
    assert_true(strlen(err) >= 500);
    assert_string_equal(err + strlen(err) - 4, "xEND");
}

static void test_exec_unknown_command_fails(void **state)
{
    staged s;
    char err[512];

    assert_int_equal(run_spec("exec:no_such_command_oq", ev_line, &s, err,
                              sizeof(err)), OQ_FAIL);
    assert_true(strncmp(err, "exit 127: ", 10) == 0);
    assert_non_null(strstr(err, "not found"));
}

static void test_exec_killed_by_signal_fails(void **state)
{
    staged s;
    char err[512];

    assert_int_equal(run_spec("exec:echo dying >&2; kill -KILL $$", ev_line,
                              &s, err, sizeof(err)), OQ_FAIL);
    assert_string_equal(err, "killed by signal 9 (SIGKILL): dying");
    assert_int_equal(run_spec("exec:kill -SEGV $$", ev_line, &s, err,
                              sizeof(err)), OQ_FAIL);
    assert_string_equal(err, "killed by signal 11 (SIGSEGV)");
    assert_no_children();
}

/* The PPid line of the status a command printed. */
static long ppid_in(const char *status)
{
    const char *p = strstr(status, "\nPPid:");
    return p ? strtol(p + 6, NULL, 10) : -1;
}

static void test_exec_plain_command_runs_without_shell(void **state)
{
    staged s;

    /* Plain words: the program is our own child, no shell between. */
    assert_int_equal(run_spec("exec:cat /proc/self/status", ev_line, &s,
                              NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_int_equal(ppid_in(s.rec[0]), (long)getpid());
    staged_free(&s);
    /* Shell syntax (here a ';') keeps the shell. */
    assert_int_equal(run_spec("exec:cat /proc/self/status;", ev_line, &s,
                              NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_true(ppid_in(s.rec[0]) != (long)getpid());
    staged_free(&s);
    /* A shell builtin keeps the shell too: its exit status is the shell's. */
    assert_int_equal(run_spec("exec:exit 4", ev_line, &s, NULL, 0), OQ_FAIL);
    assert_no_children();
}

static void test_exec_plain_command_failures(void **state)
{
    staged s;
    char err[512];

    assert_int_equal(run_spec("exec:false", ev_line, &s, err, sizeof(err)),
                     OQ_FAIL);
    assert_string_equal(err, "exit 1");
    assert_int_equal(run_spec("exec:ls /nonexistent-oq", ev_line, &s, err,
                              sizeof(err)), OQ_FAIL);
    assert_true(strncmp(err, "exit 2: ls: cannot access", 25) == 0);
    assert_int_equal(run_spec("exec:no-such-program-oq --x", ev_line, &s,
                              err, sizeof(err)), OQ_FAIL);
    assert_true(strncmp(err, "exit 127: ", 10) == 0);
    assert_no_children();
}

static void test_exec_script_without_shebang_falls_back_to_shell(void **state)
{
    char path[] = "/tmp/oq_test_script_XXXXXX";
    char spec[64];
    int fd = mkstemp(path);
    staged s;

    assert_true(fd >= 0);
    assert_int_equal(write(fd, "echo from-script\n", 17), 17);
    close(fd);
    chmod(path, 0700);
    snprintf(spec, sizeof(spec), "exec:%s", path);
    assert_int_equal(run_spec(spec, ev_line, &s, NULL, 0), OQ_OK);
    unlink(path);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], "from-script");
    staged_free(&s);
    assert_no_children();
}

static void test_exec_status_kept_with_sigchld_ignored(void **state)
{
    struct sigaction ign = { .sa_handler = SIG_IGN }, old;
    staged s;
    char err[512];

    /* Ignored SIGCHLD would make the kernel reap the children itself. */
    sigemptyset(&ign.sa_mask);
    sigaction(SIGCHLD, &ign, &old);
    assert_int_equal(run_spec("exec:exit 3", ev_line, &s, err, sizeof(err)),
                     OQ_FAIL);
    assert_string_equal(err, "exit 3");
    sigaction(SIGCHLD, &old, NULL);
}

/* A line of n bytes: {"id":"big","text":"aaaa...a"}. */
static char *big_line(size_t n)
{
    char *line = malloc(n + 1);
    const char *head = "{\"id\":\"big\",\"text\":\"";

    memset(line, 'a', n);
    memcpy(line, head, strlen(head));
    memcpy(line + n - 2, "\"}", 2);
    line[n] = '\0';
    return line;
}

static void test_exec_megabyte_each_way(void **state)
{
    size_t n = 1u << 20;
    char *line = big_line(n);
    staged s;

    assert_int_equal(run_spec("exec:cat", line, &s, NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_int_equal(s.rec_len[0], n);
    assert_memory_equal(s.rec[0], line, n);
    staged_free(&s);
    free(line);
    assert_no_children();
}

static void test_exec_big_output_before_reading_input(void **state)
{
    /* The command writes 1 MB before it reads its 1 MB of input: with
     * blocking, sequential I/O both sides would wait on a full pipe. */
    size_t n = 1u << 20;
    char *line = big_line(n);
    staged s;

    assert_int_equal(run_spec("exec:head -c 1048576 /dev/zero | tr '\\0' b; "
                              "wc -c", line, &s, NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_int_equal(s.rec_len[0], n + strlen("1048577"));
    assert_int_equal(s.rec[0][0], 'b');
    assert_int_equal(s.rec[0][n - 1], 'b');
    assert_string_equal(s.rec[0] + n, "1048577");
    staged_free(&s);
    free(line);
}

static void test_exec_stdin_not_read(void **state)
{
    /* 256 KiB to a command that never reads: EPIPE, no SIGPIPE death, and
     * no SIGPIPE left pending on this thread. */
    char *line = big_line(256u << 10);
    sigset_t pending;
    staged s;

    assert_int_equal(run_spec("exec:echo ok", line, &s, NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], "ok");
    sigpending(&pending);
    assert_false(sigismember(&pending, SIGPIPE));
    staged_free(&s);
    free(line);
}

/* Is pid gone (no such process, or a zombie someone else will reap)? */
static bool process_gone(pid_t pid)
{
    char path[64], buf[256];
    FILE *f;
    char *p;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return true;
    p = fgets(buf, sizeof(buf), f);
    fclose(f);
    p = p ? strrchr(buf, ')') : NULL;
    return p == NULL || p[2] == 'Z' || p[2] == 'X';
}

static void timeout_case(const char *cmd, int64_t grace_ms, int64_t min_ms,
                         int64_t max_ms)
{
    oq__handler_opts o = { .kill_grace_ms = grace_ms };
    oq__handler h;
    event e;
    oq_txn *t = oq__txn_new();
    const oq_clock *clk = oq_clock_monotonic();
    char pidfile[] = "/tmp/oq_test_pid_XXXXXX";
    char spec[512];
    int64_t t0, took;
    pid_t grandchild = 0;
    FILE *f;
    int fd = mkstemp(pidfile);

    assert_true(fd >= 0);
    close(fd);
    /* The command records its background child's pid in pidfile. */
    snprintf(spec, sizeof(spec), "exec:sleep 30 & echo $! > %s; %s", pidfile,
             cmd);
    assert_int_equal(oq__handler_from_spec(spec, &o, &h, NULL, 0), 0);
    event_init(&e, ev_line);
    t0 = oq_clock_now(clk);
    e.ev.deadline_ms = t0 + 200;
    assert_int_equal(h.fn(&e.ev, t, h.arg), OQ_RETRY);
    took = oq_clock_now(clk) - t0;
    assert_string_equal(oq_txn_error_text(t),
                        "timed out at the attempt's deadline");
    assert_int_equal(oq_txn_nrecords(t), 0);
    if (took < min_ms || took > max_ms * time_mult())
        fail_msg("took %" PRId64 " ms, expected %" PRId64 "..%" PRId64, took,
                 min_ms, max_ms * time_mult());
    assert_no_children();
    /* The whole process group got the signals: the background sleep too. */
    f = fopen(pidfile, "r");
    assert_non_null(f);
    assert_int_equal(fscanf(f, "%d", &grandchild), 1);
    fclose(f);
    unlink(pidfile);
    for (int i = 0; i < 100 && !process_gone(grandchild); i++)
        usleep(10000);
    assert_true(process_gone(grandchild));
    event_destroy(&e);
    oq__txn_free(t);
    oq__handler_free(&h);
}

static void test_exec_timeout_sigterm(void **state)
{
    /* A plain sleep dies of SIGTERM at the deadline: well before the grace
     * period would end. */
    timeout_case("echo early; sleep 10", 5000, 190, 1500);
}

static void test_exec_timeout_sigkill_after_grace(void **state)
{
    timeout_case("trap '' TERM; echo early; sleep 10", 200, 390, 2000);
}

static void test_exec_deadline_already_passed(void **state)
{
    oq__handler h;
    event e;
    oq_txn *t = oq__txn_new();
    char marker[] = "/tmp/oq_test_marker_XXXXXX";
    char spec[128];
    int fd = mkstemp(marker);

    assert_true(fd >= 0);
    close(fd);
    unlink(marker);
    snprintf(spec, sizeof(spec), "exec:touch %s", marker);
    assert_int_equal(oq__handler_from_spec(spec, NULL, &h, NULL, 0), 0);
    event_init(&e, ev_line);
    e.ev.deadline_ms = oq_clock_now(e.ev.clock) - 1;
    assert_int_equal(h.fn(&e.ev, t, h.arg), OQ_RETRY);
    assert_string_equal(oq_txn_error_text(t),
                        "timed out at the attempt's deadline");
    /* Not even started. */
    assert_int_equal(access(marker, F_OK), -1);
    event_destroy(&e);
    oq__txn_free(t);
    oq__handler_free(&h);
}

static void *advance_later(void *arg)
{
    usleep(150 * 1000);
    oq_testclock_advance(arg, 1000);
    return NULL;
}

static void test_exec_deadline_read_from_event_clock(void **state)
{
    /* The deadline is on ev->clock: when a test clock passes it, the
     * command is timed out although little real time passed. */
    oq_testclock *tc = oq_testclock_new(1000);
    oq__handler_opts o = { .kill_grace_ms = 100 };
    oq__handler h;
    event e;
    oq_txn *t = oq__txn_new();
    int64_t t0, took;
    pthread_t th;

    assert_int_equal(oq__handler_from_spec("exec:sleep 10", &o, &h, NULL, 0),
                     0);
    event_init(&e, ev_line);
    e.ev.clock = oq_testclock_clock(tc);
    e.ev.deadline_ms = 1500;
    t0 = oq_clock_now(NULL);
    assert_int_equal(pthread_create(&th, NULL, advance_later, tc), 0);
    assert_int_equal(h.fn(&e.ev, t, h.arg), OQ_RETRY);
    took = oq_clock_now(NULL) - t0;
    pthread_join(th, NULL);
    assert_string_equal(oq_txn_error_text(t),
                        "timed out at the attempt's deadline");
    if (took < 140 || took > 1000 * time_mult())
        fail_msg("took %" PRId64 " ms", took);
    assert_no_children();
    event_destroy(&e);
    oq__txn_free(t);
    oq__handler_free(&h);
    oq_testclock_free(tc);
}


typedef struct call {
    oq__handler *h;
    oq_txn *t;
    int rc;
} call;

static void *call_sleep(void *arg)
{
    call *c = arg;
    event e;

    event_init(&e, ev_line);
    c->rc = c->h->fn(&e.ev, c->t, c->h->arg);
    event_destroy(&e);
    return NULL;
}

static void test_exec_cancel_stops_running_commands(void **state)
{
    oq__handler h;
    call c[2];
    pthread_t th[2];
    int64_t t0, took;

    assert_int_equal(oq__handler_from_spec("exec:sleep 10", NULL, &h, NULL,
                                           0), 0);
    for (int i = 0; i < 2; i++) {
        c[i] = (call){ &h, oq__txn_new(), -1 };
        assert_int_equal(pthread_create(&th[i], NULL, call_sleep, &c[i]), 0);
    }
    usleep(200 * 1000);
    t0 = oq_clock_now(NULL);
    oq__handler_cancel(&h);
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        /* A retry that is not an attempt (the engine knows it). */
        assert_int_equal(c[i].rc, OQ__CANCELLED);
        assert_string_equal(oq_txn_error_text(c[i].t),
                            "cancelled: onceq is stopping");
        assert_int_equal(oq_txn_nrecords(c[i].t), 0);
    }
    took = oq_clock_now(NULL) - t0;
    if (took > 1000 * time_mult())
        fail_msg("cancel took %" PRId64 " ms", took);
    assert_no_children();
    /* Later calls do not start the command. */
    c[0].rc = -1;
    oq__txn_reset(c[0].t);
    t0 = oq_clock_now(NULL);
    call_sleep(&c[0]);
    assert_int_equal(c[0].rc, OQ__CANCELLED);
    assert_true(oq_clock_now(NULL) - t0 < 100 * time_mult());
    for (int i = 0; i < 2; i++)
        oq__txn_free(c[i].t);
    oq__handler_free(&h);
}

/* Several threads spawn at once; each must read only its own child's
 * output, and a leaked pipe end would show as a missing EOF (a hang) or
 * as fds left open. */
typedef struct spawner {
    oq__handler *h;
    int id;
    int ok;
} spawner;

/* The fds a child may hold: 0, 1, 2, and those this test process itself
 * inherited without close-on-exec (from whatever started it). */
static bool fd_allowed[1024];
static int nfd_allowed;

static void allowed_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;

    memset(fd_allowed, 0, sizeof(fd_allowed));
    nfd_allowed = 0;
    assert_non_null(d);
    while ((de = readdir(d)) != NULL) {
        int fd = atoi(de->d_name);
        int fl;
        if (de->d_name[0] == '.' || fd == dirfd(d) || fd >= 1024)
            continue;
        fl = fcntl(fd, F_GETFD);
        if (fd <= 2 || (fl >= 0 && !(fl & FD_CLOEXEC))) {
            fd_allowed[fd] = true;
            nfd_allowed++;
        }
    }
    closedir(d);
    /* The heartbeat pipe, ONCEQ_HEARTBEAT_FD. */
    if (!fd_allowed[3]) {
        fd_allowed[3] = true;
        nfd_allowed++;
    }
}

/* The child's fd list ("0\n1\n2...", no pipeline: a shell holds pipe
 * fds while it runs one) holds exactly the allowed fds. */
static bool fds_as_allowed(const char *list)
{
    int n = 0;

    for (char *end; *list; list = end) {
        long fd = strtol(list, &end, 10);
        if (end == list)
            return false;
        while (*end == ' ' || *end == '\n')
            end++;
        if (fd < 0 || fd >= 1024 || !fd_allowed[fd])
            return false;
        n++;
    }
    return n == nfd_allowed;
}

#define SPAWN_THREADS 4
#define SPAWN_RUNS 40

static void *spawn_loop(void *arg)
{
    spawner *sp = arg;
    oq_txn *t = oq__txn_new();

    for (int i = 0; i < SPAWN_RUNS; i++) {
        char line[128], want[160];
        oq_event ev = { 0 };
        staged s;
        snprintf(line, sizeof(line), "{\"id\":\"t%d-%d\",\"n\":%d}", sp->id,
                 i, i);
        ev.id = line + 7;
        ev.id_len = strchr(ev.id, '"') - ev.id;
        ev.payload = line;
        ev.payload_len = strlen(line);
        ev.attempt = 1;
        ev.receipt = (uint64_t)sp->id * 1000 + (uint64_t)i;
        ev.clock = oq_clock_monotonic();
        ev.deadline_ms = oq_clock_now(ev.clock) + 60000;
        oq__txn_reset(t);
        if (sp->h->fn(&ev, t, sp->h->arg) != OQ_OK)
            return NULL;
        staged_of(t, &s);
        snprintf(want, sizeof(want), "%s %.*s %" PRIu64 "|", line,
                 (int)ev.id_len, ev.id, ev.receipt);
        if (s.nrec != 1 || strncmp(s.rec[0], want, strlen(want)) != 0 ||
            !fds_as_allowed(s.rec[0] + strlen(want))) {
            fprintf(stderr, "thread %d run %d: got '%s'\n", sp->id, i,
                    s.nrec ? s.rec[0] : "(nothing)");
            staged_free(&s);
            return NULL;
        }
        staged_free(&s);
        sp->ok++;
    }
    oq__txn_free(t);
    return NULL;
}

static void test_exec_concurrent_spawns(void **state)
{
    oq__handler h;
    spawner sp[SPAWN_THREADS];
    pthread_t th[SPAWN_THREADS];
    int fds_before;

    assert_int_equal(oq__handler_from_spec(
        "exec:read -r l; printf '%s %s %s|' \"$l\" \"$ONCEQ_EVENT_ID\" "
        "\"$ONCEQ_RECEIPT\"; ls /proc/$$/fd", NULL, &h, NULL, 0), 0);
    allowed_fds();
    fds_before = count_fds(); /* with the handler's own eventfd */
    for (int i = 0; i < SPAWN_THREADS; i++) {
        sp[i] = (spawner){ &h, i, 0 };
        assert_int_equal(pthread_create(&th[i], NULL, spawn_loop, &sp[i]), 0);
    }
    for (int i = 0; i < SPAWN_THREADS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(sp[i].ok, SPAWN_RUNS);
    }
    assert_int_equal(count_fds(), fds_before);
    assert_no_children();
    oq__handler_free(&h);
}

/* --------------------------------------------------------------- coproc */

/* A co-process that prints each event's "r" member as its reply line,
 * with PID replaced by its process id. */
#define CO_REPLY "coproc:python3 -c 'import sys, json, os\n" \
    "for l in sys.stdin:\n" \
    "    r = json.loads(l)[\"event\"][\"r\"]\n" \
    "    print(r.replace(\"PID\", str(os.getpid())), flush=True)'"

/* Calls h once on {"id":ID,"r":REPLY} (REPLY as a JSON string). */
static int co_call(oq__handler *h, const char *reply, staged *s, char *err,
                   size_t errlen, int64_t deadline_ms)
{
    oq_txn *t = oq__txn_new();
    oq__buf b = { 0 };
    event e;
    int rc;

    assert_int_equal(oq__buf_add(&b, "{\"id\":\"e\",\"r\":", 14), 0);
    assert_int_equal(oq__json_quote(&b, reply, strlen(reply)), 0);
    assert_int_equal(oq__buf_add(&b, "}", 2), 0); /* with the NUL */
    event_init(&e, b.data);
    if (deadline_ms > 0)
        e.ev.deadline_ms = oq_clock_now(e.ev.clock) + deadline_ms;
    rc = h->fn(&e.ev, t, h->arg);
    staged_of(t, s);
    snprintf(err, errlen, "%s", oq_txn_error_text(t));
    event_destroy(&e);
    oq__txn_free(t);
    oq__buf_free(&b);
    return rc;
}

static void test_coproc_replies(void **state)
{
    static const struct {
        const char *reply;
        int rc;
        const char *record; /* NULL: none */
        const char *error;  /* a prefix; NULL: not checked */
    } cases[] = {
        { "{\"status\":\"ok\",\"output\":{\"b\": [1, 2.50]}}", OQ_OK,
          "{\"b\":[1,2.50]}", NULL },
        { "{\"status\":\"ok\",\"output\":\"caf\\u00e9\"}", OQ_OK,
          "\"caf\xc3\xa9\"", NULL },
        { "{\"status\":\"ok\"}", OQ_OK, NULL, NULL },
        { "{\"status\":\"ok\",\"output\":null,\"x\":1}", OQ_OK, NULL, NULL },
        { "{\"status\":\"retry\",\"error\":\"busy\"}", OQ_RETRY, NULL,
          "busy" },
        { "{\"status\":\"fail\",\"error\":{\"code\": 3}}", OQ_FAIL, NULL,
          "{\"code\":3}" },
        { "{\"status\":\"fail\"}", OQ_FAIL, NULL, "co-process answered fail" },
        { "  {\"status\":\"ok\",\"output\":7}  \r", OQ_OK, "7", NULL },
    };
    oq__handler h;
    staged s;
    char err[512];

    assert_int_equal(oq__handler_from_spec(CO_REPLY, NULL, &h, err,
                                           sizeof(err)), 0);
    assert_string_equal(h.name, "coproc");
    assert_int_equal(h.output, OQ__OUT_RECORDS);
    assert_false(h.never_blocks);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = co_call(&h, cases[i].reply, &s, err, sizeof(err), 0);
        if (rc != cases[i].rc)
            fail_msg("reply %s: rc %d, want %d (%s)", cases[i].reply, rc,
                     cases[i].rc, err);
        assert_int_equal(s.nrec, cases[i].record ? 1 : 0);
        if (cases[i].record)
            assert_string_equal(s.rec[0], cases[i].record);
        if (cases[i].error &&
            strncmp(err, cases[i].error, strlen(cases[i].error)) != 0)
            fail_msg("reply %s: error '%s', want '%s'", cases[i].reply, err,
                     cases[i].error);
        staged_free(&s);
    }
    oq__handler_free(&h);
    assert_no_children();
}

/* A reply that is not one restarts the child: a retry, nothing staged, and
 * the next event meets a new process. */
static void test_coproc_invalid_reply_restarts(void **state)
{
    static const char *const bad[] = {
        "not json", "{\"status\":\"maybe\"}", "[1]", "{\"status\":1}",
        "{\"status\":\"ok\",\"status\":\"ok\"}", "{\"status\":\"ok\",\"output\":01}",
        "{\"output\":1}", "",
    };
    oq__handler h;
    staged s;
    char err[512], pid[32];

    assert_int_equal(oq__handler_from_spec(CO_REPLY, NULL, &h, err,
                                           sizeof(err)), 0);
    assert_int_equal(co_call(&h, "{\"status\":\"ok\",\"output\":PID}", &s,
                             err, sizeof(err), 0), OQ_OK);
    snprintf(pid, sizeof(pid), "%s", s.rec[0]);
    staged_free(&s);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(co_call(&h, bad[i], &s, err, sizeof(err), 0),
                         OQ_RETRY);
        assert_int_equal(s.nrec, 0);
        if (strstr(err, "invalid reply") == NULL)
            fail_msg("reply '%s': error '%s'", bad[i], err);
        assert_int_equal(co_call(&h, "{\"status\":\"ok\",\"output\":PID}", &s,
                                 err, sizeof(err), 0), OQ_OK);
        if (strcmp(pid, s.rec[0]) == 0)
            fail_msg("reply '%s': same child %s after it", bad[i], pid);
        snprintf(pid, sizeof(pid), "%s", s.rec[0]);
        staged_free(&s);
    }
    oq__handler_free(&h);
    assert_no_children();
}

/* The child is kept between events; one that exits after each answer, or
 * without answering, is restarted; the event it held is retried. */
static void test_coproc_child_kept_and_restarted(void **state)
{
    oq__handler h;
    staged s;
    char err[512], first[32];

    assert_int_equal(oq__handler_from_spec(CO_REPLY, NULL, &h, NULL, 0), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(co_call(&h, "{\"status\":\"ok\",\"output\":PID}",
                                 &s, err, sizeof(err), 0), OQ_OK);
        if (i == 0)
            snprintf(first, sizeof(first), "%s", s.rec[0]);
        assert_string_equal(s.rec[0], first);
        staged_free(&s);
    }
    oq__handler_free(&h);

    /* Answers once, then exits: a fresh child for the next call (which
     * may meet the old one still exiting: then it is retried). */
    assert_int_equal(oq__handler_from_spec(
        "coproc:read l; echo '{\"status\":\"ok\",\"output\":1}'", NULL, &h,
        NULL, 0), 0);
    for (int i = 0, ok = 0; ok < 3; i++) {
        int rc = co_call(&h, "", &s, err, sizeof(err), 0);
        assert_true(i < 10);
        if (rc == OQ_OK) {
            assert_int_equal(s.nrec, 1);
            ok++;
        } else {
            assert_int_equal(rc, OQ_RETRY);
            assert_int_equal(s.nrec, 0);
            assert_non_null(strstr(err, "restarted for the next event"));
        }
        staged_free(&s);
    }
    oq__handler_free(&h);

    /* Exits without answering. */
    assert_int_equal(oq__handler_from_spec("coproc:read l; exit 3", NULL, &h,
                                           NULL, 0), 0);
    assert_int_equal(co_call(&h, "", &s, err, sizeof(err), 0), OQ_RETRY);
    assert_int_equal(s.nrec, 0);
    assert_string_equal(err, "co-process exited or closed its stdout "
                             "(exit 3); restarted for the next event");
    oq__handler_free(&h);
    assert_no_children();
}

/* A child that does not answer by the deadline is stopped (SIGTERM, or
 * SIGKILL after the grace when it ignores SIGTERM) and the event retried. */
static void coproc_timeout_case(const char *spec, int64_t grace_ms,
                                int64_t min_ms, int64_t max_ms)
{
    oq__handler_opts o = { .kill_grace_ms = grace_ms };
    oq__handler h;
    staged s;
    char err[512];
    int64_t t0, took;

    assert_int_equal(oq__handler_from_spec(spec, &o, &h, NULL, 0), 0);
    t0 = oq_clock_now(NULL);
    assert_int_equal(co_call(&h, "", &s, err, sizeof(err), 150), OQ_RETRY);
    took = oq_clock_now(NULL) - t0;
    assert_int_equal(s.nrec, 0);
    assert_string_equal(err, "timed out at the attempt's deadline; co-process "
                             "restarted for the next event");
    if (took < min_ms || took > max_ms * time_mult())
        fail_msg("took %" PRId64 " ms, want %" PRId64 "..%" PRId64, took,
                 min_ms, max_ms);
    assert_no_children();
    oq__handler_free(&h);
}

static void test_coproc_timeout_sigterm(void **state)
{
    coproc_timeout_case("coproc:while read l; do sleep 10; done", 5000, 140,
                        1500);
}

static void test_coproc_timeout_sigkill_after_grace(void **state)
{
    coproc_timeout_case("coproc:trap '' TERM; while read l; do sleep 10; "
                        "done", 200, 340, 2000);
}

typedef struct co_thread {
    oq__handler *h;
    int calls;
    int rc;
    char first[32];
    bool same;
} co_thread;

static void *co_thread_main(void *arg)
{
    co_thread *c = arg;
    staged s;
    char err[512];

    c->same = true;
    for (int i = 0; i < c->calls; i++) {
        c->rc = co_call(c->h, "{\"status\":\"ok\",\"output\":PID}", &s, err,
                        sizeof(err), 0);
        if (c->rc != OQ_OK || s.nrec != 1) {
            c->rc = -1;
            staged_free(&s);
            break;
        }
        if (i == 0)
            snprintf(c->first, sizeof(c->first), "%s", s.rec[0]);
        c->same &= strcmp(c->first, s.rec[0]) == 0;
        staged_free(&s);
    }
    return NULL;
}

/* Each thread has its own child, kept across its calls; a thread's end
 * ends its child (no zombie, no descriptor left). */
static void test_coproc_one_child_per_thread(void **state)
{
    oq__handler h;
    co_thread c[4];
    pthread_t th[4];
    int fds = count_fds();

    assert_int_equal(oq__handler_from_spec(CO_REPLY, NULL, &h, NULL, 0), 0);
    for (int i = 0; i < 4; i++) {
        c[i] = (co_thread){ .h = &h, .calls = 20 };
        assert_int_equal(pthread_create(&th[i], NULL, co_thread_main, &c[i]),
                         0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(c[i].rc, OQ_OK);
        assert_true(c[i].same);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(c[i].first, c[j].first);
    }
    assert_no_children();
    assert_int_equal(count_fds(), fds + 1); /* the cancel eventfd */
    oq__handler_free(&h);
    assert_int_equal(count_fds(), fds);
}

static void *co_hang(void *arg)
{
    co_thread *c = arg;
    staged s;
    char err[512];

    c->rc = co_call(c->h, "", &s, err, sizeof(err), 0);
    staged_free(&s);
    return NULL;
}

/* Cancel stops running calls at once; free ends the idle children. */
static void test_coproc_cancel_and_free(void **state)
{
    oq__handler h;
    co_thread c[2];
    pthread_t th[2];
    staged s;
    char err[512];
    int64_t t0;

    assert_int_equal(oq__handler_from_spec(
        "coproc:while read l; do sleep 10; done", NULL, &h, NULL, 0), 0);
    for (int i = 0; i < 2; i++) {
        c[i] = (co_thread){ .h = &h, .rc = -1 };
        assert_int_equal(pthread_create(&th[i], NULL, co_hang, &c[i]), 0);
    }
    usleep(300 * 1000);
    t0 = oq_clock_now(NULL);
    oq__handler_cancel(&h);
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(c[i].rc, OQ__CANCELLED);
    }
    assert_true(oq_clock_now(NULL) - t0 < 1000 * time_mult());
    assert_no_children();
    assert_int_equal(co_call(&h, "", &s, err, sizeof(err), 0),
                     OQ__CANCELLED);
    assert_string_equal(err, "cancelled: onceq is stopping");
    oq__handler_free(&h);

    /* An idle child of a thread that is still alive ends with free. */
    assert_int_equal(oq__handler_from_spec(CO_REPLY, NULL, &h, NULL, 0), 0);
    assert_int_equal(co_call(&h, "{\"status\":\"ok\"}", &s, err, sizeof(err),
                             0), OQ_OK);
    oq__handler_free(&h);
    assert_no_children();
}

/* The request: {"id":ID,"attempt":N,"event":EVENT}, the id as a JSON
 * string whatever its bytes (NUL escaped, invalid UTF-8 as U+FFFD). */
static void test_coproc_request_line(void **state)
{
    oq__handler h;
    oq_txn *t = oq__txn_new();
    staged s;
    event e;

    assert_int_equal(oq__handler_from_spec(
        "coproc:while IFS= read -r l; do "
        "printf '{\"status\":\"ok\",\"output\":%s}\\n' \"$l\"; done",
        NULL, &h, NULL, 0), 0);
    event_init(&e, "{\"id\":\"x\\u0000y\", \"n\":1.50}");
    e.ev.attempt = 3;
    assert_int_equal(h.fn(&e.ev, t, h.arg), OQ_OK);
    staged_of(t, &s);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], "{\"id\":\"x\\u0000y\",\"attempt\":3,"
                                  "\"event\":{\"id\":\"x\\u0000y\",\"n\":1.50}}");
    staged_free(&s);
    /* An id of raw bytes (the library takes any). */
    oq__txn_reset(t);
    e.ev.id = "a\xff" "b";
    e.ev.id_len = 3;
    assert_int_equal(h.fn(&e.ev, t, h.arg), OQ_OK);
    staged_of(t, &s);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], "{\"id\":\"a\xef\xbf\xbd" "b\",\"attempt\":3,"
                                  "\"event\":{\"id\":\"x\\u0000y\",\"n\":1.50}}");
    staged_free(&s);
    event_destroy(&e);
    oq__txn_free(t);
    oq__handler_free(&h);
}

/* stderr goes to ours, line by line, "[coproc N] " before each line. */
static void test_coproc_stderr_prefixed(void **state)
{
    char path[] = "/tmp/oq_test_stderr_XXXXXX", got[256];
    int fd = mkstemp(path), saved = dup(2);
    oq__handler h;
    staged s;
    char err[512];
    ssize_t n;

    assert_true(fd >= 0 && saved >= 0);
    assert_int_equal(oq__handler_from_spec(
        "coproc:while read l; do printf 'one\\ntw' >&2; printf 'o\\n' >&2; "
        "echo '{\"status\":\"ok\"}'; done; printf 'bye' >&2", NULL, &h, NULL,
        0), 0);
    fflush(stderr);
    dup2(fd, 2);
    assert_int_equal(co_call(&h, "", &s, err, sizeof(err), 0), OQ_OK);
    oq__handler_free(&h);
    dup2(saved, 2);
    close(saved);
    n = pread(fd, got, sizeof(got) - 1, 0);
    assert_true(n >= 0);
    got[n] = '\0';
    assert_string_equal(got, "[coproc 1] one\n[coproc 1] two\n"
                             "[coproc 1] bye\n");
    close(fd);
    unlink(path);
}

/* --------------------------------------------------------------- plugin */

static const char *cc(void)
{
    const char *c = getenv("CC");
    return c && *c ? c : "cc";
}

/* Compiles src (a file) into plugin_dir/name; false if no compiler. */
static bool build_so(const char *src, const char *name)
{
    char cmd[1024];

    snprintf(cmd, sizeof(cmd), "%s -shared -fPIC -Iinclude -o %s/%s %s",
             cc(), plugin_dir, name, src);
    return system(cmd) == 0;
}

static const char *counting_plugin =
    "#include \"onceq.h\"\n"
    "#include <stdlib.h>\n"
    "int oq_plugin_output = 0;\n"
    "const char *oq_plugin_count_key = \"ctx\";\n"
    "int oq_plugin_init(void **arg) { *arg = (void *)\"ctx\"; return 0; }\n"
    "void oq_plugin_fini(void *arg) { setenv(\"OQ_TEST_FINI\", arg, 1); }\n"
    "int oq_plugin_handle(const oq_event *ev, oq_txn *txn, void *arg)\n"
    "{ (void)ev; return oq_txn_count(txn, arg, 3, 1) ? OQ_RETRY : OQ_OK; }\n";

static const char *no_symbol_plugin = "int not_the_handler(void);\n"
                                      "int not_the_handler(void) { return 0; }\n";

static int plugin_setup(void **state)
{
    char src[128];
    FILE *f;

    snprintf(plugin_dir, sizeof(plugin_dir), "/tmp/oq_test_plugin_XXXXXX");
    if (mkdtemp(plugin_dir) == NULL)
        return -1;
    if (access("examples/plugin_upper.c", R_OK) != 0 ||
        !build_so("examples/plugin_upper.c", "plugin_upper.so")) {
        fprintf(stderr, "cannot build examples/plugin_upper.c with %s (run "
                        "from the repository root)\n", cc());
        return -1;
    }
    snprintf(src, sizeof(src), "%s/counting.c", plugin_dir);
    f = fopen(src, "w");
    fputs(counting_plugin, f);
    fclose(f);
    if (!build_so(src, "counting.so"))
        return -1;
    snprintf(src, sizeof(src), "%s/nosym.c", plugin_dir);
    f = fopen(src, "w");
    fputs(no_symbol_plugin, f);
    fclose(f);
    if (!build_so(src, "nosym.so"))
        return -1;
    return 0;
}

static int plugin_teardown(void **state)
{
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf %s", plugin_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_plugin_upper(void **state)
{
    char spec[128];
    staged s;

    snprintf(spec, sizeof(spec), "plugin:%s/plugin_upper.so", plugin_dir);
    assert_int_equal(run_spec(spec, "{\"id\":\"e1\",\"word\":\"hello\"}", &s,
                              NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], "{\"id\":\"e1\",\"upper\":\"HELLO\"}");
    staged_free(&s);
}

static void test_plugin_upper_escapes_and_nesting(void **state)
{
    char spec[128];
    staged s;

    snprintf(spec, sizeof(spec), "plugin:%s/plugin_upper.so", plugin_dir);
    /* "word" inside a nested object or a string value is not the field. */
    assert_int_equal(run_spec(spec,
                              "{\"meta\":{\"word\":\"no\"},\"note\":\"\\\""
                              "word\\\": no\",\"id\":\"e\\\"2\",\"text\":"
                              "\"caf\\u00e9 ok\\n\"}", &s, NULL, 0), OQ_OK);
    assert_int_equal(s.nrec, 1);
    assert_string_equal(s.rec[0], "{\"id\":\"e\\\"2\",\"upper\":"
                                  "\"CAF\\u00e9 OK\\n\"}");
    staged_free(&s);
}

static void test_plugin_upper_without_field_fails(void **state)
{
    char spec[128], err[512];
    staged s;

    snprintf(spec, sizeof(spec), "plugin:%s/plugin_upper.so", plugin_dir);
    assert_int_equal(run_spec(spec, "{\"id\":\"e1\",\"n\":1}", &s, err,
                              sizeof(err)), OQ_FAIL);
    assert_int_equal(s.nrec, 0);
    assert_string_equal(err, "no 'word' or 'text' string field");
}

static void test_plugin_init_fini_and_counts(void **state)
{
    oq__handler h;
    char spec[128];
    staged s;

    unsetenv("OQ_TEST_FINI");
    snprintf(spec, sizeof(spec), "plugin:%s/counting.so", plugin_dir);
    assert_int_equal(oq__handler_from_spec(spec, NULL, &h, NULL, 0), 0);
    assert_int_equal(h.output, OQ__OUT_COUNTS);
    assert_string_equal(h.count_key, "ctx");
    assert_string_equal(h.name, "plugin");
    oq__handler_free(&h);
    assert_non_null(getenv("OQ_TEST_FINI"));
    assert_int_equal(run_spec(spec, ev_line, &s, NULL, 0), OQ_OK);
    assert_int_equal(s.ncount, 1);
    assert_string_equal(s.key[0], "ctx");
}

static void test_plugin_missing_file(void **state)
{
    oq__handler h;
    char err[512] = "";

    assert_int_equal(oq__handler_from_spec("plugin:/nonexistent/x.so", NULL,
                                           &h, err, sizeof(err)), OQ_EINVAL);
    assert_true(strncmp(err, "cannot load plugin: /nonexistent/x.so", 37) == 0);
    assert_null(h.fn);
    /* A bare name is a file in the current directory. */
    assert_int_equal(oq__handler_from_spec("plugin:oq_nope.so", NULL, &h,
                                           err, sizeof(err)), OQ_EINVAL);
    assert_non_null(strstr(err, "./oq_nope.so"));
}

static void test_plugin_missing_symbol(void **state)
{
    oq__handler h;
    char spec[128], err[512] = "";

    snprintf(spec, sizeof(spec), "plugin:%s/nosym.so", plugin_dir);
    assert_int_equal(oq__handler_from_spec(spec, NULL, &h, err, sizeof(err)),
                     OQ_EINVAL);
    assert_non_null(strstr(err, "oq_plugin_handle"));
    assert_null(h.fn);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wordcount_word),
        cmocka_unit_test(test_wordcount_text_splits_on_ascii_whitespace),
        cmocka_unit_test(test_wordcount_word_wins_over_text),
        cmocka_unit_test(test_wordcount_neither_fails),
        cmocka_unit_test(test_wordcount_without_decode_hook),
        cmocka_unit_test(test_count_string_field),
        cmocka_unit_test(test_count_non_string_values_as_json_text),
        cmocka_unit_test(test_keys_with_nul),
        cmocka_unit_test(test_count_json_pointer),
        cmocka_unit_test(test_count_json_pointer_array_and_escapes),
        cmocka_unit_test(test_count_missing_field_fails),
        cmocka_unit_test(test_noop_stages_nothing),
        cmocka_unit_test(test_noop_emit_records_the_line),
        cmocka_unit_test(test_spec_kinds),
        cmocka_unit_test(test_spec_errors),
        cmocka_unit_test(test_spec_allocation_failures),
        cmocka_unit_test(test_handler_allocation_failure_retries),
        cmocka_unit_test(test_exec_stdout_is_the_record),
        cmocka_unit_test(test_exec_empty_stdout_stages_nothing),
        cmocka_unit_test(test_exec_environment),
        cmocka_unit_test(test_exec_exit_75_retries),
        cmocka_unit_test(test_exec_exit_3_fails_with_stderr_tail),
        cmocka_unit_test(test_exec_stderr_tail_keeps_the_end),
        cmocka_unit_test(test_exec_unknown_command_fails),
        cmocka_unit_test(test_exec_killed_by_signal_fails),
        cmocka_unit_test(test_exec_plain_command_runs_without_shell),
        cmocka_unit_test(test_exec_plain_command_failures),
        cmocka_unit_test(test_exec_script_without_shebang_falls_back_to_shell),
        cmocka_unit_test(test_exec_status_kept_with_sigchld_ignored),
        cmocka_unit_test(test_exec_megabyte_each_way),
        cmocka_unit_test(test_exec_big_output_before_reading_input),
        cmocka_unit_test(test_exec_stdin_not_read),
        cmocka_unit_test(test_exec_timeout_sigterm),
        cmocka_unit_test(test_exec_timeout_sigkill_after_grace),
        cmocka_unit_test(test_exec_deadline_already_passed),
        cmocka_unit_test(test_exec_deadline_read_from_event_clock),
        cmocka_unit_test(test_exec_cancel_stops_running_commands),
        cmocka_unit_test(test_exec_concurrent_spawns),
        cmocka_unit_test(test_coproc_replies),
        cmocka_unit_test(test_coproc_invalid_reply_restarts),
        cmocka_unit_test(test_coproc_child_kept_and_restarted),
        cmocka_unit_test(test_coproc_timeout_sigterm),
        cmocka_unit_test(test_coproc_timeout_sigkill_after_grace),
        cmocka_unit_test(test_coproc_one_child_per_thread),
        cmocka_unit_test(test_coproc_cancel_and_free),
        cmocka_unit_test(test_coproc_request_line),
        cmocka_unit_test(test_coproc_stderr_prefixed),
        cmocka_unit_test(test_plugin_upper),
        cmocka_unit_test(test_plugin_upper_escapes_and_nesting),
        cmocka_unit_test(test_plugin_upper_without_field_fails),
        cmocka_unit_test(test_plugin_init_fini_and_counts),
        cmocka_unit_test(test_plugin_missing_file),
        cmocka_unit_test(test_plugin_missing_symbol),
    };

    return cmocka_run_group_tests(tests, plugin_setup, plugin_teardown);
}
