// CPU implementation of kernels/adamw_rows.h: parallel over rows, each row's D entries vectorised.
#include "kernels/cpu/kernels_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>

#include "kernels/cpu/rows.h"

namespace peerd::kernels::cpu {
namespace {

PEERD_MULTIVERSION
void UpdateRows(float* param, float* m, float* v, const int64_t* rows, const float* grad, int64_t D, int64_t begin,
                int64_t end, const AdamWStep& st) {
  const float b1 = st.beta1, b2 = st.beta2, eps = st.eps;
  const float step = st.lr / st.bias_correction1;
  const float inv_bc2 = 1.0 / st.bias_correction2;
  const float decay = 1.0 - st.lr * st.weight_decay;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t e = rows[r];
    float *p = param + e * D, *mr = m + e * D, *vr = v + e * D;
    const float* g = grad + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      mr[d] = b1 * mr[d] + (1 - b1) * g[d];
      vr[d] = b2 * vr[d] + (1 - b2) * g[d] * g[d];
      p[d] = p[d] * decay - step * mr[d] / (std::sqrt(vr[d] * inv_bc2) + eps);
    }
  }
}

}  // namespace

void AdamWRows(torch::Tensor& param, torch::Tensor& m, torch::Tensor& v, const torch::Tensor& rows,
               const torch::Tensor& grad, const AdamWStep& step) {
  TORCH_CHECK(param.dim() == 2 && param.scalar_type() == torch::kFloat && param.is_contiguous() &&
                  m.sizes() == param.sizes() && v.sizes() == param.sizes() && m.is_contiguous() && v.is_contiguous(),
              "AdamWRows: param, m and v must be contiguous fp32 [N, D]");
  const torch::Tensor r = rows.contiguous(), g = grad.contiguous();
  TORCH_CHECK(r.dim() == 1 && r.scalar_type() == torch::kLong && g.dim() == 2 && g.size(0) == r.size(0) &&
                  g.size(1) == param.size(1) && g.scalar_type() == torch::kFloat,
              "AdamWRows: rows must be [R] int64 and grad [R, D] fp32");
  const int64_t D = param.size(1);
  float *pp = param.data_ptr<float>(), *mp = m.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t* rp = r.data_ptr<int64_t>();
  const float* gp = g.data_ptr<float>();
  at::parallel_for(0, r.size(0), 256,
                   [&](int64_t begin, int64_t end) { UpdateRows(pp, mp, vp, rp, gp, D, begin, end, step); });
}

}  // namespace peerd::kernels::cpu
