// PeerLayer: the PEER feed-forward layer (He, "Mixture of A Million Experts", arXiv 2407.04153)
// over a growable pool of expert segments.
//
//   q(x)   = Norm(W_q x), split into h heads of dk           (the query network, shared by segments)
//   per segment: product-key top-k of its n² experts          (ProductKeyTopK)
//   per head: top-k over the union of all segments' candidates, so adding a segment never
//             re-indexes old ones
//   w      = softmax over the head's k scores
//   y(x)   = Σ_heads Σ_top-k  w · GELU(u_e · x) · v_e
//
// Two implementations of the same function: the reference composition in LibTorch ops (per
// segment ProductKeyTopK, gathered [M, h·k, D] row tensors, dense gradients over each training
// table), and with model.peer.impl = PEER_IMPL_FUSED (the default) the kernels/ of docs/DESIGN.md §5 —
// fused retrieval (kernels/product_key_retrieval.h) and a fused expert mixture whose table
// gradients hold only the retrieved rows (kernels/expert_mixture.h). Tests hold them equal.
// Not thread-safe: one trainer thread owns a layer.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

#include "core/expert_segment.h"
#include "core/product_keys.h"
#include "core/status.h"
#include "proto/config.pb.h"

namespace peerd {

// What retrieval chose: for each head and token, k experts named by (segment position, index).
struct Retrieval {
  torch::Tensor scores;   // [M, h, k] float, before softmax
  torch::Tensor segment;  // [M, h, k] int64, position of the segment in segments()
  torch::Tensor index;    // [M, h, k] int64, expert index within that segment
};

class PeerLayerImpl : public torch::nn::Module {
 public:
  PeerLayerImpl(int64_t d_model, const PeerConfig& config);

  // x: [..., D] -> [..., D]. `active`, when given, has one flag per segment; retrieval ignores
  // segments whose flag is false (routing isolation, or to see what the other segments
  // contribute in tests). `query_delta`, when set, maps x [M, D] to a change of W_q x [M, h·dk]
  // (a segment adapter's, core/segment_adapter.h).
  torch::Tensor forward(const torch::Tensor& x, const std::vector<bool>* active = nullptr,
                        const std::function<torch::Tensor(const torch::Tensor&)>& query_delta = {});

  // The query network: x [M, D] -> [h, M, dk]; `delta` [M, h·dk] is added to W_q x before the norm.
  torch::Tensor Query(const torch::Tensor& x, const torch::Tensor& delta = {});
  // Retrieval over the active segments for queries [h, M, dk].
  Retrieval Retrieve(const torch::Tensor& query, const std::vector<bool>* active = nullptr) const;

  // Appends a training segment of n_keys² experts and sets *id (ids are never reused).
  // InvalidArgument if n_keys is below top-k (product-key search needs k sub-keys per half).
  Status AddSegment(int64_t n_keys, int64_t* id = nullptr);
  // Adds a training segment with a given id (restoring a checkpoint); FailedPrecondition if a
  // segment has that id.
  Status AddSegmentWithId(int64_t id, int64_t n_keys);
  // Freezes segment `id`, holding its rows as `hold_rows_as` from then on, or, given `rows`,
  // reading them through that source (ExpertSegmentImpl::Freeze); NotFound for an unknown id,
  // FailedPrecondition if already frozen.
  Status FreezeSegment(int64_t id, torch::ScalarType hold_rows_as = torch::kFloat,
                       std::shared_ptr<ExpertRowSource> rows = nullptr);
  // Puts a frozen segment restored from storage in its place (by id): it replaces a training
  // segment of the same id, which was frozen since the model was built. InvalidArgument if its
  // shapes do not fit this layer, FailedPrecondition if a frozen segment already has its id.
  Status InsertFrozenSegment(ExpertSegment segment);
  const std::vector<ExpertSegment>& segments() const { return segments_; }
  int64_t num_experts() const;

  // Expert usage: while recording, every retrieval counts how often each expert of each segment
  // was chosen (the PEER paper's usage and KL-from-uniform figures are computed from these).
  void StartUsageRecording();
  void StopUsageRecording() { recording_usage_ = false; }
  // Counts again after StopUsageRecording, adding to the counts so far.
  void ResumeUsageRecording() { recording_usage_ = true; }
  // Counts [n²] int64 of segment position `pos` since StartUsageRecording (undefined if none).
  torch::Tensor UsageCounts(size_t pos) const { return pos < usage_.size() ? usage_[pos] : torch::Tensor(); }

  // Batch-norm running statistics stop moving when frozen (docs/DESIGN.md §1: they drift with new data).
  void set_norm_stats_frozen(bool frozen) { norm_stats_frozen_ = frozen; }

  const PeerConfig& config() const { return config_; }
  // Whether forward runs the fused kernels (configured, and built for x's device and dtype).
  bool UsesFusedKernel(const torch::Tensor& x) const;
  torch::nn::Linear query_proj{nullptr};    // W_q: D -> h·dk, no bias
  torch::Tensor norm_weight, norm_bias;     // affine of the query norm ([h·dk]; undefined for NONE)
  torch::Tensor running_mean, running_var;  // batch-norm buffers (undefined unless BATCH)

 private:
  // ProductKeyTopK per active segment (by position), then the top-k over their union.
  Retrieval RetrieveReference(const torch::Tensor& query, const std::vector<int64_t>& positions) const;
  // The fused expert half: x [M, D], w [M, h·k] -> [M, D]. Rows of cached segments are fetched
  // once per distinct retrieved row.
  torch::Tensor MixFused(const torch::Tensor& x, const torch::Tensor& w, const Retrieval& r) const;
  // {down (u), up (v)} rows [M·h·k, D] of each retrieved expert, in retrieval order, as `dtype`.
  std::pair<torch::Tensor, torch::Tensor> Gather(const Retrieval& r, torch::ScalarType dtype) const;

  int64_t d_model_;
  PeerConfig config_;
  std::vector<ExpertSegment> segments_;
  int64_t next_segment_id_ = 0;
  bool norm_stats_frozen_ = false;
  bool recording_usage_ = false;
  mutable std::vector<torch::Tensor> usage_;  // per segment position, while recording
};
TORCH_MODULE(PeerLayer);

}  // namespace peerd
