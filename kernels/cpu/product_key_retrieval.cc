// CPU implementation of kernels/product_key_retrieval.h.
//
// Forward, per head: one GEMM per segment and half gives the [M, n] sub-key scores (the AVX-512
// kernel of kernels/cpu/packed_gemm.h, or BLAS on CPUs without AVX-512; in blocks of rows that
// stay in cache), each row's top-k is kept (kernels/cpu/row_topk.h), and a second parallel pass
// merges the k×k sums of every segment into the head's k best — pruned, since both halves' lists
// are sorted. Backward touches only the 2·k sub-keys each token's head selected.
#include "kernels/cpu/kernels_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>

#include "kernels/cpu/blas_threads.h"
#include "kernels/cpu/packed_gemm.h"
#include "kernels/cpu/row_topk.h"
#include "kernels/cpu/rows.h"

namespace peerd::kernels::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Inserts (v, id) into the descending list best[0..k) if it beats the last entry.
inline void Offer(float v, int64_t id, float* best, int64_t* ids, int64_t k) {
  if (!(v > best[k - 1])) return;
  int64_t at = k - 1;
  while (at > 0 && v > best[at - 1]) {
    best[at] = best[at - 1];
    ids[at] = ids[at - 1];
    --at;
  }
  best[at] = v;
  ids[at] = id;
}

// Backward, the query's gradient for units [begin, end) of (head, token) — head-major, or
// token-major when `token_major` — each the sum of its k selected sub-key pairs scaled by their
// score gradients g [M, h, k]; segment s's sub-keys are keys[s], [h, 2, n[s], dk/2].
// Multiversioned, as every loop of this file that does arithmetic: compiled for the baseline CPU
// alone, each 128-float axpy ran as 32 SSE multiplies and adds (measured: 10% of a 1M-expert
// step's CPU time).
PEERD_MULTIVERSION void QueryGradients(int64_t begin, int64_t end, bool token_major, int64_t h, int64_t M, int64_t k,
                                       int64_t half, const float* g, const int64_t* segment, const int64_t* index,
                                       const std::vector<const float*>& keys, const std::vector<int64_t>& n, float* gq,
                                       int64_t g_head, int64_t g_token) {
  for (int64_t u = begin; u < end; ++u) {
    const int64_t hh = token_major ? u % h : u / M, m = token_major ? u / h : u % M;
    float* out = gq + hh * g_head + m * g_token;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t o = (m * h + hh) * k + j, s = segment[o], e = index[o];
      cpu::Axpy(g[o], keys[s] + ((hh * 2 + 0) * n[s] + e / n[s]) * half, out, half);
      cpu::Axpy(g[o], keys[s] + ((hh * 2 + 1) * n[s] + e % n[s]) * half, out + half, half);
    }
  }
}

// Backward, segment s's sub-key gradients gk [h, 2, n, dk/2] for heads [begin, end): every token's
// selected pair adds its query halves, scaled, in ascending (token, slot) order — deterministic.
PEERD_MULTIVERSION void SubKeyGradients(int64_t begin, int64_t end, int64_t s, int64_t M, int64_t h, int64_t k,
                                        int64_t n, int64_t half, const float* g, const int64_t* segment,
                                        const int64_t* index, const float* q, int64_t q_head, int64_t q_token,
                                        float* gk) {
  for (int64_t hh = begin; hh < end; ++hh)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t o = (m * h + hh) * k + j;
        if (segment[o] != s) continue;
        const float* qm = q + hh * q_head + m * q_token;
        cpu::Axpy(g[o], qm, gk + ((hh * 2 + 0) * n + index[o] / n) * half, half);
        cpu::Axpy(g[o], qm + half, gk + ((hh * 2 + 1) * n + index[o] % n) * half, half);
      }
}

// Rows of scores computed at a time: 256 × n fp32 is 1 MB at n = 1,024 (1M experts), which stays
// in a core's L2 between the GEMM that writes it and the top-k that reads it, and one such block
// per task is all the memory scores take ([M, n] whole is 16 MB at M = 4,096, per task in flight).
// Measured the same speed as whole [M, n] scores on a machine whose L3 (480 MB) held them anyway.
constexpr int64_t kRowBlock = 256;

// Segments scored per pass: each pass keeps every (segment, head, half)'s [M, k] top-k lists until
// they are merged into the running best, 12·2·h·M·k bytes a segment (0.4 MB at h 4, M 512, k 8).
// Scoring all segments before one merge would make a step's memory grow by that per segment of the
// pool (611 MB at 1,024 tiny segments against 195 MB at one, bench/POOL.md); in passes it is
// bounded, and 32 segments still give 256 tasks at h 4 to spread over the cores.
constexpr int64_t kSegmentsPerPass = 32;

