/*
 * bench_run: end-to-end `onceq run` throughput on a generated event file,
 * against the ideal measured in the same run: a bare single-thread loop
 * that splits lines (memchr), parses each with cJSON, inserts its id into a
 * processed set and counts its words (the "split + cJSON + set
 * insert + count"). Also a memchr-only pass over the file, the I/O ceiling.
 * The bare loop is measured again before each round of onceq runs, and
 * each onceq figure is reported as the median of its per-round ratios to
 * the bare loop of the same round (the machines are shared and noisy).
 *
 * onceq is run as the real binary (fork + exec), output to /dev/null; the
 * time is wall-clock from exec to exit. Each figure is the median of
 * --reps runs. The file is read once before timing, so it is in the page
 * cache for every contender.
 *
 * --presize: the bare loop's processed set is sized for the file's lines
 * before it starts, as `onceq run` sizes its own from the input's size
 * (without it, the definition: the set grows as it goes).
 *
 * usage: bench_run [--onceq PATH] [--events N] [--reps R] [--csv PATH]
 *                  [--file PATH] [--text] [--presize] [--workers 1,2,...]
 *                  [--handlers noop,wordcount] [--args "EXTRA ARGS"]
 */
#include "onceq.h"

#include <cjson/cJSON.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *onceq = "./onceq";
static const char *file;
static size_t nevents = 1000000;
static int reps = 3;
static int text;           /* events with a "text" of several words */
static int presize;        /* the bare loop sizes its set first */
static char *extra[32];    /* --args: more arguments for onceq run */
static int nextra;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char *map_file(size_t *len)
{
    int fd = open(file, O_RDONLY);
    struct stat st;
    void *p;

    if (fd < 0 || fstat(fd, &st) != 0) {
        perror(file);
        exit(1);
    }
    *len = (size_t)st.st_size;
    p = mmap(NULL, *len, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

/* The I/O ceiling: find every newline. */
static double memchr_pass(void)
{
    size_t len, lines = 0;
    char *base = map_file(&len);
    const char *p = base, *end = base + len;
    double t0 = now_s(), dt;

    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        lines++;
        p = nl ? nl + 1 : end;
    }
    dt = now_s() - t0;
    munmap(base, len);
    return lines / dt;
}

/* The bare loop's word counts: open addressing, keys in an arena. */
#define WC_CAP (1u << 16)
static struct { const char *k; size_t n; long c; } wc[WC_CAP];
static char wc_arena[1 << 22];
static size_t wc_used;

static void count_word(const char *w, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)w[i]) * 1099511628211ULL;
    for (size_t i = h & (WC_CAP - 1);; i = (i + 1) & (WC_CAP - 1)) {
        if (wc[i].k == NULL) {
            if (wc_used + n > sizeof(wc_arena))
                return;
            memcpy(wc_arena + wc_used, w, n);
            wc[i].k = wc_arena + wc_used;
            wc[i].n = n;
            wc_used += n;
        }
        if (wc[i].n == n && memcmp(wc[i].k, w, n) == 0) {
            wc[i].c++;
            return;
        }
    }
}

static void count_text(const char *s)
{
    while (*s) {
        const char *w;
        while (*s == ' ')
            s++;
        w = s;
        while (*s && *s != ' ')
            s++;
        if (s > w)
            count_word(w, (size_t)(s - w));
    }
}

