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
#include "oq_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "oq_uthash.h"

#define STR_(x) #x
#define STR(x) STR_(x)

enum {
    S_BEGIN, S_COMMIT, S_ROLLBACK, S_PROCESSED, S_OUTPUT, S_COUNT, S_MIN_TAG,
    S_DEAD, S_DEL_REDRIVE, S_SOURCE, S_DEL_DEAD, S_PROCESSED_MANY,
    S_DEL_STALE, S_META_ADD, S__COUNT
};

/* Processed ids go MANY_ROWS to a statement: one VDBE run for many rows
 * costs much less than one per row. */
#define MANY_ROWS 32

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
    [S_DEL_DEAD] = "DELETE FROM dead_letters WHERE tag = ?1",
    /* A handler failure, and a worker's max_attempts or expired dead
     * letter, settled its id: that dead letter is the event's outcome,
     * and its line read again is a duplicate of itself. */
    [S_DEL_STALE] = "DELETE FROM dead_letters WHERE tag = ?1 AND "
                    "reason NOT IN ('failed', 'max_attempts', 'expired')",
    [S_META_ADD] = "INSERT INTO meta(key, value) VALUES (?1, ?2) "
                   "ON CONFLICT(key) DO UPDATE SET "
                   "value = CAST(value AS INTEGER) + excluded.value",
    [S_SOURCE] = "INSERT OR REPLACE INTO sources(file, path, dev, ino, size, "
                 "head_len, head_hash, offset, line, blank) "
                 "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
};

static const char schema_sql[] =
    "PRAGMA application_id = " STR(OQ__STORE_APP_ID) ";"
    "PRAGMA user_version = " STR(OQ__STORE_VERSION) ";"
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
    int lock_fd;               /* PATH.lock, locked (OQ__STORE_LOCK), or -1 */
    dev_t lock_dev;            /* its device and inode, in held_locks */
    ino_t lock_ino;
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

/* The run lock: an exclusive POSIX record lock (fcntl F_SETLK) on
 * PATH.lock, a file of its own (SQLite's locks on the database and its WAL
 * are another matter). A run holds it for its whole life; restore and dlq
 * redrive/purge take it for theirs.
 *
 * Not flock(): a flock belongs to the open file description, which an exec
 * child shares between its spawn and its exec (close-on-exec closes it only
 * at the exec), so after a kill -9 a child being spawned kept the lock for
 * a millisecond or so and a rerun was refused. A POSIX lock belongs to the
 * process: no child ever holds it, and the kernel drops it when the process
 * dies. Two consequences of POSIX locks are handled here: a process never
 * conflicts with its own lock, and closing any descriptor of the file drops
 * it; so this process's locks are kept in held_locks (by device and inode),
 * a second lock of the same file is refused from that list without opening
 * the file again, and only oq__store_close closes the descriptor. */
typedef struct held_lock {
    struct held_lock *next;
    dev_t dev;
    ino_t ino;
} held_lock;

static pthread_mutex_t held_mu = PTHREAD_MUTEX_INITIALIZER;
static held_lock *held_locks;  /* guarded by held_mu */

/* held_mu held. */
static held_lock **find_held(dev_t dev, ino_t ino)
{
    held_lock **h = &held_locks;

    while (*h && ((*h)->dev != dev || (*h)->ino != ino))
        h = &(*h)->next;
    return h;
}

static int busy(oq__store *st)
{
    return set_err(st, SQLITE_BUSY, "state '%s' is in use by another onceq "
                   "run", st->path);
}

