/*
 * Durable state in SQLite: processed ids, their outputs, aggregates, dead
 * letters, per-source progress and redriven events (docs/STATE.md has the
 * schema for sqlite3 users).
 *
 * DESIGN
 * ------
 * One oq__store is one SQLite connection, used by one thread at a time: the
 * committer thread during a run, the main thread before and after it, or a
 * subcommand. It has no lock of its own.
 *
 * A file is recognised by PRAGMA application_id (OQ__STORE_APP_ID) and its
 * schema by PRAGMA user_version (OQ__STORE_VERSION), both read on open: an
 * empty file gets the schema, anything else that is not ours (a corrupt
 * file, a text file, another application's database) is refused with a
 * one-line message. Journal mode is WAL; --sync maps to PRAGMA synchronous.
 *
 * Writes go in batches: oq__store_begin, any number of put calls (each one
 * prepared statement, kept for the connection's life), oq__store_commit.
 * A failed commit rolls back: nothing of the batch is kept. The commit is
 * the fault-injection seam (oq__store_fail_after), like oq__alloc_fail_after.
 */
#include "oq_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
    S_BEGIN, S_COMMIT, S_ROLLBACK, S_PROCESSED, S_OUTPUT, S_COUNT, S_MIN_TAG,
    S_DEAD, S_DEL_REDRIVE, S_SOURCE, S__COUNT
};

static const char *const stmt_sql[S__COUNT] = {
    [S_BEGIN] = "BEGIN IMMEDIATE",
    [S_COMMIT] = "COMMIT",
    [S_ROLLBACK] = "ROLLBACK",
    [S_PROCESSED] = "INSERT INTO processed(id, status, tag) VALUES (?1, ?2, ?3)",
    [S_OUTPUT] = "INSERT INTO outputs(id, seq, data) VALUES (?1, ?2, ?3)",
    [S_COUNT] = "INSERT INTO aggregates(key, value) VALUES (?1, ?2) "
                "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
    [S_MIN_TAG] = "UPDATE processed SET tag = ?2 WHERE id = ?1 AND tag > ?2",
    [S_DEAD] = "INSERT OR REPLACE INTO dead_letters(tag, source, id, reason, "
               "error, attempts, first_seen_ms, dead_ms, event, history) "
               "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    [S_DEL_REDRIVE] = "DELETE FROM redrive WHERE seq = ?1",
    [S_SOURCE] = "INSERT OR REPLACE INTO sources(file, path, dev, ino, size, "
                 "head_len, head_hash, offset, line, blank) "
                 "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
};

static const char schema_sql[] =
    "PRAGMA application_id = " OQ__STR(OQ__STORE_APP_ID) ";"
    "PRAGMA user_version = " OQ__STR(OQ__STORE_VERSION) ";"
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    " WITHOUT ROWID;"
    "CREATE TABLE processed(id TEXT PRIMARY KEY,"
    " status INTEGER NOT NULL," /* 0 processed, 1 dead (handler FAIL) */
    " tag INTEGER NOT NULL)"    /* first input position: file << 40 | line */
    " WITHOUT ROWID;"
    "CREATE TABLE outputs(id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " data BLOB NOT NULL, PRIMARY KEY(id, seq)) WITHOUT ROWID;"
    "CREATE TABLE aggregates(key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
    " WITHOUT ROWID;"
    "CREATE TABLE dead_letters(seq INTEGER PRIMARY KEY,"
    " tag INTEGER NOT NULL UNIQUE, source TEXT NOT NULL, id TEXT,"
    " reason TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,"
    " first_seen_ms INTEGER NOT NULL, dead_ms INTEGER NOT NULL,"
    " event BLOB NOT NULL, history TEXT NOT NULL DEFAULT '[]');"
    "CREATE TABLE sources(file INTEGER PRIMARY KEY, path TEXT NOT NULL,"
    " dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,"
    " head_len INTEGER NOT NULL, head_hash INTEGER NOT NULL,"
    " offset INTEGER NOT NULL, line INTEGER NOT NULL,"
    " blank INTEGER NOT NULL);"
    "CREATE TABLE redrive(seq INTEGER PRIMARY KEY, tag INTEGER NOT NULL,"
    " source TEXT NOT NULL, id TEXT, event BLOB NOT NULL,"
    " attempts INTEGER NOT NULL, history TEXT NOT NULL);";

