/*
 * bench_idset_mem: memory and speed of the processed set's DONE table.
 *
 *   bench_idset_mem [--ids N] [--expected N] [--shard-bits B] [--claim]
 *                   [--csv PATH]
 *
 * Reads VmRSS, marks N distinct ids ("evt-<n>") DONE with insert_done (or
 * claim + commit with --claim), reads VmRSS again, then times contains() on
 * every inserted id (hits) and on up to 1M ids never inserted (misses).
 * Reports RSS bytes per id against the goal of 32 bytes per id (the
 * baseline), table_bytes per id, and nanoseconds per operation. Only the
 * measured loops are timed; the cost of formatting ids alone is printed too.
 */
#include "onceq.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define GOAL_BYTES_PER_ID 32.0

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* VmRSS of this process, in bytes; 0 if unreadable. */
static uint64_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t kb = 0;
    if (f == NULL)
        return 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = strtoull(line + 6, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb * 1024;
}

/* Writes prefix + decimal n into buf (no NUL); returns the length. Faster
 * than snprintf, so the timed loops measure the set rather than stdio. */
static size_t make_id(char *buf, const char *prefix, size_t plen, uint64_t n)
{
    char digits[20];
    size_t nd = 0;
    memcpy(buf, prefix, plen);
    do {
        digits[nd++] = (char)('0' + n % 10);
        n /= 10;
    } while (n != 0);
    for (size_t i = 0; i < nd; i++)
        buf[plen + i] = digits[nd - 1 - i];
    return plen + nd;
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [--ids N] [--expected N] [--shard-bits B] [--claim] "
            "[--csv PATH]\n",
            argv0);
    exit(2);
}

static uint64_t parse_u64(const char *s, const char *argv0)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (*s == '\0' || *end != '\0')
        usage(argv0);
    return v;
}

int main(int argc, char **argv)
{
    uint64_t n = 1000000, expected = 0, shard_bits = 6;
    int use_claim = 0;
    const char *csv = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--ids") == 0 && i + 1 < argc)
            n = parse_u64(argv[++i], argv[0]);
        else if (strcmp(argv[i], "--expected") == 0 && i + 1 < argc)
            expected = parse_u64(argv[++i], argv[0]);
        else if (strcmp(argv[i], "--shard-bits") == 0 && i + 1 < argc)
            shard_bits = parse_u64(argv[++i], argv[0]);
        else if (strcmp(argv[i], "--claim") == 0)
            use_claim = 1;
        else if (strcmp(argv[i], "--csv") == 0 && i + 1 < argc)
            csv = argv[++i];
        else
            usage(argv[0]);
    }
    if (n == 0)
        usage(argv[0]);

    printf("command:");
    for (int i = 0; i < argc; i++)
        printf(" %s", argv[i]);
    printf("\n");

    oq_idset *s;
    oq_idset_opts o;
    oq_idset_opts_defaults(&o);
    o.shard_bits = (unsigned)shard_bits;
    o.expected_ids = (size_t)expected;
    int rc = oq_idset_new(&s, &o);
    if (rc != 0) {
        fprintf(stderr, "oq_idset_new: %s\n", oq_strerror(rc));
        return 1;
    }

    char id[64];
    volatile size_t sink = 0;

    /* What formatting the ids costs on its own. */
    double t = now_s();
    for (uint64_t i = 0; i < n; i++)
        sink += make_id(id, "evt-", 4, i);
    double gen_s = now_s() - t;

    uint64_t rss0 = rss_bytes();
    t = now_s();
    for (uint64_t i = 0; i < n; i++) {
        size_t len = make_id(id, "evt-", 4, i);
        if (use_claim) {
            oq_claim c;
            rc = oq_idset_claim(s, id, len, INT64_MAX, &c);
            if (rc == OQ_CLAIMED)
                rc = oq_idset_commit(s, id, len, c.token);
        } else {
            rc = oq_idset_insert_done(s, id, len);
        }
        if (rc != 0) {
            fprintf(stderr, "insert %s: %s\n", id, oq_strerror(rc));
            return 1;
        }
    }
    double ins_s = now_s() - t;
    uint64_t rss1 = rss_bytes();

    t = now_s();
    uint64_t hits = 0;
    for (uint64_t i = 0; i < n; i++) {
        size_t len = make_id(id, "evt-", 4, i);
        hits += (uint64_t)oq_idset_contains(s, id, len);
    }
    double hit_s = now_s() - t;

    uint64_t nmiss = n < 1000000 ? n : 1000000, false_hits = 0;
    t = now_s();
    for (uint64_t i = 0; i < nmiss; i++) {
        size_t len = make_id(id, "miss-", 5, i);
        false_hits += (uint64_t)oq_idset_contains(s, id, len);
    }
    double miss_s = now_s() - t;

    oq_idset_stats st;
    oq_idset_stats_get(s, &st);
    if (hits != n || false_hits != 0 || st.done != n) {
        fprintf(stderr, "wrong: %" PRIu64 " hits of %" PRIu64 ", %" PRIu64
                " false hits, done %" PRIu64 "\n",
                hits, n, false_hits, st.done);
        return 1;
    }

    double dn = (double)n;
    double bytes_per_id = (double)(rss1 - rss0) / dn;
    double table_per_id = (double)st.table_bytes / dn;
    double ns_gen = gen_s * 1e9 / dn;
    double ns_ins = ins_s * 1e9 / dn;
    double ns_hit = hit_s * 1e9 / dn;
    double ns_miss = miss_s * 1e9 / (double)nmiss;

    printf("mode: %s, shard_bits %u, expected_ids %" PRIu64 "\n",
           use_claim ? "claim+commit" : "insert_done", o.shard_bits, expected);
    printf("%12s %12s %12s %10s %10s %10s %10s %10s\n", "ids", "rss_delta",
           "bytes/id", "table/id", "ns/insert", "ns/hit", "ns/miss",
           "ns/id-gen");
    printf("%12" PRIu64 " %12" PRIu64 " %12.2f %10.2f %10.1f %10.1f %10.1f "
           "%10.1f\n",
           n, rss1 - rss0, bytes_per_id, table_per_id, ns_ins, ns_hit,
           ns_miss, ns_gen);
    printf("baseline: goal %.0f bytes/id; measured %.2f bytes/id = %.2fx the "
           "goal (%s)\n",
           GOAL_BYTES_PER_ID, bytes_per_id, bytes_per_id / GOAL_BYTES_PER_ID,
           bytes_per_id <= GOAL_BYTES_PER_ID ? "within" : "OVER");

    if (csv != NULL) {
        FILE *f = fopen(csv, "w");
        if (f == NULL) {
            perror(csv);
            return 1;
        }
        fprintf(f, "ids,mode,shard_bits,expected_ids,rss_delta_bytes,"
                   "bytes_per_id,table_bytes_per_id,ns_per_insert,"
                   "ns_per_contains_hit,ns_per_contains_miss,ns_per_id_gen\n");
        fprintf(f, "%" PRIu64 ",%s,%u,%" PRIu64 ",%" PRIu64
                   ",%.3f,%.3f,%.1f,%.1f,%.1f,%.1f\n",
                n, use_claim ? "claim" : "insert_done", o.shard_bits,
                expected, rss1 - rss0, bytes_per_id, table_per_id, ns_ins,
                ns_hit, ns_miss, ns_gen);
        fclose(f);
    }
    oq_idset_free(s);
    (void)sink;
    return 0;
}
