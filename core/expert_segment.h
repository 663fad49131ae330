// ExpertSegment: one batch of PEER experts — n² single-neuron experts and their product sub-keys.
//
// Expert e of the segment computes act(u_e · x) · v_e with u_e = down[e], v_e = up[e] (both R^D).
// A segment is `training` until it is frozen; freezing is one way: its tensors stop requiring
// gradients, the optimizer forgets them (Trainer), and a checksum of their bytes is taken so that
// anyone can verify later that they never changed. Not thread-safe: the owning layer serialises.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace peerd {

enum class SegmentState { kTraining, kFrozen };

class ExpertSegmentImpl : public torch::nn::Module {
 public:
  // n_keys sub-keys per half, so n_keys² experts of width d_model; `heads` query heads of
  // `query_dim` (even). Initialised from the global torch generator.
  ExpertSegmentImpl(int64_t id, int64_t n_keys, int64_t d_model, int64_t heads, int64_t query_dim);

  int64_t id() const { return id_; }
  int64_t n_keys() const { return n_keys_; }
  int64_t num_experts() const { return n_keys_ * n_keys_; }
  SegmentState state() const { return state_; }
  bool frozen() const { return state_ == SegmentState::kFrozen; }

  // Marks the segment frozen, stops its gradients and records Checksum(). Idempotent.
  void Freeze();
  // xxHash3 over the bytes of sub_keys, down and up (in that order, with their shapes).
  uint64_t Checksum() const;
  // The checksum taken when the segment was frozen (0 while training).
  uint64_t frozen_checksum() const { return frozen_checksum_; }

  torch::Tensor sub_keys;  // [h, 2, n, dk/2]
  torch::Tensor down;      // [N, D]  u_e: input projection of expert e
  torch::Tensor up;        // [N, D]  v_e: output vector of expert e

 private:
  int64_t id_;
  int64_t n_keys_;
  SegmentState state_ = SegmentState::kTraining;
  uint64_t frozen_checksum_ = 0;
};
TORCH_MODULE(ExpertSegment);

}  // namespace peerd
