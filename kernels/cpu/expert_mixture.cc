// CPU implementation of kernels/expert_mixture.h, row-major: the (token, slot) pairs are grouped
// by the expert row they retrieved (a radix sort), and the loops walk the distinct rows in
// ascending order, each row read once a pass for all the tokens that chose it; forward and
// backward each make one pass over the down table and one over the up table. A token-major walk
// read a random row per pair: at 1M experts hardly any row is retrieved twice in a step, and each
// read was a cache and TLB miss; in row order the reads go forward through the table, which the
// hardware prefetches. Tokens' x and y (M × D, a few MB) are what is now read at random, and they
// stay in cache. Rows are split into one chunk per thread with as many pairs each; a chunk adds
// into its own y (or gx) buffer, summed in chunk order afterwards; within a row, pairs go in
// ascending (m, j) order — deterministic for a fixed thread count.
#include "kernels/cpu/kernels_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernels/cpu/rows.h"

namespace peerd::kernels::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One table's rows, typed: exactly one pointer is set.
struct Rows {
  const float* f32 = nullptr;
  const c10::BFloat16* bf16 = nullptr;
};

Rows RowsOf(const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16),
              "expert tables must be contiguous fp32 or bf16");
  Rows r;
  if (t.scalar_type() == torch::kFloat)
    r.f32 = t.data_ptr<float>();
  else
    r.bf16 = t.data_ptr<c10::BFloat16>();
  return r;
}

inline float DotRow(const Rows& t, int64_t e, const float* x, int64_t D) {
  return t.f32 ? Dot(t.f32 + e * D, x, D) : Dot(t.bf16 + e * D, x, D);
}
inline void AxpyRow(float c, const Rows& t, int64_t e, float* y, int64_t D) {
  if (t.f32)
    Axpy(c, t.f32 + e * D, y, D);
  else
    Axpy(c, t.bf16 + e * D, y, D);
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
      if (!alive || !alive->requires_grad())
        it = buffers_.erase(it);
      else
        ++it;
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

// The (m, j) pairs grouped by (segment, row): groups in segment then row order, each naming its
// pairs hits[begin, end) in ascending (m, j) order.
struct RowGroups {
  struct Group {
    int64_t segment, row, begin, end;
  };
  std::vector<Group> groups;
  std::vector<int64_t> hits;
  std::vector<int64_t> first_group;  // per segment, its first group (size S + 1)
};

// An LSD radix sort of the pairs by global row (the segment's first row + row): stable, so a
// row's pairs stay in ascending (m, j) order, and O(M·J) a pass, with nothing as large as a table
// at 1M experts. The counting sort per segment it replaced kept a counter per table row (8 MB at
// 1M experts, touched at random: 11 ms a step, serial) and walked the pairs once per segment.
RowGroups GroupByRow(const Problem& p, const std::vector<int64_t>& n_rows) {
  const int64_t MJ = p.M * p.J, S = static_cast<int64_t>(n_rows.size());
  std::vector<int64_t> first_row(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) first_row[s + 1] = first_row[s] + n_rows[s];
  TORCH_CHECK(first_row[S] <= int64_t{1} << 32, "expert pool too large to group: ", first_row[S], " rows");
  std::vector<uint32_t> key(MJ), sorted_key(MJ);
  std::vector<int64_t> hits(MJ), sorted_hits(MJ);
  for (int64_t mj = 0; mj < MJ; ++mj) {
    key[mj] = static_cast<uint32_t>(first_row[p.segment[mj]] + p.index[mj]);
    hits[mj] = mj;
  }
  // As few passes as digits of at most 16 bits allow (their counters, 512 KB, stay in L2): one up
  // to 65,536 rows, two (of 10 bits each) at 1M.
  const uint64_t largest = static_cast<uint64_t>(std::max<int64_t>(first_row[S] - 1, 0));
  const int bits = std::max(1, static_cast<int>(std::bit_width(largest)));
  const int passes = (bits + 15) / 16, digit = (bits + passes - 1) / passes;
  const uint32_t mask = (1u << digit) - 1;
  std::vector<int64_t> start(mask + 1);
  for (int shift = 0; shift < passes * digit; shift += digit) {
    std::fill(start.begin(), start.end(), 0);
    for (int64_t mj = 0; mj < MJ; ++mj) ++start[(key[mj] >> shift) & mask];
    int64_t sum = 0;
    for (int64_t& c : start) sum += std::exchange(c, sum);  // counts -> first position of each digit
    for (int64_t mj = 0; mj < MJ; ++mj) {
      const int64_t at = start[(key[mj] >> shift) & mask]++;
      sorted_key[at] = key[mj];
      sorted_hits[at] = hits[mj];
    }
    key.swap(sorted_key);
    hits.swap(sorted_hits);
  }
  // Runs of one key are the groups; segments are ascending along the keys.
  RowGroups g;
  g.first_group.assign(1, 0);
  int64_t s = 0;
  for (int64_t i = 0; i < MJ; ++i) {
    if (i > 0 && key[i] == key[i - 1]) {
      g.groups.back().end = i + 1;
      continue;
    }
    while (key[i] >= first_row[s + 1]) {
      ++s;
      g.first_group.push_back(static_cast<int64_t>(g.groups.size()));
    }
    g.groups.push_back({s, key[i] - first_row[s], i, i + 1});
  }
  while (s < S) {
    ++s;
    g.first_group.push_back(static_cast<int64_t>(g.groups.size()));
  }
  g.hits = std::move(hits);
  return g;
}

// A grouping kept in the autograd context from forward to backward.
struct SavedRowGroups : torch::CustomClassHolder {
  RowGroups groups;
};

// Splits the groups into `chunks` runs of about equal numbers of pairs: chunk c is groups
// [bounds[c], bounds[c + 1]).
std::vector<int64_t> ChunkBounds(const RowGroups& g, int64_t chunks) {
  std::vector<int64_t> bounds = {0};
  const int64_t pairs = static_cast<int64_t>(g.hits.size()), G = static_cast<int64_t>(g.groups.size());
  int64_t q = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = pairs * c / chunks;
    while (q < G && g.groups[q].begin < target) ++q;
    bounds.push_back(q);
  }
  bounds.push_back(G);
  return bounds;
}

