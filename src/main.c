/*
 * The onceq command: dispatch on a table of subcommands (one short function
 * each), --help and --version. Logic lives in the library and in the
 * subcommand modules, where tests can reach it.
 */
#include "oq_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

typedef struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *summary;
} command;

static const command commands[] = {
    { "run", oq__cmd_run, "process JSON-lines event files exactly once" },
    { "gen", oq__cmd_gen, "generate synthetic event files" },
    { "node", oq__cmd_node, "speak the JSON-lines node protocol on stdin/stdout" },
    { "send", oq__cmd_send, "load events into a Redis stream (--redis)" },
    { "request", oq__cmd_request, "send requests over Redis and wait for "
                                  "their replies" },
    { "dlq", oq__cmd_dlq, "list, show, redrive or purge dead letters" },
    { "export", oq__cmd_export, "write the results of a durable run as JSONL" },
    { "stats", oq__cmd_stats, "print the stats of a durable run as JSON" },
    { "checkpoint", oq__cmd_checkpoint, "save a named snapshot of a durable run" },
    { "restore", oq__cmd_restore, "restore a named snapshot of a durable run" },
};

#define NCOMMANDS (sizeof(commands) / sizeof(commands[0]))

static void usage(FILE *f)
{
    fprintf(f,
            "usage: onceq [--help] [--version] COMMAND [ARGS...]\n"
            "\n"
            "onceq processes events exactly once with a pool of competing\n"
            "worker threads: a visibility-timeout queue, a sharded processed\n"
            "set with fenced leases, retries with backoff and a dead-letter\n"
            "queue.\n"
            "\n"
            "Commands:\n");
    for (size_t i = 0; i < NCOMMANDS; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f,
            "\n"
            "Options:\n"
            "  -h, --help     show this help and exit\n"
            "  -V, --version  print the version and exit\n"
            "\n"
            "Exit status: 0 success, 1 some events dead-lettered, 2 bad usage.\n");
}

/*
 * A standard descriptor (0, 1, 2) that was closed when onceq started is
 * held by /dev/null opened the wrong way round (stdin for writing, stdout
 * and stderr for reading), so that no file onceq opens gets its number
 * (results written "to stdout" would land in a dead-letter file, progress
 * "to stderr" in the results) and every use of it still fails as it would
 * have: reading stdin or writing results to stdout is an error (exit 3).
 */
static void hold_standard_fds(void)
{
    /* In order: the lower ones are held, so open() returns fd itself. */
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF)
            (void)open("/dev/null", fd == 0 ? O_WRONLY : O_RDONLY);
}

int main(int argc, char **argv)
{
    hold_standard_fds();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("onceq %s\n", oq_version());
        return 0;
    }
    for (size_t i = 0; i < NCOMMANDS; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "onceq: unknown command '%s' (try 'onceq --help')\n",
            argv[1]);
    return 2;
}
