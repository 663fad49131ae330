// Rank sync: making every rank of a multi-rank job hold the same model (docs/DESIGN.md §6).
//
// A job starts (and restarts) with rank 0 holding the truth — its model restored from the store
// and the last checkpoint — and every other rank holding nothing durable. ShareConfig gives the
// others rank 0's configuration to build their model from; SyncFromRankZero then copies the pool
// (segments added since, frozen rows — sent once, here), every trainable parameter and buffer, the
// optimizer's state, the step and the training config. From then on every rank applies the same
// updates, and ModelDigest tells whether they still agree.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "core/collective.h"
#include "core/trainer.h"
#include "proto/config.pb.h"

namespace peerd {

// What multi-rank training cannot do with this configuration: batch-norm statistics of each
// rank's share would differ from one process's (use the layer norm, the default).
Status CheckDataParallel(const Config& config);

// Every rank's *config becomes rank 0's.
Status ShareConfig(Collective& collective, Config* config);

// Every rank's trainer becomes a copy of rank 0's. Other ranks must have built their model from
// the shared configuration. Frozen rows must be held in memory (--residency resident).
Status SyncFromRankZero(Collective& collective, Trainer& trainer);

// A segment added on every rank takes rank 0's initial values (each rank drew its own).
Status SyncSegmentFromRankZero(Collective& collective, const ExpertSegmentImpl& segment);

// xxHash3 over the pool's shape (layer, segment id, size, frozen, frozen checksum) and the bytes
// of every parameter and buffer except frozen segments' (their checksum, taken of those bytes at
// the freeze, stands for them): equal on ranks that hold the same model.
uint64_t ModelDigest(TransformerLM& model);

}  // namespace peerd
