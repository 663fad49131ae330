// CPU implementation of kernels/expert_mixture.h. Forward and the gradients of x and w are
// parallel over tokens; table gradients are parallel over the distinct retrieved rows, each row
// summing its (token, slot) contributions in ascending order — deterministic for any thread count.
#include "kernels/expert_mixture.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels/cpu/rows.h"
#ifdef PEERD_WITH_CUDA_KERNELS
#include "kernels/cuda/kernels_cuda.h"
#endif

namespace peerd::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using cpu::Axpy;
using cpu::Dot;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline float Gelu(float a) { return 0.5f * a * (1.0f + std::erf(a * kInvSqrt2)); }
inline float GeluGrad(float a) { return 0.5f * (1.0f + std::erf(a * kInvSqrt2)) + a * kInvSqrt2Pi * std::exp(-0.5f * a * a); }

// One table's rows, typed: exactly one pointer is set.
struct Rows {
  const float* f32 = nullptr;
  const c10::BFloat16* bf16 = nullptr;
};

Rows RowsOf(const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16),
              "expert tables must be contiguous fp32 or bf16");
  Rows r;
  if (t.scalar_type() == torch::kFloat) r.f32 = t.data_ptr<float>();
  else r.bf16 = t.data_ptr<c10::BFloat16>();
  return r;
}

inline float DotRow(const Rows& t, int64_t e, const float* x, int64_t D) {
  return t.f32 ? Dot(t.f32 + e * D, x, D) : Dot(t.bf16 + e * D, x, D);
}
inline void AxpyRow(float c, const Rows& t, int64_t e, float* y, int64_t D) {
  if (t.f32) Axpy(c, t.f32 + e * D, y, D);
  else Axpy(c, t.bf16 + e * D, y, D);
}
inline void PrefetchRow(const Rows& t, int64_t e, int64_t D) {
  const char* p = t.f32 ? reinterpret_cast<const char*>(t.f32 + e * D) : reinterpret_cast<const char*>(t.bf16 + e * D);
  const int64_t bytes = D * (t.f32 ? 4 : 2);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
}

// What the loops read: [M, J] retrieval and weights, x [M, D], the tables by segment position.
struct Problem {
  int64_t M, D, J;
  const float *x, *w;
  const int64_t *segment, *index;
  std::vector<Rows> down, up;
};

// The rows are random, in DRAM once a pool outgrows the caches: while one expert computes, the
// loops ask for the rows of the expert kPrefetchAhead slots later (1 and 3 measured the same at 1M
// experts: the hardware keeps few misses in flight per core either way).
constexpr int64_t kPrefetchAhead = 1;
inline void PrefetchExpert(const Problem& p, int64_t mj) {
  PrefetchRow(p.down[p.segment[mj]], p.index[mj], p.D);
  PrefetchRow(p.up[p.segment[mj]], p.index[mj], p.D);
}

// y[m] = Σ_j w·GELU(u·x)·v for tokens [begin, end); keeps a = u·x for backward.
PEERD_MULTIVERSION
void ForwardTokens(const Problem& p, int64_t begin, int64_t end, float* y, float* a) {
  const int64_t D = p.D, J = p.J;
  const int64_t last = end * J;
  for (int64_t mj = begin * J; mj < begin * J + kPrefetchAhead && mj < last; ++mj) PrefetchExpert(p, mj);
  for (int64_t m = begin; m < end; ++m) {
    const float* xm = p.x + m * D;
    for (int64_t j = 0; j < J; ++j) {
      const int64_t mj = m * J + j, s = p.segment[mj], e = p.index[mj];
      if (mj + kPrefetchAhead < last) PrefetchExpert(p, mj + kPrefetchAhead);
      const float pre = DotRow(p.down[s], e, xm, D);
      a[mj] = pre;
      AxpyRow(p.w[mj] * Gelu(pre), p.up[s], e, y + m * D, D);
    }
  }
}

// Per token: gw = GELU(a)·(gy·v), c = w·GELU(a), ga = w·(gy·v)·GELU'(a), gx = Σ_j ga·u.
PEERD_MULTIVERSION
void BackwardTokens(const Problem& p, int64_t begin, int64_t end, const float* a, const float* gy, float* gx,
                    float* gw, float* ga, float* c) {
  const int64_t D = p.D, J = p.J;
  const int64_t last = end * J;
  for (int64_t mj = begin * J; mj < begin * J + kPrefetchAhead && mj < last; ++mj) PrefetchExpert(p, mj);
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t j = 0; j < J; ++j) {
      const int64_t mj = m * J + j, s = p.segment[mj], e = p.index[mj];
      if (mj + kPrefetchAhead < last) PrefetchExpert(p, mj + kPrefetchAhead);
      const float sv = DotRow(p.up[s], e, gy + m * D, D);
      const float g = Gelu(a[mj]);
      gw[mj] = g * sv;
      c[mj] = p.w[mj] * g;
      ga[mj] = p.w[mj] * sv * GeluGrad(a[mj]);
      AxpyRow(ga[mj], p.down[s], e, gx + m * D, D);
    }
  }
}

