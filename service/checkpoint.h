// Checkpoints: everything that training changes and the expert store does not hold — dense
// parameters, query networks, training segments, segment adapters (frozen ones too: the store holds
// rows, not adapters), batch-norm statistics, optimizer state, the step counter, the schedule's
// start and the spool cursor — so a restart resumes from one consistent moment. Frozen segments
// are not in it: the store is their truth, and a segment frozen after the checkpoint stays frozen.
//
// A checkpoint of any size: each tensor is stored raw, in pieces of at most `piece_bytes` (one
// RocksDB value each, far below its 4 GiB limit), under a generation number; the record ("meta")
// names the generation and lists the tensors. A save writes the new generation's pieces first, a
// bounded batch at a time (memory beyond the model: about two pieces), then the record and the
// removal of every other generation in one synced batch. Until that batch lands the last
// checkpoint is whole and is what a restart finds; pieces of a save cut short are never read, and
// the next save removes them.
#pragma once

#include <memory>

#include "core/trainer.h"
#include "experts_store/data_dir_db.h"
#include "proto/admin.pb.h"

namespace peerd {

class Checkpointer {
 public:
  static constexpr size_t kDefaultPieceBytes = size_t{64} << 20;

  explicit Checkpointer(std::shared_ptr<DataDirDb> db, size_t piece_bytes = kDefaultPieceBytes)
      : db_(std::move(db)), piece_bytes_(piece_bytes) {}

  // Saves the trainer's model and optimizer with `meta` (its training_segments are filled in).
  Status Save(Trainer& trainer, CheckpointMeta meta);
  // Loads the latest checkpoint into a trainer whose model already holds the store's frozen
  // segments: re-creates the checkpoint's training segments and adapters, copies every tensor by
  // name, freezes the adapters that were frozen, restores the optimizer, the step and the schedule.
  // *found = false (and nothing changes) when there is none. Reads checkpoints written as one
  // archive (generation 0) too.
  Status Load(Trainer& trainer, CheckpointMeta* meta, bool* found);

 private:
  std::shared_ptr<DataDirDb> db_;
  size_t piece_bytes_;
};

}  // namespace peerd