struct oq__store {
    sqlite3 *db;
    sqlite3_stmt *st[S__COUNT];
    bool in_txn;
    uint64_t commits;          /* successful batch commits */
    char path[4096];
    char err[512];             /* the last error, one line */
};

static _Atomic long fail_after = -1;

void oq__store_fail_after(long n)
{
    atomic_store(&fail_after, n);
}

static int set_err(oq__store *st, int rc, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Records a one-line error and maps an SQLite code to an OQ_E* code. */
static int set_err(oq__store *st, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(st->err, sizeof(st->err), fmt, ap);
    va_end(ap);
    switch (rc & 0xff) {
    case SQLITE_FULL: return OQ_ENOSPC;
    case SQLITE_NOMEM: return OQ_ENOMEM;
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return OQ_EBUSY;
    case SQLITE_CANTOPEN: return OQ_ENOENT;
    case SQLITE_CONSTRAINT:
    case SQLITE_MISMATCH: return OQ_EINVAL;
    default: return OQ_EIO;
    }
}

static int db_err(oq__store *st, int rc, const char *what)
{
    return set_err(st, rc, "%s: %s", what, sqlite3_errmsg(st->db));
}

const char *oq__store_error(const oq__store *st)
{
    return st->err;
}

sqlite3 *oq__store_db(oq__store *st)
{
    return st->db;
}

const char *oq__store_path(const oq__store *st)
{
    return st->path;
}

/* The first integer column of sql's first row, or an error. */
static int query_int(oq__store *st, const char *sql, int64_t *out)
{
    sqlite3_stmt *s;
    int rc = sqlite3_prepare_v2(st->db, sql, -1, &s, NULL);

    if (rc != SQLITE_OK)
        return rc;
    rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        *out = sqlite3_column_int64(s, 0);
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        *out = 0;
        rc = SQLITE_OK;
    }
    sqlite3_finalize(s);
    return rc;
}

