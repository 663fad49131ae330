#include "core/trainer.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/check_ok.h"
#include "core/gradient_sync.h"

namespace peerd {

namespace {

bool Lists(const TrainConfig& c, const std::string& group) {
  return std::find(c.train_groups().begin(), c.train_groups().end(), group) != c.train_groups().end();
}

// Whether the policy's groups select this parameter.
bool Selected(const TrainConfig& c, const ParamInfo& p) {
  if (Lists(c, "all")) return true;
  if (Lists(c, "non-expert") && p.kind != ParamKind::kExpert) return true;
  if (Lists(c, "expert") && p.kind == ParamKind::kExpert) return true;
  if (Lists(c, "attention") && p.kind == ParamKind::kAttention) return true;
  if (Lists(c, "dense-ffn") && p.kind == ParamKind::kDenseFfn) return true;
  // A segment's adapter is part of what it owns: it trains and freezes with the segment.
  if (Lists(c, "new-segment") && (p.kind == ParamKind::kExpert || p.kind == ParamKind::kAdapter) && p.newest_segment)
    return true;
  if (Lists(c, "adapter") && p.kind == ParamKind::kAdapter) return true;
  if (Lists(c, "query") && p.kind == ParamKind::kQuery) return true;
  return false;
}

AdamW::Options OptimizerOptions(const TrainConfig& c) {
  AdamW::Options o;
  o.beta1 = c.beta1();
  o.beta2 = c.beta2();
  o.eps = c.eps();
  o.weight_decay = c.weight_decay();
  return o;
}

}  // namespace

Trainer::Trainer(TransformerLM model, const TrainConfig& config)
    : model_(std::move(model)), config_(config), optimizer_(OptimizerOptions(config)) {
  RefreshParameters();
}

void Trainer::SetConfig(const TrainConfig& config) {
  config_ = config;
  optimizer_.set_options(OptimizerOptions(config));
  RefreshParameters();
}

void Trainer::RefreshParameters() {
  std::vector<AdamW::Param> params;
  for (const ParamInfo& p : model_->ClassifiedParameters()) {
    const bool on = Selected(config_, p);
    p.tensor.set_requires_grad(on);  // parts that do not train need no gradient at all
    const double scale = p.kind == ParamKind::kExpert ? config_.expert_lr_scale()
                         : p.kind == ParamKind::kAdapter
                             ? (p.trunk_delta ? config_.trunk_delta_lr_scale() : config_.adapter_lr_scale())
                             : config_.backbone_lr_scale();
    if (on) params.push_back({p.tensor, p.decay, scale});
  }
  optimizer_.SetParameters(std::move(params));
  const bool stats_move = Lists(config_, "all") || Lists(config_, "norm-stats");
  for (auto& layer : model_->PeerLayers()) layer->set_norm_stats_frozen(!stats_move);
}

Status Trainer::AddSegment(size_t layer, int64_t n_keys, int64_t* id) {
  auto layers = model_->PeerLayers();
  if (layer >= layers.size())
    return Status::NotFound("PEER layer " + std::to_string(layer) + " does not exist (the model has " +
                            std::to_string(layers.size()) + ")");
  Status st = layers[layer]->AddSegment(n_keys, id);
  if (st.ok()) RefreshParameters();
  return st;
}

Status Trainer::FreezeSegment(size_t layer, int64_t id, const FreezeOptions& options) {
  auto layers = model_->PeerLayers();
  if (layer >= layers.size())
    return Status::NotFound("PEER layer " + std::to_string(layer) + " does not exist (the model has " +
                            std::to_string(layers.size()) + ")");
  if (options.persist) {
    const ExpertSegmentImpl* segment = nullptr;
    for (const auto& s : layers[layer]->segments())
      if (s->id() == id) segment = s.get();
    if (!segment) return Status::NotFound("no segment with id " + std::to_string(id));
    if (segment->frozen()) return Status::FailedPrecondition("segment " + std::to_string(id) + " is already frozen");
    if (Status st = options.persist(layer, *segment); !st.ok()) return st;
  }
  std::shared_ptr<ExpertRowSource> rows;
  if (options.leave_rows_to)
    for (const auto& s : layers[layer]->segments())
      if (s->id() == id && !s->frozen()) rows = options.leave_rows_to(layer, *s);
  Status st = layers[layer]->FreezeSegment(id, options.hold_rows_as, std::move(rows));
  if (!st.ok()) return st;
  if (auto a = model_->adapters().find(id); a != model_->adapters().end() && !a->second->frozen())
    st = model_->FreezeAdapter(id);
  RefreshParameters();
  return st;
}

double Trainer::LearningRate(int64_t step) const {
  const double lr = config_.lr(), min_lr = config_.min_lr();
  const int64_t warmup = config_.warmup_steps();
  if (step < warmup) return lr * (step + 1) / warmup;
  if (config_.schedule() == LR_SCHEDULE_CONSTANT) return lr;
  const int64_t decay_steps = std::max<int64_t>(1, int64_t{config_.steps()} - warmup);
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / decay_steps);
  return min_lr + 0.5 * (lr - min_lr) * (1 + std::cos(M_PI * progress));
}

