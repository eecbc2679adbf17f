/*
 * Description: unit tests of the SQLite store (src/store.c): the schema is
 * created on first use and checked on open (a file that is not ours, or of
 * another schema version, is refused with a message, never a crash); a batch
 * writes processed ids, outputs, aggregates, dead letters and sources that
 * read back as written; a failed commit keeps nothing of its batch; the
 * tracker's watermark covers exactly the settled prefix of a file.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "oq_cli.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[] = "/tmp/onceq-test-store-XXXXXX";

static const char *tmp_path(const char *name)
{
    static char p[256];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    return p;
}

static oq__store *open_new(const char *name)
{
    char err[600] = "";
    oq__store *st = NULL;
    const char *p = tmp_path(name);

    unlink(p);
    assert_int_equal(oq__store_open(&st, p, OQ__STORE_CREATE, OQ__SYNC_OFF,
                                    err, sizeof(err)), 0);
    return st;
}

/* Opens name expecting failure; returns the message. */
static const char *open_fails(const char *name, int want_rc)
{
    static char err[600];
    oq__store *st = NULL;

    assert_int_equal(oq__store_open(&st, tmp_path(name), OQ__STORE_CREATE,
                                    OQ__SYNC_OFF, err, sizeof(err)), want_rc);
    assert_null(st);
    assert_null(strchr(err, '\n'));
    return err;
}