/* Checks that the file is ours (or empty: then creates the schema). */
static int check_schema(oq__store *st, bool create)
{
    int64_t app, version, ntables;
    int rc;

    if ((rc = query_int(st, "PRAGMA application_id", &app)) != SQLITE_OK ||
        (rc = query_int(st, "PRAGMA user_version", &version)) != SQLITE_OK ||
        (rc = query_int(st, "SELECT count(*) FROM sqlite_schema",
                        &ntables)) != SQLITE_OK)
        return set_err(st, rc, "'%s' is not an onceq state file: %s",
                       st->path, sqlite3_errmsg(st->db));
    if (app == 0 && version == 0 && ntables == 0) {
        if (!create)
            return set_err(st, SQLITE_CANTOPEN, "'%s' is an empty database, "
                           "not an onceq state file", st->path);
        rc = sqlite3_exec(st->db, "BEGIN IMMEDIATE;", NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_exec(st->db, schema_sql, NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_exec(st->db, "COMMIT;", NULL, NULL, NULL);
        if (rc != SQLITE_OK) {
            int e = db_err(st, rc, "cannot create the schema");
            sqlite3_exec(st->db, "ROLLBACK;", NULL, NULL, NULL);
            return e;
        }
        return 0;
    }
    if (app != OQ__STORE_APP_ID)
        return set_err(st, SQLITE_MISMATCH, "'%s' is an SQLite database but "
                       "not an onceq state file (application_id %" PRId64 ")",
                       st->path, app);
    if (version != OQ__STORE_VERSION)
        return set_err(st, SQLITE_MISMATCH, "'%s' has state schema version "
                       "%" PRId64 "; this onceq reads version %d", st->path,
                       version, OQ__STORE_VERSION);
    return 0;
}

static const char *sync_pragma(oq__store_sync sync)
{
    switch (sync) {
    case OQ__SYNC_OFF: return "PRAGMA synchronous = OFF";
    case OQ__SYNC_NORMAL: return "PRAGMA synchronous = NORMAL";
    default: return "PRAGMA synchronous = FULL";
    }
}

int oq__store_open(oq__store **out, const char *path, int flags,
                   oq__store_sync sync, char *err, size_t errlen)
{
    oq__store *st = oq__calloc(1, sizeof(*st));
    int oflags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX;
    int rc = 0;

    *out = NULL;
    if (st == NULL) {
        snprintf(err, errlen, "out of memory");
        return OQ_ENOMEM;
    }
    snprintf(st->path, sizeof(st->path), "%s", path);
    if (flags & OQ__STORE_CREATE) {
        oflags |= SQLITE_OPEN_CREATE;
    } else if (access(path, F_OK) != 0) {
        rc = set_err(st, SQLITE_CANTOPEN, "no state file '%s'", path);
        goto out_fail;
    }
    rc = sqlite3_open_v2(path, &st->db, oflags, NULL);
    if (rc != SQLITE_OK) {
        rc = st->db ? db_err(st, rc, "cannot open the state file")
                    : set_err(st, rc, "cannot open '%s'", path);
        goto out_fail;
    }
    sqlite3_extended_result_codes(st->db, 1);
    sqlite3_busy_timeout(st->db, 5000);
    if ((rc = check_schema(st, flags & OQ__STORE_CREATE)) != 0)
        goto out_fail;
    rc = sqlite3_exec(st->db, "PRAGMA journal_mode = WAL", NULL, NULL, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(st->db, sync_pragma(sync), NULL, NULL, NULL);
    /* A checkpoint of the WAL every 4 MiB or so, not every 1000 pages of
     * a few KiB: fewer fsyncs of the main file. */
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(st->db, "PRAGMA wal_autocheckpoint = 4096", NULL,
                          NULL, NULL);
    if (rc != SQLITE_OK) {
        rc = db_err(st, rc, "cannot set up the state file");
        goto out_fail;
    }
    for (int i = 0; i < S__COUNT; i++) {
        rc = sqlite3_prepare_v3(st->db, stmt_sql[i], -1,
                                SQLITE_PREPARE_PERSISTENT, &st->st[i], NULL);
        if (rc != SQLITE_OK) {
            rc = db_err(st, rc, "cannot prepare a statement");
            goto out_fail;
        }
    }
    *out = st;
    return 0;

out_fail:
    snprintf(err, errlen, "%s", st->err);
    oq__store_close(st);
    return rc ? rc : OQ_EIO;
}

void oq__store_close(oq__store *st)
{
    if (st == NULL)
        return;
    for (int i = 0; i < S__COUNT; i++)
        sqlite3_finalize(st->st[i]);
    if (st->db)
        sqlite3_close(st->db);
    oq__free(st);
}

/* Runs a prepared write statement to completion and resets it. */
static int step(oq__store *st, int which, const char *what)
{
    sqlite3_stmt *s = st->st[which];
    int rc = sqlite3_step(s);

    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc != SQLITE_DONE)
        return db_err(st, rc, what);
    return 0;
}

static void bind_text(sqlite3_stmt *s, int i, const char *p, size_t n)
{
    if (p == NULL)
        sqlite3_bind_null(s, i);
    else
        sqlite3_bind_text64(s, i, p, n, SQLITE_STATIC, SQLITE_UTF8);
}

static void bind_blob(sqlite3_stmt *s, int i, const void *p, size_t n)
{
    /* A zero-length blob with a NULL pointer would be stored as NULL. */
    sqlite3_bind_blob64(s, i, n ? p : "", n, SQLITE_STATIC);
}

int oq__store_begin(oq__store *st)
{
    int rc = step(st, S_BEGIN, "cannot begin a transaction");

    st->in_txn = rc == 0;
    return rc;
}

int oq__store_commit(oq__store *st)
{
    long n = atomic_load(&fail_after);
    int rc;

    if (n == 0) {
        oq__store_rollback(st);
        return set_err(st, SQLITE_FULL, "cannot commit to '%s': database or "
                       "disk is full (injected fault)", st->path);
    }
    if (n > 0)
        atomic_store(&fail_after, n - 1);
    rc = step(st, S_COMMIT, "cannot commit");
    if (rc != 0) {
        char keep[sizeof(st->err)];
        memcpy(keep, st->err, sizeof(keep));
        oq__store_rollback(st);
        memcpy(st->err, keep, sizeof(keep));
        return rc;
    }
    st->in_txn = false;
    st->commits++;
    return 0;
}

void oq__store_rollback(oq__store *st)
{
    if (st->in_txn || !sqlite3_get_autocommit(st->db))
        step(st, S_ROLLBACK, "cannot roll back");
    st->in_txn = false;
}

uint64_t oq__store_commits(const oq__store *st)
{
    return st->commits;
}

int oq__store_put_processed(oq__store *st, const char *id, size_t len,
                            int status, uint64_t tag)
{
    sqlite3_stmt *s = st->st[S_PROCESSED];

    bind_text(s, 1, id, len);
    sqlite3_bind_int(s, 2, status);
    sqlite3_bind_int64(s, 3, (sqlite3_int64)tag);
    return step(st, S_PROCESSED, "cannot record a processed id");
}

int oq__store_put_output(oq__store *st, const char *id, size_t len,
                         unsigned seq, const void *data, size_t n)
{
    sqlite3_stmt *s = st->st[S_OUTPUT];

    bind_text(s, 1, id, len);
    sqlite3_bind_int(s, 2, (int)seq);
    bind_blob(s, 3, data, n);
    return step(st, S_OUTPUT, "cannot record an output");
}

int oq__store_add_count(oq__store *st, const char *key, size_t len,
                        int64_t delta)
{
    sqlite3_stmt *s = st->st[S_COUNT];

    bind_text(s, 1, key, len);
    sqlite3_bind_int64(s, 2, delta);
    return step(st, S_COUNT, "cannot update an aggregate");
}

int oq__store_min_tag(oq__store *st, const char *id, size_t len,
                      uint64_t tag)
{
    sqlite3_stmt *s = st->st[S_MIN_TAG];

    bind_text(s, 1, id, len);
    sqlite3_bind_int64(s, 2, (sqlite3_int64)tag);
    return step(st, S_MIN_TAG, "cannot update a first-seen position");
}

int oq__store_put_dead(oq__store *st, const oq__dead_row *d)
{
    sqlite3_stmt *s = st->st[S_DEAD];

    sqlite3_bind_int64(s, 1, (sqlite3_int64)d->tag);
    bind_text(s, 2, d->source, strlen(d->source));
    bind_text(s, 3, d->id, d->id_len);
    bind_text(s, 4, d->reason, strlen(d->reason));
    bind_text(s, 5, d->error, strlen(d->error));
    sqlite3_bind_int64(s, 6, d->attempts);
    sqlite3_bind_int64(s, 7, d->first_seen_ms);
    sqlite3_bind_int64(s, 8, d->dead_ms);
    bind_blob(s, 9, d->event, d->event_len);
    bind_text(s, 10, d->history ? d->history : "[]",
              d->history ? strlen(d->history) : 2);
    return step(st, S_DEAD, "cannot record a dead letter");
}

int oq__store_del_redrive(oq__store *st, int64_t seq)
{
    sqlite3_bind_int64(st->st[S_DEL_REDRIVE], 1, seq);
    return step(st, S_DEL_REDRIVE, "cannot delete a redriven event");
}

int oq__store_put_source(oq__store *st, const oq__source_row *r)
{
    sqlite3_stmt *s = st->st[S_SOURCE];

    sqlite3_bind_int64(s, 1, r->file);
    bind_text(s, 2, r->path, strlen(r->path));
    sqlite3_bind_int64(s, 3, (sqlite3_int64)r->dev);
    sqlite3_bind_int64(s, 4, (sqlite3_int64)r->ino);
    sqlite3_bind_int64(s, 5, (sqlite3_int64)r->size);
    sqlite3_bind_int64(s, 6, (sqlite3_int64)r->head_len);
    sqlite3_bind_int64(s, 7, (sqlite3_int64)r->head_hash);
    sqlite3_bind_int64(s, 8, (sqlite3_int64)r->offset);
    sqlite3_bind_int64(s, 9, (sqlite3_int64)r->line);
    sqlite3_bind_int64(s, 10, (sqlite3_int64)r->blank);
    return step(st, S_SOURCE, "cannot record source progress");
}

/* ----------------------------------------------------------- reading */

/* Prepares sql (one-off). 0 or an error with st->err set. */
static int prep(oq__store *st, const char *sql, sqlite3_stmt **s)
{
    int rc = sqlite3_prepare_v2(st->db, sql, -1, s, NULL);
    return rc == SQLITE_OK ? 0 : db_err(st, rc, "cannot read the state");
}

/* Steps s to its end calling row(s, arg) per row; finalizes s. */
static int each_row(oq__store *st, sqlite3_stmt *s,
                    void (*row)(sqlite3_stmt *s, void *arg), void *arg)
{
    int rc;

    while ((rc = sqlite3_step(s)) == SQLITE_ROW)
        row(s, arg);
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? 0 : db_err(st, rc, "cannot read the state");
}

int oq__store_meta_get(oq__store *st, const char *key, char *buf, size_t len)
{
    sqlite3_stmt *s;
    int rc = prep(st, "SELECT value FROM meta WHERE key = ?1", &s);

    if (rc != 0)
        return rc;
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        snprintf(buf, len, "%s", (const char *)sqlite3_column_text(s, 0));
        rc = 0;
    } else {
        rc = rc == SQLITE_DONE ? OQ_ENOENT
                               : db_err(st, rc, "cannot read the state");
    }
    sqlite3_finalize(s);
    return rc;
}

int oq__store_meta_set(oq__store *st, const char *key, const char *value)
{
    sqlite3_stmt *s;
    int rc = prep(st, "INSERT OR REPLACE INTO meta(key, value) "
                      "VALUES (?1, ?2)", &s);

    if (rc != 0)
        return rc;
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, value, -1, SQLITE_STATIC);
    rc = sqlite3_step(s);
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? 0 : db_err(st, rc, "cannot write the state");
}

