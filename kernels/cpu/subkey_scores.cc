// Implementation of kernels/cpu/subkey_scores.h.
//
// A tile is R query rows × one panel of 32 keys: 2R accumulators of 16 lanes (R = 8: 16 of the 32
// vector registers). Each step over d loads the panel's two vectors once and broadcasts R query
// values from memory, so it does 2R FMAs for R + 2 loads.
#include "kernels/cpu/subkey_scores.h"

#include <immintrin.h>

#include <algorithm>

namespace peerd::kernels::cpu {
namespace {

constexpr int64_t kPanel = 32;  // keys a panel holds: two 16-lane vectors
constexpr int kTileRows = 8;

template <int R>
__attribute__((target("avx512f"))) void Tile(const float* q, int64_t q_stride, const float* panel, int64_t dh,
                                              float* out, int64_t n, int64_t cols) {
  __m512 lo[R], hi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dh; ++d) {
    const __m512 b0 = _mm512_loadu_ps(panel + d * kPanel), b1 = _mm512_loadu_ps(panel + d * kPanel + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(q[r * q_stride + d]);
      lo[r] = _mm512_fmadd_ps(a, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(a, b1, hi[r]);
    }
  }
  // The last panel may hold fewer than 32 keys: store only those.
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xFFFF) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : __mmask16(0);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(out + r * n, m0, lo[r]);
    _mm512_mask_storeu_ps(out + r * n + 16, m1, hi[r]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>, Tile<7>, Tile<8>};

}  // namespace

bool PackedSubKeys::Available() {
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;  // also checks that the OS saves the zmm registers
  }();
  return available;
}

void PackedSubKeys::Pack(const float* keys, int64_t n, int64_t dh) {
  n_ = n;
  dh_ = dh;
  const int64_t panels = (n + kPanel - 1) / kPanel;
  panels_.assign(panels * dh * kPanel, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    float* column = panels_.data() + (j / kPanel) * dh * kPanel + j % kPanel;
    for (int64_t d = 0; d < dh; ++d) column[d * kPanel] = keys[j * dh + d];
  }
}

void PackedSubKeys::Score(const float* q, int64_t q_stride, int64_t rows, float* scores) const {
  // Panel outer, rows inner: the panel (dh × 32 floats, 16 KB at dh = 128) stays in L1 while the
  // query rows, reread once per panel, come from L2.
  for (int64_t p = 0; p * kPanel < n_; ++p) {
    const float* panel = panels_.data() + p * dh_ * kPanel;
    const int64_t j0 = p * kPanel, cols = std::min(kPanel, n_ - j0);
    for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
      const int64_t r = std::min<int64_t>(kTileRows, rows - r0);
      kTiles[r](q + r0 * q_stride, q_stride, panel, dh_, scores + r0 * n_ + j0, n_, cols);
    }
  }
}

}  // namespace peerd::kernels::cpu
