/*
 * Durable runs (--state): the state opened and checked, inputs resumed at
 * their watermarks, redriven events sent, and results, dead letters and
 * totals read back from the state at the end (src/runner.c runs them).
 */
#include "oq_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sqlite3.h>
#include <xxhash.h>

#define TAG(file, line) (((uint64_t)(file) << 40) | (uint64_t)(line))
#define TAG_FILE(tag) ((unsigned)((tag) >> 40))
#define TAG_LINE(tag) ((tag) & ((1ULL << 40) - 1))

/*
 * Durable mode (--state PATH). The engine hands every finished event to the
 * SQLite ledger's committer (store.c), which writes batches to the SQLite state and only
 * then marks ids DONE and acks; duplicates and the queue's dead letters go
 * through it too, so a line is settled only once what it did is on disk.
 * The reader tells the tracker about every line it reads, so the committer
 * can move each source's watermark over the settled prefix in the same
 * transaction. At the start, the processed ids are loaded into the idset,
 * each input skips to its watermark (after an identity check), and events
 * redriven from the dead letters are sent first. At the end the results and
 * dead letters are written from the state, never from memory.
 */

/* The redriven event of tag, if it is one. */
static const oq__redrive_ent *find_redrive(const oq__runner *r, uint64_t tag)
{
    size_t lo = 0, hi = r->nredrive;
    int64_t seq = (int64_t)OQ__TAG_LINE(tag);

    if (OQ__TAG_FILE(tag) != OQ__TAG_REDRIVE)
        return NULL;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->redrive[mid].seq == seq)
            return &r->redrive[mid];
        if (r->redrive[mid].seq < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static uint64_t position(uint64_t tag, void *arg)
{
    const oq__redrive_ent *e = find_redrive(arg, tag);
    return e ? e->tag : tag;
}

static int64_t to_wall(const oq__runner *r, int64_t mono_ms)
{
    return r->wall0_ms + (mono_ms - r->t0_ms);
}

/* The committer's describe hook: see oq__committer_opts. */
static void describe(oq__dead_row *row, char *buf, size_t buflen, void *arg)
{
    oq__runner *r = arg;
    const oq__redrive_ent *e = find_redrive(r, row->tag);
    size_t used = 0;

    if (e) {
        row->tag = e->tag;
        row->attempts += e->attempts;
        row->source = e->source;
        row->history = e->history;
    } else {
        const char *src = oq__reader_path(r->reader, OQ__TAG_FILE(row->tag));
        int n = snprintf(buf, buflen, "%s:%" PRIu64,
                         strcmp(src, "-") == 0 ? "<stdin>" : src,
                         (uint64_t)OQ__TAG_LINE(row->tag));
        row->source = buf;
        used = n < 0 ? buflen : OQ__MIN((size_t)n + 1, buflen);
    }
    if (row->id == NULL && strcmp(row->reason, "parse_error") != 0 &&
        strcmp(row->reason, "too_large") != 0) {
        oq_event ev = { 0 };
        oq_decoded dec;
        memset(&dec, 0, sizeof(dec));
        ev.payload = row->event;
        ev.payload_len = row->event_len;
        if (oq__json_decode(&ev, &dec, &r->idspec) == 0 &&
            dec.id_len <= buflen - used) {
            memcpy(buf + used, dec.id, dec.id_len);
            row->id = buf + used;
            row->id_len = dec.id_len;
        }
        if (dec.parsed)
            oq__json_free(dec.parsed, &r->idspec);
    }
    row->first_seen_ms = to_wall(r, row->first_seen_ms);
    row->dead_ms = to_wall(r, row->dead_ms);
}

void oq__durable_dup(const oq_event *ev, void *arg)
{
    oq__committer_duplicate(arg, ev);
}

static uint64_t file_bytes(const char *path, const char *suffix)
{
    char p[4200];
    struct stat st;

    snprintf(p, sizeof(p), "%s%s", path, suffix);
    return stat(p, &st) == 0 ? (uint64_t)st.st_size : 0;
}

void oq__write_state_stats(FILE *f, const oq__runner *r, const oq__totals *t)
{
    double avg = t->commits ? (double)t->commit_events / t->commits : 0;

    fprintf(f, ",\"resumed_skipped_lines\":%" PRIu64 ",\"redriven\":%" PRIu64
            ",\"state\":{\"path\":", t->skipped, t->redriven);
    oq__json_write_string(f, r->c->state_path, strlen(r->c->state_path));
    fprintf(f, ",\"loaded_ids\":%" PRIu64 ",\"load_ms\":%" PRId64
            ",\"commits\":%" PRIu64 ",\"commits_per_s\":%.1f"
            ",\"events_per_commit_avg\":%.1f,\"events_per_commit_max\":%"
            PRIu64 ",\"processed_ids\":%" PRIu64 ",\"dead_letters\":%" PRIu64
            ",\"db_bytes\":%" PRIu64 ",\"write_ms\":%" PRId64
            ",\"finish_ms\":%" PRId64 "}",
            r->loaded_ids, r->load_ms, t->commits,
            t->elapsed_s > 0 ? t->commits / t->elapsed_s : 0, avg,
            t->commit_max, t->db_processed, t->db_dead, t->db_bytes,
            t->write_ms, t->finish_ms);
}

/* Counts of the state, for the stats (main thread, committer stopped). */
void oq__state_totals(oq__runner *r, oq__totals *t)
{
    sqlite3_stmt *s;
    sqlite3 *db = oq__store_db(r->store);

    if (sqlite3_prepare_v2(db, "SELECT (SELECT count(*) FROM processed "
                           "WHERE status = 0), (SELECT count(*) FROM "
                           "dead_letters)", -1, &s, NULL) == SQLITE_OK) {
        if (sqlite3_step(s) == SQLITE_ROW) {
            t->db_processed = (uint64_t)sqlite3_column_int64(s, 0);
            t->db_dead = (uint64_t)sqlite3_column_int64(s, 1);
        }
        sqlite3_finalize(s);
    }
    t->db_bytes = file_bytes(r->c->state_path, "") +
                  file_bytes(r->c->state_path, "-wal");
}

static void put_record(const void *data, size_t len, void *arg)
{
    fwrite(data, 1, len, arg);
    putc('\n', arg);
}

/* The results, from the state. Returns 0 or an exit status. */
int oq__write_results_db(oq__runner *r)
{
    FILE *f = r->out.f;
    int rc;

    if (r->h.output == OQ__OUT_COUNTS) {
        oq__count_out c = { f, r->h.count_key ? r->h.count_key : "key" };
        rc = oq__store_foreach_count(r->store, oq__write_count, &c);
    } else {
        rc = oq__store_foreach_record(r->store, put_record, f);
    }
    if (rc != 0) {
        fprintf(stderr, "onceq run: %s\n", oq__store_error(r->store));
        oq__out_discard(&r->out, false);
        return 3;
    }
    return oq__out_commit(&r->out, "onceq run");
}

typedef struct dead_out {
    FILE *f;
    uint64_t n;
} dead_out;

static void put_dead(const oq__dead_row *d, void *arg)
{
    dead_out *o = arg;
    oq__write_dead_row(o->f, d, false);
    o->n++;
}

/* The dead letters, from the state; with none, the --dlq file is removed
 * (no stale one). */
int oq__write_dlq_db(oq__runner *r, uint64_t *count)
{
    dead_out o = { r->dlq.f, 0 };
    int rc = oq__store_foreach_dead(r->store, put_dead, &o);

    *count = o.n;
    if (rc != 0) {
        fprintf(stderr, "onceq run: %s\n", oq__store_error(r->store));
        oq__out_discard(&r->dlq, false);
        return 3;
    }
    if (o.n == 0) {
        oq__out_discard(&r->dlq, true);
        return 0;
    }
    return oq__out_commit(&r->dlq, "onceq run");
}

/* The handler and id settings a state was made with must not change. */
static int check_meta(oq__runner *r, char *err, size_t errlen)
{
    char want[1024], have[1024];
    const struct { const char *key; const char *value; } kv[] = {
        { "handler", want },
        { "id_field", r->c->id_field },
    };
    int rc;

    snprintf(want, sizeof(want), "%s%s", r->c->handler_spec,
             r->c->emit ? " --emit" : "");
    for (size_t i = 0; i < sizeof(kv) / sizeof(kv[0]); i++) {
        rc = oq__store_meta_get(r->store, kv[i].key, have, sizeof(have));
        if (rc == OQ_ENOENT)
            rc = oq__store_meta_set(r->store, kv[i].key, kv[i].value);
        else if (rc == 0 && strcmp(have, kv[i].value) != 0) {
            snprintf(err, errlen, "state '%.200s' was made with %s '%.100s', "
                     "not '%.100s' (use another --state file)", r->c->state_path,
                     i == 0 ? "--handler" : "--id-field", have, kv[i].value);
            return OQ_EINVAL;
        }
        if (rc != 0) {
            snprintf(err, errlen, "%s", oq__store_error(r->store));
            return rc;
        }
    }
    /* The duplicates counted so far (onceq stats): a state made before
     * they were counted starts from its watermarks' estimate. */
    if (sqlite3_exec(oq__store_db(r->store), "INSERT OR IGNORE INTO meta"
                     "(key, value) SELECT 'duplicates', max(0, (SELECT "
                     "coalesce(sum(line) - sum(blank), 0) FROM sources) - "
                     "(SELECT count(*) FROM processed WHERE status = 0) - "
                     "(SELECT count(*) FROM dead_letters) - (SELECT count(*) "
                     "FROM redrive))", NULL, NULL, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "cannot write the state: %s",
                 sqlite3_errmsg(oq__store_db(r->store)));
        return OQ_EIO;
    }
    /* What `onceq export` needs to write the results like a run: written
     * once the checks passed, and only when absent (a refused run leaves
     * the state as it was). */
    const struct { const char *key; const char *value; } ex[] = {
        { "output", r->h.output == OQ__OUT_COUNTS ? "counts" : "records" },
        { "count_key", r->h.count_key ? r->h.count_key : "key" },
    };
    for (size_t i = 0; i < sizeof(ex) / sizeof(ex[0]); i++) {
        rc = oq__store_meta_get(r->store, ex[i].key, have, sizeof(have));
        if (rc == OQ_ENOENT)
            rc = oq__store_meta_set(r->store, ex[i].key, ex[i].value);
        if (rc != 0) {
            snprintf(err, errlen, "%s", oq__store_error(r->store));
            return rc;
        }
    }
    return 0;
}

#define HEAD_BYTES 4096

/* Identity of input i now: fills row (path, dev, ino, size, head).
 * Returns 1 for a regular file, 0 for anything else (not tracked). */
static int identify(oq__runner *r, unsigned i, uint64_t head_len,
                    oq__source_row *row)
{
    int fd = oq__reader_fd(r->reader, i);
    char head[HEAD_BYTES];
    struct stat st;
    ssize_t got;

    /* stdin is never tracked, even redirected from a regular file: it
     * may be another file at the next run. */
    if (strcmp(r->c->inputs[i], "-") == 0 || fd < 0 ||
        fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return 0;
    memset(row, 0, sizeof(*row));
    row->file = i;
    row->path = r->c->inputs[i];
    row->dev = (uint64_t)st.st_dev;
    row->ino = (uint64_t)st.st_ino;
    row->size = (uint64_t)st.st_size;
    row->head_len = OQ__MIN(head_len, row->size);
    got = pread(fd, head, row->head_len, 0);
    row->head_hash = XXH3_64bits(head, got > 0 ? (size_t)got : 0);
    return 1;
}

/* Why a saved source does not match the file now; NULL if it does. */
static const char *changed(const oq__source_row *was, const oq__source_row *now)
{
    if (strcmp(was->path, now->path) != 0)
        return "another file is at this position of the input list";
    if (was->dev != now->dev || was->ino != now->ino)
        return "it is another file now (device or inode changed)";
    if (now->size < was->size || now->size < was->offset)
        return "it is shorter now (truncated)";
    if (now->head_len != was->head_len || now->head_hash != was->head_hash)
        return "its first bytes changed";
    return NULL;
}

/* Checks each input against its saved progress and sets where it resumes. */
static int retire(oq__runner *r, unsigned i, char *err, size_t errlen)
{
    int rc = oq__store_retire_dead(r->store, i);

    if (rc != 0)
        snprintf(err, errlen, "%s", oq__store_error(r->store));
    return rc;
}

static int resume_sources(oq__runner *r, char *err, size_t errlen)
{
    /* An input read from its start (stdin, a pipe, a new file, --force) is
     * a new generation: the dead letters at its positions are another
     * input's, and are retired (OQ__TAG_RETIRED) so that this run's do not
     * replace them. Only a resumed file keeps them (a rerun after a crash
     * replaces a dead letter of the same line). */
    if (r->c->ninputs == 0)
        return retire(r, 0, err, errlen); /* implicit stdin */
    for (unsigned i = 0; i < r->c->ninputs; i++) {
        oq__source_row was, now;
        char wpath[4200];
        const char *why = NULL;
        int rc;

        if (!identify(r, i, HEAD_BYTES, &now)) {
            if ((rc = retire(r, i, err, errlen)) != 0)
                return rc;
            continue;
        }
        rc = oq__store_get_source(r->store, i, &was, wpath, sizeof(wpath));
        if (rc != 0 && rc != OQ_ENOENT) {
            snprintf(err, errlen, "%s", oq__store_error(r->store));
            return rc;
        }
        if (rc == OQ_ENOENT) {
            /* A new file: read from its start. */
            if ((rc = retire(r, i, err, errlen)) != 0)
                return rc;
        } else {
            /* Compare the head over the length hashed then. */
            oq__source_row head;
            identify(r, i, was.head_len, &head);
            now.head_len = head.head_len;
            now.head_hash = head.head_hash;
            if ((why = changed(&was, &now)) != NULL && !r->c->force) {
                snprintf(err, errlen, "input '%s' changed since state '%s' "
                         "last read it (%s); refusing to resume (--force "
                         "reads it again from the start)", r->c->inputs[i],
                         r->c->state_path, why);
                return OQ_EINVAL;
            }
            if (why == NULL && was.offset > 0) {
                rc = oq__reader_start_at(r->reader, i, was.offset, was.line);
                if (rc != 0) {
                    snprintf(err, errlen, "cannot seek in '%s': %s",
                             r->c->inputs[i], oq_strerror(rc));
                    return rc;
                }
                now.offset = was.offset;
                now.line = was.line;
                now.blank = was.blank;
                r->skipped += was.line;
            }
            if (why == NULL &&
                (rc = oq__store_max_dead_line(r->store, i, was.line,
                                              &r->stale_dead[i])) != 0) {
                snprintf(err, errlen, "%s", oq__store_error(r->store));
                return rc;
            } else if (why != NULL) {
                if (!r->c->quiet)
                    fprintf(stderr, "onceq run: input '%s' changed (%s); "
                            "--force: reading it from the start\n",
                            r->c->inputs[i], why);
                if ((rc = retire(r, i, err, errlen)) != 0)
                    return rc;
            }
            identify(r, i, HEAD_BYTES, &head);
            now.head_len = head.head_len;
            now.head_hash = head.head_hash;
        }
        if ((rc = oq__tracker_track(r->tracker, &now)) != 0) {
            snprintf(err, errlen, "%s", oq_strerror(rc));
            return rc;
        }
    }
    return 0;
}

static void load_id(const char *id, size_t len, void *arg)
{
    oq__runner *r = arg;
    int rc = oq_idset_insert_done(r->s, id, len);

    if (rc == 0)
        r->loaded_ids++;
    else if (rc != OQ_EEXIST && r->load_rc == 0)
        r->load_rc = rc; /* a processed id not loaded: do not start */
}

typedef struct redrive_load {
    oq__runner *r;
    size_t cap;
    int rc;
} redrive_load;

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = oq__malloc(n);
    if (p)
        memcpy(p, s, n);
    return p;
}

static void load_redrive(const oq__dead_row *d, void *arg)
{
    redrive_load *l = arg;
    oq__runner *r = l->r;
    oq__redrive_ent *e;
    oq_message m;

    if (l->rc != 0)
        return;
    if (r->nredrive == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 64;
        oq__redrive_ent *nv = oq__realloc(r->redrive, ncap * sizeof(*nv));
        if (nv == NULL) {
            l->rc = OQ_ENOMEM;
            return;
        }
        r->redrive = nv;
        l->cap = ncap;
    }
    e = &r->redrive[r->nredrive];
    e->seq = d->seq;
    e->tag = d->tag;
    e->attempts = d->attempts;
    e->source = dup_str(d->source);
    e->history = dup_str(d->history ? d->history : "[]");
    if (e->source == NULL || e->history == NULL) {
        oq__free(e->source);
        oq__free(e->history);
        l->rc = OQ_ENOMEM;
        return;
    }
    r->nredrive++;
    m = (oq_message){ NULL, 0, d->event, d->event_len, 0,
                      OQ__TAG(OQ__TAG_REDRIVE, (uint64_t)d->seq) };
    if (oq__send_all(r, &m, 1) != 0)
        l->rc = OQ_ENOMEM;
}

static oq__store_sync sync_mode(int sync)
{
    return sync == OQ__SYNC_OFF ? OQ__SYNC_OFF
           : sync == OQ__SYNC_NORMAL ? OQ__SYNC_NORMAL : OQ__SYNC_FULL;
}

/* Opens the state, checks and resumes the inputs, loads the processed ids,
 * sends the redriven events and starts the committer. */
int oq__open_state(oq__runner *r, char *err, size_t errlen)
{
    const oq__run_config *c = r->c;
    redrive_load rl = { r, 0, 0 };
    oq__committer_opts co;
    int64_t t0;
    int rc;

    /* Test seam (test/test_durable.py): commits fail after this many, as
     * on a full disk. */
    if (getenv("ONCEQ_TEST_STORE_FAIL_AFTER"))
        oq__store_fail_after(atol(getenv("ONCEQ_TEST_STORE_FAIL_AFTER")));
    rc = oq__store_open(&r->store, c->state_path,
                        OQ__STORE_CREATE | OQ__STORE_LOCK, sync_mode(c->sync), err, errlen);
    if (rc != 0)
        return rc;
    if ((rc = check_meta(r, err, errlen)) != 0)
        return rc;
    if ((rc = oq__tracker_new(&r->tracker, c->ninputs)) != 0) {
        snprintf(err, errlen, "%s", oq_strerror(rc));
        return rc;
    }
    r->stale_dead = oq__calloc(c->ninputs ? c->ninputs : 1,
                               sizeof(*r->stale_dead));
    if (r->stale_dead == NULL) {
        snprintf(err, errlen, "%s", oq_strerror(OQ_ENOMEM));
        return OQ_ENOMEM;
    }
    if ((rc = resume_sources(r, err, errlen)) != 0)
        return rc;
    t0 = oq_clock_now(NULL);
    rc = oq__store_foreach_processed(r->store, load_id, r);
    r->load_ms = oq_clock_now(NULL) - t0;
    if (rc == 0 && r->load_rc != 0) {
        snprintf(err, errlen, "cannot load the processed ids of '%s': %s",
                 c->state_path, oq_strerror(r->load_rc));
        return r->load_rc;
    }
    if (rc == 0)
        rc = oq__store_foreach_redrive(r->store, load_redrive, &rl);
    if (rc != 0 || rl.rc != 0) {
        snprintf(err, errlen, "%s", rc ? oq__store_error(r->store)
                                       : oq_strerror(rl.rc));
        return rc ? rc : rl.rc;
    }
    memset(&co, 0, sizeof(co));
    co.store = r->store;
    co.q = r->q;
    co.s = r->s;
    co.tracker = r->tracker;
    co.batch = c->commit_batch;
    co.interval_ms = c->commit_interval_ms;
    co.keep_first = r->rs.track_first;
    co.describe = describe;
    co.position = position;
    co.stale_dead = r->stale_dead;
    co.nstale = c->ninputs;
    co.arg = r;
    if ((rc = oq__committer_start(&r->cm, &co)) != 0)
        snprintf(err, errlen, "cannot start the committer: %s",
                 oq_strerror(rc));
    return rc;
}

void oq__close_state(oq__runner *r)
{
    oq__committer_free(r->cm);
    oq__tracker_free(r->tracker);
    for (size_t i = 0; i < r->nredrive; i++) {
        oq__free(r->redrive[i].source);
        oq__free(r->redrive[i].history);
    }
    oq__free(r->redrive);
    oq__free(r->stale_dead);
    oq__store_close(r->store);
}

/* Saves the run's stats in the state, for `onceq stats`. */
void oq__save_last_run(oq__runner *r, const oq__totals *t)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    if (f == NULL)
        return;
    oq__write_stats_json(f, r, t);
    fclose(f);
    if (len > 0 && buf[len - 1] == '\n')
        buf[len - 1] = '\0';
    oq__store_meta_set(r->store, "last_run", buf);
    free(buf);
}