/* The ideal: split, parse, insert the id, count; one thread. */
static double bare_loop(void)
{
    size_t len, lines = 0;
    char *base = map_file(&len);
    const char *p = base, *end = base + len;
    oq_idset *s;
    oq_idset_opts so;
    double t0, dt;

    oq_idset_opts_defaults(&so);
    if (presize) {
        for (const char *q = base; (q = memchr(q, '\n', (size_t)(end - q)));
             q++)
            so.expected_ids++;
    }
    if (oq_idset_new(&s, &so) != 0)
        exit(1);
    t0 = now_s();
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        cJSON *root = cJSON_ParseWithLength(p, n);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(root, "id");
        if (cJSON_IsString(id) &&
            oq_idset_insert_done(s, id->valuestring,
                                 strlen(id->valuestring)) == 0) {
            const cJSON *w = cJSON_GetObjectItemCaseSensitive(root, "word");
            if (!cJSON_IsString(w))
                w = cJSON_GetObjectItemCaseSensitive(root, "text");
            if (cJSON_IsString(w))
                count_text(w->valuestring);
        }
        cJSON_Delete(root);
        lines++;
        p = nl ? nl + 1 : end;
    }
    dt = now_s() - t0;
    oq_idset_free(s);
    munmap(base, len);
    memset(wc, 0, sizeof(wc));
    wc_used = 0;
    return lines / dt;
}

/* Runs onceq; returns events/s. */
static double onceq_run(const char *handler, unsigned workers)
{
    char w[16], h[64];
    double t0, dt;
    pid_t pid;
    int status;

    snprintf(w, sizeof(w), "%u", workers);
    snprintf(h, sizeof(h), "%s", handler);
    t0 = now_s();
    pid = fork();
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        char *argv[64];
        int n = 0;
        argv[n++] = (char *)(uintptr_t)onceq;
        argv[n++] = "run";
        argv[n++] = "-q";
        argv[n++] = "--no-progress";
        argv[n++] = "-w";
        argv[n++] = w;
        argv[n++] = "--handler";
        argv[n++] = h;
        argv[n++] = "--dlq";
        argv[n++] = "/dev/null";
        for (int i = 0; i < nextra && n < 60; i++)
            argv[n++] = extra[i];
        argv[n++] = (char *)(uintptr_t)file;
        argv[n] = NULL;
        execv(onceq, argv);
        _exit(127);
    }
    waitpid(pid, &status, 0);
    dt = now_s() - t0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) > 1) {
        fprintf(stderr, "bench_run: %s run failed (status %d)\n", onceq,
                status);
        exit(1);
    }
    return nevents / dt;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef double (*measure_fn)(const char *, unsigned);

static double median(measure_fn fn, const char *h, unsigned w)
{
    double v[16];
    for (int i = 0; i < reps; i++)
        v[i] = fn(h, w);
    qsort(v, (size_t)reps, sizeof(v[0]), cmp);
    return v[reps / 2];
}

static double memchr_adapter(const char *h, unsigned w)
{
    (void)h;
    (void)w;
    return memchr_pass();
}

static void make_file(void)
{
    static char path[256];
    char cmd[512];

    snprintf(path, sizeof(path), "/tmp/onceq-bench-%zu%s.jsonl", nevents,
             text ? "-text" : "");
    if (access(path, R_OK) != 0) {
        snprintf(cmd, sizeof(cmd), "%s gen --events %zu --duplicates 0.1 "
                 "--words 1000 --seed 1%s -o %s", onceq, nevents,
                 text ? " --text" : "", path);
        if (system(cmd) != 0) {
            fprintf(stderr, "bench_run: %s failed\n", cmd);
            exit(1);
        }
    }
    file = path;
}

/* Splits a comma list into at most max strings (modifies s). */
static int split_list(char *s, char **out, int max)
{
    int n = 0;
    for (char *t = strtok(s, ","); t && n < max; t = strtok(NULL, ","))
        out[n++] = t;
    return n;
}

