// Trainer: one optimizer step at a time on a TransformerLM, under a training policy.
//
// The policy (TrainConfig.train_groups) names which parameter groups train; frozen segments never
// do. After the pool changes (a segment added or frozen) or the policy does, the trainer's
// optimizer is re-pointed at exactly the trainable parameters: state is kept for those that stay,
// dropped for those that leave. Learning rate: linear warmup, then cosine decay or constant.
// Not thread-safe: one thread trains.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <memory>

#include "core/adamw.h"
#include "core/collective.h"
#include "core/model.h"
#include "core/status.h"
#include "proto/config.pb.h"

namespace peerd {

// How a segment is frozen beyond the in-memory flip (docs/DESIGN.md §2: the store is the truth).
struct FreezeOptions {
  // Runs first, with the still-training segment; if it fails the segment stays training and the
  // error is returned. The service writes the segment to the expert store here.
  std::function<Status(size_t layer, const ExpertSegmentImpl& segment)> persist;
  // The dtype the frozen rows are held in afterwards (kBFloat16 to hold what a bf16 store holds).
  torch::ScalarType hold_rows_as = torch::kFloat;
  // When set, the rows leave memory once frozen: the segment reads them through the source this
  // returns (over the store `persist` wrote them to). Cached residency: a pool that grows by a
  // segment per domain does not grow in memory with it.
  std::function<std::shared_ptr<ExpertRowSource>(size_t layer, const ExpertSegmentImpl& segment)> leave_rows_to;
};

struct StepStats {
  double loss = 0;     // mean cross-entropy, nats per token
  double distill = 0;  // mean KL(teacher ‖ model) over the replayed tokens, nats (0 without)
  double lr = 0;
  double grad_norm = 0;  // global norm before clipping
};

class Trainer {
 public:
  Trainer(TransformerLM model, const TrainConfig& config);

  // One step on tokens [B, T+1]. The first `replayed` rows were replayed from earlier domains:
  // with a teacher and train.distill_weight > 0, their loss adds distill_weight · KL(teacher ‖
  // model) of the next-byte distributions (the continual-learning recipe: replay + distillation).
  StepStats Step(const torch::Tensor& tokens, int64_t replayed = 0);
  // The same step, data parallel when a collective of several ranks is set: every rank is given
  // the whole global batch, trains its contiguous share of the rows (rank r of W: rows
  // [rB/W, (r+1)B/W)), with each loss term divided by the global batch's token count so that the
  // gradients summed over ranks (core/gradient_sync.h) are the whole batch's. Clipping and the
  // update then run on identical gradients, so every rank applies the same update that one process
  // would. Stats are the global batch's. An IOError when a rank is lost mid-step (nothing updated).
  Status Step(const torch::Tensor& tokens, int64_t replayed, StepStats* stats);
  // Makes Step data parallel over `collective` (nullptr: one process). Not owned.
  void set_collective(Collective* collective) { collective_ = collective; }

  // The model as it was before the current domain (CopyForTeacher), or nullptr for none.
  void SetTeacher(TransformerLM teacher) { teacher_ = std::move(teacher); }
  bool has_teacher() const { return !teacher_.is_empty(); }

  // Adds a training segment to PEER layer `layer` (position among the model's PEER layers).
  Status AddSegment(size_t layer, int64_t n_keys, int64_t* id = nullptr);
  // Freezes segment `id` of PEER layer `layer` (persisting it first when options say how) and
  // removes it from the optimizer, with the model's adapter of the same id if it has one (a
  // segment's adapter is part of what the segment owns).
  Status FreezeSegment(size_t layer, int64_t id, const FreezeOptions& options = {});
  // Re-points the optimizer at the parameters the policy trains now.
  void RefreshParameters();

  // The learning rate at step `step` of the configured schedule (warmup, then decay).
  double LearningRate(int64_t step) const;
  // The rate the next Step() uses.
  double NextLearningRate() const { return LearningRate(step_ - schedule_start_); }
  int64_t step() const { return step_; }
  void set_step(int64_t step) { step_ = step; }  // restoring a checkpoint
  // The schedule runs from this step on: a routed branch starts its own warmup and decay, as a
  // new domain trained alone would.
  int64_t schedule_start() const { return schedule_start_; }
  void set_schedule_start(int64_t step) { schedule_start_ = step; }
  const AdamW& optimizer() const { return optimizer_; }
  AdamW& mutable_optimizer() { return optimizer_; }
  const TrainConfig& config() const { return config_; }
  // Changes the training policy (groups, learning rates); the caller has validated it.
  void SetConfig(const TrainConfig& config);
  TransformerLM& model() { return model_; }

 private:
  Status StepShare(const torch::Tensor& tokens, int64_t replayed, StepStats* stats);

  TransformerLM model_;
  TransformerLM teacher_{nullptr};
  TrainConfig config_;
  AdamW optimizer_;
  Collective* collective_ = nullptr;
  int64_t step_ = 0;
  int64_t schedule_start_ = 0;
};

}  // namespace peerd
