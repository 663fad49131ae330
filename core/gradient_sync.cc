#include "core/gradient_sync.h"

namespace peerd {

Status SumGradients(Collective& collective, const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  if (collective.world_size() == 1) return Status::OK();
  torch::NoGradGuard no_grad;
  const int64_t P = static_cast<int64_t>(params.size());
  // How many ranks hold a dense / a sparse gradient of each parameter.
  torch::Tensor has = torch::zeros({2 * P}, torch::kInt);
  int32_t* h = has.data_ptr<int32_t>();
  for (int64_t i = 0; i < P; ++i) {
    const torch::Tensor& g = params[i].grad();
    if (g.defined()) h[2 * i + (g.is_sparse() ? 1 : 0)] = 1;
  }
  std::vector<torch::Tensor> flags{has};
  if (Status st = collective.AllReduceSum(flags, "agreeing on which gradients exist"); !st.ok()) return st;
  h = has.data_ptr<int32_t>();

  // Dense gradients, bucketed in parameter order (the same order on every rank).
  std::vector<int64_t> bucket;
  int64_t bucket_size = 0;
  auto flush = [&]() -> Status {
    if (bucket.empty()) return Status::OK();
    std::vector<torch::Tensor> parts;
    for (int64_t i : bucket) {
      const torch::Tensor& g = params[i].grad();
      parts.push_back(g.defined() ? g.reshape(-1) : torch::zeros({params[i].numel()}, params[i].options()));
    }
    std::vector<torch::Tensor> flat{torch::cat(parts)};
    if (Status st = collective.AllReduceSum(flat, "summing dense gradients"); !st.ok()) return st;
    int64_t at = 0;
    for (int64_t i : bucket) {
      torch::Tensor sum = flat[0].slice(0, at, at + params[i].numel()).view(params[i].sizes());
      at += params[i].numel();
      torch::Tensor p = params[i];
      if (p.grad().defined())
        p.mutable_grad().copy_(sum);
      else
        p.mutable_grad() = sum.clone();
    }
    bucket.clear();
    bucket_size = 0;
    return Status::OK();
  };
  for (int64_t i = 0; i < P; ++i) {
    if (h[2 * i] && h[2 * i + 1])
      return Status::FailedPrecondition("ranks disagree on whether a gradient is sparse (parameter " +
                                        std::to_string(i) + "): every rank must run the same configuration");
    if (!h[2 * i]) continue;
    if (!bucket.empty() && params[bucket.front()].scalar_type() != params[i].scalar_type())
      if (Status st = flush(); !st.ok()) return st;
    bucket.push_back(i);
    bucket_size += params[i].numel() * params[i].element_size();
    if (bucket_size >= bucket_bytes)
      if (Status st = flush(); !st.ok()) return st;
  }
  if (Status st = flush(); !st.ok()) return st;

  // Sparse row gradients, one parameter at a time.
  for (int64_t i = 0; i < P; ++i) {
    if (!h[2 * i + 1]) continue;
    torch::Tensor p = params[i];
    torch::Tensor g = p.grad();
    if (!g.defined()) {
      std::vector<int64_t> value_shape = p.sizes().vec();
      value_shape[0] = 0;
      g = torch::sparse_coo_tensor(torch::empty({1, 0}, torch::kLong), torch::empty(value_shape, p.options()),
                                   p.sizes());
    }
    if (Status st = collective.AllReduceSparse(&g, "summing sparse row gradients"); !st.ok()) return st;
    p.mutable_grad() = g;
  }
  return Status::OK();
}

}  // namespace peerd
