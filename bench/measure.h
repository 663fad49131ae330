// What the benches measure with: a steady clock, the seconds since a point of it, and medians.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace peerd::bench {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

// The median (the mean of the middle two of an even count); 0 of none.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

}  // namespace peerd::bench
