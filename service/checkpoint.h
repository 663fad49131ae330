// Checkpoints: everything that training changes and the expert store does not hold — dense
// parameters, query networks, training segments, segment adapters (frozen ones too: the store holds
// rows, not adapters), batch-norm statistics, optimizer state, the step counter, the schedule's
// start and the spool cursor — written together in one synced WriteBatch (column family
// "checkpoints"), so a restart resumes from one consistent moment. Frozen segments are not in it:
// the store is their truth, and a segment frozen after the checkpoint stays frozen.
#pragma once

#include <memory>

#include "core/trainer.h"
#include "experts_store/data_dir_db.h"
#include "proto/admin.pb.h"

namespace peerd {

class Checkpointer {
 public:
  explicit Checkpointer(std::shared_ptr<DataDirDb> db) : db_(std::move(db)) {}

  // Saves the trainer's model and optimizer with `meta` (its training_segments are filled in).
  Status Save(Trainer& trainer, CheckpointMeta meta);
  // Loads the latest checkpoint into a trainer whose model already holds the store's frozen
  // segments: re-creates the checkpoint's training segments and adapters, copies every tensor by
  // name, freezes the adapters that were frozen, restores the optimizer, the step and the schedule.
  // *found = false (and nothing changes) when there is none.
  Status Load(Trainer& trainer, CheckpointMeta* meta, bool* found);

 private:
  std::shared_ptr<DataDirDb> db_;
};

}  // namespace peerd
