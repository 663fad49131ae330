// The training side of GET /metrics, in Prometheus' text exposition format.
#pragma once

#include <string>

#include "experts_store/row_cache.h"
#include "proto/admin.pb.h"

namespace peerd {

// Metrics of `status` (TrainingLoop::Snapshot) and of the frozen rows' cache.
std::string TrainingMetricsText(const StatusReply& status, const RowCache::Stats& cache);

}  // namespace peerd
