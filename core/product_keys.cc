#include "core/product_keys.h"

namespace peerd {

TopK ProductKeyTopK(const torch::Tensor& query, const torch::Tensor& sub_keys, int64_t k) {
  const int64_t half = query.size(2) / 2;
  const int64_t n = sub_keys.size(2);
  torch::Tensor q1 = query.narrow(2, 0, half);     // [h, M, dk/2]
  torch::Tensor q2 = query.narrow(2, half, half);  // [h, M, dk/2]
  torch::Tensor k1 = sub_keys.select(1, 0);        // [h, n, dk/2]
  torch::Tensor k2 = sub_keys.select(1, 1);        // [h, n, dk/2]

  // Each half's scores against its n sub-keys, then its own top-k.
  auto [s1, i1] = torch::bmm(q1, k1.transpose(1, 2)).topk(k, /*dim=*/-1);  // [h, M, k]
  auto [s2, i2] = torch::bmm(q2, k2.transpose(1, 2)).topk(k, /*dim=*/-1);  // [h, M, k]

  // The k² candidate sums, and the top-k among them.
  torch::Tensor sums = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2);  // [h, M, k²]
  torch::Tensor ids = (i1.unsqueeze(-1) * n + i2.unsqueeze(-2)).flatten(-2);
  auto [scores, pick] = sums.topk(k, /*dim=*/-1);  // [h, M, k]
  return {scores, ids.gather(-1, pick)};
}

}  // namespace peerd