static void write_file(const char *name, const void *data, size_t n)
{
    FILE *f = fopen(tmp_path(name), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void sql(const char *name, const char *stmt)
{
    sqlite3 *db;
    assert_int_equal(sqlite3_open(tmp_path(name), &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, stmt, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
}

/* ---------------------------------------------------------- open */

static void test_create_then_reopen_keeps_meta(void **state)
{
    char err[600], buf[64];
    oq__store *st = open_new("meta.db");

    assert_int_equal(oq__store_meta_set(st, "handler", "wordcount"), 0);
    oq__store_close(st);
    assert_int_equal(oq__store_open(&st, tmp_path("meta.db"), 0,
                                    OQ__SYNC_FULL, err, sizeof(err)), 0);
    assert_int_equal(oq__store_meta_get(st, "handler", buf, sizeof(buf)), 0);
    assert_string_equal(buf, "wordcount");
    assert_int_equal(oq__store_meta_get(st, "nope", buf, sizeof(buf)),
                     OQ_ENOENT);
    oq__store_close(st);
}

static void test_open_missing_without_create(void **state)
{
    char err[600];
    oq__store *st = NULL;

    assert_int_equal(oq__store_open(&st, tmp_path("missing.db"), 0,
                                    OQ__SYNC_FULL, err, sizeof(err)),
                     OQ_ENOENT);
    assert_non_null(strstr(err, "no state file"));
    assert_int_equal(access(tmp_path("missing.db"), F_OK), -1);
}

static void test_other_schema_version_is_refused(void **state)
{
    oq__store_close(open_new("ver.db"));
    sql("ver.db", "PRAGMA user_version = 99");
    assert_non_null(strstr(open_fails("ver.db", OQ_EINVAL), "version 99"));
}

static void test_random_bytes_are_not_a_state_file(void **state)
{
    unsigned char junk[8192];
    uint64_t rng = 42;

    for (size_t i = 0; i < sizeof(junk); i++)
        junk[i] = (unsigned char)oq__splitmix64(&rng);
    write_file("junk.db", junk, sizeof(junk));
    assert_non_null(strstr(open_fails("junk.db", OQ_EIO),
                           "not an onceq state file"));
}

static void test_text_file_is_not_a_state_file(void **state)
{
    static const char text[] = "{\"id\":\"1\"}\nthis is not a database\n";

    write_file("text.db", text, sizeof(text) - 1);
    assert_non_null(strstr(open_fails("text.db", OQ_EIO),
                           "not an onceq state file"));
}

static void test_another_sqlite_database_is_refused(void **state)
{
    unlink(tmp_path("other.db"));
    sql("other.db", "CREATE TABLE t(x); INSERT INTO t VALUES (1)");
    assert_non_null(strstr(open_fails("other.db", OQ_EINVAL),
                           "not an onceq state file"));
}

/* ---------------------------------------------------------- batches */

typedef struct seen {
    char text[1024];
    size_t n;
} seen;

static void see_id(const char *id, size_t len, void *arg)
{
    seen *s = arg;
    s->n++;
    strncat(s->text, id, len);
    strcat(s->text, ";");
}

static void see_count(const char *key, size_t len, int64_t v, void *arg)
{
    seen *s = arg;
    char one[64];
    snprintf(one, sizeof(one), "%.*s=%lld;", (int)len, key, (long long)v);
    strcat(s->text, one);
    s->n++;
}

static void see_record(const void *data, size_t len, void *arg)
{
    seen *s = arg;
    strncat(s->text, data, len);
    strcat(s->text, ";");
    s->n++;
}

static void test_batch_reads_back(void **state)
{
    oq__store *st = open_new("batch.db");
    seen ids = { "", 0 }, recs = { "", 0 };

    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_processed(st, "b", 1, 0, OQ__TAG(0, 2)), 0);
    assert_int_equal(oq__store_put_processed(st, "a", 1, 0, OQ__TAG(0, 5)), 0);
    assert_int_equal(oq__store_put_output(st, "a", 1, 0, "A0", 2), 0);
    assert_int_equal(oq__store_put_output(st, "a", 1, 1, "A1", 2), 0);
    assert_int_equal(oq__store_put_output(st, "b", 1, 0, "B0", 2), 0);
    assert_int_equal(oq__store_commit(st), 0);
    assert_int_equal(oq__store_commits(st), 1);
    assert_int_equal(oq__store_foreach_processed(st, see_id, &ids), 0);
    assert_int_equal(ids.n, 2);
    /* Records by first-seen position, then their order in the event. */
    assert_int_equal(oq__store_foreach_record(st, see_record, &recs), 0);
    assert_string_equal(recs.text, "B0;A0;A1;");
    oq__store_close(st);
}

static void test_processed_id_twice_fails_the_batch(void **state)
{
    oq__store *st = open_new("twice.db");

    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_processed(st, "x", 1, 0, 1), 0);
    assert_int_equal(oq__store_put_processed(st, "x", 1, 0, 2), OQ_EINVAL);
    oq__store_rollback(st);
    oq__store_close(st);
}

static void test_aggregates_sum_across_batches_sorted(void **state)
{
    oq__store *st = open_new("agg.db");
    seen s = { "", 0 };

    for (int b = 0; b < 2; b++) {
        assert_int_equal(oq__store_begin(st), 0);
        assert_int_equal(oq__store_add_count(st, "zeta", 4, 2), 0);
        assert_int_equal(oq__store_add_count(st, "alpha", 5, 1), 0);
        assert_int_equal(oq__store_add_count(st, "Beta", 4, -1), 0);
        assert_int_equal(oq__store_commit(st), 0);
    }
    assert_int_equal(oq__store_foreach_count(st, see_count, &s), 0);
    /* Bytewise: uppercase sorts first. */
    assert_string_equal(s.text, "Beta=-2;alpha=2;zeta=4;");
    oq__store_close(st);
}

static void test_min_tag_only_lowers(void **state)
{
    oq__store *st = open_new("mintag.db");
    seen s = { "", 0 };

    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_processed(st, "a", 1, 0, 10), 0);
    assert_int_equal(oq__store_put_processed(st, "b", 1, 0, 20), 0);
    assert_int_equal(oq__store_put_output(st, "a", 1, 0, "a", 1), 0);
    assert_int_equal(oq__store_put_output(st, "b", 1, 0, "b", 1), 0);
    assert_int_equal(oq__store_min_tag(st, "b", 1, 5), 0);
    assert_int_equal(oq__store_min_tag(st, "a", 1, 30), 0);
    assert_int_equal(oq__store_commit(st), 0);
    assert_int_equal(oq__store_foreach_record(st, see_record, &s), 0);
    assert_string_equal(s.text, "b;a;");
    oq__store_close(st);
}

typedef struct dead_seen {
    int n;
    char reasons[256];
    int64_t attempts;
    char event[64];
} dead_seen;

static void see_dead(const oq__dead_row *d, void *arg)
{
    dead_seen *s = arg;
    s->n++;
    strcat(s->reasons, d->reason);
    strcat(s->reasons, ";");
    s->attempts += d->attempts;
    snprintf(s->event, sizeof(s->event), "%.*s", (int)d->event_len,
             (const char *)d->event);
}

static void test_dead_letters_replace_by_position(void **state)
{
    oq__store *st = open_new("dead.db");
    oq__dead_row d = { .tag = OQ__TAG(0, 7), .source = "f:7", .id = "e",
                       .id_len = 1, .reason = "max_attempts", .error = "x",
                       .attempts = 5, .first_seen_ms = 1, .dead_ms = 2,
                       .event = "{}", .event_len = 2 };
    dead_seen s = { 0, "", 0, "" };

    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_dead(st, &d), 0);
    /* The same line dead-lettered again (read again after a crash). */
    d.reason = "failed";
    d.attempts = 1;
    d.event = "{\"a\":1}";
    d.event_len = 7;
    assert_int_equal(oq__store_put_dead(st, &d), 0);
    d.tag = OQ__TAG(1, 1);
    d.reason = "parse_error";
    d.id = NULL;
    assert_int_equal(oq__store_put_dead(st, &d), 0);
    assert_int_equal(oq__store_commit(st), 0);
    assert_int_equal(oq__store_foreach_dead(st, see_dead, &s), 0);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.reasons, "failed;parse_error;");
    assert_int_equal(s.attempts, 2);
    assert_string_equal(s.event, "{\"a\":1}");
    oq__store_close(st);
}

