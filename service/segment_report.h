// What the admin API says about the expert pool (GET /v1/segments, the segments of /v1/status):
// each segment's state, size, dtype and checksum, and how much of it the last evaluation used.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "core/evaluator.h"
#include "core/model.h"
#include "proto/admin.pb.h"
#include "proto/store.pb.h"

namespace peerd {

// Expert usage of one segment over an evaluation (PEER paper, Table 2): the share of its experts
// retrieved at least once, and KL(usage || uniform) in nats.
struct SegmentUsage {
  double share_used = 0;
  double kl_from_uniform = 0;
  double retrievals = 0;  // experts retrieved from it (a token's h·k retrievals counted each)
};
using UsageBySegment = std::map<std::pair<uint32_t, uint32_t>, SegmentUsage>;  // by (layer, segment id)

// Starts counting retrievals in every PEER layer of `model`.
void StartUsageRecording(TransformerLM& model);
// Stops counting and returns what was counted since StartUsageRecording.
UsageBySegment StopUsageRecording(TransformerLM& model);
// Between StartUsageRecording and StopUsageRecording: counts only the passes that score a text
// evaluated with `*o`, not those that choose its windows' routes (EvalOptions::candidates).
void CountUsageWhileScoring(TransformerLM& model, EvalOptions* o);

// Each segment's share of its layer's retrievals in `usage`, layer by layer.
void AddSegmentShares(const UsageBySegment& usage, ScoreReply* reply);

// The pool as GET /v1/segments shows it: the model's segments, with the store's manifests of the
// frozen ones (dtype, checksum, step) and `usage` where it has them.
SegmentsReply DescribeSegments(TransformerLM& model, const std::vector<SegmentManifest>& manifests,
                               const UsageBySegment& usage);

}  // namespace peerd
