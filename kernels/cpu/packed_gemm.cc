// Implementation of kernels/cpu/packed_gemm.h.
//
// A tile is R rows of C × one panel of 32 columns: 2R accumulators of 16 lanes (R = 8: 16 of the
// 32 vector registers). Each step over k loads the panel's two vectors once and broadcasts R
// values of A, so it does 2R FMAs for R + 2 loads. C is blocked so that what a tile reads again
// stays close: 256 of K at a time (the panel's slice, 32 KB, in L1) and 128 rows of A at a time
// (128 KB, in L2).
#include "kernels/cpu/packed_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace peerd::kernels::cpu {
namespace {

constexpr int64_t kPanel = 32;  // columns a panel holds: two 16-lane vectors
constexpr int kTileRows = 8;
constexpr int64_t kDepth = 256;     // K per pass
constexpr int64_t kRowBlock = 128;  // rows of A per pass

// kRowMajor: A[r][k] = a[r · stride + k]; else A[r][k] = a[k · stride + r].
template <int R, bool kRowMajor>
__attribute__((target("avx512f"))) void Tile(const float* a, int64_t stride, const float* panel, int64_t depth,
                                             float* c, int64_t ldc, int64_t cols, bool load_c) {
  // The last panel may hold fewer than 32 columns: read and write only those.
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xFFFF) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : __mmask16(0);
  __m512 lo[R], hi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    lo[r] = load_c ? _mm512_maskz_loadu_ps(m0, c + r * ldc) : _mm512_setzero_ps();
    hi[r] = load_c ? _mm512_maskz_loadu_ps(m1, c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < depth; ++d) {
    const __m512 b0 = _mm512_loadu_ps(panel + d * kPanel), b1 = _mm512_loadu_ps(panel + d * kPanel + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(kRowMajor ? a[r * stride + d] : a[d * stride + r]);
      lo[r] = _mm512_fmadd_ps(x, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(x, b1, hi[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, lo[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, hi[r]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool);
template <bool kRowMajor>
constexpr TileFn kTiles[kTileRows + 1] = {nullptr,
                                          Tile<1, kRowMajor>,
                                          Tile<2, kRowMajor>,
                                          Tile<3, kRowMajor>,
                                          Tile<4, kRowMajor>,
                                          Tile<5, kRowMajor>,
                                          Tile<6, kRowMajor>,
                                          Tile<7, kRowMajor>,
                                          Tile<8, kRowMajor>};

}  // namespace

bool PackedMatrix::Available() {
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;  // also checks that the OS saves the zmm registers
  }();
  return available;
}

void PackedMatrix::Pack(const float* b, int64_t K, int64_t N, int64_t k_stride, int64_t n_stride) {
  K_ = K;
  N_ = N;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  panels_.assign(panels * K * kPanel, 0.f);
  // Walk B in its own order (the inner loop along the unit stride), write the panels strided.
  if (n_stride == 1) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) panels_[((n / kPanel) * K + k) * kPanel + n % kPanel] = b[k * k_stride + n];
  } else {
    for (int64_t n = 0; n < N; ++n) {
      float* column = panels_.data() + (n / kPanel) * K * kPanel + n % kPanel;
      for (int64_t k = 0; k < K; ++k) column[k * kPanel] = b[k * k_stride + n * n_stride];
    }
  }
}

void PackedMatrix::Multiply(const float* a, int64_t a_row_stride, int64_t a_col_stride, int64_t M, float* c,
                            int64_t ldc, bool accumulate) const {
  // A with unit-stride rows is read in place. A with unit-stride columns (a transpose) is copied a
  // block at a time into `block` [depth][rows], unit stride along rows: a tile's R values for one k
  // are then adjacent, and the block's lines do not all fall in the same cache sets, as rows of a
  // matrix a power of two wide apart would.
  const bool row_major = a_col_stride == 1;
  std::vector<float> block(row_major ? 0 : kDepth * kRowBlock);
  // Row blocks outer: a block's C (128 × N) stays in L2 while every pass over K adds into it.
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - m0);
    for (int64_t k0 = 0; k0 < K_; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, K_ - k0);
      const bool load_c = accumulate || k0 > 0;
      const float* a_block = a + m0 * a_row_stride + k0 * a_col_stride;
      int64_t stride = a_row_stride;
      if (!row_major) {
        for (int64_t d = 0; d < depth; ++d)
          std::memcpy(block.data() + d * rows, a_block + d * a_col_stride, rows * sizeof(float));
        a_block = block.data();
        stride = rows;
      }
      for (int64_t p = 0; p * kPanel < N_; ++p) {
        const float* panel = panels_.data() + (p * K_ + k0) * kPanel;
        const int64_t n0 = p * kPanel, cols = std::min(kPanel, N_ - n0);
        for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
          const int64_t r = std::min<int64_t>(kTileRows, rows - r0);
          float* c_tile = c + (m0 + r0) * ldc + n0;
          if (row_major)
            kTiles<true>[r](a_block + r0 * stride, stride, panel, depth, c_tile, ldc, cols, load_c);
          else
            kTiles<false>[r](a_block + r0, stride, panel, depth, c_tile, ldc, cols, load_c);
        }
      }
    }
  }
}

}  // namespace peerd::kernels::cpu