static void test_sources_read_back(void **state)
{
    oq__store *st = open_new("src.db");
    oq__source_row r = { 3, "in.jsonl", 1, 2, 300, 256, 0xdeadbeefcafeULL,
                         120, 4, 1 }, got;
    char path[64];

    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_source(st, &r), 0);
    assert_int_equal(oq__store_commit(st), 0);
    assert_int_equal(oq__store_get_source(st, 3, &got, path, sizeof(path)), 0);
    assert_string_equal(got.path, "in.jsonl");
    assert_int_equal(got.ino, 2);
    assert_int_equal(got.head_hash, 0xdeadbeefcafeULL);
    assert_int_equal(got.offset, 120);
    assert_int_equal(got.line, 4);
    assert_int_equal(got.blank, 1);
    assert_int_equal(oq__store_get_source(st, 4, &got, path, sizeof(path)),
                     OQ_ENOENT);
    oq__store_close(st);
}

static void test_failed_commit_keeps_nothing(void **state)
{
    oq__store *st = open_new("fault.db");
    seen s = { "", 0 };

    oq__store_fail_after(1);
    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_processed(st, "kept", 4, 0, 1), 0);
    assert_int_equal(oq__store_commit(st), 0);
    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_processed(st, "lost", 4, 0, 2), 0);
    assert_int_equal(oq__store_add_count(st, "k", 1, 1), 0);
    assert_int_equal(oq__store_commit(st), OQ_ENOSPC);
    assert_non_null(strstr(oq__store_error(st), "full"));
    oq__store_fail_after(-1);
    assert_int_equal(oq__store_foreach_processed(st, see_id, &s), 0);
    assert_string_equal(s.text, "kept;");
    s = (seen){ "", 0 };
    assert_int_equal(oq__store_foreach_count(st, see_count, &s), 0);
    assert_int_equal(s.n, 0);
    /* The store still works after the failure. */
    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_put_processed(st, "again", 5, 0, 3), 0);
    assert_int_equal(oq__store_commit(st), 0);
    oq__store_close(st);
}

