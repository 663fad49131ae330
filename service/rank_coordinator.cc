#include "service/rank_coordinator.h"

#include <spdlog/spdlog.h>

#include "core/collective.h"
#include "service/rank_commands.h"

namespace peerd {

RankCoordinator::RankCoordinator(Collective* ranks, std::function<void(const Status&)> on_lost)
    : ranks_(ranks), on_lost_(std::move(on_lost)) {}

bool RankCoordinator::active() const { return ranks_ && ranks_->world_size() > 1; }

Status RankCoordinator::Check(Status st) {
  if (st.ok()) return st;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!lost_.empty()) return st;  // lost already: on_lost ran
    lost_ = st.ToString();
  }
  if (on_lost_) on_lost_(st);
  return st;
}

std::string RankCoordinator::lost_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return lost_;
}

Status RankCoordinator::Tell(RankCommand command) {
  if (!active()) return Status::OK();
  if (std::string lost = lost_reason(); !lost.empty()) return Status::IOError(lost);
  last_command_ = std::chrono::steady_clock::now();
  return Check(ShareCommand(*ranks_, &command));
}

void RankCoordinator::TellStop() {
  if (!active() || !lost_reason().empty()) return;
  RankCommand bye;
  bye.set_kind(RankCommand::STOP);
  if (Status st = ShareCommand(*ranks_, &bye); !st.ok())
    spdlog::warn("telling the other ranks to stop: {}", st.ToString());
}

bool RankCoordinator::HeartbeatDue() const {
  return active() && std::chrono::steady_clock::now() - last_command_ > std::chrono::seconds(1);
}

Status RankCoordinator::Compare(Trainer& trainer, std::vector<RankInfo>* ranks, bool* agree) {
  ranks->clear();
  *agree = true;
  if (!active()) return Status::OK();
  RankCommand digest;
  digest.set_kind(RankCommand::DIGEST);
  if (Status st = Tell(digest); !st.ok()) return st;
  if (Status st = Check(GatherDigests(*ranks_, trainer, ranks)); !st.ok()) return st;
  for (const RankInfo& r : *ranks)
    *agree &= r.model_digest() == ranks->front().model_digest() && r.step() == ranks->front().step();
  if (!*agree) {
    std::string list;
    for (const RankInfo& r : *ranks)
      list += fmt::format(" rank {}: step {} digest {:016x};", r.rank(), r.step(), r.model_digest());
    spdlog::error("the ranks' models differ:{} (a bug: please report it with this line)", list);
  }
  return Status::OK();
}

}  // namespace peerd
