// Product-key retrieval on the GPU (kernels/cuda/launch.h): the top-k of each row of sub-key
// scores, the merge of every segment's k×k candidate sums, and the backward to queries and
// sub-keys. The sub-key score GEMMs themselves are cuBLAS's, called from the glue.
//
// Top-k, k ≤ 32, is one warp per row: each lane keeps its own best candidates sorted in
// registers (insertion by a compile-time-unrolled compare-and-shift, so the arrays never spill
// to local memory), then k rounds of a warp-wide argmax pop the row's best in order. A row of
// n scores costs n/32 loads and comparisons per lane; most candidates fail the first comparison
// against the lane's current k-th best.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/launch.h"

namespace peerd::kernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

// The key of an empty slot: after every real key (sub-key columns, or segment << 10 | a << 5 | b).
template <typename Key>
__device__ __forceinline__ Key EmptyKey();
template <>
__device__ __forceinline__ int32_t EmptyKey<int32_t>() {
  return 0x7fffffff;
}
template <>
__device__ __forceinline__ uint64_t EmptyKey<uint64_t>() {
  return ~uint64_t{0};
}

// The order of candidates: the higher score first; on equal scores the lower key. An empty slot
// is (−inf, EmptyKey), after every real candidate.
template <typename Key>
__device__ __forceinline__ bool Better(float a, Key ka, float b, Key kb) {
  return a > b || (a == b && ka < kb);
}

// One lane's best KP candidates, best first, in registers.
template <int KP, typename Key>
struct LaneList {
  float v[KP];
  Key key[KP];

  __device__ __forceinline__ void Clear() {
#pragma unroll
    for (int t = 0; t < KP; ++t) {
      v[t] = -INFINITY;
      key[t] = EmptyKey<Key>();
    }
  }

  // Slides the worse entries down one place and puts (x, kx) where it belongs; a candidate that
  // does not beat the last entry changes nothing. NaN scores never enter.
  __device__ __forceinline__ void Offer(float x, Key kx) {
    if (!Better(x, kx, v[KP - 1], key[KP - 1])) return;
#pragma unroll
    for (int t = KP - 1; t > 0; --t) {
      if (Better(x, kx, v[t - 1], key[t - 1])) {
        v[t] = v[t - 1];
        key[t] = key[t - 1];
      } else if (Better(x, kx, v[t], key[t])) {
        v[t] = x;
        key[t] = kx;
      }
    }
    if (Better(x, kx, v[0], key[0])) {
      v[0] = x;
      key[0] = kx;
    }
  }

  __device__ __forceinline__ void PopFront() {
#pragma unroll
    for (int t = 0; t + 1 < KP; ++t) {
      v[t] = v[t + 1];
      key[t] = key[t + 1];
    }
    v[KP - 1] = -INFINITY;
    key[KP - 1] = EmptyKey<Key>();
  }
};

// The warp's k best over all lanes' lists, best first: write(r, score, key) on lane 0 for r < k.
// Keys are unique among real candidates, so exactly one lane pops each round.
template <int KP, typename Key, typename Write>
__device__ __forceinline__ void WarpTopK(LaneList<KP, Key>& list, int k, int lane, Write write) {
  for (int r = 0; r < k; ++r) {
    float best = list.v[0];
    Key best_key = list.key[0];
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(kFullMask, best, o);
      const Key other_key = __shfl_xor_sync(kFullMask, best_key, o);
      if (Better(other, other_key, best, best_key)) {
        best = other;
        best_key = other_key;
      }
    }
    if (list.key[0] == best_key) list.PopFront();
    if (lane == 0) write(r, best, best_key);
  }
}

// One warp per row of scores [rows, n].
template <int KP>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    RowTopKKernel(const float* __restrict__ scores, int64_t rows, int64_t n, int k, float* __restrict__ val,
                  int32_t* __restrict__ idx) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;  // the whole warp: every lane has the same row
  const int lane = threadIdx.x % kWarp;
  LaneList<KP, int32_t> list;
  list.Clear();
  const float* s = scores + row * n;
  for (int64_t i = lane; i < n; i += kWarp) {
    const float v = s[i];
    list.Offer(v == v ? v : -INFINITY, static_cast<int32_t>(i));  // NaN as −inf, as the CPU's fallback
  }
  WarpTopK(list, k, lane, [&](int r, float v, int32_t key) {
    val[row * k + r] = v;
    idx[row * k + r] = key == EmptyKey<int32_t>() ? 0 : key;  // only with NaN scores: a valid row
  });
}

