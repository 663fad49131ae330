// The LibTorch side of the CUDA product-key retrieval: an autograd Function. Forward, per
// segment: one batched GEMM scores both halves of every head against their sub-keys (cuBLAS, via
// torch::bmm: [2h, M, dk/2] × [2h, dk/2, n] → [2h, M, n]), RowTopK keeps each row's best k; then
// MergeCandidates picks the k best of every segment's k×k sums. Nothing [h, M, k²]-shaped is
// built, and the backward touches only the 2·k sub-keys each token's head selected.
#include "kernels/cuda/glue.h"
#include "kernels/cuda/kernels_cuda.h"
#include "kernels/cuda/launch.h"

namespace peerd::kernels::cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RetrievalFunction : public torch::autograd::Function<RetrievalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& query, int64_t k, torch::TensorList keys) {
    const int64_t h = query.size(0), M = query.size(1), half = query.size(2) / 2;
    const int64_t S = static_cast<int64_t>(keys.size());
    const c10::DeviceGuard guard(query.device());
    const auto f32 = query.options();
    // Each segment's per-half top-k: [S, h, 2, M, k], row (s, hh, part, m).
    torch::Tensor half_val = torch::empty({S, h, 2, M, k}, f32);
    torch::Tensor half_idx = torch::empty({S, h, 2, M, k}, f32.dtype(torch::kInt));
    const torch::Tensor halves = query.view({h, M, 2, half}).transpose(1, 2).reshape({2 * h, M, half});
    std::vector<int64_t> n_keys;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = keys[s].size(2);
      n_keys.push_back(n);
      const torch::Tensor scores = torch::bmm(halves, keys[s].view({2 * h, n, half}).transpose(1, 2));  // [2h, M, n]
      CheckLaunch(RowTopK(scores.data_ptr<float>(), 2 * h * M, n, static_cast<int>(k), half_val[s].data_ptr<float>(),
                          half_idx[s].data_ptr<int32_t>()),
                  "ProductKeyRetrieval top-k");
    }
    const torch::Tensor n_dev = torch::tensor(n_keys, torch::kLong).to(query.device());
    torch::Tensor scores = torch::empty({M, h, k}, f32);
    torch::Tensor segment = torch::empty({M, h, k}, f32.dtype(torch::kLong));
    torch::Tensor index = torch::empty({M, h, k}, f32.dtype(torch::kLong));
    CheckLaunch(MergeCandidates(half_val.data_ptr<float>(), half_idx.data_ptr<int32_t>(), n_dev.data_ptr<int64_t>(),
                                static_cast<int>(S), static_cast<int>(h), M, static_cast<int>(k),
                                scores.data_ptr<float>(), segment.data_ptr<int64_t>(), index.data_ptr<int64_t>()),
                "ProductKeyRetrieval merge");
    std::vector<torch::Tensor> saved = {query, segment, index};
    saved.insert(saved.end(), keys.begin(), keys.end());
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({segment, index});
    return {scores, segment, index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor query = saved[0], segment = saved[1], index = saved[2];
    const std::vector<torch::Tensor> keys(saved.begin() + 3, saved.end());
    const int64_t h = query.size(0), M = query.size(1), dk = query.size(2), k = segment.size(2);
    const int64_t S = static_cast<int64_t>(keys.size());
    const c10::DeviceGuard guard(query.device());
    CheckDefaultStream(query.device());
    const torch::Tensor g =
        grad_outputs[0].defined() ? grad_outputs[0].contiguous() : torch::zeros({M, h, k}, query.options());

    variable_list grads(2 + S);  // query, k, then each segment's sub-keys
    if (ctx->needs_input_grad(0)) {
      std::vector<SegmentKeys> segments;
      for (const torch::Tensor& t : keys) segments.push_back({t.data_ptr<float>(), t.size(2)});
      const torch::Tensor segments_dev = ToDevice(segments, query.device());
      torch::Tensor gq = torch::empty({h, M, dk}, query.options());
      CheckLaunch(RetrievalQueryGrad(g.data_ptr<float>(), segment.data_ptr<int64_t>(), index.data_ptr<int64_t>(),
                                     DataOf<SegmentKeys>(segments_dev), static_cast<int>(h), M, static_cast<int>(k),
                                     static_cast<int>(dk), gq.data_ptr<float>()),
                  "ProductKeyRetrieval query gradient");
      grads[0] = gq;
    }
    for (int64_t s = 0; s < S; ++s) {
      // needs_input_grad counts tensor inputs only (query, then the sub-keys); the returned
      // list counts every argument (query, k, then the sub-keys).
      if (!ctx->needs_input_grad(1 + s)) continue;
      // Deterministic: each selected score's two contributions, grouped by the sub-key they reach
      // (a stable sort keeps the slots ascending within a group), then one warp sums each group
      // in that order — the CPU kernel's order too.
      torch::Tensor gk = torch::zeros_like(keys[s]);
      const int64_t n = keys[s].size(2);
      const torch::Tensor slots = (segment.flatten() == s).nonzero().flatten();  // [P] ascending
      if (slots.numel() > 0) {
        const torch::Tensor e = index.flatten().index_select(0, slots);
        const torch::Tensor hh = slots.div(k, "floor").remainder(h);
        const torch::Tensor targets = torch::cat({hh * 2 * n + e.div(n, "floor"), (hh * 2 + 1) * n + e.remainder(n)});
        const torch::Tensor contributions = torch::cat({slots * 2, slots * 2 + 1});
        const auto [sorted, order] = torch::sort(targets, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        const auto [runs, inverse, counts] = torch::unique_consecutive(sorted, false, true);
        const torch::Tensor ends = counts.cumsum(0), ordered = contributions.index_select(0, order);
        CheckLaunch(
            RetrievalKeyGrad(g.data_ptr<float>(), query.data_ptr<float>(), ordered.data_ptr<int64_t>(),
                             runs.data_ptr<int64_t>(), ends.data_ptr<int64_t>(), runs.numel(), static_cast<int>(h), M,
                             static_cast<int>(k), static_cast<int>(dk), gk.data_ptr<float>()),
            "ProductKeyRetrieval sub-key gradient");
      }
      grads[2 + s] = gk;
    }
    return grads;
  }
};

}  // namespace

RetrievedExperts ProductKeyRetrieval(const torch::Tensor& query, const std::vector<torch::Tensor>& sub_keys,
                                     int64_t k) {
  // Shapes were checked by kernels::ProductKeyRetrieval, which dispatches here; only the device's own limits.
  TORCH_CHECK(query.is_cuda(), "query must be on a CUDA device");
  TORCH_CHECK(k >= 1 && k <= kMaxTopK, "ProductKeyRetrieval on CUDA: k must be in [1, ", kMaxTopK, "], got ", k);
  CheckDefaultStream(query.device());
  std::vector<torch::Tensor> keys;
  for (const torch::Tensor& t : sub_keys) {
    TORCH_CHECK(t.size(2) <= 65536, "ProductKeyRetrieval on CUDA: at most 65536 sub-keys per half, got ", t.size(2));
    CheckOn(t, query.device(), "sub-keys");
    keys.push_back(t.contiguous());
  }
  variable_list out = RetrievalFunction::apply(query.contiguous(), k, torch::TensorList(keys));
  return {out[0], out[1], out[2]};
}

}  // namespace peerd::kernels::cuda
