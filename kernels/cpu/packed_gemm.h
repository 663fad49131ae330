// C = A · B in fp32 on CPUs with AVX-512, for the two GEMMs a PEER layer step spends its FLOPs on:
// the retrieval's sub-key scores (q · keyᵀ per segment, head and half) and the query projection
// (x · W_qᵀ and its two gradients).
//
// Why not BLAS: at 1M experts these are all ~30 GFLOP of a layer step, and on the AMD machines
// this project runs on OpenBLAS 0.3.21 is held to its AVX2 kernels (OPENBLAS_CORETYPE is set
// there because that build's AVX-512 kernels are not trusted on those CPUs): ~100 GFLOP/s a
// thread. A register-tiled kernel is short: B is packed once into panels of 32 columns, and tiles
// of 8 rows of A stream past a panel held in L1, 256 deep at a time. Measured in bench/KERNELS.md.
// Without AVX-512, callers keep using BLAS.
#pragma once

#include <cstdint>
#include <vector>

namespace peerd::kernels::cpu {

class PackedMatrix {
 public:
  // Whether this CPU (and OS) can run Multiply; when not, Pack and Multiply must not be called.
  static bool Available();

  // Packs B [K, N], B[k][n] = b[k · k_stride + n · n_stride] (any strides: a row-major [N, K]
  // matrix packs as its transpose with k_stride 1, n_stride K).
  void Pack(const float* b, int64_t K, int64_t N, int64_t k_stride, int64_t n_stride);

  // Rows [0, M) of C = A · B, or C += A · B when `accumulate`. A [M, K] with
  // A[m][k] = a[m · a_row_stride + k · a_col_stride], one of the two strides 1; C[m][n] at
  // c[m · ldc + n]. Serial: callers split rows among threads. Each C element is fp32 FMAs over k
  // in ascending order, so results do not depend on how rows are split.
  void Multiply(const float* a, int64_t a_row_stride, int64_t a_col_stride, int64_t M, float* c, int64_t ldc,
                bool accumulate = false) const;

  int64_t K() const { return K_; }
  int64_t N() const { return N_; }

 private:
  std::vector<float> panels_;  // [⌈N/32⌉][K][32], columns beyond N zero
  int64_t K_ = 0, N_ = 0;
};

}  // namespace peerd::kernels::cpu
