// The steps rank 0 and the other ranks of a multi-rank peerd take together (docs/DESIGN.md §6). Rank 0
// decides — it owns the spool, the admin API and the store — and announces each collective thing
// with a RankCommand (proto/ranks.proto); the others (service/rank_worker.h) follow. Each function
// here is called by every rank at the same point: rank 0's values go out, the others' come in.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "core/collective.h"
#include "core/trainer.h"
#include "proto/admin.pb.h"
#include "proto/ranks.pb.h"

namespace peerd {

// Every rank's *command becomes rank 0's.
Status ShareCommand(Collective& collective, RankCommand* command);
// Rank 0's training batch (shape from the STEP command) reaches every rank.
Status ShareBatch(Collective& collective, const RankCommand& step, torch::Tensor* batch);
// After ADD_SEGMENTS: the added segments take rank 0's initial values on every rank.
Status ShareAddedSegments(Collective& collective, Trainer& trainer, const RankCommand& add);
// Every rank's step and ModelDigest, in rank order.
Status GatherDigests(Collective& collective, Trainer& trainer, std::vector<RankInfo>* ranks);

}  // namespace peerd
