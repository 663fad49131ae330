// The CUDA kernels behind kernels/cuda/kernels_cuda.h, as plain C++ launchers: raw device
// pointers and sizes in, no LibTorch types, so the .cu files compile without LibTorch's headers
// (nvcc stays fast) and the LibTorch glue (kernels/cuda/*.cc) compiles without CUDA's.
//
// Every launcher enqueues its kernels on the legacy default stream of the current device and
// returns without waiting. It returns nullptr on success or CUDA's message for the launch error;
// errors inside a kernel surface at the next synchronising call, as usual for CUDA. All pointers
// are device pointers unless a comment says otherwise; "[a, b]" is a row-major shape.
#pragma once

#include <cstdint>

namespace peerd::kernels::cuda {

// The largest k the retrieval kernels handle: a warp keeps each lane's best k in registers.
constexpr int kMaxTopK = 32;

// ---- product-key retrieval (kernels/cuda/retrieval.cu) ----------------------------------------

// scores [rows, n] → the k best of each row, descending: val [rows, k], idx [rows, k] (column in
// the row). Equal scores: the lower column first; NaN counts as −inf (as the CPU's fallback for
// rows with fewer than k numbers). Requires 1 ≤ k ≤ kMaxTopK and k ≤ n.
const char* RowTopK(const float* scores, int64_t rows, int64_t n, int k, float* val, int32_t* idx);

// One segment's sub-keys as the retrieval kernels read them.
struct SegmentKeys {
  const float* keys;  // [h, 2, n, dk/2]
  int64_t n;          // sub-keys per half
};

// The k best experts over every segment for each token and head. half_val / half_idx
// [S, h, 2, M, k] are each segment's per-half top-k (RowTopK over its [h, 2, M, n] scores);
// n_keys [S] (device) the segments' n. Expert (i, j) of segment s scores
// half_val[s, ., 0, m, a] + half_val[s, ., 1, m, b]. Writes scores [M, h, k] descending, and the
// winner's segment [M, h, k] and index i·n + j [M, h, k]. As the CPU's merge: equal sums keep the
// order (segment, first half's rank, second half's rank); sums that are −inf or NaN never enter,
// and slots left empty read (−inf, segment 0, index 0).
const char* MergeCandidates(const float* half_val, const int32_t* half_idx, const int64_t* n_keys, int S, int h,
                            int64_t M, int k, float* scores, int64_t* segment, int64_t* index);

// grad_query [h, M, dk] = for each token and head, Σ_r g[m, h, r] · [K1_s[i_r] ; K2_s[j_r]]
// (summed in r order: deterministic). g, segment, index [M, h, k]; segments [S] (device).
const char* RetrievalQueryGrad(const float* grad_scores, const int64_t* segment, const int64_t* index,
                               const SegmentKeys* segments, int h, int64_t M, int k, int dk, float* grad_query);

// grad_keys [h, 2, n, dk/2] (zeroed by the caller) of one segment, from its selected scores'
// contributions grouped by the sub-key they reach: ordered [·] holds slot·2 + part (slot o =
// (m·h + hh)·k + r of g [M, h, k]; part 0 adds g·q1 to K1[i], part 1 g·q2 to K2[j]), run r is
// ordered[ends[r-1] .. ends[r]) (ends[-1] = 0) and goes to sub-key runs[r] = (hh·2 + part)·n + row.
// Each run is summed in its order and written once: deterministic. query [h, M, dk] contiguous.
const char* RetrievalKeyGrad(const float* grad_scores, const float* query, const int64_t* ordered, const int64_t* runs,
                             const int64_t* ends, int64_t U, int h, int64_t M, int k, int dk, float* grad_keys);

// ---- expert mixture (kernels/cuda/expert_mixture.cu) -------------------------------------------

// One segment's tables, read in place: down and up [N, D], each fp32 or bf16.
struct TableRows {
  const void* down;
  const void* up;
  int32_t down_bf16, up_bf16;  // 1: the table holds bf16
};

// Bytes of shared memory the mixture kernels need per token; the launchers refuse more than 48 KiB.
int64_t MixtureSharedBytes(int64_t D, int64_t J);

// For every token m: a[m, j] = u_e · x[m] and y[m] = Σ_j w[m, j] · GELU(a[m, j]) · v_e, with
// e = (segment, index)[m, j]. x [M, D], w/segment/index/a [M, J], y [M, D]; tables [S] (device).
const char* MixtureForward(const float* x, const float* w, const int64_t* segment, const int64_t* index,
                           const TableRows* tables, int64_t M, int64_t D, int64_t J, float* y, float* a);

// Per token, from gy [M, D] and the saved a: gw = GELU(a)·(gy·v), c = w·GELU(a),
// ga = w·(gy·v)·GELU'(a) (all [M, J]) and gx [M, D] = Σ_j ga·u, summed in j order.
const char* MixtureBackwardTokens(const float* w, const int64_t* segment, const int64_t* index, const TableRows* tables,
                                  const float* a, const float* gy, int64_t M, int64_t D, int64_t J, float* gx,
                                  float* gw, float* ga, float* c);

// The compacted gradients of one segment's R retrieved rows: row r sums, over its slots
// slots[starts[r] .. starts[r+1]) (flat m·J + j, ascending), gd[r] += ga·x[m] and gu[r] += c·gy[m]
// in slot order: deterministic. gd, gu [R, D] fp32; starts [R + 1].
const char* MixtureRowGrads(const float* x, const float* gy, const float* ga, const float* c, const int64_t* slots,
                            const int64_t* starts, int64_t R, int64_t D, int64_t J, float* gd, float* gu);

// ---- AdamW on rows (kernels/cuda/adamw_rows.cu) -------------------------------------------------

// The step's constants, rounded to float as the CPU kernel rounds them.
struct AdamWConstants {
  float beta1, beta2, eps;
  float step;     // lr / bias_correction1
  float inv_bc2;  // 1 / bias_correction2
  float decay;    // 1 − lr · weight_decay
};

// For each r < R, row e = rows[r] of param, m, v [N, D]: m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g²,
// p = p·decay − step·m / (sqrt(v·inv_bc2) + eps), with g = grad[r] ([R, D]). One block per row.
const char* AdamWRowsUpdate(float* param, float* m, float* v, const int64_t* rows, const float* grad, int64_t R,
                            int64_t D, const AdamWConstants& c);

}  // namespace peerd::kernels::cuda