// The next group's row of `table` is asked for while this one computes (it is usually a little
// further on in the table, but not next to it).
inline void PrefetchGroup(const std::vector<Rows>& table, const RowGroups& g, int64_t q, int64_t end, int64_t D) {
  if (q >= end) return;
  PrefetchRow(table[g.groups[q].segment], g.groups[q].row, D);
}

// Each pass below walks one table, and what it needs per pair (weights, activations) is laid out
// in hit order h beforehand, so that it is read in sequence. One pass over both tables, reading
// w[m, j] and a[m, j] per pair at random and computing GELU's erf per pair, made the whole step
// 1.1–1.4× slower at 65k experts (about the same at 1M, where the rows' memory traffic dominates):
// those loads from L3 and the erf sat on each pair's chain of dependent work.

// The pairs of groups [begin, end) are hits[HitsBegin, HitsEnd).
inline int64_t HitsBegin(const RowGroups& g, int64_t begin, int64_t end) {
  return begin < end ? g.groups[begin].begin : 0;
}
inline int64_t HitsEnd(const RowGroups& g, int64_t begin, int64_t end) {
  return begin < end ? g.groups[end - 1].end : 0;
}

// Forward, first pass, over the down table: a[h] = u·x[m].
PEERD_MULTIVERSION
void ForwardDown(const Problem& p, const RowGroups& g, int64_t begin, int64_t end, float* a) {
  const int64_t D = p.D, J = p.J;
  for (int64_t q = begin; q < end; ++q) {
    PrefetchGroup(p.down, g, q + 1, end, D);
    const RowGroups::Group& grp = g.groups[q];
    for (int64_t h = grp.begin; h < grp.end; ++h)
      a[h] = DotRow(p.down[grp.segment], grp.row, p.x + (g.hits[h] / J) * D, D);
  }
}

