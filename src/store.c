/* Durable state in SQLite (being written; see issue 4). */
#include "oq_internal.h"