int main(int argc, char **argv)
{
    const char *csv = NULL;
    char hl[256] = "noop,wordcount", wl[256] = "1,2", *handlers[8], *ws[16];
    double base, ceil;
    int nh, nw;
    FILE *out = NULL;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--onceq") == 0 && i + 1 < argc)
            onceq = argv[++i];
        else if (strcmp(argv[i], "--events") == 0 && i + 1 < argc)
            nevents = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--csv") == 0 && i + 1 < argc)
            csv = argv[++i];
        else if (strcmp(argv[i], "--file") == 0 && i + 1 < argc)
            file = argv[++i];
        else if (strcmp(argv[i], "--text") == 0)
            text = 1;
        else if (strcmp(argv[i], "--presize") == 0)
            presize = 1;
        else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc)
            snprintf(wl, sizeof(wl), "%s", argv[++i]);
        else if (strcmp(argv[i], "--handlers") == 0 && i + 1 < argc)
            snprintf(hl, sizeof(hl), "%s", argv[++i]);
        else if (strcmp(argv[i], "--args") == 0 && i + 1 < argc)
            nextra = split_list(strdup(argv[++i]), extra, 32);
        else {
            fprintf(stderr, "usage: bench_run [--onceq PATH] [--events N] "
                            "[--reps R] [--csv PATH] [--file PATH] [--text] "
                            "[--presize] "
                            "[--workers 1,2,...] [--handlers noop,...] "
                            "[--args A,B,...]\n");
            return 2;
        }
    }
    nh = split_list(hl, handlers, 8);
    nw = split_list(wl, ws, 16);
    if (reps < 1 || reps > 15 || nh == 0 || nw == 0) {
        fprintf(stderr, "bench_run: --reps must be 1..15, and --handlers "
                        "and --workers not empty\n");
        return 2;
    }
    if (file == NULL)
        make_file();
    bare_loop(); /* warm the page cache */
    printf("bench_run --events %zu --reps %d%s, file %s\n", nevents, reps,
           text ? " --text" : "", file);
    ceil = median(memchr_adapter, NULL, 0);
    if (csv && (out = fopen(csv, "w")) == NULL) {
        perror(csv);
        return 1;
    }
    {
        /* Round r: the bare loop, then every configuration once. */
        double bare[16], rate[8][16][16], ratio[8][16][16];
        for (int r = 0; r < reps; r++) {
            bare[r] = bare_loop();
            for (int h = 0; h < nh; h++)
                for (int w = 0; w < nw; w++) {
                    rate[h][w][r] = onceq_run(handlers[h],
                                              (unsigned)atoi(ws[w]));
                    ratio[h][w][r] = rate[h][w][r] / bare[r];
                }
        }
        qsort(bare, (size_t)reps, sizeof(bare[0]), cmp);
        base = bare[reps / 2];
        printf("%-34s %12s %9s %9s\n", "configuration", "events/s",
               "x bare", "x memchr");
        printf("%-34s %12.0f %9.2f %9.2f\n", "memchr only (I/O ceiling)",
               ceil, ceil / base, 1.0);
        printf("%-34s %12.0f %9.2f %9.3f\n",
               presize ? "bare loop, set presized"
                       : "bare loop (split+cJSON+insert+count)",
               base, 1.0, base / ceil);
        if (out)
            fprintf(out, "config,handler,workers,events,events_per_s,"
                         "ratio_bare,ratio_memchr\nmemchr,,1,%zu,%.0f,%.3f,1\n"
                         "bare,,1,%zu,%.0f,1,%.4f\n",
                    nevents, ceil, ceil / base, nevents, base, base / ceil);
        for (int h = 0; h < nh; h++)
            for (int w = 0; w < nw; w++) {
                char name[64];
                double rr, x;
                qsort(rate[h][w], (size_t)reps, sizeof(double), cmp);
                qsort(ratio[h][w], (size_t)reps, sizeof(double), cmp);
                rr = rate[h][w][reps / 2];
                x = ratio[h][w][reps / 2];
                snprintf(name, sizeof(name), "onceq run %s -w %s",
                         handlers[h], ws[w]);
                printf("%-34s %12.0f %9.2f %9.3f\n", name, rr, x, rr / ceil);
                if (out)
                    fprintf(out, "onceq,%s,%s,%zu,%.0f,%.3f,%.4f\n",
                            handlers[h], ws[w], nevents, rr, x, rr / ceil);
            }
    }
    if (out)
        fclose(out);
    return 0;
}