typedef struct cb {
    void (*fn)();
    void *arg;
} cb;

static void id_row(sqlite3_stmt *s, void *arg)
{
    const oq__store_visit *v = arg;
    v->id((const char *)sqlite3_column_text(s, 0),
          (size_t)sqlite3_column_bytes(s, 0), v->arg);
}

int oq__store_foreach_processed(oq__store *st, oq__store_id_fn fn, void *arg)
{
    oq__store_visit v = { .id = fn, .arg = arg };
    sqlite3_stmt *s;
    int rc = prep(st, "SELECT id FROM processed", &s);

    return rc ? rc : each_row(st, s, id_row, &v);
}

static void count_row(sqlite3_stmt *s, void *arg)
{
    const oq__store_visit *v = arg;
    v->count((const char *)sqlite3_column_text(s, 0),
             (size_t)sqlite3_column_bytes(s, 0), sqlite3_column_int64(s, 1),
             v->arg);
}

int oq__store_foreach_count(oq__store *st, oq_txn_count_fn fn, void *arg)
{
    oq__store_visit v = { .count = fn, .arg = arg };
    sqlite3_stmt *s;
    /* TEXT compares with memcmp (BINARY): the in-memory run's order. */
    int rc = prep(st, "SELECT key, value FROM aggregates ORDER BY key", &s);

    return rc ? rc : each_row(st, s, count_row, &v);
}

