// Product-key retrieval over several segments, fused (docs/DESIGN.md §5; PEER, He 2024 §2).
//
// For each head and token: every segment's two halves are scored against the query halves (one
// GEMM per head and half), each half keeps its own top-k, the k² sums are candidates, and the k
// best candidates over all segments win — the same function as ProductKeyTopK per segment
// followed by a top-k over the union (core/peer_layer.cc, the reference), without the [h, M, k²]
// candidate tensors or autograd's dense [h, M, n] score gradients. Backward sends each selected
// score's gradient to the query halves and to exactly the two sub-keys that made it, accumulated
// in a fixed order (deterministic for a fixed thread count, and on CUDA).
#pragma once

#include <torch/torch.h>

#include <vector>

namespace peerd::kernels {

struct RetrievedExperts {
  torch::Tensor scores;   // [M, h, k] fp32, best first, differentiable w.r.t. query and sub-keys
  torch::Tensor segment;  // [M, h, k] int64: position of the expert's segment in `sub_keys`
  torch::Tensor index;    // [M, h, k] int64: expert index i·n + j within that segment
};

// query [h, M, dk] fp32 (dk even); sub_keys: one [h, 2, n_s, dk/2] fp32 tensor per segment, with
// n_s ≥ k. Segments whose sub-keys require a gradient get one (dense: sub-keys are small).
RetrievedExperts ProductKeyRetrieval(const torch::Tensor& query, const std::vector<torch::Tensor>& sub_keys, int64_t k);

}  // namespace peerd::kernels
