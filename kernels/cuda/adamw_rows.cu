// Row-wise AdamW on the GPU (kernels/cuda/launch.h; the update is documented in
// kernels/adamw_rows.h): one block per retrieved row, threads over its D entries. Rows are
// distinct, so no two blocks touch the same memory.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch.h"

namespace peerd::kernels::cuda {
namespace {

// The same expression, in the same order, as the CPU kernel (kernels/cpu/adamw_rows.cc).
__global__ void AdamWRowsKernel(float* __restrict__ param, float* __restrict__ m, float* __restrict__ v,
                                const int64_t* __restrict__ rows, const float* __restrict__ grad, int64_t D,
                                AdamWConstants c) {
  const int64_t r = blockIdx.x, e = rows[r];
  float *p = param + e * D, *mr = m + e * D, *vr = v + e * D;
  const float* g = grad + r * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float gd = g[d];
    const float md = c.beta1 * mr[d] + (1 - c.beta1) * gd;
    const float vd = c.beta2 * vr[d] + (1 - c.beta2) * gd * gd;
    mr[d] = md;
    vr[d] = vd;
    p[d] = p[d] * c.decay - c.step * md / (sqrtf(vd * c.inv_bc2) + c.eps);
  }
}

}  // namespace

const char* AdamWRowsUpdate(float* param, float* m, float* v, const int64_t* rows, const float* grad, int64_t R,
                            int64_t D, const AdamWConstants& c) {
  if (R == 0 || D == 0) return nullptr;
  const int64_t threads = D >= 256 ? 256 : (D + kWarp - 1) / kWarp * kWarp;
  AdamWRowsKernel<<<static_cast<unsigned>(R), static_cast<unsigned>(threads)>>>(param, m, v, rows, grad, D, c);
  return LaunchStatus();
}

}  // namespace peerd::kernels::cuda
