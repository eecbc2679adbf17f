/*
 * bench_run: end-to-end `onceq run` throughput on a generated event file,
 * against the ideal measured in the same run: a bare single-thread loop
 * that splits lines (memchr), parses each with cJSON (the library onceq
 * uses), and inserts its id into a processed set. Also a memchr-only pass
 * over the file, the I/O ceiling.
 *
 * onceq is run as the real binary (fork + exec), output to /dev/null; the
 * time is wall-clock from exec to exit. Each figure is the median of
 * --reps runs. The file is read once before timing, so it is in the page
 * cache for every contender.
 *
 * usage: bench_run [--onceq PATH] [--events N] [--reps R] [--csv PATH]
 *                  [--file PATH]
 */
#include "onceq.h"

#include <cjson/cJSON.h>
#include <fcntl.h>
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

/* The ideal: split, parse, insert the id; one thread. */
static double bare_loop(void)
{
    size_t len, lines = 0;
    char *base = map_file(&len);
    const char *p = base, *end = base + len;
    oq_idset *s;
    oq_idset_opts so;
    double t0, dt;

    oq_idset_opts_defaults(&so);
    if (oq_idset_new(&s, &so) != 0)
        exit(1);
    t0 = now_s();
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        cJSON *root = cJSON_ParseWithLength(p, n);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(root, "id");
        if (cJSON_IsString(id))
            oq_idset_insert_done(s, id->valuestring, strlen(id->valuestring));
        cJSON_Delete(root);
        lines++;
        p = nl ? nl + 1 : end;
    }
    dt = now_s() - t0;
    oq_idset_free(s);
    munmap(base, len);
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
        execl(onceq, onceq, "run", "-q", "--no-progress", "-w", w,
              "--handler", h, "--dlq", "/dev/null", file, (char *)NULL);
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

static double bare_adapter(const char *h, unsigned w)
{
    (void)h;
    (void)w;
    return bare_loop();
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

    snprintf(path, sizeof(path), "/tmp/onceq-bench-%zu.jsonl", nevents);
    if (access(path, R_OK) != 0) {
        snprintf(cmd, sizeof(cmd), "%s gen --events %zu --duplicates 0.1 "
                 "--words 1000 --seed 1 -o %s", onceq, nevents, path);
        if (system(cmd) != 0) {
            fprintf(stderr, "bench_run: %s failed\n", cmd);
            exit(1);
        }
    }
    file = path;
}

int main(int argc, char **argv)
{
    const char *csv = NULL;
    static const char *handlers[] = { "noop", "wordcount" };
    static const unsigned workers[] = { 1, 2 };
    double base, ceil;
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
        else {
            fprintf(stderr, "usage: bench_run [--onceq PATH] [--events N] "
                            "[--reps R] [--csv PATH] [--file PATH]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > 15) {
        fprintf(stderr, "bench_run: --reps must be 1..15\n");
        return 2;
    }
    if (file == NULL)
        make_file();
    bare_loop(); /* warm the page cache */
    printf("bench_run --events %zu --reps %d, file %s (median of reps)\n",
           nevents, reps, file);
    ceil = median(memchr_adapter, NULL, 0);
    base = median(bare_adapter, NULL, 0);
    printf("%-34s %12s %9s %9s\n", "configuration", "events/s", "x bare",
           "x memchr");
    printf("%-34s %12.0f %9.2f %9.2f\n", "memchr only (I/O ceiling)", ceil,
           ceil / base, 1.0);
    printf("%-34s %12.0f %9.2f %9.3f\n", "bare loop (split+cJSON+insert)",
           base, 1.0, base / ceil);
    if (csv && (out = fopen(csv, "w")) == NULL) {
        perror(csv);
        return 1;
    }
    if (out)
        fprintf(out, "config,handler,workers,events,events_per_s,ratio_bare,"
                     "ratio_memchr\nmemchr,,1,%zu,%.0f,%.3f,1\n"
                     "bare,,1,%zu,%.0f,1,%.4f\n",
                nevents, ceil, ceil / base, nevents, base, base / ceil);
    for (size_t hi = 0; hi < 2; hi++)
        for (size_t wi = 0; wi < 2; wi++) {
            char name[64];
            double r = median(onceq_run, handlers[hi], workers[wi]);
            snprintf(name, sizeof(name), "onceq run %s -w %u", handlers[hi],
                     workers[wi]);
            printf("%-34s %12.0f %9.2f %9.3f\n", name, r, r / base, r / ceil);
            if (out)
                fprintf(out, "onceq,%s,%u,%zu,%.0f,%.3f,%.4f\n", handlers[hi],
                        workers[wi], nevents, r, r / base, r / ceil);
        }
    if (out)
        fclose(out);
    return 0;
}
