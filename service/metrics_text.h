// GET /metrics in Prometheus' text exposition format (version 0.0.4), following its naming
// conventions: every family has # HELP and # TYPE, counters end in _total, units are in the name
// (_seconds, _bytes), ratios are left to PromQL (hits and misses are counters, not a hit ratio).
// Debian has no Prometheus client library for C++; the format is small enough to write here.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "experts_store/row_cache.h"
#include "proto/admin.pb.h"

namespace peerd {

// Writes families one after another; a family's samples follow its header.
class PrometheusText {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;
  // `type`: "counter" (name ends in _total), "gauge" or "histogram".
  void Family(const std::string& name, const char* type, const std::string& help);
  // A sample of the family last begun; `suffix` for histograms ("_bucket", "_sum", "_count").
  void Sample(double value, const Labels& labels = {}, const char* suffix = "");
  // A family with one sample.
  void Counter(const std::string& name, const std::string& help, double value);
  void Gauge(const std::string& name, const std::string& help, double value);
  const std::string& text() const { return text_; }

 private:
  std::string text_, family_;
};

// Training step times: a Prometheus histogram with fixed buckets (seconds).
struct StepTimeHistogram {
  static constexpr std::array<double, 12> kBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  std::array<uint64_t, kBounds.size()> counts{};  // per bucket, not cumulative
  uint64_t count = 0;
  double sum = 0;
  void Observe(double seconds);
  void WriteTo(PrometheusText* out, const std::string& name, const std::string& help) const;
};

// What the training side exposes: the snapshot of `status`, the row cache, step times and the
// latest evaluation (bits per byte per task and the forgetting metrics of `report`).
struct TrainingMetrics {
  StatusReply status;
  RowCache::Stats cache;
  StepTimeHistogram step_seconds;
  ForgettingReport report;
};
void WriteTrainingMetrics(const TrainingMetrics& m, PrometheusText* out);

}  // namespace peerd
