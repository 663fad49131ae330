// The retrieval's GEMM on CPUs with AVX-512: scores[r, j] = q[r] · key[j] for one (segment, head,
// half), written row-major for the top-k that reads them next.
//
// Why not BLAS: at 1M experts this GEMM is 17 of the ~30 GFLOP a layer step does, and on the AMD
// machines this project runs on OpenBLAS 0.3.21 is held to its AVX2 kernels (OPENBLAS_CORETYPE is
// set there because that build's AVX-512 kernels are not trusted on those CPUs): ~100 GFLOP/s a
// thread. The shape is fixed and small — dh (64-256) deep, n (√N, up to a few thousand) wide — so
// a register-tiled kernel is short: keys packed once per task into panels of 32, each panel kept
// in L1 while blocks of 8 query rows stream past it. Measured in bench/KERNELS.md (2026-12-01).
// Without AVX-512 the caller keeps using BLAS (at::mm_out).
#pragma once

#include <cstdint>
#include <vector>

namespace peerd::kernels::cpu {

class PackedSubKeys {
 public:
  // Whether this CPU (and OS) can run Score; when not, Pack and Score must not be called.
  static bool Available();

  // keys: row-major [n, dh], dh ≥ 1.
  void Pack(const float* keys, int64_t n, int64_t dh);
  // q: [rows, dh] with row stride q_stride; scores: [rows, n] row-major (leading dimension n).
  // Each score is one fp32 FMA chain over d in order: deterministic, independent of threads.
  void Score(const float* q, int64_t q_stride, int64_t rows, float* scores) const;

 private:
  std::vector<float> panels_;  // [⌈n/32⌉][dh][32], keys beyond n zero
  int64_t n_ = 0, dh_ = 0;
};

}  // namespace peerd::kernels::cpu