static_assert(kMaxTopK <= 32, "MergeKernel keeps a candidate's two ranks in 5 bits each");

// One warp per (token m, head hh); output row m·h + hh of [M, h, k]. Candidate (a, b) of a
// segment — the a-th best first-half sub-key with the b-th best second-half one — is beaten by the
// (a+1)(b+1) − 1 candidates (a' ≤ a, b' ≤ b) of the same segment, so it can be among the k best
// only if (a+1)(b+1) ≤ k: about k·ln k candidates per segment instead of k².
template <int KP>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    MergeKernel(const float* __restrict__ half_val, const int32_t* __restrict__ half_idx,
                const int64_t* __restrict__ n_keys, int S, int h, int64_t M, int k, float* __restrict__ scores,
                int64_t* __restrict__ segment, int64_t* __restrict__ index) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= M * h) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t m = row / h;
  const int hh = static_cast<int>(row % h);
  LaneList<KP, uint64_t> list;
  list.Clear();
  const int kk = k * k;
  for (int64_t c = lane; c < static_cast<int64_t>(S) * kk; c += kWarp) {
    const int s = static_cast<int>(c / kk), a = static_cast<int>(c % kk) / k, b = static_cast<int>(c % k);
    if ((a + 1) * (b + 1) > k) continue;
    const int64_t first = (((static_cast<int64_t>(s) * h + hh) * 2 + 0) * M + m) * k;   // [s, hh, 0, m, :]
    const int64_t second = (((static_cast<int64_t>(s) * h + hh) * 2 + 1) * M + m) * k;  // [s, hh, 1, m, :]
    const float v = half_val[first + a] + half_val[second + b];
    if (!(v > -INFINITY)) continue;  // as the CPU: −inf and NaN sums never enter
    // The key is (s, a, b), not the expert: on equal sums the CPU keeps the candidate it offered
    // first — segment, then first-half rank, then second-half rank — and the (a+1)(b+1) ≤ k
    // pruning above is exact under this order (every candidate it skips has ≥ k ahead of it).
    list.Offer(v, (static_cast<uint64_t>(s) << 10) | (static_cast<uint64_t>(a) << 5) | static_cast<uint64_t>(b));
  }
  WarpTopK(list, k, lane, [&](int r, float v, uint64_t key) {
    int64_t s = 0, e = 0;  // an empty slot: (−inf, segment 0, index 0), as the CPU writes it
    if (key != EmptyKey<uint64_t>()) {
      s = static_cast<int64_t>(key >> 10);
      const int a = static_cast<int>((key >> 5) & 31), b = static_cast<int>(key & 31);
      const int64_t first = (((s * h + hh) * 2 + 0) * M + m) * k, second = (((s * h + hh) * 2 + 1) * M + m) * k;
      e = static_cast<int64_t>(half_idx[first + a]) * n_keys[s] + half_idx[second + b];
    }
    scores[row * k + r] = v;
    segment[row * k + r] = s;
    index[row * k + r] = e;
  });
}

// One warp per (head hh, token m): the row hh·M + m of grad_query [h, M, dk].
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    QueryGradKernel(const float* __restrict__ g, const int64_t* __restrict__ segment, const int64_t* __restrict__ index,
                    const SegmentKeys* __restrict__ segments, int h, int64_t M, int k, int dk,
                    float* __restrict__ grad_query) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= h * M) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t hh = row / M, m = row % M;
  const int half = dk / 2;
  for (int d = lane; d < dk; d += kWarp) {
    const int part = d < half ? 0 : 1, dd = d - part * half;
    float acc = 0;
    for (int r = 0; r < k; ++r) {
      const int64_t o = (m * h + hh) * k + r;
      const SegmentKeys sk = segments[segment[o]];
      const int64_t sub = part == 0 ? index[o] / sk.n : index[o] % sk.n;
      acc += g[o] * sk.keys[((hh * 2 + part) * sk.n + sub) * half + dd];
    }
    grad_query[row * dk + d] = acc;
  }
}

