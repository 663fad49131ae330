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
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

#include "proto/config.pb.h"

namespace peerd {

class SegmentAdapterImpl : public torch::nn::Module {
 public:
  static constexpr int64_t kFullRank = 0;

  // One delta per adapted map of a model of `config`: of rank r = `rank`, or full (kFullRank).
  SegmentAdapterImpl(const ModelConfig& config, int64_t rank);

  // The delta of map `name` ("block0.qkv", "head", …) for inputs x [..., in] -> [..., out];
  // an undefined tensor when this adapter has no such map.
  torch::Tensor Delta(const std::string& name, const torch::Tensor& x) const;

  int64_t rank() const { return rank_; }  // kFullRank for full deltas
  bool frozen() const { return frozen_; }
  // Freezing is for ever: the deltas stop requiring gradients and leave the optimizer.
  void Freeze();

 private:
  void AddMap(const std::string& name, int64_t in, int64_t out);

  int64_t rank_;
  double scale_;
  bool frozen_ = false;
  // name -> {A, B}, or {ΔW, undefined} for a full delta
  std::map<std::string, std::pair<torch::Tensor, torch::Tensor>> maps_;
};
TORCH_MODULE(SegmentAdapter);

}  // namespace peerd
