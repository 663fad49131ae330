// RoutedTraining: routing isolation (docs/DESIGN.md §4b) as peerd's training loop runs it.
//
// Before routing starts, every trained byte is counted under the base's id in the router, whatever
// the policy: the base is everything trained jointly so far. With train.routed on, the first
// segment added starts routing and opens a *branch*: that segment in every PEER layer plus an
// adapter of the same id, trained alone (policy group `new-segment`) under the route {adapter,
// base segments + branch}, on its own learning-rate schedule, starting as a copy of the branch
// trained before it (as a dense model starts a new domain where the last one left it, while the
// old branch stays frozen). Freezing the segment freezes the adapter and closes
// the branch; until the next one is added nothing may train (new text waits in the spool).
// Evaluation routes each window by the bytes before it.
//
// Owned by the trainer thread; not thread-safe.
#pragma once

#include <torch/torch.h>

#include "core/evaluator.h"
#include "core/routed_branches.h"
#include "core/trainer.h"
#include "proto/admin.pb.h"

namespace peerd {

class RoutedTraining {
 public:
  // `base`: the id of the model's first segment, the base's branch id in the router.
  explicit RoutedTraining(int64_t base = 0) { branches_.base = base; }

  bool started() const { return !branches_.base_segments.empty(); }
  // The branches and their router, as evaluation routes by them.
  const RoutedBranches& branches() const { return branches_; }
  // Whether a batch may train now: before routing starts, or while a branch is open.
  bool CanTrain(const TransformerLM& model) const;
  // The train config that runs: `c` itself, or once routing started `c` training only the newest
  // segment and its adapter.
  TrainConfig Effective(TrainConfig c) const;

  // Opens branch `id`, whose segment was just added to every PEER layer: an adapter of the
  // configured rank under the same id, seeded from the branch before it (the first branch starts
  // at the base; rows not in memory: not seeded, said in the log), the branch's route, its own
  // schedule from now, and (the first time) routing starts with every other segment as the base.
  // The trainer's config becomes Effective of itself.
  Status Open(Trainer& trainer, int64_t id);
  // After a step: counts the fresh rows [b, T+1] under the branch that trained them.
  void AfterStep(const torch::Tensor& fresh_rows);

  // `o` with each window routed by the `context` bytes before it, by the model among `candidates`
  // branches (0: by the bigram router; RoutedBranches::ModelOptions); `o` itself before routing
  // starts.
  EvalOptions Options(EvalOptions o, int64_t context, uint32_t candidates) const;
  // The route a generation from `prompt` runs: the branch, of the `candidates` proposed for the
  // prompt's last `context` + 1 bytes, under which the model predicts them best (0 candidates, or
  // a one-byte prompt: the bigram router's choice); the model's route before routing starts.
  Route RouteForPrompt(TransformerLM& model, std::string_view prompt, int64_t context, uint32_t candidates) const;
  RoutingInfo Info(const TransformerLM& model) const;

  CheckpointMeta::Routing ToProto() const;
  // Restores what ToProto wrote and puts the model on the open branch's route.
  Status FromProto(const CheckpointMeta::Routing& p, TransformerLM& model);

 private:
  int64_t branch_ = -1;  // the open (or last opened) branch; -1 before routing
  RoutedBranches branches_;
};

}  // namespace peerd
