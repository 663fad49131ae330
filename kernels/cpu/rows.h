// Row primitives shared by the CPU kernels: a dot product and an axpy over one expert row held
// as fp32 or bf16, vectorised. Float sums are not associative, so the dot product fixes its order
// itself: kLanes running sums (lane l takes elements l, l + kLanes, …), then the lanes added
// pairwise. GCC vectorises the lane loop as it is (the kernels are built with -fopenmp-simd) and
// the order is the same for both element types and every instruction set a clone targets, so a
// row held as bf16 and the same row widened to fp32 (a cached segment's, core/peer_layer.cc) give
// bit-identical results (always inlined, so both are compiled into the same clone with the same
// contraction into fused multiply-adds); a result depends only on the build, never on threads. (`omp simd
// reduction` leaves the order to the compiler, which on AVX2 split the fp32 and bf16 loops
// differently.)
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

inline constexpr int kLanes = 16;

[[gnu::always_inline]] inline float SumLanes(float* lanes) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

[[gnu::always_inline]] inline float Dot(const float* a, const float* x, int64_t D) {
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * x[d + l];
  for (int l = 0; d + l < D; ++l) lanes[l] += a[d + l] * x[d + l];
  return SumLanes(lanes);
}

[[gnu::always_inline]] inline float Dot(const c10::BFloat16* a, const float* x, int64_t D) {
  const uint16_t* b = reinterpret_cast<const uint16_t*>(a);
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += Bf16(b[d + l]) * x[d + l];
  for (int l = 0; d + l < D; ++l) lanes[l] += Bf16(b[d + l]) * x[d + l];
  return SumLanes(lanes);
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