// One warp per run r of contributions to one sub-key (runs[r] = (hh·2 + part)·n + row), each
// contribution slot·2 + part; the run's sum in its order (slots ascending), written once: no
// atomics, so the same bits on every run.
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    KeyGradKernel(const float* __restrict__ g, const float* __restrict__ query, const int64_t* __restrict__ ordered,
                  const int64_t* __restrict__ runs, const int64_t* __restrict__ ends, int64_t U, int h, int64_t M,
                  int k, int dk, float* __restrict__ grad_keys) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= U) return;
  const int lane = threadIdx.x % kWarp;
  const int half = dk / 2;
  const int64_t begin = r == 0 ? 0 : ends[r - 1], end = ends[r];
  float* out = grad_keys + runs[r] * half;
  for (int d = lane; d < half; d += kWarp) {
    float acc = 0;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = ordered[t], o = c >> 1;
      const int part = static_cast<int>(c & 1);
      const int64_t m = o / (static_cast<int64_t>(h) * k), hh = (o / k) % h;
      acc += g[o] * query[(hh * M + m) * dk + part * half + d];
    }
    out[d] = acc;
  }
}

// Registers per lane: the smallest list that holds k.
int LaneSlots(int k) { return k <= 8 ? 8 : k <= 16 ? 16 : 32; }

}  // namespace

const char* RowTopK(const float* scores, int64_t rows, int64_t n, int k, float* val, int32_t* idx) {
  if (k < 1 || k > kMaxTopK || k > n) return "RowTopK: k must be in [1, min(n, 32)]";
  if (rows == 0) return nullptr;
  const unsigned blocks = Blocks(rows, kWarpsPerBlock), threads = kWarpsPerBlock * kWarp;
  switch (LaneSlots(k)) {
    case 8: RowTopKKernel<8><<<blocks, threads>>>(scores, rows, n, k, val, idx); break;
    case 16: RowTopKKernel<16><<<blocks, threads>>>(scores, rows, n, k, val, idx); break;
    default: RowTopKKernel<32><<<blocks, threads>>>(scores, rows, n, k, val, idx); break;
  }
  return LaunchStatus();
}

const char* MergeCandidates(const float* half_val, const int32_t* half_idx, const int64_t* n_keys, int S, int h,
                            int64_t M, int k, float* scores, int64_t* segment, int64_t* index) {
  if (k < 1 || k > kMaxTopK || S < 1) return "MergeCandidates: needs 1 <= k <= 32 and a segment";
  if (M * h == 0) return nullptr;
  const unsigned blocks = Blocks(M * h, kWarpsPerBlock), threads = kWarpsPerBlock * kWarp;
  const auto v = half_val;
  const auto i = half_idx;
  switch (LaneSlots(k)) {
    case 8: MergeKernel<8><<<blocks, threads>>>(v, i, n_keys, S, h, M, k, scores, segment, index); break;
    case 16: MergeKernel<16><<<blocks, threads>>>(v, i, n_keys, S, h, M, k, scores, segment, index); break;
    default: MergeKernel<32><<<blocks, threads>>>(v, i, n_keys, S, h, M, k, scores, segment, index); break;
  }
  return LaunchStatus();
}

const char* RetrievalQueryGrad(const float* grad_scores, const int64_t* segment, const int64_t* index,
                               const SegmentKeys* segments, int h, int64_t M, int k, int dk, float* grad_query) {
  if (h * M == 0) return nullptr;
  QueryGradKernel<<<Blocks(h * M, kWarpsPerBlock), kWarpsPerBlock * kWarp>>>(grad_scores, segment, index, segments, h,
                                                                             M, k, dk, grad_query);
  return LaunchStatus();
}

const char* RetrievalKeyGrad(const float* grad_scores, const float* query, const int64_t* ordered, const int64_t* runs,
                             const int64_t* ends, int64_t U, int h, int64_t M, int k, int dk, float* grad_keys) {
  if (U == 0) return nullptr;
  KeyGradKernel<<<Blocks(U, kWarpsPerBlock), kWarpsPerBlock * kWarp>>>(grad_scores, query, ordered, runs, ends, U, h, M,
                                                                       k, dk, grad_keys);
  return LaunchStatus();
}

}  // namespace peerd::kernels::cuda