// Where a training segment's compacted row gradients go (null for frozen segments): row r of the
// segment's groups is gd[r], gu[r].
struct RowGradientsOut {
  std::vector<float*> gd, gu;
};

// A training row's gradient over its group's pairs: out = Σ c[h]·src[m], the first pair writing
// (the buffers are not zeroed).
inline void RowGradient(const RowGroups::Group& grp, const int64_t* hits, int64_t J, int64_t D, const float* c,
                        const float* src, float* out) {
  const float c0 = c[grp.begin];
  const float* s0 = src + (hits[grp.begin] / J) * D;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = c0 * s0[d];
  for (int64_t h = grp.begin + 1; h < grp.end; ++h) Axpy(c[h], src + (hits[h] / J) * D, out, D);
}

// The backward's per-pair values, in hit order.
struct PairValues {
  const float* c;    // w·GELU(a)
  const float* act;  // GELU(a)
  const float* w;    // w[m, j]
  float* ga;         // GELU'(a) in; ∂a = w·sv·GELU'(a) out of the first pass
};

// Backward, first pass, over the up table, per pair: sv = v·gy[m], ∂w = GELU(a)·sv and
// ∂a = w·sv·GELU'(a); for a training row also gu = Σ w·GELU(a)·gy[m].
PEERD_MULTIVERSION
void BackwardUp(const Problem& p, const RowGroups& g, int64_t begin, int64_t end, const float* gy,
                const RowGradientsOut& out, const PairValues& v, float* gw) {
  const int64_t D = p.D, J = p.J;
  for (int64_t q = begin; q < end; ++q) {
    PrefetchGroup(p.up, g, q + 1, end, D);
    const RowGroups::Group& grp = g.groups[q];
    for (int64_t h = grp.begin; h < grp.end; ++h) {
      const int64_t mj = g.hits[h];
      const float sv = DotRow(p.up[grp.segment], grp.row, gy + (mj / J) * D, D);
      gw[mj] = v.act[h] * sv;
      v.ga[h] = v.w[h] * sv * v.ga[h];
    }
    if (float* gu = out.gu[grp.segment])
      RowGradient(grp, g.hits.data(), J, D, v.c, gy, gu + (q - g.first_group[grp.segment]) * D);
  }
}

// A pass that adds table rows into tokens: out[m] += c[h]·row for every pair of groups
// [begin, end) (out is this chunk's own). Where `row_grads` has a buffer for a row's segment, that
// row's gradient Σ c[h]·src[m] goes there too. Forward's second pass (up table into y, c = w·GELU(a),
// no gradients) and backward's second (down table into ∂x, c = ∂a, gd = Σ ∂a·x[m]).
PEERD_MULTIVERSION
void AddRowsToTokens(const Problem& p, const std::vector<Rows>& table, const RowGroups& g, int64_t begin, int64_t end,
                     const float* c, float* out, const std::vector<float*>* row_grads = nullptr,
                     const float* src = nullptr) {
  const int64_t D = p.D, J = p.J;
  for (int64_t q = begin; q < end; ++q) {
    PrefetchGroup(table, g, q + 1, end, D);
    const RowGroups::Group& grp = g.groups[q];
    for (int64_t h = grp.begin; h < grp.end; ++h)
      AxpyRow(c[h], table[grp.segment], grp.row, out + (g.hits[h] / J) * D, D);
    if (float* rg = row_grads ? (*row_grads)[grp.segment] : nullptr)
      RowGradient(grp, g.hits.data(), J, D, c, src, rg + (q - g.first_group[grp.segment]) * D);
  }
}

// How many chunks of groups the passes split into: one per thread, at most one per group.
int64_t RowChunkCount(const RowGroups& g) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(g.groups.size())));
}

