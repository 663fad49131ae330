// The dtype of frozen rows by name — "bf16" or "fp32" — as the configuration, the admin API and
// the status replies write it: parsed and printed here, nowhere else. Header-only, no LibTorch.
#pragma once

#include <optional>
#include <string_view>

#include "proto/store.pb.h"

namespace peerd {

inline constexpr const char* kRowDtypeChoices = "\"bf16\" or \"fp32\"";

inline const char* RowDtypeName(RowDtype dtype) { return dtype == ROW_DTYPE_FP32 ? "fp32" : "bf16"; }

// The dtype called `name`; nullopt for any other name.
inline std::optional<RowDtype> ParseRowDtype(std::string_view name) {
  if (name == "bf16") return ROW_DTYPE_BF16;
  if (name == "fp32") return ROW_DTYPE_FP32;
  return std::nullopt;
}

}  // namespace peerd