static void record_row(sqlite3_stmt *s, void *arg)
{
    const oq__store_visit *v = arg;
    v->record(sqlite3_column_blob(s, 0), (size_t)sqlite3_column_bytes(s, 0),
              v->arg);
}

int oq__store_foreach_record(oq__store *st, oq_txn_record_fn fn, void *arg)
{
    oq__store_visit v = { .record = fn, .arg = arg };
    sqlite3_stmt *s;
    int rc = prep(st, "SELECT o.data FROM outputs o JOIN processed p "
                      "ON p.id = o.id ORDER BY p.tag, o.seq", &s);

    return rc ? rc : each_row(st, s, record_row, &v);
}

/* Columns of dead_letters (and of redrive, which has a subset), in order. */
#define DEAD_COLS "seq, tag, source, id, reason, error, attempts, " \
                  "first_seen_ms, dead_ms, event, history"

void oq__store_dead_from_row(sqlite3_stmt *s, oq__dead_row *d)
{
    memset(d, 0, sizeof(*d));
    d->seq = sqlite3_column_int64(s, 0);
    d->tag = (uint64_t)sqlite3_column_int64(s, 1);
    d->source = (const char *)sqlite3_column_text(s, 2);
    d->id = (const char *)sqlite3_column_text(s, 3);
    d->id_len = (size_t)sqlite3_column_bytes(s, 3);
    d->reason = (const char *)sqlite3_column_text(s, 4);
    d->error = (const char *)sqlite3_column_text(s, 5);
    d->attempts = (uint32_t)sqlite3_column_int64(s, 6);
    d->first_seen_ms = sqlite3_column_int64(s, 7);
    d->dead_ms = sqlite3_column_int64(s, 8);
    d->event = sqlite3_column_blob(s, 9);
    d->event_len = (size_t)sqlite3_column_bytes(s, 9);
    d->history = (const char *)sqlite3_column_text(s, 10);
    if (d->source == NULL)
        d->source = "";
    if (d->reason == NULL)
        d->reason = "";
    if (d->error == NULL)
        d->error = "";
}

static void dead_row(sqlite3_stmt *s, void *arg)
{
    const oq__store_visit *v = arg;
    oq__dead_row d;

    oq__store_dead_from_row(s, &d);
    v->dead(&d, v->arg);
}