static void test_snapshot_restores_the_state(void **state)
{
    oq__store *st = open_new("snap.db");
    seen s = { "", 0 };

    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_add_count(st, "w", 1, 7), 0);
    assert_int_equal(oq__store_commit(st), 0);
    unlink(tmp_path("snap.ckpt"));
    assert_int_equal(oq__store_snapshot(st, tmp_path("snap.ckpt"), false), 0);
    assert_int_equal(oq__store_begin(st), 0);
    assert_int_equal(oq__store_add_count(st, "w", 1, 100), 0);
    assert_int_equal(oq__store_commit(st), 0);
    assert_int_equal(oq__store_snapshot(st, tmp_path("snap.ckpt"), true), 0);
    assert_int_equal(oq__store_foreach_count(st, see_count, &s), 0);
    assert_string_equal(s.text, "w=7;");
    assert_int_equal(oq__store_snapshot(st, tmp_path("none.ckpt"), true),
                     OQ_ENOENT);
    oq__store_close(st);
}

/* ---------------------------------------------------------- tracker */

static void test_tracker_watermark_is_the_settled_prefix(void **state)
{
    oq__tracker *t;
    oq__source_row row = { 0, "f", 1, 1, 100, 0, 0, 0, 0, 0 }, out[4];
    uint64_t tags[] = { OQ__TAG(0, 3), OQ__TAG(0, 1) };

    assert_int_equal(oq__tracker_new(&t, 2), 0);
    assert_int_equal(oq__tracker_track(t, &row), 0);
    assert_int_equal(oq__tracker_collect(t, out, 4), 1); /* the identity */
    for (uint64_t l = 1; l <= 5; l++)
        assert_int_equal(oq__tracker_add(t, 0, l, l * 10, l == 2), 0);
    /* Out of order: lines 3 and 1 settle; 2 is blank; 4 is pending. */
    oq__tracker_settle(t, tags, 2);
    assert_int_equal(oq__tracker_collect(t, out, 4), 1);
    assert_int_equal(out[0].line, 3);
    assert_int_equal(out[0].offset, 30);
    assert_int_equal(out[0].blank, 1);
    assert_int_equal(oq__tracker_collect(t, out, 4), 0); /* not dirty */
    /* Lines come in order, once each. */
    assert_int_equal(oq__tracker_add(t, 0, 9, 90, false), OQ_EINVAL);
    /* An untracked file (stdin) is ignored. */
    assert_int_equal(oq__tracker_add(t, 1, 1, 10, false), 0);
    oq__tracker_free(t);
}

static void test_tracker_resumes_from_the_saved_line(void **state)
{
    oq__tracker *t;
    oq__source_row row = { 0, "f", 1, 1, 100, 0, 0, 500, 40, 2 }, out[1];
    uint64_t tag = OQ__TAG(0, 41);

    assert_int_equal(oq__tracker_new(&t, 1), 0);
    assert_int_equal(oq__tracker_track(t, &row), 0);
    oq__tracker_collect(t, out, 1);
    assert_int_equal(oq__tracker_add(t, 0, 41, 520, false), 0);
    oq__tracker_settle(t, &tag, 1);
    assert_int_equal(oq__tracker_collect(t, out, 1), 1);
    assert_int_equal(out[0].line, 41);
    assert_int_equal(out[0].offset, 520);
    assert_int_equal(out[0].blank, 2);
    oq__tracker_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_then_reopen_keeps_meta),
        cmocka_unit_test(test_open_missing_without_create),
        cmocka_unit_test(test_other_schema_version_is_refused),
        cmocka_unit_test(test_random_bytes_are_not_a_state_file),
        cmocka_unit_test(test_text_file_is_not_a_state_file),
        cmocka_unit_test(test_another_sqlite_database_is_refused),
        cmocka_unit_test(test_batch_reads_back),
        cmocka_unit_test(test_processed_id_twice_fails_the_batch),
        cmocka_unit_test(test_aggregates_sum_across_batches_sorted),
        cmocka_unit_test(test_min_tag_only_lowers),
        cmocka_unit_test(test_dead_letters_replace_by_position),
        cmocka_unit_test(test_sources_read_back),
        cmocka_unit_test(test_failed_commit_keeps_nothing),
        cmocka_unit_test(test_snapshot_restores_the_state),
        cmocka_unit_test(test_tracker_watermark_is_the_settled_prefix),
        cmocka_unit_test(test_tracker_resumes_from_the_saved_line),
    };
    int rc;

    if (mkdtemp(dir) == NULL)
        return 1;
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
        if (system(cmd) != 0)
            rc = rc ? rc : 1;
    }
    return rc;
}
