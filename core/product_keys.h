// Product-key retrieval (Lample et al. 2019; PEER, He 2024 §2): the top-k of N = n² experts,
// found by searching two sets of n sub-keys instead of N full keys.
//
// Expert (i, j) of a segment has the full key [K1_i ; K2_j] (i, j in [0, n)), so its score against
// a query [q1 ; q2] is q1·K1_i + q2·K2_j. The k best full keys are among the k×k sums of each
// half's own top-k, so top-k over those k² sums equals brute-force top-k over all N keys, at the
// cost of 2n + k² scores instead of n².
#pragma once

#include <torch/torch.h>

namespace peerd {

struct TopK {
  torch::Tensor scores;  // [h, M, k] float, differentiable w.r.t. query and sub-keys
  torch::Tensor index;   // [h, M, k] int64, expert index i·n + j within the segment
};

// query:    [h, M, dk]       (M tokens, h heads, dk even: halves of dk/2)
// sub_keys: [h, 2, n, dk/2]  (each head has its own two sets of n sub-keys)
// returns the k best experts of the segment for every head and token.
TopK ProductKeyTopK(const torch::Tensor& query, const torch::Tensor& sub_keys, int64_t k);

}  // namespace peerd
