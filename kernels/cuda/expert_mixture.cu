// The fused expert mixture on the GPU (kernels/cuda/launch.h; the function is documented in
// kernels/expert_mixture.h). Rows are read in place from their segment's table, fp32 or bf16;
// nothing [M, J, D]-shaped is ever built.
//
// Forward and the per-token backward are one block per token, in two phases:
//   1. one warp per expert j: the dot product of a D-row with the token's vector (held in shared
//      memory), lanes striding over D (coalesced), reduced by a fixed butterfly;
//   2. one thread per column d: the sum over j of coefficient · row[d], in j order.
// Neither phase uses atomics, so every output is the same bits on every run.
// Row gradients are one block per distinct retrieved row, summing that row's slots in order.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch.h"

namespace peerd::kernels::cuda {
namespace {

constexpr int kTokenThreads = 128;
constexpr int64_t kMaxShared = 48 * 1024;  // what a block gets without opting in

// A block's shared memory: the row pointers of its J experts, then the token's vector [D], the
// J coefficients and the J row dtypes.
struct TokenShared {
  const void** rows;  // [J] the row phase 2 reads
  float* vec;         // [D] x[m] or gy[m]
  float* coef;        // [J] w·GELU(a) (forward) or ga (backward)
  int32_t* bf16;      // [J] whether rows[j] holds bf16

  __device__ static TokenShared Carve(unsigned char* base, int64_t D, int64_t J) {
    TokenShared s;
    s.rows = reinterpret_cast<const void**>(base);
    s.vec = reinterpret_cast<float*>(s.rows + J);
    s.coef = s.vec + D;
    s.bf16 = reinterpret_cast<int32_t*>(s.coef + J);
    return s;
  }
};

// Row e of a table as an untyped pointer.
__device__ __forceinline__ const void* RowAt(const void* table, bool bf16, int64_t e, int64_t D) {
  return bf16 ? static_cast<const void*>(static_cast<const __nv_bfloat16*>(table) + e * D)
              : static_cast<const void*>(static_cast<const float*>(table) + e * D);
}

// The dot product of a row with vec [D], by one warp; every lane gets it.
__device__ __forceinline__ float WarpDot(const void* row, bool bf16, const float* vec, int64_t D, int lane) {
  float s = 0;
  if (bf16) {
    const __nv_bfloat16* r = static_cast<const __nv_bfloat16*>(row);
    for (int64_t d = lane; d < D; d += kWarp) s += __bfloat162float(r[d]) * vec[d];
  } else {
    const float* r = static_cast<const float*>(row);
    for (int64_t d = lane; d < D; d += kWarp) s += r[d] * vec[d];
  }
  return WarpSum(s);
}

// out[d] = Σ_j coef[j] · rows[j][d] for this block's columns, j ascending.
__device__ __forceinline__ void SumRows(const TokenShared& sh, int64_t D, int64_t J, float* out) {
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0;
    for (int64_t j = 0; j < J; ++j) acc += sh.coef[j] * LoadRow(sh.rows[j], sh.bf16[j], d);
    out[d] = acc;
  }
}

__global__ void __launch_bounds__(kTokenThreads)
    ForwardKernel(const float* __restrict__ x, const float* __restrict__ w, const int64_t* __restrict__ segment,
                  const int64_t* __restrict__ index, const TableRows* __restrict__ tables, int64_t D, int64_t J,
                  float* __restrict__ y, float* __restrict__ a) {
  extern __shared__ __align__(16) unsigned char shared[];
  const TokenShared sh = TokenShared::Carve(shared, D, J);
  const int64_t m = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) sh.vec[d] = x[m * D + d];
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  for (int64_t j = threadIdx.x / kWarp; j < J; j += blockDim.x / kWarp) {
    const int64_t mj = m * J + j, e = index[mj];
    const TableRows t = tables[segment[mj]];
    const float pre = WarpDot(RowAt(t.down, t.down_bf16, e, D), t.down_bf16, sh.vec, D, lane);
    if (lane == 0) {
      a[mj] = pre;
      sh.coef[j] = w[mj] * Gelu(pre);
      sh.rows[j] = RowAt(t.up, t.up_bf16, e, D);
      sh.bf16[j] = t.up_bf16;
    }
  }
  __syncthreads();
  SumRows(sh, D, J, y + m * D);
}

