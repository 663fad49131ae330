// Row primitives shared by the CPU kernels: a dot product and an axpy over one expert row held
// as fp32 or bf16, vectorised. Float sums are not associative, so GCC vectorises the reductions
// only where `omp simd reduction` permits it (the kernels are built with -fopenmp-simd); the
// lanes are summed in a fixed order, so a result depends only on the build, never on threads.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace peerd::kernels::cpu {

// bf16 → fp32 is a 16-bit shift: done here in integers so the loop vectorises.
inline float Bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float Dot(const float* a, const float* x, int64_t D) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * x[d];
  return s;
}

inline float Dot(const c10::BFloat16* a, const float* x, int64_t D) {
  const uint16_t* b = reinterpret_cast<const uint16_t*>(a);
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += Bf16(b[d]) * x[d];
  return s;
}

// y += c · a
inline void Axpy(float c, const float* a, float* y, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += c * a[d];
}

inline void Axpy(float c, const c10::BFloat16* a, float* y, int64_t D) {
  const uint16_t* b = reinterpret_cast<const uint16_t*>(a);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += c * Bf16(b[d]);
}

}  // namespace peerd::kernels::cpu

// The hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time
// (GCC function multi-versioning), so one binary runs everywhere and fast where it can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEERD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PEERD_MULTIVERSION
#endif