static int take_lock(oq__store *st, int flags)
{
    char lpath[sizeof(st->path) + 8];
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
    struct stat sb;
    held_lock *h = NULL;
    int rc = 0;

    if (!(flags & OQ__STORE_CREATE) && access(st->path, F_OK) != 0)
        return set_err(st, SQLITE_CANTOPEN, "no state file '%s'", st->path);
    snprintf(lpath, sizeof(lpath), "%s.lock", st->path);
    pthread_mutex_lock(&held_mu);
    if (stat(lpath, &sb) == 0 && *find_held(sb.st_dev, sb.st_ino) != NULL) {
        rc = busy(st);
        goto out;
    }
    st->lock_fd = open(lpath, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (st->lock_fd < 0 || fstat(st->lock_fd, &sb) != 0) {
        rc = set_err(st, SQLITE_CANTOPEN, "cannot open '%s': %s", lpath,
                     strerror(errno));
        goto out;
    }
    if ((h = oq__malloc(sizeof(*h))) == NULL) {
        rc = set_err(st, SQLITE_NOMEM, "out of memory");
        goto out;
    }
    while (fcntl(st->lock_fd, F_SETLK, &fl) != 0) {
        if (errno == EINTR)
            continue;
        rc = errno == EAGAIN || errno == EACCES
                 ? busy(st)
                 : set_err(st, SQLITE_IOERR, "cannot lock '%s': %s", lpath,
                           strerror(errno));
        oq__free(h);
        goto out;
    }
    st->lock_dev = h->dev = sb.st_dev;
    st->lock_ino = h->ino = sb.st_ino;
    h->next = held_locks;
    held_locks = h;
out:
    if (rc != 0 && st->lock_fd >= 0) {
        close(st->lock_fd); /* this process held no lock of this file */
        st->lock_fd = -1;
    }
    pthread_mutex_unlock(&held_mu);
    return rc;
}

/* Drops the run lock (closing the descriptor releases it). */
static void drop_lock(oq__store *st)
{
    held_lock **h, *gone;

    pthread_mutex_lock(&held_mu);
    h = find_held(st->lock_dev, st->lock_ino);
    if ((gone = *h) != NULL)
        *h = gone->next;
    close(st->lock_fd);
    st->lock_fd = -1;
    pthread_mutex_unlock(&held_mu);
    oq__free(gone);
}

/* 0 unless st->path exists, is not empty, and does not start with SQLite's
 * header ("SQLite format 3"): then the error (an empty or missing file
 * becomes a new state). */
static int not_sqlite(oq__store *st)
{
    char head[16] = "";
    struct stat sb;
    FILE *f;
    size_t n;

    if (stat(st->path, &sb) == 0 && !S_ISREG(sb.st_mode))
        return set_err(st, SQLITE_CANTOPEN, "'%s' is not an onceq state "
                       "file: %s", st->path, S_ISDIR(sb.st_mode)
                           ? "a directory" : "not a regular file");
    if ((f = fopen(st->path, "rbe")) == NULL)
        return 0;
    n = fread(head, 1, sizeof(head), f);
    fclose(f);
    if (n == 0 || (n == sizeof(head) && memcmp(head, "SQLite format 3",
                                                16) == 0))
        return 0;
    return set_err(st, SQLITE_NOTADB, "'%s' is not an onceq state file: "
                   "not an SQLite database", st->path);
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
    st->lock_fd = -1;
    /* A file that is plainly not SQLite's is refused before its PATH.lock
     * is made: a mistyped path must leave nothing behind. */
    if ((rc = not_sqlite(st)) != 0)
        goto out_fail;
    if ((flags & OQ__STORE_LOCK) && (rc = take_lock(st, flags)) != 0)
        goto out_fail;
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
    /* 64 MiB of page cache (the default is 2 MiB): the processed table's
     * hot pages stay in memory between batches. */
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(st->db, "PRAGMA cache_size = -65536", NULL, NULL,
                          NULL);
    if (rc != SQLITE_OK) {
        rc = db_err(st, rc, "cannot set up the state file");
        goto out_fail;
    }
    for (int i = 0; i < S__COUNT; i++) {
        char many[64 + MANY_ROWS * 16];
        const char *text = stmt_sql[i];
        if (i == S_PROCESSED_MANY) {
            size_t n = (size_t)snprintf(many, sizeof(many), "INSERT INTO "
                                        "processed(id, status, tag) VALUES ");
            for (int k = 0; k < MANY_ROWS; k++)
                n += (size_t)snprintf(many + n, sizeof(many) - n, "%s(?,?,?)",
                                      k ? "," : "");
            text = many;
        }
        rc = sqlite3_prepare_v3(st->db, text, -1,
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
    if (st->lock_fd >= 0)
        drop_lock(st); /* after the database */
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

int oq__store_put_processed_many(oq__store *st, const oq__processed *rows,
                                 size_t n)
{
    sqlite3_stmt *s = st->st[S_PROCESSED_MANY];
    int rc = 0;

    for (; n >= MANY_ROWS && rc == 0; n -= MANY_ROWS, rows += MANY_ROWS) {
        for (int k = 0; k < MANY_ROWS; k++) {
            bind_text(s, 3 * k + 1, rows[k].id, rows[k].len);
            sqlite3_bind_int(s, 3 * k + 2, rows[k].status);
            sqlite3_bind_int64(s, 3 * k + 3, (sqlite3_int64)rows[k].tag);
        }
        rc = step(st, S_PROCESSED_MANY, "cannot record processed ids");
    }
    for (size_t k = 0; k < n && rc == 0; k++)
        rc = oq__store_put_processed(st, rows[k].id, rows[k].len,
                                     rows[k].status, rows[k].tag);
    return rc;
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

int oq__store_del_dead(oq__store *st, uint64_t tag)
{
    sqlite3_bind_int64(st->st[S_DEL_DEAD], 1, (sqlite3_int64)tag);
    return step(st, S_DEL_DEAD, "cannot delete a dead letter");
}

int oq__store_retire_dead(oq__store *st, unsigned file)
{
    sqlite3_stmt *s;
    int rc = sqlite3_prepare_v2(st->db, "UPDATE dead_letters SET tag = ?3 + "
                                "seq WHERE tag >= ?1 AND tag < ?2", -1, &s,
                                NULL);

    if (rc != SQLITE_OK)
        return db_err(st, rc, "cannot write the state");
    sqlite3_bind_int64(s, 1, (sqlite3_int64)OQ__TAG(file, 0));
    sqlite3_bind_int64(s, 2, (sqlite3_int64)OQ__TAG(file + 1, 0));
    sqlite3_bind_int64(s, 3, (sqlite3_int64)OQ__TAG(OQ__TAG_RETIRED, 0));
    rc = sqlite3_step(s);
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? 0 : db_err(st, rc, "cannot write the state");
}

int oq__store_max_dead_line(oq__store *st, unsigned file, uint64_t above,
                            uint64_t *line)
{
    sqlite3_stmt *s;
    int rc = sqlite3_prepare_v2(st->db, "SELECT max(tag) FROM dead_letters "
                                "WHERE tag > ?1 AND tag < ?2", -1, &s, NULL);

    *line = 0;
    if (rc != SQLITE_OK)
        return db_err(st, rc, "cannot read the state");
    sqlite3_bind_int64(s, 1, (sqlite3_int64)OQ__TAG(file, above));
    sqlite3_bind_int64(s, 2, (sqlite3_int64)OQ__TAG(file + 1, 0));
    rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        if (sqlite3_column_type(s, 0) != SQLITE_NULL)
            *line = OQ__TAG_LINE((uint64_t)sqlite3_column_int64(s, 0));
        rc = SQLITE_DONE;
    }
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? 0 : db_err(st, rc, "cannot read the state");
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
        /* One pass (-1): copying in steps restarts whenever a run commits
         * meanwhile, and may never finish during a busy run. */
        rc = sqlite3_backup_step(b, -1);
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

/* ============================================================ tracker */

/*
 * Per-source progress: which lines are settled (processed, duplicate, dead
 * or blank) and durable. Lines settle out of order, so each tracked file
 * has a ring of the lines read but not yet below its watermark, in line
 * order, each with its end offset and state; the watermark moves over the
 * settled prefix. The ring holds at most what is in the queue or the
 * committer (the reader throttles on the queue), not the file.
 *
 * Lock: t->mu guards everything below it; a leaf. The reader thread adds
 * lines; the committer settles them and collects the moved watermarks.
 */
enum { L_PENDING = 0, L_SETTLED, L_BLANK };

typedef struct tline {
    uint64_t end;       /* offset just past the line */
    uint8_t state;      /* L_* */
} tline;

typedef struct tfile {
    bool tracked;       /* a regular file with a sources row */
    bool dirty;         /* watermark moved since the last collect */
    oq__source_row row; /* identity and watermark; row.path is owned */
    tline *ring;
    size_t cap;         /* a power of 2, or 0 */
    size_t head, len;
    uint64_t first;     /* line number of ring[head] */
} tfile;

struct oq__tracker {
    pthread_mutex_t mu;
    tfile *f;
    unsigned n;
    uint64_t blank_untracked; /* blank lines of untracked inputs (stdin,
                                 pipes) not yet counted in the state */
};

int oq__tracker_new(oq__tracker **out, unsigned nfiles)
{
    oq__tracker *t = oq__calloc(1, sizeof(*t));

    if (t == NULL || (t->f = oq__calloc(nfiles ? nfiles : 1,
                                        sizeof(*t->f))) == NULL) {
        oq__free(t);
        return OQ_ENOMEM;
    }
    t->n = nfiles;
    oq__mutex_init(&t->mu);
    *out = t;
    return 0;
}

void oq__tracker_free(oq__tracker *t)
{
    if (t == NULL)
        return;
    for (unsigned i = 0; i < t->n; i++) {
        oq__free(t->f[i].ring);
        oq__free((char *)(uintptr_t)t->f[i].row.path);
    }
    oq__free(t->f);
    pthread_mutex_destroy(&t->mu);
    oq__free(t);
}

int oq__tracker_track(oq__tracker *t, const oq__source_row *row)
{
    tfile *f;
    char *path;

    if (row->file >= t->n)
        return OQ_EINVAL;
    if ((path = oq__malloc(strlen(row->path) + 1)) == NULL)
        return OQ_ENOMEM;
    strcpy(path, row->path);
    f = &t->f[row->file];
    f->tracked = true;
    f->dirty = true; /* written with the first batch: the identity */
    f->row = *row;
    f->row.path = path;
    f->first = row->line + 1;
    return 0;
}

/* Moves the watermark over the settled prefix. t->mu held. */
static void advance(tfile *f)
{
    while (f->len > 0 && f->ring[f->head].state != L_PENDING) {
        tline *l = &f->ring[f->head];
        /* A last line without a newline ends where it starts (see the
         * reader): it is settled in this run but the watermark stays
         * before it (offset and line), so a rerun reads it again (whole,
         * if the file grew meanwhile; its id is then a duplicate). */
        if (l->end > f->row.offset) {
            f->row.offset = l->end;
            f->row.line = f->first;
            f->row.blank += l->state == L_BLANK;
        }
        f->first++;
        f->head = (f->head + 1) & (f->cap - 1);
        f->len--;
        f->dirty = true;
    }
}

static int grow(tfile *f)
{
    size_t ncap = f->cap ? f->cap * 2 : 1024;
    tline *nr = oq__malloc(ncap * sizeof(*nr));

    if (nr == NULL)
        return OQ_ENOMEM;
    for (size_t i = 0; i < f->len; i++)
        nr[i] = f->ring[(f->head + i) & (f->cap - 1)];
    oq__free(f->ring);
    f->ring = nr;
    f->cap = ncap;
    f->head = 0;
    return 0;
}

int oq__tracker_add(oq__tracker *t, unsigned file, uint64_t line,
                    uint64_t end, bool blank)
{
    tfile *f = file < t->n ? &t->f[file] : NULL;
    int rc = 0;

    if (f == NULL || !f->tracked) {
        /* Settled as it is read; counted in the state's totals with the
         * next transaction. */
        if (blank) {
            pthread_mutex_lock(&t->mu);
            t->blank_untracked++;
            pthread_mutex_unlock(&t->mu);
        }
        return 0;
    }
    pthread_mutex_lock(&t->mu);
    if (line != f->first + f->len) {
        rc = OQ_EINVAL; /* lines come in order, once each */
    } else if (f->len == f->cap && (rc = grow(f)) == 0) {
        ;
    }
    if (rc == 0) {
        f->ring[(f->head + f->len) & (f->cap - 1)] =
            (tline){ end, blank ? L_BLANK : L_PENDING };
        f->len++;
        if (blank)
            advance(f);
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

/* t->mu held. */
static void settle_locked(oq__tracker *t, uint64_t tag)
{
    unsigned file = OQ__TAG_FILE(tag);
    uint64_t line = OQ__TAG_LINE(tag);
    tfile *f = file < t->n ? &t->f[file] : NULL;

    if (f == NULL || !f->tracked || line < f->first ||
        line - f->first >= f->len)
        return;
    f->ring[(f->head + (line - f->first)) & (f->cap - 1)].state = L_SETTLED;
    if (line == f->first)
        advance(f);
}

void oq__tracker_settle(oq__tracker *t, const uint64_t *tags, size_t n)
{
    pthread_mutex_lock(&t->mu);
    for (size_t i = 0; i < n; i++)
        settle_locked(t, tags[i]);
    pthread_mutex_unlock(&t->mu);
}

size_t oq__tracker_collect(oq__tracker *t, oq__source_row *rows, size_t max)
{
    size_t k = 0;

    pthread_mutex_lock(&t->mu);
    for (unsigned i = 0; i < t->n && k < max; i++) {
        if (t->f[i].tracked && t->f[i].dirty) {
            rows[k++] = t->f[i].row;
            t->f[i].dirty = false;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return k;
}

/* ========================================================== committer */

/*
 * The committer thread: group commit of finished events.
 *
 * The SQLite ledger's commit (oq__sqlite_ledger_methods, below) hands it
 * the engine's commit entries (submit), duplicates come through
 * oq__committer_duplicate; both copy what they need into one allocation
 * (a citem) and append it to c->items. A
 * transaction starts when `batch` items are pending or the oldest is
 * `interval_ms` old, and takes every pending item up to `max_batch` (group
 * commit: what arrives during one fsync goes into the next transaction),
 * and the queue's new dead letters; it writes all of it at once: processed ids, outputs, aggregate deltas (summed
 * per key over the batch first), dead letters, deleted redrive rows, and the
 * sources' new watermarks. Only after COMMIT returns does it mark the ids
 * DONE and hand the pinned messages back to the engine (the ledger's
 * set_done callback), which settles them, so whatever is acked is on disk.
 * If COMMIT fails, the batch is rolled back, the claims released, the
 * messages handed back failed (the engine returns them to the queue), and
 * the committer refuses everything from then on (the run stops with the
 * error). It settles no queue itself.
 *
 * Lock: c->mu guards items, tail, nitems, first_ms, stopping, failed and
 * err; a leaf. Submitters wait on c->room when nitems reaches max_pending
 * (back-pressure); the thread waits on c->cv. The thread alone touches the
 * store and the batch buffers (ops, tags, sums).
 */
enum { C_EVENT, C_FAILED, C_DUP, C_DEAD };

typedef struct citem {
    struct citem *next;
    int kind;               /* C_* */
    oq_delivery d;          /* C_EVENT/C_FAILED: the pinned delivery */
    uint64_t token;         /* the prepared claim */
    uint64_t tag;
    uint32_t attempts;      /* C_FAILED/C_DEAD: receive count */
    oq_dlq_reason reason;   /* C_FAILED/C_DEAD */
    int64_t sent_ms, dead_ms; /* C_FAILED/C_DEAD: monotonic ms */
    size_t id_len;
    size_t out_len;         /* outputs (C_EVENT): serialized after the id */
    size_t event_len;       /* C_DEAD: the payload, after the outputs */
    size_t err_len;         /* C_FAILED/C_DEAD: error text, last */
    char data[];            /* id, outputs, event, error */
} citem;

/* An aggregate delta summed over a batch. */
typedef struct csum {
    UT_hash_handle hh;
    const char *key;
    size_t len;
    int64_t delta;
} csum;

struct oq__committer {
    oq__committer_opts o;   /* immutable after start */
    pthread_t thread;
    bool started;

    pthread_mutex_t mu;
    pthread_cond_t cv;      /* items arrived, or stop */
    pthread_cond_t room;    /* the thread took the items */
    citem *items, *tail;    /* guarded by mu */
    size_t nitems;          /* guarded by mu */
    int64_t first_ms;       /* guarded by mu: when the oldest item came */
    bool stopping;          /* guarded by mu */
    bool failed;            /* guarded by mu */
    char err[512];          /* guarded by mu */

    /* Where committed (or failed) deliveries go back: the engine. Set
     * before the engine's workers start; read by the thread. */
    oq__ledger_done_fn done;
    void *done_arg;
    oq__mem_ledger claims;  /* claims: the processed set, no sink */

    /* The thread's own. */
    oq_settle *ops;
    uint64_t *tags;
    csum *sums, *sum_mem;
    oq__processed *prows;   /* the batch's processed ids */
    size_t nprows;
    size_t ops_cap, tags_cap, sum_cap, prows_cap;
    citem *dead, *dead_tail; /* dead letters taken from the queue */

    _Atomic uint64_t dead_written, commits, events_max, events_total;
    _Atomic int64_t write_ms;   /* in write_batch, ms */
    _Atomic int64_t finish_ms;  /* marking DONE and settling, ms */
};

#define REC_MARK 'R'
#define CNT_MARK 'C'

/* Serializes a txn's outputs: a first pass measures (p == NULL), the
 * second writes into the item. */
typedef struct ser {
    char *p;
    size_t len;
} ser;

static void ser_put(ser *b, const void *data, size_t n)
{
    if (b->p && n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void ser_record(const void *data, size_t len, void *arg)
{
    uint32_t n = (uint32_t)len;
    ser_put(arg, &(char){ REC_MARK }, 1);
    ser_put(arg, &n, sizeof(n));
    ser_put(arg, data, len);
}

static void ser_count(const char *key, size_t len, int64_t delta, void *arg)
{
    uint32_t n = (uint32_t)len;
    ser_put(arg, &(char){ CNT_MARK }, 1);
    ser_put(arg, &n, sizeof(n));
    ser_put(arg, key, len);
    ser_put(arg, &delta, sizeof(delta));
}

static citem *item_new(int kind, const char *id, size_t id_len,
                       const void *out, size_t out_len, const void *event,
                       size_t event_len, const char *err)
{
    size_t err_len = err ? strlen(err) : 0;
    citem *it = oq__malloc(sizeof(*it) + id_len + out_len + event_len +
                           err_len + 1);

    if (it == NULL)
        return NULL;
    memset(it, 0, sizeof(*it));
    it->kind = kind;
    it->id_len = id_len;
    it->out_len = out_len;
    it->event_len = event_len;
    it->err_len = err_len;
    if (id_len)
        memcpy(it->data, id, id_len);
    if (out_len && out)
        memcpy(it->data + id_len, out, out_len);
    if (event_len)
        memcpy(it->data + id_len + out_len, event, event_len);
    if (err_len)
        memcpy(it->data + id_len + out_len + event_len, err, err_len);
    it->data[id_len + out_len + event_len + err_len] = '\0';
    return it;
}

static const char *item_event(const citem *it)
{
    return it->data + it->id_len + it->out_len;
}

static const char *item_error(const citem *it)
{
    return it->data + it->id_len + it->out_len + it->event_len;
}

/* Appends it (waiting for room unless it is a dead letter). Returns 0, or
 * OQ_EIO once the committer failed (it is not taken). */
static int enqueue(oq__committer *c, citem *it, bool wait)
{
    int rc = 0;

    pthread_mutex_lock(&c->mu);
    while (wait && !c->failed && !c->stopping &&
           c->nitems >= c->o.max_pending)
        pthread_cond_wait(&c->room, &c->mu);
    if (c->failed) {
        rc = OQ_EIO;
    } else {
        if (c->nitems == 0)
            c->first_ms = oq_clock_now(NULL);
        if (c->tail)
            c->tail->next = it;
        else
            c->items = it;
        c->tail = it;
        if (++c->nitems == c->o.batch)
            pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Queues a commit entry (its claim prepared) for the next transaction. */
static int submit(oq__committer *c, const oq__lcommit *e)
{
    bool failed = e->kind == OQ__LC_DEAD;
    const oq_delivery *d = e->op->d;
    ser b = { NULL, 0 };
    const char *err = failed ? oq_txn_error_text(e->txn) : NULL;
    citem *it;
    int rc;

    if (!failed)
        oq_txn_foreach(e->txn, ser_record, ser_count, &b);
    it = item_new(failed ? C_FAILED : C_EVENT, e->ev->id, e->ev->id_len,
                  NULL, b.len, failed ? d->payload : NULL,
                  failed ? d->payload_len : 0, err);
    if (it == NULL)
        return OQ_ENOMEM;
    if (b.len > 0) {
        b = (ser){ it->data + it->id_len, 0 };
        oq_txn_foreach(e->txn, ser_record, ser_count, &b);
    }
    it->d = *d;
    it->reason = failed ? e->op->reason : OQ_DLQ_FAILED;
    it->token = e->claim->token;
    it->tag = e->ev->tag;
    it->attempts = d->receive_count;
    it->sent_ms = d->sent_ms;
    rc = enqueue(c, it, true);
    if (rc != 0)
        oq__free(it);
    return rc;
}

void oq__committer_duplicate(oq__committer *c, const oq_event *ev)
{
    citem *it = item_new(C_DUP, ev->id, c->o.keep_first ? ev->id_len : 0,
                         NULL, 0, NULL, 0, NULL);

    /* Without memory the line is not settled: a rerun reads it again and
     * finds the id DONE again. Nothing is lost. */
    if (it == NULL)
        return;
    it->tag = ev->tag;
    if (enqueue(c, it, true) != 0)
        oq__free(it);
}

/* Queue dead letters, taken on the committer thread. */
static void take_dead(const oq_dead_letter *dl, void *arg)
{
    oq__committer *c = arg;
    citem *it;

    /* Handler failures were written with their event (C_FAILED). */
    if (dl->reason == OQ_DLQ_FAILED)
        return;
    it = item_new(C_DEAD, dl->id, dl->id_len, NULL, 0, dl->payload,
                  dl->payload_len, dl->error);
    if (it == NULL) {
        /* Not recorded: its line stays unsettled, so a rerun reads it and
         * dead-letters it again. Stop, as for a failed commit. */
        pthread_mutex_lock(&c->mu);
        if (!c->failed)
            snprintf(c->err, sizeof(c->err), "out of memory recording a "
                     "dead letter");
        c->failed = true;
        pthread_mutex_unlock(&c->mu);
        return;
    }
    it->tag = dl->tag;
    it->reason = dl->reason;
    it->attempts = dl->attempts;
    it->sent_ms = dl->sent_ms;
    it->dead_ms = dl->dead_ms;
    if (c->dead_tail)
        c->dead_tail->next = it;
    else
        c->dead = it;
    c->dead_tail = it;
}

/* Makes sure the batch arrays hold n entries. */
static int reserve(void **p, size_t *cap, size_t n, size_t size)
{
    void *np;

    if (n <= *cap)
        return 0;
    if ((np = oq__realloc(*p, n * size)) == NULL)
        return OQ_ENOMEM;
    *p = np;
    *cap = n;
    return 0;
}

/* Adds delta to key's batch sum. OQ_ENOMEM if the table could not grow
 * (the batch then fails and rolls back: nothing is lost). */
static int sum_add(oq__committer *c, size_t *nsum, const char *key,
                   size_t len, int64_t delta)
{
    csum *e;

    HASH_FIND(hh, c->sums, key, len, e);
    if (e == NULL) {
        e = &c->sum_mem[(*nsum)++];
        e->key = key;
        e->len = len;
        e->delta = 0;
        oq__hash_oom = 0;
        HASH_ADD_KEYPTR(hh, c->sums, e->key, len, e);
        if (oq__hash_oom) {
            (*nsum)--;
            return OQ_ENOMEM;
        }
    }
    e->delta += delta;
    return 0;
}

/* Writes one event's id and outputs (counts go to the batch sums). */
static int write_event(oq__committer *c, const citem *it, uint64_t pos,
                       size_t *nsum)
{
    oq__store *st = c->o.store;
    const char *p = it->data + it->id_len, *end = p + it->out_len;
    unsigned seq = 0;
    int rc = 0;

    c->prows[c->nprows++] = (oq__processed){ it->data, it->id_len, 0, pos };

    while (rc == 0 && p < end) {
        char mark = *p++;
        uint32_t n;
        memcpy(&n, p, sizeof(n));
        p += sizeof(n);
        if (mark == REC_MARK) {
            rc = oq__store_put_output(st, it->data, it->id_len, seq++, p, n);
            p += n;
        } else {
            int64_t delta;
            memcpy(&delta, p + n, sizeof(delta));
            rc = sum_add(c, nsum, p, n, delta);
            p += n + sizeof(delta);
        }
    }
    return rc;
}

/* Writes a dead letter (a handler failure or one of the queue's). */
static int write_dead(oq__committer *c, const citem *it)
{
    char buf[8192];
    oq__dead_row row = {
        .tag = it->tag,
        .source = "",
        .id = it->id_len || it->kind == C_FAILED ? it->data : NULL,
        .id_len = it->id_len,
        .reason = oq_dlq_reason_name(it->reason),
        .error = item_error(it),
        .attempts = it->attempts,
        .first_seen_ms = it->sent_ms,
        .dead_ms = it->kind == C_FAILED ? oq_clock_now(NULL) : it->dead_ms,
        .event = item_event(it),
        .event_len = it->event_len,
    };

    if (c->o.describe)
        c->o.describe(&row, buf, sizeof(buf), c->o.arg);
    return oq__store_put_dead(c->o.store, &row);
}

static uint64_t position(const oq__committer *c, uint64_t tag)
{
    return c->o.position ? c->o.position(tag, c->o.arg) : tag;
}

static int del_stale(oq__store *st, uint64_t tag)
{
    sqlite3_bind_int64(st->st[S_DEL_STALE], 1, (sqlite3_int64)tag);
    return step(st, S_DEL_STALE, "cannot delete a dead letter");
}

static int meta_add(oq__store *st, const char *key, uint64_t n)
{
    sqlite3_bind_text(st->st[S_META_ADD], 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st->st[S_META_ADD], 2, (sqlite3_int64)n);
    return step(st, S_META_ADD, "cannot update the totals");
}

/* Writes the batch (items, then the queue's dead letters) in one
 * transaction. Fills c->tags with the lines it settles. */
static int write_batch(oq__committer *c, citem *items, size_t n,
                       size_t *ntags)
{
    oq__store *st = c->o.store;
    oq__source_row rows[64];
    size_t nsum = 0, nrows, k = 0, ndead = 0;
    uint64_t ndup = 0, nblank = 0;
    int rc;

    for (citem *it = c->dead; it; it = it->next)
        ndead++;
    rc = reserve((void **)&c->tags, &c->tags_cap, n + ndead + 1,
                 sizeof(*c->tags));
    if (rc == 0) {
        size_t need = 0;
        for (citem *it = items; it; it = it->next)
            need += it->out_len / (1 + sizeof(uint32_t) + sizeof(int64_t)) + 1;
        rc = reserve((void **)&c->sum_mem, &c->sum_cap, need,
                     sizeof(*c->sum_mem));
    }
    if (rc == 0)
        rc = reserve((void **)&c->prows, &c->prows_cap, n + 1,
                     sizeof(*c->prows));
    if (rc == 0)
        rc = oq__store_begin(st);
    if (rc != 0)
        return rc;
    c->sums = NULL;
    c->nprows = 0;
    for (citem *it = items; it && rc == 0; it = it->next) {
        uint64_t pos = position(c, it->tag);
        unsigned file = OQ__TAG_FILE(it->tag);
        if (it->kind == C_EVENT)
            rc = write_event(c, it, pos, &nsum);
        /* A dead letter committed above the watermark before a crash,
         * whose line is processed now: it is not dead any more. */
        if (rc == 0 && it->kind == C_EVENT && file < c->o.nstale &&
            OQ__TAG_LINE(it->tag) <= c->o.stale_dead[file])
            rc = oq__store_del_dead(st, it->tag);
        else if (it->kind == C_FAILED)
            c->prows[c->nprows++] = (oq__processed){ it->data, it->id_len, 1,
                                                     pos };
        else if (it->kind == C_DUP && it->id_len > 0)
            rc = oq__store_min_tag(st, it->data, it->id_len, pos);
        /* Likewise when its line is a duplicate now (a last line that
         * was cut short when it was read: the whole line is a copy). */
        if (rc == 0 && it->kind == C_DUP && file < c->o.nstale &&
            OQ__TAG_LINE(it->tag) <= c->o.stale_dead[file])
            rc = del_stale(st, it->tag);
        ndup += it->kind == C_DUP;
        if (rc == 0 && it->kind == C_FAILED)
            rc = write_dead(c, it);
        if (rc == 0 && OQ__TAG_FILE(it->tag) == OQ__TAG_REDRIVE)
            rc = oq__store_del_redrive(st, (int64_t)OQ__TAG_LINE(it->tag));
        c->tags[k++] = it->tag;
    }
    if (rc == 0)
        rc = oq__store_put_processed_many(st, c->prows, c->nprows);
    for (csum *e = c->sums; e && rc == 0; e = e->hh.next)
        rc = oq__store_add_count(st, e->key, e->len, e->delta);
    HASH_CLEAR(hh, c->sums);
    for (citem *it = c->dead; it && rc == 0; it = it->next) {
        rc = write_dead(c, it);
        if (rc == 0 && OQ__TAG_FILE(it->tag) == OQ__TAG_REDRIVE)
            rc = oq__store_del_redrive(st, (int64_t)OQ__TAG_LINE(it->tag));
        c->tags[k++] = it->tag;
    }
    *ntags = k;
    /* The state's totals (onceq stats): duplicates and the blank lines of
     * untracked inputs are counted in the transaction that settles them. */
    if (rc == 0 && c->o.tracker) {
        pthread_mutex_lock(&c->o.tracker->mu);
        nblank = c->o.tracker->blank_untracked;
        c->o.tracker->blank_untracked = 0;
        pthread_mutex_unlock(&c->o.tracker->mu);
    }
    if (rc == 0 && ndup > 0)
        rc = meta_add(st, "duplicates", ndup);
    if (rc == 0 && nblank > 0)
        rc = meta_add(st, "blank_untracked", nblank);
    if (rc != 0 && nblank > 0 && c->o.tracker) {
        pthread_mutex_lock(&c->o.tracker->mu);
        c->o.tracker->blank_untracked += nblank; /* not written */
        pthread_mutex_unlock(&c->o.tracker->mu);
    }
    if (rc == 0 && c->o.tracker) {
        /* The watermarks move with what this transaction makes durable;
         * if it fails the run stops, and they are not written. */
        oq__tracker_settle(c->o.tracker, c->tags, k);
        do {
            nrows = oq__tracker_collect(c->o.tracker, rows, 64);
            for (size_t i = 0; i < nrows && rc == 0; i++)
                rc = oq__store_put_source(st, &rows[i]);
        } while (rc == 0 && nrows == 64);
    }
    if (rc == 0)
        return oq__store_commit(st);
    oq__store_rollback(st);
    return rc;
}

static void nap_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* After COMMIT: the ids become DONE, then the engine settles the
 * messages. */
static void finish_ok(oq__committer *c, citem *items, size_t n)
{
    size_t k = 0;

    for (citem *it = items; it; it = it->next) {
        if (it->kind != C_EVENT && it->kind != C_FAILED)
            continue;
        /* A prepared claim cannot go stale; only memory can be short.
         * The event is on disk, so wait for memory rather than give up. */
        while (oq_idset_commit(c->o.s, it->data, it->id_len, it->token) ==
               OQ_ENOMEM)
            nap_ms(1);
        c->ops[k++] = (oq_settle){
            .d = &it->d,
            .op = it->kind == C_EVENT ? OQ_SETTLE_ACK : OQ_SETTLE_DEAD,
            .reason = it->reason,
            .error = item_error(it),
        };
    }
    if (k > 0)
        c->done(c->done_arg, c->ops, k, 0);
    atomic_fetch_add(&c->commits, 1);
    atomic_fetch_add(&c->events_total, n);
    if (n > atomic_load(&c->events_max))
        atomic_store(&c->events_max, n);
}

/* After a failed COMMIT (rolled back): nothing of the batch was kept, so
 * nothing is acked; the claims are given up and the messages go back. */
static void finish_failed(oq__committer *c, citem *items, const char *err)
{
    /* A buffer of its own: this must work when c->ops could not grow. */
    oq_settle ops[64];
    size_t k = 0;

    for (citem *it = items; it; it = it->next) {
        if (it->kind != C_EVENT && it->kind != C_FAILED)
            continue;
        oq_idset_release(c->o.s, it->data, it->id_len, it->token);
        ops[k++] = (oq_settle){ .d = &it->d };
        if (k == sizeof(ops) / sizeof(ops[0])) {
            c->done(c->done_arg, ops, k, OQ_EIO);
            k = 0;
        }
    }
    if (k > 0)
        c->done(c->done_arg, ops, k, OQ_EIO);
    pthread_mutex_lock(&c->mu);
    if (!c->failed)
        snprintf(c->err, sizeof(c->err), "%s", err);
    c->failed = true;
    pthread_cond_broadcast(&c->room);
    pthread_mutex_unlock(&c->mu);
}

static void free_items(citem *it)
{
    while (it) {
        citem *next = it->next;
        oq__free(it);
        it = next;
    }
}

/* Takes the pending items once there are enough, or the oldest is old
 * enough, or every interval (to take the queue's dead letters). */
static citem *take_items(oq__committer *c, size_t *n, bool *stopping,
                         bool *failed)
{
    citem *items;

    pthread_mutex_lock(&c->mu);
    while (!c->stopping && c->nitems < c->o.batch) {
        int64_t wait = c->o.interval_ms;
        if (c->nitems > 0) {
            wait = c->first_ms + c->o.interval_ms - oq_clock_now(NULL);
            if (wait <= 0)
                break;
        }
        struct timespec until = oq__abstime_after(wait);
        if (pthread_cond_timedwait(&c->cv, &c->mu, &until) != 0 &&
            c->nitems == 0)
            break; /* idle: look at the dead letters */
    }
    /* Group commit: `batch` events (or the interval) start a transaction,
     * and it takes everything that is pending, up to max_batch. While one
     * transaction waits for its fsync, the next one fills up: with a fixed
     * size, throughput would be capped at batch / fsync time. */
    items = c->items;
    *n = OQ__MIN(c->nitems, c->o.max_batch);
    if (*n == c->nitems) {
        c->items = c->tail = NULL;
    } else {
        citem *last = items;
        for (size_t i = 1; i < *n; i++)
            last = last->next;
        c->items = last->next;
        last->next = NULL;
        c->first_ms = oq_clock_now(NULL);
    }
    c->nitems -= *n;
    *stopping = c->stopping;
    *failed = c->failed;
    pthread_cond_broadcast(&c->room);
    pthread_mutex_unlock(&c->mu);
    return items;
}

/* Blank lines move a watermark without any item to write. */
static bool tracker_dirty(oq__committer *c)
{
    oq__tracker *t = c->o.tracker;
    bool dirty = false;

    if (t == NULL)
        return false;
    pthread_mutex_lock(&t->mu);
    dirty = t->blank_untracked > 0;
    for (unsigned i = 0; i < t->n && !dirty; i++)
        dirty = t->f[i].tracked && t->f[i].dirty;
    pthread_mutex_unlock(&t->mu);
    return dirty;
}

static void *committer_main(void *arg)
{
    oq__committer *c = arg;

    for (;;) {
        size_t n, nd = 0, ntags = 0;
        bool stopping, failed;
        citem *items = take_items(c, &n, &stopping, &failed);
        int rc;

        if (!failed)
            oq_queue_dead_letters(c->o.q, 1, take_dead, c);
        for (citem *it = c->dead; it; it = it->next)
            nd++;
        if (failed) {
            /* Refuse what came in meanwhile, as a failed batch. */
            finish_failed(c, items, "");
            free_items(items);
            if (stopping)
                break;
            continue;
        }
        if (n + nd > 0 || tracker_dirty(c)) {
            int64_t t0 = oq_clock_now(NULL), t1;
            rc = reserve((void **)&c->ops, &c->ops_cap, n + 1,
                         sizeof(*c->ops));
            if (rc == 0)
                rc = write_batch(c, items, n, &ntags);
            t1 = oq_clock_now(NULL);
            if (rc == 0)
                finish_ok(c, items, n + nd);
            else
                finish_failed(c, items, rc == OQ_ENOMEM &&
                              c->ops_cap < n + 1 ? "out of memory"
                              : oq__store_error(c->o.store));
            atomic_fetch_add(&c->write_ms, t1 - t0);
            atomic_fetch_add(&c->finish_ms, oq_clock_now(NULL) - t1);
            atomic_fetch_add(&c->dead_written, rc == 0 ? nd : 0);
        }
        free_items(items);
        free_items(c->dead);
        c->dead = c->dead_tail = NULL;
        if (stopping && n == 0 && nd == 0 && !tracker_dirty(c))
            break;
    }
    return NULL;
}

int oq__committer_start(oq__committer **out, const oq__committer_opts *o)
{
    oq__committer *c = oq__calloc(1, sizeof(*c));
    int rc;

    if (c == NULL)
        return OQ_ENOMEM;
    c->o = *o;
    c->claims = (oq__mem_ledger){ .s = o->s };
    if (c->o.batch == 0)
        c->o.batch = 256;
    if (c->o.interval_ms <= 0)
        c->o.interval_ms = 5;
    if (c->o.max_batch < c->o.batch)
        c->o.max_batch = OQ__MAX(16 * c->o.batch, (size_t)4096);
    if (c->o.max_pending < c->o.max_batch)
        c->o.max_pending = 2 * c->o.max_batch;
    oq__mutex_init(&c->mu);
    oq__cond_init_monotonic(&c->cv);
    oq__cond_init_monotonic(&c->room);
    rc = -pthread_create(&c->thread, NULL, committer_main, c);
    if (rc != 0) {
        oq__committer_free(c);
        return rc;
    }
    c->started = true;
    *out = c;
    return 0;
}

int oq__committer_stop(oq__committer *c, char *err, size_t errlen)
{
    int rc = 0;

    if (c == NULL)
        return 0;
    pthread_mutex_lock(&c->mu);
    c->stopping = true;
    pthread_cond_broadcast(&c->cv);
    pthread_cond_broadcast(&c->room);
    pthread_mutex_unlock(&c->mu);
    if (c->started) {
        pthread_join(c->thread, NULL);
        c->started = false;
    }
    pthread_mutex_lock(&c->mu);
    if (c->failed) {
        rc = OQ_EIO;
        if (err)
            snprintf(err, errlen, "%s", c->err);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

bool oq__committer_failed(oq__committer *c, char *err, size_t errlen)
{
    bool failed;

    pthread_mutex_lock(&c->mu);
    failed = c->failed;
    if (failed && err)
        snprintf(err, errlen, "%s", c->err);
    pthread_mutex_unlock(&c->mu);
    return failed;
}

void oq__committer_stats_get(oq__committer *c, oq__committer_stats *out)
{
    out->commits = atomic_load(&c->commits);
    out->events_total = atomic_load(&c->events_total);
    out->events_max = atomic_load(&c->events_max);
    out->write_ms = atomic_load(&c->write_ms);
    out->finish_ms = atomic_load(&c->finish_ms);
}

void oq__committer_free(oq__committer *c)
{
    if (c == NULL)
        return;
    if (c->started)
        oq__committer_stop(c, NULL, 0);
    free_items(c->items);
    free_items(c->dead);
    oq__free(c->ops);
    oq__free(c->tags);
    oq__free(c->sum_mem);
    oq__free(c->prows);
    pthread_cond_destroy(&c->cv);
    pthread_cond_destroy(&c->room);
    pthread_mutex_destroy(&c->mu);
    oq__free(c);
}

/* ------------------------------------------------------ the SQLite ledger */

/*
 * The engine's ledger for --state: claims in the processed set (loaded from
 * the state at the start), commits through the committer thread. A commit
 * entry's claim is prepared (fenced: a lost lease is OQ_ESTALE, nothing
 * queued) and the entry queued; the committer writes it in the next
 * transaction, marks the id DONE, and hands the pinned delivery back to
 * the engine (done), which acks or dead-letters it. A failed transaction
 * gives the claims back and hands the deliveries back as failed.
 */
static int sl_claim(void *ctx, oq__lclaim *cl, size_t n)
{
    oq__committer *c = ctx;
    return oq__mem_ledger_methods.claim(&c->claims, cl, n);
}

static void sl_release(void *ctx, oq__lclaim *cl, size_t n)
{
    oq__committer *c = ctx;
    oq__mem_ledger_methods.release(&c->claims, cl, n);
}

static int sl_extend(void *ctx, const oq__lclaim *cl, int64_t deadline_ms)
{
    oq__committer *c = ctx;
    return oq__mem_ledger_methods.extend(&c->claims, cl, deadline_ms);
}

static void sl_commit(void *ctx, oq__lcommit *e, size_t n)
{
    oq__committer *c = ctx;
    int64_t now = oq__idset_now(c->o.s); /* once a batch: idset.c, Time */

    for (size_t i = 0; i < n; i++) {
        const oq__lclaim *cl = e[i].claim;
        int rc = oq__idset_prepare_d(c->o.s, cl->dg, cl->token, now);
        if (rc == 0 && (rc = submit(c, &e[i])) != 0)
            oq__idset_release_d(c->o.s, cl->dg, cl->token);
        e[i].result = rc == 0 ? OQ__PENDING : rc;
    }
}

static void sl_set_done(void *ledger, oq__ledger_done_fn fn, void *engine)
{
    oq__committer *c = ledger;
    c->done = fn;
    c->done_arg = engine;
}

const oq__ledger_methods oq__sqlite_ledger_methods = {
    .version = 1,
    .name = "sqlite",
    .flags = 0,
    .attach = oq__ctx_self,
    .detach = oq__ctx_none,
    .claim = sl_claim,
    .release = sl_release,
    .extend = sl_extend,
    .commit = sl_commit,
    .set_done = sl_set_done,
};
