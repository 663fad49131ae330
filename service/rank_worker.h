// RankWorker: what peerd is on ranks other than 0 of a multi-rank job (docs/DESIGN.md §6).
//
// A worker holds nothing durable — no data directory, spool, ports or checkpoints: when the job
// starts it builds the model from rank 0's configuration and takes rank 0's whole state (frozen
// rows included), then does what each RankCommand from rank 0 says: train its share of a step,
// add or freeze segments, change the policy, report its model digest. Losing rank 0 (or any
// rank) ends it with the error; restarting every rank resumes from rank 0's last checkpoint.
#pragma once

#include <memory>

#include "core/collective.h"
#include "core/status.h"

namespace peerd {

class Trainer;

class RankWorker {
 public:
  // Joins: rank 0's configuration and state. `collective` must outlive the worker.
  static Status Join(Collective* collective, std::unique_ptr<RankWorker>* out);
  ~RankWorker();
  // Follows rank 0 until it says STOP (OK) or a collective fails (the error).
  Status Run();
  int64_t step() const;

 private:
  explicit RankWorker(Collective* collective);
  Collective* collective_;
  std::unique_ptr<Trainer> trainer_;
};

}  // namespace peerd
