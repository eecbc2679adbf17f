/* Redis Streams broker (being written; see issue 6). */
#include "oq_internal.h"

#include <stdio.h>

static int not_yet(const char *what)
{
    fprintf(stderr, "onceq %s --redis: not implemented yet\n", what);
    return 2;
}

int oq__cmd_send(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}

int oq__redis_run(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}

int oq__redis_dlq(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}

int oq__redis_export(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}
