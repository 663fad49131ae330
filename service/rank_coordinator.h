// Rank 0's side of a multi-rank job (docs/DESIGN.md §6): it announces each command to the other
// ranks (service/rank_commands.h) and compares their models.
//
// A collective that fails loses the ranks for good: the ranks can no longer agree on what was
// trained, so none trains on. The coordinator keeps why, calls `on_lost` once (on the thread that
// saw the failure), and fails every later call with the same reason; restarting every rank
// resumes from the last checkpoint. With one process every call is a no-op that succeeds.
#pragma once

#include <chrono>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "core/status.h"
#include "proto/admin.pb.h"
#include "proto/ranks.pb.h"

namespace peerd {

class Collective;
class Trainer;

class RankCoordinator {
 public:
  RankCoordinator() = default;
  // `ranks` (not owned) may be null: one process.
  RankCoordinator(Collective* ranks, std::function<void(const Status& why)> on_lost);

  bool active() const;  // several ranks
  Collective& collective() { return *ranks_; }

  // Announces `command` to the other ranks.
  Status Tell(RankCommand command);
  // Tells the other ranks that rank 0 stops; a failure is only logged (they stop either way).
  void TellStop();
  // Every rank's step and model digest in rank order, and whether all equal rank 0's.
  Status Compare(Trainer& trainer, std::vector<RankInfo>* ranks, bool* agree);
  // Whether a heartbeat is due: the other ranks wait for rank 0's next command with a timeout, so
  // while nothing trains rank 0 sends one a second (and notices a lost rank while idle too).
  bool HeartbeatDue() const;
  // `st`, once the ranks are lost if it failed: for what a collective returned.
  Status Check(Status st);
  // Why the ranks were lost; "" while they are all there.
  std::string lost_reason() const;

 private:
  Collective* ranks_ = nullptr;
  std::function<void(const Status&)> on_lost_;
  std::chrono::steady_clock::time_point last_command_{};
  mutable std::mutex mu_;  // guards lost_ (read by the admin threads)
  std::string lost_;
};

}  // namespace peerd