// Row r of the compacted gradient: gd[r] = Σ ga·x[m], gu[r] = Σ c·gy[m] over the row's hits
// hits[start[r] .. start[r+1]) (at least one), in ascending (m, j) order. gd and gu need not be
// zeroed: the first hit writes.
PEERD_MULTIVERSION
void RowGradients(const Problem& p, const int64_t* hits, const int64_t* start, int64_t begin, int64_t end,
                  const float* ga, const float* c, const float* gy, float* gd, float* gu) {
  const int64_t D = p.D, J = p.J;
  for (int64_t r = begin; r < end; ++r) {
    float *gdr = gd + r * D, *gur = gu + r * D;
    const int64_t first = hits[start[r]], m0 = first / J;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      gdr[d] = ga[first] * p.x[m0 * D + d];
      gur[d] = c[first] * gy[m0 * D + d];
    }
    for (int64_t h = start[r] + 1; h < start[r + 1]; ++h) {
      const int64_t mj = hits[h], m = mj / J;
      Axpy(ga[mj], p.x + m * D, gdr, D);
      Axpy(c[mj], gy + m * D, gur, D);
    }
  }
}

// A training table's row gradients are needed every step and are large (at 1M experts ~40% of
// the table: 400 MB at D = 256). Allocating them afresh each step costs the kernel's page faults
// and zeroing — measured at ~30% of a step. So each table keeps its last buffer and gets it back
// once nobody holds it any more (the optimizer has dropped the gradient); a buffer still held (two
// backward passes kept side by side) is never handed out twice. Buffers of tables that stopped
// training (frozen, or gone) are released.
class RowGradientBuffers {
 public:
  // A [rows, D] fp32 tensor, uninitialised, for the gradient of `table`.
  torch::Tensor Take(const torch::Tensor& table, int64_t rows, int64_t D) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = buffers_.begin(); it != buffers_.end();) {
      auto alive = it->second.table.lock();
      if (!alive || !alive->requires_grad()) it = buffers_.erase(it);
      else ++it;
    }
    Entry& e = buffers_[table.unsafeGetTensorImpl()];
    const bool free = e.rows.defined() && e.rows.storage().use_count() == 1;
    if (!free || e.rows.size(0) < rows || e.rows.size(1) != D) {
      // Headroom: the number of distinct rows retrieved varies a little from step to step.
      e.rows = torch::empty({rows + rows / 8 + 1, D});
      e.table = table.getIntrusivePtr();
    }
    return e.rows.narrow(0, 0, rows);
  }

 private:
  struct Entry {
    torch::Tensor rows;
    c10::weak_intrusive_ptr<c10::TensorImpl> table{c10::intrusive_ptr<c10::TensorImpl>()};
  };
  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, Entry> buffers_;
};

RowGradientBuffers& GradientBuffers() {
  static RowGradientBuffers* buffers = new RowGradientBuffers();  // never destroyed: used until exit
  return *buffers;
}

// The (m, j) slots that retrieved rows of segment `s`, grouped by row (a counting sort: O(N + M·J),
// stable, so each row's slots stay in ascending order). rows: the distinct rows, ascending.
void GroupByRow(const Problem& p, int64_t s, int64_t n_rows, std::vector<int64_t>* rows,
                std::vector<int64_t>* start, std::vector<int64_t>* hits) {
  const int64_t MJ = p.M * p.J;
  std::vector<int64_t> count(n_rows + 1, 0);
  for (int64_t mj = 0; mj < MJ; ++mj)
    if (p.segment[mj] == s) ++count[p.index[mj] + 1];
  rows->clear();
  start->clear();
  for (int64_t e = 0; e < n_rows; ++e) {
    if (count[e + 1] > 0) {
      rows->push_back(e);
      start->push_back(count[e]);
    }
    count[e + 1] += count[e];  // count[e] becomes the first slot of row e
  }
  start->push_back(count[n_rows]);
  hits->resize(count[n_rows]);
  for (int64_t mj = 0; mj < MJ; ++mj)
    if (p.segment[mj] == s) (*hits)[count[p.index[mj]]++] = mj;
}

Problem Describe(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                 const torch::Tensor& index, const std::vector<torch::Tensor>& tables) {
  Problem p{x.size(0), x.size(1), w.size(1), x.data_ptr<float>(), w.data_ptr<float>(),
            segment.data_ptr<int64_t>(), index.data_ptr<int64_t>(), {}, {}};
  for (size_t t = 0; t < tables.size(); t += 2) {
    p.down.push_back(RowsOf(tables[t]));
    p.up.push_back(RowsOf(tables[t + 1]));
  }
  return p;
}