// Runs `body(group_begin, group_end, chunk)` for each chunk of groups (ChunkBounds), the chunks
// spread over the threads: the same chunks on every call with the same grouping and thread count.
template <typename Body>
void ForEachRowChunk(const RowGroups& g, const Body& body) {
  const int64_t chunks = RowChunkCount(g);
  const std::vector<int64_t> bounds = ChunkBounds(g, chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) body(bounds[c], bounds[c + 1], c);
  });
}

// As ForEachRowChunk, each chunk with its own zeroed [M, D] buffer: `body(group_begin, group_end,
// buffer)`. Returns the buffers' sum in chunk order.
template <typename Body>
torch::Tensor OverRowChunks(const RowGroups& g, int64_t M, int64_t D, const Body& body) {
  const int64_t chunks = RowChunkCount(g);
  torch::Tensor parts = torch::zeros({chunks, M, D});
  ForEachRowChunk(g, [&](int64_t begin, int64_t end, int64_t c) { body(begin, end, parts[c].data_ptr<float>()); });
  torch::Tensor sum = parts[0];
  for (int64_t c = 1; c < chunks; ++c) sum = sum + parts[c];
  return sum.contiguous();
}

Problem Describe(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                 const torch::Tensor& index, const std::vector<torch::Tensor>& tables) {
  Problem p{x.size(0),
            x.size(1),
            w.size(1),
            x.data_ptr<float>(),
            w.data_ptr<float>(),
            segment.data_ptr<int64_t>(),
            index.data_ptr<int64_t>(),
            {},
            {}};
  for (size_t t = 0; t < tables.size(); t += 2) {
    p.down.push_back(RowsOf(tables[t]));
    p.up.push_back(RowsOf(tables[t + 1]));
  }
  return p;
}

std::vector<int64_t> RowCounts(const std::vector<torch::Tensor>& tables) {
  std::vector<int64_t> n;
  for (size_t t = 0; t < tables.size(); t += 2) n.push_back(tables[t].size(0));
  return n;
}

