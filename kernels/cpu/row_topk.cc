// Implementation of kernels/cpu/row_topk.h: an AVX-512 path for k ≤ 16 with no data-dependent
// branch, and a general path for every other case (and for the rows the fast one hands back).
#include "kernels/cpu/row_topk.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "kernels/cpu/packed_gemm.h"
#include "kernels/cpu/rows.h"

namespace peerd::kernels::cpu {
namespace {

// The general path. For rows [begin, end) of scores [M, n]: the k largest of each row, descending
// (ties: lower index first), into val/ids [M, k]. The cost is per row more than per element (65,536 rows a
// step at n = 256 or 1,024), so what matters is few branches a row:
//  1. The row is dealt into B = min(n, 4k) interleaved blocks (element i to block i mod B); their
//     maxima are vertical, vectorised maxima over the row read once.
//  2. t = the k-th largest block maximum, a lower bound of the row's k-th largest (k distinct
//     elements are ≥ t). Found by selecting among the maxima that reach t0, the smallest of k
//     group maxima (group g: blocks g, g + k, …) — itself a lower bound, and cheap: about half
//     the maxima reach it, so the selection sorts ~2k floats, not 4k.
//  3. Only blocks whose maximum reaches t are read again (usually k of them, a quarter of the
//     row); the elements ≥ t (usually ~k) are the candidates, appended without a branch.
//  4. Each candidate's place is the number of candidates that beat it — a vectorised count, no
//     sort. Rows with many ties (more than 4k candidates) or NaN (fewer than k numbers) take a
//     plain partial sort instead.
// NaN never enters a maximum (`v > m` is false for it) and is never a candidate unless a row has
// fewer than k numbers. Measured on rows of fresh random scores (AMD EPYC, 2026-12-01): 1,080 ns
// a row at n = 256 and 1,430 at n = 1,024 — branch mispredictions, mostly (timed on the same rows
// again and again, the predictor learns them and it runs in half that).
PEERD_MULTIVERSION
void TopKRowsGeneral(const float* scores, int64_t n, int64_t k, int64_t begin, int64_t end, float* val, int64_t* ids,
                     TopKScratch& scratch) {
  constexpr float kLowest = -std::numeric_limits<float>::infinity();
  const int64_t B = std::min(n, 4 * k);
  scratch.maxima.resize(B);
  scratch.group_maxima.resize(k);
  scratch.contenders.resize(B);
  scratch.values.resize(n + 1);  // the branchless append writes one past the last candidate
  scratch.ids.resize(n + 1);
  float *mx = scratch.maxima.data(), *gmx = scratch.group_maxima.data(), *top = scratch.contenders.data();
  float* cv = scratch.values.data();
  int64_t* ci = scratch.ids.data();
  for (int64_t m = begin; m < end; ++m) {
    const float* row = scores + m * n;
    // 1. Block maxima.
    std::fill(mx, mx + B, kLowest);
    for (int64_t c = 0; c < n; c += B) {
      const float* part = row + c;
      const int64_t width = std::min(B, n - c);
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) mx[j] = part[j] > mx[j] ? part[j] : mx[j];
    }
    // 2. t0 from k group maxima, then t among the maxima that reach t0 (at least k do).
    std::fill(gmx, gmx + k, kLowest);
    for (int64_t j0 = 0; j0 < B; j0 += k) {
      const int64_t width = std::min(k, B - j0);
#pragma omp simd
      for (int64_t g = 0; g < width; ++g) gmx[g] = mx[j0 + g] > gmx[g] ? mx[j0 + g] : gmx[g];
    }
    float t0 = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : t0)
    for (int64_t g = 0; g < k; ++g) t0 = std::min(t0, gmx[g]);
    int64_t Q = 0;
    for (int64_t j = 0; j < B; ++j) {
      top[Q] = mx[j];
      Q += mx[j] >= t0;
    }
    std::nth_element(top, top + (k - 1), top + Q, std::greater<float>());
    const float t = top[k - 1];
    // 3. Candidates: the elements ≥ t of the blocks that reach t.
    int64_t C = 0;
    for (int64_t j = 0; j < B; ++j) {
      if (!(mx[j] >= t)) continue;
      for (int64_t i = j; i < n; i += B) {
        cv[C] = row[i];
        ci[C] = i;
        C += row[i] >= t;
      }
    }
    if (C < k || C > 4 * k) {
      auto& sorted = scratch.sorted;
      sorted.clear();
      for (int64_t i = 0; i < n; ++i)
        if (C < k || row[i] >= t) sorted.emplace_back(std::isnan(row[i]) ? kLowest : row[i], i);
      std::partial_sort(sorted.begin(), sorted.begin() + k, sorted.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      for (int64_t j = 0; j < k; ++j) {
        val[m * k + j] = sorted[j].first;
        ids[m * k + j] = sorted[j].second;
      }
      continue;
    }
    // 4. Each candidate's place: how many candidates beat it (larger, or equal with a lower index).
    for (int64_t c = 0; c < C; ++c) {
      const float v = cv[c];
      const int64_t id = ci[c];
      int32_t place = 0;
#pragma omp simd reduction(+ : place)
      for (int64_t o = 0; o < C; ++o) place += (cv[o] > v || (cv[o] == v && ci[o] < id)) ? 1 : 0;
      if (place < k) {
        val[m * k + place] = v;
        ids[m * k + place] = id;
      }
    }
  }
}

// One row, k ≤ 16, on AVX-512; false (nothing written) when the row needs the general path.
//  1. t = the least of 16 lane maxima (lane l: elements l, l + 16, …): at least 16 elements are
//     ≥ t, so it bounds the k-th largest from below.
//  2. The elements ≥ t (about 50 of n = 256 or 1,024 for random scores) are compressed, with
//     their indices, into cv and ci: a compare and two compresses per 16 elements.
//  3. Each candidate's place is the number of candidates that beat it (larger, or equal with a
//     lower index), counted 16 at a time; places are distinct, the first k are the answer.
// Rows with fewer than k candidates (NaN) or more than kMaxCandidates (ties) go to the general
// path. NaN is never a lane maximum nor a candidate: both compares are ordered. Measured on fresh
// random rows (AMD EPYC, 2026-12-01): 500 ns a row at n = 256 and 770 at n = 1,024, against 1,080
// and 1,430 for the general path (both including reading the rows from memory).
constexpr int64_t kMaxCandidates = 256;

// The lanes of v (of those in `in`) larger than max's, in max's place.
__attribute__((target("avx512f"))) inline __m512 Take(__m512 max, __m512 v, __mmask16 in) {
  return _mm512_mask_blend_ps(_mm512_mask_cmp_ps_mask(in, v, max, _CMP_GT_OQ), max, v);
}

__attribute__((target("avx512f,popcnt"))) bool TopKRowAvx512(const float* row, int64_t n, int64_t k, float* val,
                                                             int64_t* ids, float* cv, int32_t* ci) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1);
  // 1. A lane takes an element only when it is larger (an ordered compare: never NaN); four
  //    running maxima side by side, so that each compare need not wait for the one before.
  __m512 lane_max[4] = {lowest, lowest, lowest, lowest};
  int64_t i = 0;
  for (; i + 64 <= full; i += 64)
    for (int a = 0; a < 4; ++a) lane_max[a] = Take(lane_max[a], _mm512_loadu_ps(row + i + 16 * a), 0xFFFF);
  for (; i < full; i += 16) lane_max[0] = Take(lane_max[0], _mm512_loadu_ps(row + i), 0xFFFF);
  if (tail) lane_max[1] = Take(lane_max[1], _mm512_maskz_loadu_ps(tail, row + full), tail);
  for (int a = 1; a < 4; ++a) lane_max[0] = Take(lane_max[0], lane_max[a], 0xFFFF);
  alignas(64) float maxima[16];
  _mm512_store_ps(maxima, lane_max[0]);
  const __m512 t = _mm512_set1_ps(*std::min_element(maxima, maxima + 16));
  // 2. Each store writes 16 lanes, of which the first popcount are kept: cv and ci hold n + 16.
  int64_t C = 0;
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const __mmask16 in = i0 < full ? __mmask16(0xFFFF) : tail;
    const __m512 v = _mm512_maskz_loadu_ps(in, row + i0);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(in, v, t, _CMP_GE_OQ);
    _mm512_storeu_ps(cv + C, _mm512_maskz_compress_ps(keep, v));
    _mm512_storeu_si512(ci + C, _mm512_maskz_compress_epi32(keep, index));
    C += _mm_popcnt_u32(keep);
    index = _mm512_add_epi32(index, sixteen);
  }
  if (C < k || C > kMaxCandidates) return false;
  // 3. Lanes past C hold (-inf, INT32_MAX): they beat no candidate.
  const int64_t padded = (C + 15) / 16 * 16;
  for (int64_t c = C; c < padded; ++c) {
    cv[c] = -std::numeric_limits<float>::infinity();
    ci[c] = std::numeric_limits<int32_t>::max();
  }
  for (int64_t c = 0; c < C; ++c) {
    const __m512 v = _mm512_set1_ps(cv[c]);
    const __m512i id = _mm512_set1_epi32(ci[c]);
    int32_t place = 0;
    for (int64_t o = 0; o < padded; o += 16) {
      const __m512 other = _mm512_loadu_ps(cv + o);
      const __mmask16 larger = _mm512_cmp_ps_mask(other, v, _CMP_GT_OQ);
      const __mmask16 tie_before =
          _mm512_mask_cmplt_epi32_mask(_mm512_cmp_ps_mask(other, v, _CMP_EQ_OQ), _mm512_loadu_si512(ci + o), id);
      place += _mm_popcnt_u32(larger | tie_before);
    }
    if (place < k) {
      val[place] = cv[c];
      ids[place] = ci[c];
    }
  }
  return true;
}

}  // namespace

void TopKRows(const float* scores, int64_t n, int64_t k, int64_t begin, int64_t end, float* val, int64_t* ids,
              TopKScratch& scratch) {
  int64_t m = begin;
  if (k <= 16 && PackedMatrix::Available()) {  // i.e. this CPU has AVX-512
    scratch.values.resize(n + 16);
    scratch.ids32.resize(n + 16);
    for (; m < end; ++m) {
      if (TopKRowAvx512(scores + m * n, n, k, val + m * k, ids + m * k, scratch.values.data(), scratch.ids32.data()))
        continue;
      TopKRowsGeneral(scores, n, k, m, m + 1, val, ids, scratch);
    }
    return;
  }
  TopKRowsGeneral(scores, n, k, m, end, val, ids, scratch);
}

}  // namespace peerd::kernels::cpu
