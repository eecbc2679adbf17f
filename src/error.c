/* Error codes, their text, and the version string. */
#include "oq_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void oq__set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

const char *oq_version(void)
{
    return OQ_VERSION_STRING;
}

const char *oq_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case OQ_ESTALE:
        return "stale receipt or fencing token";
    case OQ_EEXIST:
        return "duplicate id (within the dedup window)";
    case OQ_ECLOSED:
        return "queue is closed";
    case OQ_EOF:
        return "end of queue (closed and drained)";
    case OQ_ENOMEM:
        return "out of memory";
    case OQ_EINVAL:
        return "invalid argument";
    case OQ_ENOENT:
        return "not found";
    case OQ_EBUSY:
        return "busy";
    default:
        break;
    }
    if (err < 0 && err > -4095)
        return strerror(-err);
    return "unknown error";
}

const char *oq_dlq_reason_name(oq_dlq_reason r)
{
    static const char *const names[OQ_DLQ__COUNT] = {
        [OQ_DLQ_MAX_ATTEMPTS] = "max_attempts",
        [OQ_DLQ_EXPIRED] = "expired",
        [OQ_DLQ_FAILED] = "failed",
        [OQ_DLQ_REJECTED] = "rejected",
        [OQ_DLQ_PARSE_ERROR] = "parse_error",
        [OQ_DLQ_BAD_ID] = "bad_id",
        [OQ_DLQ_TOO_LARGE] = "too_large",
    };
    if ((unsigned)r < OQ_DLQ__COUNT)
        return names[r];
    return "unknown";
}