struct SegmentTopK {
  torch::Tensor val[2];  // [M, k] per half, descending
  torch::Tensor ids[2];  // [M, k]
  int64_t n;
};

class RetrievalFunction : public torch::autograd::Function<RetrievalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& query, int64_t k, torch::TensorList keys) {
    const int64_t h = query.size(0), M = query.size(1), half = query.size(2) / 2;
    const int64_t S = static_cast<int64_t>(keys.size());
    torch::Tensor scores = torch::empty({M, h, k}), segment = torch::empty({M, h, k}, torch::kLong),
                  index = torch::empty({M, h, k}, torch::kLong);
    float* sp = scores.data_ptr<float>();
    int64_t *gp = segment.data_ptr<int64_t>(), *ip = index.data_ptr<int64_t>();
    // One task per (segment, head, half): its GEMM and the top-k of each row, while the scores
    // are warm in cache. The tasks spread over OpenMP's threads. Where BLAS runs the GEMMs (no
    // AVX-512), each gets one BLAS thread: the tasks already fill the cores (blas_threads.h).
    const bool avx512 = cpu::PackedMatrix::Available();  // query rows are unit-stride: see ProductKeyRetrieval
    std::optional<cpu::SingleThreadedBlas> one_blas_thread_per_task;
    if (!avx512) one_blas_thread_per_task.emplace();
    // The running k best per (token, head), across passes: s · 2^40 + expert names position and index.
    std::vector<float> best_all(M * h * k, -std::numeric_limits<float>::infinity());
    std::vector<int64_t> who_all(M * h * k, 0);
    for (int64_t first = 0; first < S; first += kSegmentsPerPass) {
      const int64_t count = std::min(kSegmentsPerPass, S - first);
      std::vector<SegmentTopK> tops(count * h);  // [(s - first) · h + head]
      for (int64_t t = 0; t < count * h; ++t) tops[t].n = keys[first + t / h].size(2);
      at::parallel_for(0, count * h * 2, 1, [&](int64_t begin, int64_t end) {
        // Grad mode is per thread, and OpenMP's workers have it on: this forward records nothing.
        at::NoGradGuard no_grad;
        cpu::TopKScratch scratch;
        cpu::PackedMatrix packed;    // the keys as B [dk/2, n]
        torch::Tensor scores_block;  // [kRowBlock, n]: the GEMM writes it, the top-k reads it from cache
        for (int64_t task = begin; task < end; ++task) {
          const int64_t s = first + task / (2 * h), hh = (task / 2) % h, part = task % 2;
          SegmentTopK& top = tops[(s - first) * h + hh];
          top.val[part] = torch::empty({M, k});
          top.ids[part] = torch::empty({M, k}, torch::kLong);
          const torch::Tensor q = query[hh].narrow(1, part * half, half), keys_part = keys[s][hh][part].contiguous();
          if (avx512) packed.Pack(keys_part.data_ptr<float>(), half, top.n, 1, half);
          if (!scores_block.defined() || scores_block.size(1) != top.n) scores_block = torch::empty({kRowBlock, top.n});
          for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
            const int64_t rows = std::min(kRowBlock, M - m0);
            torch::Tensor block = scores_block.narrow(0, 0, rows);
            // [rows, dk/2] x [dk/2, n] -> [rows, n]
            const float* q_rows = q.data_ptr<float>() + m0 * q.stride(0);
            if (avx512)
              packed.Multiply(q_rows, q.stride(0), 1, rows, block.data_ptr<float>(), top.n);
            else
              at::mm_out(block, q.narrow(0, m0, rows), keys_part.t());
            cpu::TopKRows(block.data_ptr<float>(), top.n, k, 0, rows, top.val[part].data_ptr<float>() + m0 * k,
                          top.ids[part].data_ptr<int64_t>() + m0 * k, scratch);
          }
        }
      });
      // Merge: per token and head, the k best of every segment's k×k sums. Lists are descending, so
      // once v1[a] + v2[b] cannot enter, neither can any later b; once v1[a] + v2[0] cannot, no later a.
      // Offered in ascending segment order, pass after pass: the same k best as one merge of all.
      at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          for (int64_t hh = 0; hh < h; ++hh) {
            float* best = best_all.data() + (m * h + hh) * k;
            int64_t* who = who_all.data() + (m * h + hh) * k;
            for (int64_t s = first; s < first + count; ++s) {
              const SegmentTopK& top = tops[(s - first) * h + hh];
              const float* v1 = top.val[0].data_ptr<float>() + m * k;
              const float* v2 = top.val[1].data_ptr<float>() + m * k;
              const int64_t* i1 = top.ids[0].data_ptr<int64_t>() + m * k;
              const int64_t* i2 = top.ids[1].data_ptr<int64_t>() + m * k;
              for (int64_t a = 0; a < k; ++a) {
                if (!(v1[a] + v2[0] > best[k - 1])) break;
                for (int64_t b = 0; b < k; ++b) {
                  const float sum = v1[a] + v2[b];
                  if (!(sum > best[k - 1])) break;
                  Offer(sum, (s << 40) | (i1[a] * top.n + i2[b]), best, who, k);
                }
              }
            }
          }
        }
      });
    }
    for (int64_t o = 0; o < M * h * k; ++o) {
      sp[o] = best_all[o];
      gp[o] = who_all[o] >> 40;
      ip[o] = who_all[o] & ((int64_t{1} << 40) - 1);
    }
    std::vector<torch::Tensor> saved = {query, segment, index};
    saved.insert(saved.end(), keys.begin(), keys.end());
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({segment, index});
    return {scores, segment, index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor query = saved[0], segment = saved[1], index = saved[2];
    const std::vector<torch::Tensor> keys(saved.begin() + 3, saved.end());
    const int64_t h = query.size(0), M = query.size(1), dk = query.size(2), half = dk / 2, k = segment.size(2);
    const int64_t S = static_cast<int64_t>(keys.size());
    torch::Tensor gs = grad_outputs[0].defined() ? grad_outputs[0].contiguous() : torch::zeros({M, h, k});
    const float* g = gs.data_ptr<float>();
    const float* q = query.data_ptr<float>();
    const int64_t q_head = query.stride(0), q_token = query.stride(1);  // query may be [M, h, dk] seen as [h, M, dk]
    const int64_t *gp = segment.data_ptr<int64_t>(), *ip = index.data_ptr<int64_t>();
    std::vector<const float*> kp(S);
    std::vector<int64_t> n(S);
    for (int64_t s = 0; s < S; ++s) {
      kp[s] = keys[s].data_ptr<float>();
      n[s] = keys[s].size(2);
    }

    variable_list grads(2 + S);  // query, k, then each segment's sub-keys
    if (ctx->needs_input_grad(0)) {
      // In the query's own layout (zeros_like keeps a transpose's strides): autograd then passes
      // it back through the layer's transpose and view without a copy.
      torch::Tensor gq = torch::zeros_like(query);
      float* gqp = gq.data_ptr<float>();
      const int64_t g_head = gq.stride(0), g_token = gq.stride(1);
      const bool token_major = g_token > g_head;  // the layer's [M, h, dk]: write it in that order
      at::parallel_for(0, h * M, 64, [&](int64_t begin, int64_t end) {
        QueryGradients(begin, end, token_major, h, M, k, half, g, gp, ip, kp, n, gqp, g_head, g_token);
      });
      grads[0] = gq;
    }
    for (int64_t s = 0; s < S; ++s) {
      if (!ctx->needs_input_grad(1 + s)) continue;  // counts tensor inputs only: query, then the keys
      torch::Tensor gk = torch::zeros_like(keys[s]);
      float* gkp = gk.data_ptr<float>();
      at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {  // one head per task
        SubKeyGradients(begin, end, s, M, h, k, n[s], half, g, gp, ip, q, q_head, q_token, gkp);
      });
      grads[2 + s] = gk;
    }
    return grads;
  }
};

}  // namespace

RetrievedExperts ProductKeyRetrieval(const torch::Tensor& query, const std::vector<torch::Tensor>& sub_keys,
                                     int64_t k) {
  std::vector<torch::Tensor> keys;
  for (const torch::Tensor& t : sub_keys) keys.push_back(t.contiguous());
  // The layer's query is [M, h, dk] seen as [h, M, dk] (a transpose): taken as it is, with no
  // 32 MB copy a step (M = 4,096, h·dk = 2,048), as long as each row of dk is contiguous.
  variable_list out =
      RetrievalFunction::apply(query.stride(2) == 1 ? query : query.contiguous(), k, torch::TensorList(keys));
  return {out[0], out[1], out[2]};
}

}  // namespace peerd::kernels::cpu
