/* What bindgen reads: the system verbs header whose declarations verbs-sys binds (see build.rs's
 * allowlist), and the shim's own functions. */
#include <infiniband/verbs.h>

#include "shim.h"
