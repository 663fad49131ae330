// The benchmarks' JSON output: one object per line, printed (--json) and written beside the table.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace peerd::bench {

// Writes `rows` to `path` ('' = nowhere), creating its folder. A failure is reported on stderr and
// the benchmark goes on: the table on stdout is the figure that matters.
inline void WriteJsonLines(const std::string& path, const std::vector<nlohmann::json>& rows) {
  if (path.empty()) return;
  std::error_code ec;
  if (std::filesystem::path(path).has_parent_path())
    std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  std::ofstream out(path);
  for (const auto& r : rows) out << r.dump() << "\n";
  if (!out) std::fprintf(stderr, "peer-bench: cannot write %s\n", path.c_str());
}

inline void PrintJsonLines(const std::vector<nlohmann::json>& rows) {
  for (const auto& r : rows) std::printf("%s\n", r.dump().c_str());
}

}  // namespace peerd::bench