class ExpertMixtureFunction : public torch::autograd::Function<ExpertMixtureFunction> {
 public:
  // tables: down0, up0, down1, up1, ...
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const torch::Tensor& segment, const torch::Tensor& index, torch::TensorList tables) {
    std::vector<torch::Tensor> kept(tables.begin(), tables.end());
    const Problem p = Describe(x, w, segment, index, kept);
    torch::Tensor y = torch::zeros({p.M, p.D});
    torch::Tensor a = torch::empty({p.M, p.J});
    at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
      ForwardTokens(p, begin, end, y.data_ptr<float>(), a.data_ptr<float>());
    });
    ctx->save_for_backward({x, w, segment, index, a});
    ctx->saved_data["table_list"] = c10::List<torch::Tensor>(kept);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor x = saved[0], w = saved[1], segment = saved[2], index = saved[3], a = saved[4];
    const auto table_list = ctx->saved_data["table_list"].toTensorList();
    std::vector<torch::Tensor> tables;
    for (size_t t = 0; t < table_list.size(); ++t) tables.push_back(table_list.get(t));
    const torch::Tensor gy = grad_outputs[0].contiguous();
    const Problem p = Describe(x, w, segment, index, tables);
    torch::Tensor gx = torch::zeros({p.M, p.D}), gw = torch::empty({p.M, p.J});
    torch::Tensor ga = torch::empty({p.M, p.J}), c = torch::empty({p.M, p.J});  // dL/da and w·GELU(a)
    at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
      BackwardTokens(p, begin, end, a.data_ptr<float>(), gy.data_ptr<float>(), gx.data_ptr<float>(),
                     gw.data_ptr<float>(), ga.data_ptr<float>(), c.data_ptr<float>());
    });

    variable_list grads = {gx, gw, torch::Tensor(), torch::Tensor()};
    std::vector<int64_t> rows, start, hits;
    for (size_t s = 0; s < tables.size() / 2; ++s) {
      const torch::Tensor &down = tables[2 * s], &up = tables[2 * s + 1];
      if (!ctx->needs_input_grad(4 + 2 * s) && !ctx->needs_input_grad(5 + 2 * s)) {
        grads.push_back(torch::Tensor());
        grads.push_back(torch::Tensor());
        continue;
      }
      const int64_t N = down.size(0);
      GroupByRow(p, static_cast<int64_t>(s), N, &rows, &start, &hits);
      const int64_t R = static_cast<int64_t>(rows.size());
      torch::Tensor gd = GradientBuffers().Take(down, R, p.D), gu = GradientBuffers().Take(up, R, p.D);
      at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
        RowGradients(p, hits.data(), start.data(), begin, end, ga.data_ptr<float>(), c.data_ptr<float>(),
                     gy.data_ptr<float>(), gd.data_ptr<float>(), gu.data_ptr<float>());
      });
      // Sparse COO [N, D]: one entry per distinct row, indices ascending — coalesced by construction.
      // Each gradient gets its own indices: autograd stores a sparse gradient without copying it
      // only when nothing else holds its indices and values.
      auto sparse = [&](const torch::Tensor& values, const torch::Tensor& like) {
        torch::Tensor ids = torch::from_blob(rows.data(), {1, R}, torch::kLong).clone();
        return at::_sparse_coo_tensor_unsafe(ids, values.to(like.scalar_type()), {N, p.D})._coalesced_(true);
      };
      grads.push_back(sparse(gd, down));
      grads.push_back(sparse(gu, up));
    }
    return grads;
  }
};

}  // namespace

bool FusedKernelsSupport(const torch::Tensor& x) {
  if (x.scalar_type() != torch::kFloat) return false;
#ifdef PEERD_WITH_CUDA_KERNELS
  if (x.is_cuda()) return true;
#endif
  return x.device().is_cpu();
}

torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables) {
  // Shapes are checked here, once, for every device; the CUDA glue checks only what is its own.
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be [M, D] fp32");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.scalar_type() == torch::kFloat, "w must be [M, J] fp32");
  TORCH_CHECK(segment.sizes() == w.sizes() && index.sizes() == w.sizes() && segment.scalar_type() == torch::kLong &&
                  index.scalar_type() == torch::kLong,
              "segment and index must be int64 shaped like w");
  for (const ExpertTable& t : tables)
    TORCH_CHECK(t.down.dim() == 2 && t.down.size(1) == x.size(1) && t.up.sizes() == t.down.sizes(),
                "expert tables must be [N, D] with D = x.size(1)");
#ifdef PEERD_WITH_CUDA_KERNELS
  if (x.is_cuda()) return cuda::ExpertMixture(x, w, segment, index, tables);
#endif
  TORCH_CHECK(x.device().is_cpu(), "ExpertMixture: this build has no CUDA kernels; x is on ", x.device());
  std::vector<torch::Tensor> flat;
  for (const ExpertTable& t : tables) {
    flat.push_back(t.down);
    flat.push_back(t.up);
  }
  return ExpertMixtureFunction::apply(x.contiguous(), w.contiguous(), segment.contiguous(), index.contiguous(),
                                      torch::TensorList(flat));
}

}  // namespace peerd::kernels
