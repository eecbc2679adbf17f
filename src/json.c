/* Placeholder: the strict JSON scanner lands here (issue 10). */
#include "oq_internal.h"