int oq__store_foreach_dead(oq__store *st, oq__store_dead_fn fn, void *arg)
{
    oq__store_visit v = { .dead = fn, .arg = arg };
    sqlite3_stmt *s;
    int rc = prep(st, "SELECT " DEAD_COLS " FROM dead_letters ORDER BY tag",
                  &s);

    return rc ? rc : each_row(st, s, dead_row, &v);
}

int oq__store_foreach_redrive(oq__store *st, oq__store_dead_fn fn, void *arg)
{
    oq__store_visit v = { .dead = fn, .arg = arg };
    sqlite3_stmt *s;
    int rc = prep(st, "SELECT seq, tag, source, id, 'redrive', '', attempts,"
                      " 0, 0, event, history FROM redrive ORDER BY seq", &s);

    return rc ? rc : each_row(st, s, dead_row, &v);
}

int oq__store_get_source(oq__store *st, unsigned file, oq__source_row *r,
                         char *path, size_t pathlen)
{
    sqlite3_stmt *s;
    int rc = prep(st, "SELECT path, dev, ino, size, head_len, head_hash, "
                      "offset, line, blank FROM sources WHERE file = ?1", &s);

    if (rc != 0)
        return rc;
    sqlite3_bind_int64(s, 1, file);
    rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        snprintf(path, pathlen, "%s", (const char *)sqlite3_column_text(s, 0));
        r->file = file;
        r->path = path;
        r->dev = (uint64_t)sqlite3_column_int64(s, 1);
        r->ino = (uint64_t)sqlite3_column_int64(s, 2);
        r->size = (uint64_t)sqlite3_column_int64(s, 3);
        r->head_len = (uint64_t)sqlite3_column_int64(s, 4);
        r->head_hash = (uint64_t)sqlite3_column_int64(s, 5);
        r->offset = (uint64_t)sqlite3_column_int64(s, 6);
        r->line = (uint64_t)sqlite3_column_int64(s, 7);
        r->blank = (uint64_t)sqlite3_column_int64(s, 8);
        rc = 0;
    } else {
        rc = rc == SQLITE_DONE ? OQ_ENOENT
                               : db_err(st, rc, "cannot read the state");
    }
    sqlite3_finalize(s);
    return rc;
}

/* -------------------------------------------------------- snapshots */

/* Copies the whole database src -> dst with the online backup API. */
static int backup(oq__store *st, sqlite3 *dst, sqlite3 *src, const char *what)
{
    sqlite3_backup *b = sqlite3_backup_init(dst, "main", src, "main");
    int rc;

    if (b == NULL)
        return set_err(st, sqlite3_errcode(dst), "%s: %s", what,
                       sqlite3_errmsg(dst));
    do {
        rc = sqlite3_backup_step(b, 256);
        if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED)
            sqlite3_sleep(5);
    } while (rc == SQLITE_OK || rc == SQLITE_BUSY || rc == SQLITE_LOCKED);
    sqlite3_backup_finish(b);
    if (rc != SQLITE_DONE)
        return set_err(st, rc, "%s: %s", what, sqlite3_errstr(rc));
    return 0;
}

int oq__store_snapshot(oq__store *st, const char *file, bool restore)
{
    sqlite3 *other = NULL;
    int flags = restore ? SQLITE_OPEN_READONLY
                        : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
    int rc;

    if (restore && access(file, R_OK) != 0)
        return set_err(st, SQLITE_CANTOPEN, "no checkpoint file '%s'", file);
    rc = sqlite3_open_v2(file, &other, flags, NULL);
    if (rc != SQLITE_OK) {
        rc = set_err(st, rc, "cannot open '%s': %s", file,
                     other ? sqlite3_errmsg(other) : sqlite3_errstr(rc));
        sqlite3_close(other);
        return rc;
    }
    if (restore) {
        int64_t app = 0;
        sqlite3_stmt *s;
        if (sqlite3_prepare_v2(other, "PRAGMA application_id", -1, &s,
                               NULL) == SQLITE_OK) {
            if (sqlite3_step(s) == SQLITE_ROW)
                app = sqlite3_column_int64(s, 0);
            sqlite3_finalize(s);
        }
        if (app != OQ__STORE_APP_ID) {
            sqlite3_close(other);
            return set_err(st, SQLITE_MISMATCH, "'%s' is not an onceq "
                           "checkpoint", file);
        }
        rc = backup(st, st->db, other, "cannot restore");
    } else {
        rc = backup(st, other, st->db, "cannot write the checkpoint");
    }
    sqlite3_close(other);
    return rc;
}