StepStats Trainer::Step(const torch::Tensor& tokens, int64_t replayed) {
  StepStats stats;
  Status st = Step(tokens, replayed, &stats);
  CheckOk(st);
  return stats;
}

Status Trainer::Step(const torch::Tensor& tokens, int64_t replayed, StepStats* out) {
  if (collective_ && collective_->world_size() > 1) return StepShare(tokens, replayed, out);
  model_->train();
  optimizer_.ZeroGrad();
  StepStats& stats = *out;
  stats = StepStats();
  torch::Tensor loss;
  const bool distill = has_teacher() && replayed > 0 && config_.distill_weight() > 0;
  if (!distill) {
    loss = model_->Loss(tokens);
    stats.loss = loss.item<double>();
  } else {
    const int64_t T = tokens.size(1) - 1;
    const torch::Tensor inputs = tokens.slice(1, 0, T), targets = tokens.slice(1, 1, T + 1);
    torch::Tensor logits = model_->forward(inputs);  // [B, T, V]
    torch::Tensor ce = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), targets.reshape(-1));
    torch::Tensor teacher_logp;
    {
      torch::NoGradGuard no_grad;
      teacher_->eval();
      teacher_logp = torch::log_softmax(teacher_->forward(inputs.slice(0, 0, replayed)), -1);  // [r, T, V]
    }
    torch::Tensor student_logp = torch::log_softmax(logits.slice(0, 0, replayed), -1);
    // KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s), averaged over the replayed tokens.
    torch::Tensor kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean();
    loss = ce + config_.distill_weight() * kl;
    stats.loss = ce.item<double>();
    stats.distill = kl.item<double>();
  }
  loss.backward();
  // Our own clipping: LibTorch's clip_grad_norm_ does not scale sparse gradients (expert tables).
  stats.grad_norm = optimizer_.ClipGradNorm(config_.grad_clip() > 0 ? config_.grad_clip() : INFINITY);
  stats.lr = NextLearningRate();
  optimizer_.Step(stats.lr);
  ++step_;
  return Status::OK();
}

Status Trainer::StepShare(const torch::Tensor& tokens, int64_t replayed, StepStats* out) {
  model_->train();
  optimizer_.ZeroGrad();
  const int64_t B = tokens.size(0), T = tokens.size(1) - 1;
  const int64_t W = collective_->world_size(), r = collective_->rank();
  const int64_t lo = B * r / W, hi = B * (r + 1) / W;
  const int64_t local_replayed = std::clamp<int64_t>(replayed - lo, 0, hi - lo);
  const bool distill = has_teacher() && replayed > 0 && config_.distill_weight() > 0;
  double ce_part = 0, kl_part = 0;  // this rank's share of the global means
  if (hi > lo) {
    const torch::Tensor share = tokens.slice(0, lo, hi);
    const torch::Tensor inputs = share.slice(1, 0, T), targets = share.slice(1, 1, T + 1);
    torch::Tensor logits = model_->forward(inputs);  // [b, T, V]
    torch::Tensor loss =
        torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), targets.reshape(-1),
                                             torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
        static_cast<double>(B * T);
    ce_part = loss.item<double>();
    if (distill && local_replayed > 0) {
      torch::Tensor teacher_logp;
      {
        torch::NoGradGuard no_grad;
        teacher_->eval();
        teacher_logp = torch::log_softmax(teacher_->forward(inputs.slice(0, 0, local_replayed)), -1);
      }
      torch::Tensor student_logp = torch::log_softmax(logits.slice(0, 0, local_replayed), -1);
      // KL(p_t ‖ p_s) summed over this rank's replayed tokens, divided by the global count of them.
      torch::Tensor kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum() / static_cast<double>(replayed * T);
      kl_part = kl.item<double>();
      loss = loss + config_.distill_weight() * kl;
    }
    loss.backward();
  }
  std::vector<torch::Tensor> params;
  for (const AdamW::Param& p : optimizer_.parameters()) params.push_back(p.tensor);
  if (Status st = SumGradients(*collective_, params); !st.ok()) return st;
  std::vector<torch::Tensor> parts{torch::tensor({ce_part, kl_part}, torch::kDouble)};
  if (Status st = collective_->AllReduceSum(parts, "summing the loss"); !st.ok()) return st;
  out->loss = parts[0][0].item<double>();
  out->distill = distill ? parts[0][1].item<double>() : 0;
  out->grad_norm = optimizer_.ClipGradNorm(config_.grad_clip() > 0 ? config_.grad_clip() : INFINITY);
  out->lr = NextLearningRate();
  optimizer_.Step(out->lr);
  ++step_;
  return Status::OK();
}

}  // namespace peerd
