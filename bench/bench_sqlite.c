/*
 * bench_sqlite: SQLite's single-writer limit for the rows a durable
 * `onceq run --state` writes, as the ceiling its throughput is compared
 * with. One thread, no queue, no claims, no committer thread: it reads
 * the events file, decodes each line, runs the handler into a txn, skips
 * ids it has seen, and writes the same rows onceq's committer writes (the
 * processed ids, multi-row; the aggregates summed per transaction, one
 * upsert per key) with the same prepared statements (src/store.c), in
 * transactions of --batch events, on a fresh state file with the same
 * schema and --sync. Not written: the per-source progress rows (one or two
 * per transaction).
 *
 * usage: bench_sqlite --file EVENTS --db PATH [--batch N] [--sync full|
 *                     normal|off] [--handler wordcount]
 * Prints one line: events, transactions, seconds, events/s.
 */
#include "oq_cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "oq_uthash.h"

typedef struct sum {
    UT_hash_handle hh;
    int64_t delta;
    size_t len;
    char key[];
} sum;

static sum *sums;
static int oom;

static void add_count(const char *key, size_t len, int64_t delta, void *arg)
{
    sum *s;
    (void)arg;
    HASH_FIND(hh, sums, key, len, s);
    if (s == NULL) {
        s = malloc(sizeof(*s) + len);
        if (s == NULL) {
            oom = 1;
            return;
        }
        s->delta = 0;
        s->len = len;
        memcpy(s->key, key, len);
        HASH_ADD(hh, sums, key[0], len, s);
    }
    s->delta += delta;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int flush(oq__store *st, oq__processed *rows, size_t n)
{
    sum *s, *tmp;
    int rc = oq__store_begin(st);

    if (rc == 0 && n > 0)
        rc = oq__store_put_processed_many(st, rows, n);
    HASH_ITER(hh, sums, s, tmp) {
        if (rc == 0)
            rc = oq__store_add_count(st, s->key, s->len, s->delta);
        HASH_DEL(sums, s);
        free(s);
    }
    if (rc == 0)
        rc = oq__store_commit(st);
    if (rc != 0)
        fprintf(stderr, "bench_sqlite: %s\n", oq__store_error(st));
    return rc;
}

int main(int argc, char **argv)
{
    const char *file = NULL, *db = NULL, *spec = "wordcount";
    oq__store_sync sync = OQ__SYNC_FULL;
    size_t batch = 256, n = 0, events = 0, txns = 0;
    oq__idspec idspec = { .field = "id", .fallback = true };
    oq__handler_opts ho = { 2000, false };
    oq__handler h;
    oq__reader *rd;
    oq__store *st;
    oq_idset *seen;
    oq_txn *txn = oq__txn_new();
    oq__processed *rows;
    char **ids;
    char err[600];
    oq__line l;
    double t0;
    int rc;

    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--file") == 0)
            file = argv[i + 1];
        else if (strcmp(argv[i], "--db") == 0)
            db = argv[i + 1];
        else if (strcmp(argv[i], "--batch") == 0)
            batch = strtoul(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--handler") == 0)
            spec = argv[i + 1];
        else if (strcmp(argv[i], "--sync") == 0)
            sync = strcmp(argv[i + 1], "off") == 0      ? OQ__SYNC_OFF
                   : strcmp(argv[i + 1], "normal") == 0 ? OQ__SYNC_NORMAL
                                                        : OQ__SYNC_FULL;
    }
    if (file == NULL || db == NULL || batch == 0 || txn == NULL) {
        fprintf(stderr, "usage: bench_sqlite --file EVENTS --db PATH "
                        "[--batch N] [--sync full|normal|off] "
                        "[--handler wordcount]\n");
        return 2;
    }
    rows = calloc(batch, sizeof(*rows));
    ids = calloc(batch, sizeof(*ids));
    unlink(db);
    if (rows == NULL || ids == NULL ||
        oq__handler_from_spec(spec, &ho, &h, err, sizeof(err)) != 0 ||
        oq__store_open(&st, db, OQ__STORE_CREATE, sync, err, sizeof(err)) != 0 ||
        oq_idset_new(&seen, NULL) != 0 ||
        oq__reader_open(&rd, &file, 1, 1 << 20, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_sqlite: cannot start: %s\n", err);
        return 1;
    }
    t0 = now_s();
    while ((rc = oq__reader_next(rd, &l, err, sizeof(err))) > 0) {
        oq_event ev = { .payload = l.data, .payload_len = l.len };
        oq_decoded dec;
        if (l.kind != OQ__LINE_EVENT)
            continue;
        memset(&dec, 0, sizeof(dec));
        if (oq__json_decode(&ev, &dec, &idspec) != 0)
            continue;
        ev.id = dec.id;
        ev.id_len = dec.id_len;
        ev.parsed = dec.parsed;
        if (oq_idset_insert_done(seen, dec.id, dec.id_len) == 0) {
            oq__txn_reset(txn);
            if (h.fn(&ev, txn, h.arg) == OQ_OK)
                oq_txn_foreach(txn, NULL, add_count, NULL);
            ids[n] = malloc(dec.id_len ? dec.id_len : 1);
            memcpy(ids[n], dec.id, dec.id_len);
            rows[n] = (oq__processed){ ids[n], dec.id_len, 0,
                                       OQ__TAG(l.file, l.lineno) };
            n++;
        }
        oq__json_free(dec.parsed, &idspec);
        events++;
        if (n == batch) {
            if (flush(st, rows, n) != 0 || oom)
                return 1;
            for (size_t i = 0; i < n; i++)
                free(ids[i]);
            n = 0;
            txns++;
        }
    }
    if (n > 0 || sums) {
        if (flush(st, rows, n) != 0)
            return 1;
        for (size_t i = 0; i < n; i++)
            free(ids[i]);
        txns++;
    }
    t0 = now_s() - t0;
    printf("bench_sqlite: %zu events, %zu transactions of %zu, %.3f s, "
           "%.0f events/s\n", events, txns, batch, t0, events / t0);
    oq__reader_close(rd);
    oq__store_close(st);
    oq_idset_free(seen);
    oq__txn_free(txn);
    oq__handler_free(&h);
    free(rows);
    free(ids);
    return 0;
}
