// SegmentAdapter: the low-rank deltas a segment owns beside its experts (docs/DESIGN.md,
// "Routing isolation"). With the trunk frozen after the base phase, everything that adapts to a
// new domain must belong to that domain's segment and freeze with it, or it becomes a forgetting
// channel shared by every domain. An adapter adds, to each linear map of the trunk,
//
//   W x  ->  W x + (α / r) · B (A x)        A: [r, in], B: [out, r], B starts at zero
//
// (LoRA, Hu et al. 2021), for attention's qkv and output projections, the dense FFN's two layers,
// the PEER query network, and the output head. A sequence routed to a segment runs the trunk with
// that segment's adapter; the base phase's route uses none.
//
// Rank kFullRank gives each map a full delta instead, W x -> (W + ΔW) x with ΔW [out, in] starting
// at zero: training it is fine-tuning that map while the base weights stay exactly as they were.
// It costs as many parameters as the maps themselves; a low rank costs r · (in + out) a map.
//
// With `trunk_deltas`, the adapter also owns a full delta, starting at zero, of each trunk parameter
// that costs little per token: the token and position embeddings (the head is tied to the token
// embedding, so the token delta moves the head too), the blocks' and the final layer norms' gains
// and biases, and every linear map's bias — 52 K parameters at the embedded defaults (44 K at the
// benchmark's context of 64), which a dense model fine-tunes freely and a low-rank delta cannot
// express (bench/FORGETTING.md, "What each ingredient of routed bought").
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

#include "proto/config.pb.h"

namespace peerd {

class SegmentAdapterImpl : public torch::nn::Module {
 public:
  static constexpr int64_t kFullRank = 0;

  // One delta per adapted map of a model of `config`: of rank r = `rank`, or full (kFullRank);
  // with `trunk_deltas`, the full deltas of embeddings, norms and biases besides.
  SegmentAdapterImpl(const ModelConfig& config, int64_t rank, bool trunk_deltas);

  // The delta of map `name` ("block0.qkv", "head", …) for inputs x [..., in] -> [..., out],
  // its bias delta included; an undefined tensor when this adapter has no such map.
  torch::Tensor Delta(const std::string& name, const torch::Tensor& x) const;
  // The full delta of the trunk's parameter `name` ("tok_emb", "pos_emb", "block0.ln1.weight", …),
  // the same shape as it; an undefined tensor when this adapter owns none.
  torch::Tensor TrunkDelta(const std::string& name) const;
  // Whether `parameter` (one of this adapter's) is a trunk delta rather than a map's delta.
  bool IsTrunkDelta(const torch::Tensor& parameter) const;

  int64_t rank() const { return rank_; }  // kFullRank for full deltas
  bool trunk_deltas() const { return owns_trunk_deltas_; }
  bool frozen() const { return frozen_; }
  // Freezing is for ever: the deltas stop requiring gradients and leave the optimizer.
  void Freeze();

 private:
  void AddMap(const std::string& name, int64_t in, int64_t out, bool with_bias);
  void AddTrunkDelta(const std::string& name, std::vector<int64_t> shape);

  int64_t rank_;
  bool owns_trunk_deltas_;
  double scale_;
  bool frozen_ = false;
  // name -> {A, B}, or {ΔW, undefined} for a full delta
  std::map<std::string, std::pair<torch::Tensor, torch::Tensor>> maps_;
  std::map<std::string, torch::Tensor> trunk_;  // trunk parameter name -> full delta
};
TORCH_MODULE(SegmentAdapter);

}  // namespace peerd
