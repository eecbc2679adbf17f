/*
 * bench_json: what onceq parses events with. Parses the same small event
 * lines with cJSON, jansson and jsmn (all from Debian) and with onceq's
 * strict scanner (src/json.c, through the decode hook the workers use), and
 * reads the id of each, in one run; reports ns/line and the ratio to cJSON.
 * jsmn only tokenises (it checks neither escapes, nor numbers, nor UTF-8),
 * so it is the floor of a tokenising pass, not a candidate for acceptance.
 *
 * usage: bench_json [--events N] [--reps R]
 */
#include "oq_cli.h"

#include <cjson/cJSON.h>
#include <jansson.h>
#define JSMN_STATIC
#include <jsmn.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char **lines;
static size_t *lens;
static size_t n = 200000;
static size_t sink;

static double with_cjson(void)
{
    double t0 = now_s();
    for (size_t i = 0; i < n; i++) {
        cJSON *root = cJSON_ParseWithLength(lines[i], lens[i]);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(root, "id");
        sink += cJSON_IsString(id) ? strlen(id->valuestring) : 0;
        cJSON_Delete(root);
    }
    return (now_s() - t0) * 1e9 / n;
}

static double with_decode_hook(void)
{
    double t0 = now_s();
    for (size_t i = 0; i < n; i++) {
        oq_event ev = { 0 };
        oq_decoded d;
        memset(&d, 0, sizeof(d));
        ev.payload = lines[i];
        ev.payload_len = lens[i];
        if (oq__json_decode(&ev, &d, NULL) == 0) {
            sink += d.id_len;
            oq__json_free(d.parsed, NULL);
        }
    }
    return (now_s() - t0) * 1e9 / n;
}

static double with_jansson(void)
{
    double t0 = now_s();
    for (size_t i = 0; i < n; i++) {
        json_error_t err;
        json_t *root = json_loadb(lines[i], lens[i], 0, &err);
        json_t *id = json_object_get(root, "id");
        sink += json_is_string(id) ? json_string_length(id) : 0;
        json_decref(root);
    }
    return (now_s() - t0) * 1e9 / n;
}

static double with_jsmn(void)
{
    double t0 = now_s();
    for (size_t i = 0; i < n; i++) {
        jsmn_parser p;
        jsmntok_t t[64];
        int k;
        jsmn_init(&p);
        k = jsmn_parse(&p, lines[i], lens[i], t, 64);
        for (int j = 1; j + 1 < k; j += 2)
            if (t[j].type == JSMN_STRING && t[j].end - t[j].start == 2 &&
                memcmp(lines[i] + t[j].start, "id", 2) == 0) {
                sink += (size_t)(t[j + 1].end - t[j + 1].start);
                break;
            }
    }
    return (now_s() - t0) * 1e9 / n;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double (*fn)(void), int reps)
{
    double v[16];
    for (int i = 0; i < reps; i++)
        v[i] = fn();
    qsort(v, (size_t)reps, sizeof(v[0]), cmp);
    return v[reps / 2];
}

int main(int argc, char **argv)
{
    int reps = 5;
    uint64_t rng = 1;
    double cj, jn, dh, js;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--events") == 0 && i + 1 < argc)
            n = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_json [--events N] [--reps R]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > 15 || n == 0)
        return 2;
    lines = malloc(n * sizeof(*lines));
    lens = malloc(n * sizeof(*lens));
    for (size_t i = 0; i < n; i++) {
        char buf[128];
        int len = snprintf(buf, sizeof(buf), "{\"id\":\"evt-%zu\",\"word\":\"w%u\"}",
                           i, (unsigned)(oq__splitmix64(&rng) % 1000));
        lines[i] = strdup(buf);
        lens[i] = (size_t)len;
    }
    /* Like the workers: the arena is on while parsed events are held. */
    printf("bench_json --events %zu --reps %d: lines like %s\n", n, reps,
           lines[0]);
    cj = median(with_cjson, reps);
    jn = median(with_jansson, reps);
    dh = median(with_decode_hook, reps);
    js = median(with_jsmn, reps);
    printf("%-44s %9s %8s\n", "parser (parse + read id + free)", "ns/line",
           "x cJSON");
    printf("%-44s %9.0f %8.2f\n", "cJSON 1.7 (malloc)", cj, 1.0);
    printf("%-44s %9.0f %8.2f\n", "jansson 2.14", jn, jn / cj);
    printf("%-44s %9.0f %8.2f\n", "jsmn 1.1 (tokens only, no validation)", js,
           js / cj);
    printf("%-44s %9.0f %8.2f\n", "oq__json_decode (strict scan + UTF-8 + id)",
           dh, dh / cj);
    return sink == 0;
}
