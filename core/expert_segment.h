// ExpertSegment: one batch of PEER experts — n² single-neuron experts and their product sub-keys.
//
// Expert e of the segment computes act(u_e · x) · v_e with u_e = down[e], v_e = up[e] (both R^D).
// A segment is `training` until it is frozen; freezing is one way: its tensors stop requiring
// gradients, the optimizer forgets them (Trainer), and a checksum of their bytes is taken so that
// anyone can verify later that they never changed.
//
// A frozen segment's rows live in one of three ways: fp32 tensors (frozen in this process), or,
// restored from the expert store, tensors in the store's dtype (fp32 or bf16: memory costs the
// storage bytes) or nowhere in the segment at all — fetched on demand through an ExpertRowSource
// (a cache in front of the store), for pools larger than memory. Not thread-safe: the owning
// layer serialises.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <utility>

#include "core/status.h"

namespace peerd {

enum class SegmentState { kTraining, kFrozen };

// Rows of a frozen segment that are not held in memory. No LibTorch in the interface: the
// implementation sits over the expert store, which knows bytes.
class ExpertRowSource {
 public:
  virtual ~ExpertRowSource() = default;
  // Writes the fp32 down and up rows of experts[0..n) to down[n·D] and up[n·D].
  virtual Status Fetch(const int64_t* experts, int64_t n, float* down, float* up) = 0;
};

class ExpertSegmentImpl : public torch::nn::Module {
 public:
  // A training segment: n_keys sub-keys per half, so n_keys² experts of width d_model; `heads`
  // query heads of `query_dim` (even). Initialised from the global torch generator.
  ExpertSegmentImpl(int64_t id, int64_t n_keys, int64_t d_model, int64_t heads, int64_t query_dim);
  // A frozen segment restored with resident rows: sub_keys [h, 2, n, dk/2], down/up [n², D] of any
  // floating dtype (kept as given).
  ExpertSegmentImpl(int64_t id, torch::Tensor sub_keys, torch::Tensor down, torch::Tensor up);
  // A frozen segment restored with its rows left in storage, fetched through `rows`.
  ExpertSegmentImpl(int64_t id, torch::Tensor sub_keys, int64_t d_model, std::shared_ptr<ExpertRowSource> rows);

  int64_t id() const { return id_; }
  int64_t n_keys() const { return n_keys_; }
  int64_t num_experts() const { return n_keys_ * n_keys_; }
  int64_t d_model() const { return d_model_; }
  SegmentState state() const { return state_; }
  bool frozen() const { return state_ == SegmentState::kFrozen; }
  bool resident() const { return !source_; }

  // Marks the segment frozen, stops its gradients, converts resident rows to `hold_rows_as`
  // (kBFloat16 to hold what a bf16 store holds) and records Checksum(). Given `rows` (a source
  // over a copy of them already stored), the rows leave memory instead and are fetched through it
  // from then on. Idempotent.
  void Freeze(torch::ScalarType hold_rows_as = torch::kFloat, std::shared_ptr<ExpertRowSource> rows = nullptr);
  // xxHash3 over the bytes held in memory: sub_keys, then down and up when resident.
  uint64_t Checksum() const;
  // The checksum taken when the segment was frozen (0 while training).
  uint64_t frozen_checksum() const { return frozen_checksum_; }

  // Rows of `experts` (int64 [R]) as `dtype`: {down [R, D], up [R, D]}. Differentiable with
  // respect to the tables of a training segment.
  std::pair<torch::Tensor, torch::Tensor> Rows(const torch::Tensor& experts, torch::ScalarType dtype) const;

  torch::Tensor sub_keys;  // [h, 2, n, dk/2]
  torch::Tensor down;      // [N, D]  u_e (undefined when rows are not resident)
  torch::Tensor up;        // [N, D]  v_e (undefined when rows are not resident)

 private:
  void MarkFrozen();

  int64_t id_;
  int64_t n_keys_;
  int64_t d_model_;
  SegmentState state_ = SegmentState::kTraining;
  uint64_t frozen_checksum_ = 0;
  std::shared_ptr<ExpertRowSource> source_;
};
TORCH_MODULE(ExpertSegment);

}  // namespace peerd