class ExpertMixtureFunction : public torch::autograd::Function<ExpertMixtureFunction> {
 public:
  // tables: down0, up0, down1, up1, ...
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const torch::Tensor& segment, const torch::Tensor& index, torch::TensorList tables) {
    std::vector<torch::Tensor> kept(tables.begin(), tables.end());
    const Problem p = Describe(x, w, segment, index, kept);
    auto grouped = c10::make_intrusive<SavedRowGroups>();
    grouped->groups = GroupByRow(p, RowCounts(kept));
    const RowGroups& g = grouped->groups;
    // a: the pre-activations in hit order (kept for backward). GELU runs over all of them at once,
    // by ATen's vectorised kernel (the reference layer's own); c = w·GELU(a) then takes its place.
    torch::Tensor a = torch::empty({p.M * p.J});
    float* ap = a.data_ptr<float>();
    ForEachRowChunk(g, [&](int64_t begin, int64_t end, int64_t) { ForwardDown(p, g, begin, end, ap); });
    torch::Tensor c = torch::gelu(a);
    float* cp = c.data_ptr<float>();
    torch::Tensor y = OverRowChunks(g, p.M, p.D, [&](int64_t begin, int64_t end, float* y_part) {
      for (int64_t h = HitsBegin(g, begin, end); h < HitsEnd(g, begin, end); ++h) cp[h] *= p.w[g.hits[h]];
      AddRowsToTokens(p, p.up, g, begin, end, cp, y_part);
    });
    ctx->save_for_backward({x, w, segment, index, a});
    ctx->saved_data["table_list"] = c10::List<torch::Tensor>(kept);
    ctx->saved_data["row_groups"] = c10::IValue::make_capsule(std::move(grouped));
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
    // The forward's grouping (a radix sort of every pair: 8 ms a step at 1M experts, serial) is
    // kept for backward rather than done again; it holds ~5% of the bytes the row gradients will.
    const auto grouped = c10::static_intrusive_pointer_cast<SavedRowGroups>(ctx->saved_data["row_groups"].toCapsule());
    const RowGroups& g = grouped->groups;
    const int64_t S = static_cast<int64_t>(tables.size() / 2);

    // Training segments' compacted row gradients: one row per group of the segment.
    RowGradientsOut out{std::vector<float*>(S, nullptr), std::vector<float*>(S, nullptr)};
    std::vector<torch::Tensor> gd(S), gu(S);
    for (int64_t s = 0; s < S; ++s) {
      if (!ctx->needs_input_grad(4 + 2 * s) && !ctx->needs_input_grad(5 + 2 * s)) continue;
      const int64_t R = g.first_group[s + 1] - g.first_group[s];
      gd[s] = GradientBuffers().Take(tables[2 * s], R, p.D);
      gu[s] = GradientBuffers().Take(tables[2 * s + 1], R, p.D);
      out.gd[s] = gd[s].data_ptr<float>();
      out.gu[s] = gu[s].data_ptr<float>();
    }
    torch::Tensor gw = torch::empty({p.M, p.J});
    // Per pair, in hit order: GELU(a) and GELU'(a) (ATen's vectorised kernels, as in forward); w and
    // c = w·GELU(a) gathered per chunk; GELU'(a) becomes ∂a in the first pass.
    const torch::Tensor act = torch::gelu(a);
    torch::Tensor ga = at::gelu_backward(torch::ones_like(a), a);
    const int64_t MJ = p.M * p.J;
    const auto c = std::make_unique_for_overwrite<float[]>(MJ), wh = std::make_unique_for_overwrite<float[]>(MJ);
    const float* actp = act.data_ptr<float>();
    float* gap = ga.data_ptr<float>();
    torch::Tensor gx = OverRowChunks(g, p.M, p.D, [&](int64_t begin, int64_t end, float* gx_part) {
      for (int64_t h = HitsBegin(g, begin, end); h < HitsEnd(g, begin, end); ++h) {
        wh[h] = p.w[g.hits[h]];
        c[h] = wh[h] * actp[h];
      }
      BackwardUp(p, g, begin, end, gy.data_ptr<float>(), out, PairValues{c.get(), actp, wh.get(), gap},
                 gw.data_ptr<float>());
      AddRowsToTokens(p, p.down, g, begin, end, gap, gx_part, &out.gd, p.x);
    });

    variable_list grads = {gx, gw, torch::Tensor(), torch::Tensor()};
    for (int64_t s = 0; s < S; ++s) {
      if (!gd[s].defined()) {
        grads.push_back(torch::Tensor());
        grads.push_back(torch::Tensor());
        continue;
      }
      const torch::Tensor &down = tables[2 * s], &up = tables[2 * s + 1];
      const int64_t R = g.first_group[s + 1] - g.first_group[s], N = down.size(0);
      // Sparse COO [N, D]: one entry per distinct row, indices ascending — coalesced by construction.
      // Each gradient gets its own indices: autograd stores a sparse gradient without copying it
      // only when nothing else holds its indices and values.
      auto sparse = [&](const torch::Tensor& values, const torch::Tensor& like) {
        torch::Tensor ids = torch::empty({1, R}, torch::kLong);
        int64_t* ip = ids.data_ptr<int64_t>();
        for (int64_t r = 0; r < R; ++r) ip[r] = g.groups[g.first_group[s] + r].row;
        return at::_sparse_coo_tensor_unsafe(ids, values.to(like.scalar_type()), {N, p.D})._coalesced_(true);
      };
      grads.push_back(sparse(gd[s], down));
      grads.push_back(sparse(gu[s], up));
    }
    return grads;
  }
};

}  // namespace

torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables) {
  std::vector<torch::Tensor> flat;
  for (const ExpertTable& t : tables) {
    flat.push_back(t.down);
    flat.push_back(t.up);
  }
  return ExpertMixtureFunction::apply(x.contiguous(), w.contiguous(), segment.contiguous(), index.contiguous(),
                                      torch::TensorList(flat));
}

}  // namespace peerd::kernels::cpu
