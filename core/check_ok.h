// CheckOk: a Status that cannot fail unless the code is wrong, turned into an exception that
// carries its message (the error convention: core/status.h). For code with tensors; code without
// carries the Status up.
#pragma once

#include <c10/util/Exception.h>

#include "core/status.h"

namespace peerd {

inline void CheckOk(const Status& st) { TORCH_CHECK(st.ok(), st.ToString()); }

}  // namespace peerd
