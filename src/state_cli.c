/* onceq dlq|export|stats|checkpoint|restore (being written; see issue 4). */
#include "oq_internal.h"

#include <stdio.h>

static int not_yet(const char *what)
{
    fprintf(stderr, "onceq %s: not implemented yet\n", what);
    return 2;
}

int oq__cmd_dlq(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}

int oq__cmd_export(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}

int oq__cmd_stats(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}

int oq__cmd_checkpoint(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}

int oq__cmd_restore(int argc, char **argv)
{
    OQ__UNUSED(argc);
    return not_yet(argv[0]);
}
