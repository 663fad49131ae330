#include "service/routed_training.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <string>

namespace peerd {

bool RoutedTraining::CanTrain(const TransformerLM& model) const {
  if (!started()) return true;
  auto a = model->adapters().find(branch_);
  return a != model->adapters().end() && !a->second->frozen();
}

TrainConfig RoutedTraining::Effective(TrainConfig c) const {
  if (!started()) return c;
  c.clear_train_groups();
  c.add_train_groups("new-segment");
  return c;
}

Status RoutedTraining::Open(Trainer& trainer, int64_t id) {
  TransformerLM& model = trainer.model();
  auto layers = model->PeerLayers();
  if (layers.empty()) return Status::FailedPrecondition("routed training needs PEER layers");
  std::vector<int64_t> base;
  for (const auto& s : layers[0]->segments())
    if (s->id() != id) base.push_back(s->id());
  if (Status st = model->AddAdapter(id, trainer.config().adapter_rank()); !st.ok()) return st;
  if (!started()) {
    branches_.base_segments = base;
    spdlog::info("routing starts: the base is segment(s) {}; from now on only a new segment and its adapter train",
                 fmt::join(base, ", "));
  }
  if (branch_ >= 0) {
    if (Status st = model->CopyBranch(branch_, id); !st.ok())
      spdlog::warn("branch {} starts from the base, not as a copy of branch {}: {}", id, branch_, st.ToString());
    else
      spdlog::info("branch {} starts as a copy of branch {}", id, branch_);
  }
  branch_ = id;
  if (Status st = model->SetRoute(branches_.RouteOf(id)); !st.ok()) return st;
  trainer.set_schedule_start(trainer.step());
  trainer.SetConfig(Effective(trainer.config()));
  return Status::OK();
}

void RoutedTraining::AfterStep(const torch::Tensor& fresh_rows) {
  if (fresh_rows.size(0) == 0) return;
  branches_.router.Observe(started() ? branch_ : branches_.base, BatchBytes(fresh_rows));
}

EvalOptions RoutedTraining::Options(EvalOptions o, int64_t context, uint32_t candidates) const {
  return started() ? branches_.ModelOptions(o, context, candidates) : o;
}

Route RoutedTraining::RouteForPrompt(TransformerLM& model, std::string_view prompt, int64_t context,
                                     uint32_t candidates) const {
  if (!started()) return model->route();
  const std::string_view tail = prompt.substr(prompt.size() - std::min<size_t>(prompt.size(), context + 1));
  if (candidates == 0 || tail.size() < 2) return branches_.RouteOf(branches_.Choose(tail));
  return branches_.RouteOf(BestBranchFor(model, branches_, std::string(tail), branches_.Candidates(tail, candidates)));
}

RoutingInfo RoutedTraining::Info(const TransformerLM& model) const {
  RoutingInfo info;
  for (int64_t s : branches_.base_segments) info.add_base_segments(static_cast<uint32_t>(s));
  info.add_branches(static_cast<uint32_t>(branches_.base));
  for (int64_t b : branches_.router.routes())
    if (b != branches_.base) info.add_branches(static_cast<uint32_t>(b));
  info.set_training_branch(CanTrain(model) && started() ? branch_ : -1);
  info.set_router_statistics_bytes(branches_.router.StatisticsBytes());
  return info;
}

CheckpointMeta::Routing RoutedTraining::ToProto() const {
  CheckpointMeta::Routing p;
  p.set_base(static_cast<uint32_t>(branches_.base));
  for (int64_t s : branches_.base_segments) p.add_base_segments(static_cast<uint32_t>(s));
  p.set_branch(branch_);
  p.set_router(branches_.router.Serialize());
  return p;
}

Status RoutedTraining::FromProto(const CheckpointMeta::Routing& p, TransformerLM& model) {
  RoutedBranches b;
  b.base = p.base();
  b.base_segments.assign(p.base_segments().begin(), p.base_segments().end());
  if (!p.router().empty())
    if (Status st = b.router.Parse(p.router()); !st.ok()) return st;
  branches_ = std::move(b);
  branch_ = p.branch();
  if (started()) return model->SetRoute(branches_.RouteOf(branch_));
  return Status::OK();
}

}  // namespace peerd
