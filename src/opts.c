/*
 * Options that grow. Every oq_*_opts struct starts with size_t size: the
 * sizeof of the struct as the caller was compiled (the *_defaults() macro of
 * onceq.h passes it to *_opts_init()). Fields are only ever added at the
 * end, so a caller built against an older header hands in a shorter struct:
 * the library reads the fields that size covers, and the rest keep their
 * defaults. A caller built against a newer header hands in a longer one:
 * accepted when the part this library does not know is all zero (what the
 * library's own *_opts_init() left there, so the caller set none of the
 * newer options), refused with OQ_EINVAL otherwise, rather than silently
 * ignoring an option the caller asked for (Linux's copy_struct_from_user()
 * rule). size 0 (a struct not set up by *_defaults(), e.g. `= {0}`) is
 * OQ_EINVAL too. Threads: none; the functions touch only their arguments.
 */
#include "oq_internal.h"

#include <string.h>

void oq__opts_init(void *o, size_t size, const void *defaults, size_t known)
{
    if (o == NULL || size < sizeof(size_t))
        return; /* no room even for the size: nothing to fill */
    memset(o, 0, size);
    memcpy(o, defaults, OQ__MIN(size, known));
    memcpy(o, &size, sizeof(size));
}

int oq__opts_copy(void *dst, size_t known, const void *src)
{
    const unsigned char *s = src;
    size_t size;

    memcpy(&size, src, sizeof(size));
    if (size < sizeof(size_t))
        return OQ_EINVAL;
    for (size_t i = known; i < size; i++)
        if (s[i] != 0)
            return OQ_EINVAL; /* a newer option this library lacks */
    memcpy(dst, src, OQ__MIN(size, known));
    memcpy(dst, &known, sizeof(known));
    return 0;
}