__global__ void __launch_bounds__(kTokenThreads)
    BackwardTokensKernel(const float* __restrict__ w, const int64_t* __restrict__ segment,
                         const int64_t* __restrict__ index, const TableRows* __restrict__ tables,
                         const float* __restrict__ a, const float* __restrict__ gy, int64_t D, int64_t J,
                         float* __restrict__ gx, float* __restrict__ gw, float* __restrict__ ga,
                         float* __restrict__ c) {
  extern __shared__ __align__(16) unsigned char shared[];
  const TokenShared sh = TokenShared::Carve(shared, D, J);
  const int64_t m = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) sh.vec[d] = gy[m * D + d];
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  for (int64_t j = threadIdx.x / kWarp; j < J; j += blockDim.x / kWarp) {
    const int64_t mj = m * J + j, e = index[mj];
    const TableRows t = tables[segment[mj]];
    const float sv = WarpDot(RowAt(t.up, t.up_bf16, e, D), t.up_bf16, sh.vec, D, lane);  // gy · v
    if (lane == 0) {
      const float g = Gelu(a[mj]);
      const float dl_da = w[mj] * sv * GeluGrad(a[mj]);
      gw[mj] = g * sv;
      c[mj] = w[mj] * g;
      ga[mj] = dl_da;
      sh.coef[j] = dl_da;
      sh.rows[j] = RowAt(t.down, t.down_bf16, e, D);
      sh.bf16[j] = t.down_bf16;
    }
  }
  __syncthreads();
  SumRows(sh, D, J, gx + m * D);
}

// Block r: row r of gd and gu [R, D].
__global__ void RowGradsKernel(const float* __restrict__ x, const float* __restrict__ gy, const float* __restrict__ ga,
                               const float* __restrict__ c, const int64_t* __restrict__ slots,
                               const int64_t* __restrict__ starts, int64_t D, int64_t J, float* __restrict__ gd,
                               float* __restrict__ gu) {
  const int64_t r = blockIdx.x, begin = starts[r], end = starts[r + 1];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float down = 0, up = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t mj = slots[p], m = mj / J;
      down += ga[mj] * x[m * D + d];
      up += c[mj] * gy[m * D + d];
    }
    gd[r * D + d] = down;
    gu[r * D + d] = up;
  }
}

}  // namespace

int64_t MixtureSharedBytes(int64_t D, int64_t J) {
  return J * static_cast<int64_t>(sizeof(void*)) + (D + J) * static_cast<int64_t>(sizeof(float)) +
         J * static_cast<int64_t>(sizeof(int32_t));
}

const char* MixtureForward(const float* x, const float* w, const int64_t* segment, const int64_t* index,
                           const TableRows* tables, int64_t M, int64_t D, int64_t J, float* y, float* a) {
  const int64_t bytes = MixtureSharedBytes(D, J);
  if (bytes > kMaxShared) return "MixtureForward: D and J need more than 48 KiB of shared memory per token";
  if (M == 0) return nullptr;
  ForwardKernel<<<static_cast<unsigned>(M), kTokenThreads, bytes>>>(x, w, segment, index, tables, D, J, y, a);
  return LaunchStatus();
}

const char* MixtureBackwardTokens(const float* w, const int64_t* segment, const int64_t* index, const TableRows* tables,
                                  const float* a, const float* gy, int64_t M, int64_t D, int64_t J, float* gx,
                                  float* gw, float* ga, float* c) {
  const int64_t bytes = MixtureSharedBytes(D, J);
  if (bytes > kMaxShared) return "MixtureBackwardTokens: D and J need more than 48 KiB of shared memory per token";
  if (M == 0) return nullptr;
  BackwardTokensKernel<<<static_cast<unsigned>(M), kTokenThreads, bytes>>>(w, segment, index, tables, a, gy, D, J, gx,
                                                                           gw, ga, c);
  return LaunchStatus();
}

const char* MixtureRowGrads(const float* x, const float* gy, const float* ga, const float* c, const int64_t* slots,
                            const int64_t* starts, int64_t R, int64_t D, int64_t J, float* gd, float* gu) {
  if (R == 0) return nullptr;
  // Enough threads to cover D in one pass where it is small, so each row's slot list is walked once.
  const int64_t threads = D >= 256 ? 256 : D <= kWarp ? kWarp : (D + kWarp - 1) / kWarp * kWarp;
  RowGradsKernel<<<static_cast<unsigned>(R), static_cast<unsigned>(threads)>>>(x, gy, ga, c, slots, starts, D, J, gd,
                                                                               gu);
  return LaunchStatus();
}

}  // namespace peerd::kernels::cuda
