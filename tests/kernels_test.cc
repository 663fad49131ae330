// The fused CPU kernels (kernels/) compute the same function as the reference LibTorch
// composition — forward and every gradient — on fresh random inputs, several shapes, several
// segments, training and frozen (fp32 and bf16) tables; retrieval finds the brute-force top-k;
// the row-wise AdamW update equals dense AdamW on the rows it touches and touches no other.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>

#include "core/adamw.h"
#include "core/peer_layer.h"
#include "kernels/cpu/blas_threads.h"
#include "kernels/cpu/packed_gemm.h"
#include "kernels/cpu/row_topk.h"
#include "kernels/expert_mixture.h"
#include "kernels/linear.h"
#include "kernels/product_key_retrieval.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

struct Shape {
  int64_t M, D, J;
  std::vector<int64_t> rows;            // experts per segment
  std::vector<torch::ScalarType> kind;  // kFloat training, kDouble = fp32 frozen, kBFloat16 frozen
};

// The reference: gather the rows, then the same sums with LibTorch ops (autograd does the rest).
torch::Tensor Reference(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& seg,
                        const torch::Tensor& idx, const std::vector<kernels::ExpertTable>& tables) {
  const int64_t M = x.size(0), J = w.size(1), D = x.size(1);
  torch::Tensor u = torch::zeros({M * J, D}), v = torch::zeros({M * J, D});
  for (size_t s = 0; s < tables.size(); ++s) {
    torch::Tensor mask = (seg.reshape(-1) == static_cast<int64_t>(s)).unsqueeze(1).to(torch::kFloat);
    torch::Tensor i = idx.reshape(-1).clamp_max(tables[s].down.size(0) - 1);
    u = u + mask * tables[s].down.index_select(0, i).to(torch::kFloat);
    v = v + mask * tables[s].up.index_select(0, i).to(torch::kFloat);
  }
  torch::Tensor a = torch::bmm(u.view({M, J, D}), x.unsqueeze(2)).view({M, 1, J});
  return torch::bmm(torch::gelu(a) * w.view({M, 1, J}), v.view({M, J, D})).view({M, D});
}

torch::Tensor Dense(const torch::Tensor& t) { return t.is_sparse() ? t.to_dense() : t; }

// Distinct values of an int64 tensor, ascending.
torch::Tensor Distinct(const torch::Tensor& t) { return std::get<0>(at::_unique2(t.reshape(-1), true)); }

class ExpertMixture : public ::testing::TestWithParam<Shape> {};

TEST_P(ExpertMixture, MatchesTheReferenceForwardAndEveryGradient) {
  const Shape& sh = GetParam();
  std::random_device rd;  // fresh inputs every run; the seed is printed on failure
  const uint64_t seed = rd();
  torch::manual_seed(seed);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::vector<kernels::ExpertTable> tables;
  for (size_t s = 0; s < sh.rows.size(); ++s) {
    const bool training = sh.kind[s] == torch::kFloat;
    const auto dtype = sh.kind[s] == torch::kBFloat16 ? torch::kBFloat16 : torch::kFloat;
    torch::Tensor d = (torch::randn({sh.rows[s], sh.D}) / std::sqrt(sh.D)).to(dtype).set_requires_grad(training);
    torch::Tensor u = (torch::randn({sh.rows[s], sh.D}) / std::sqrt(sh.D)).to(dtype).set_requires_grad(training);
    tables.push_back({d, u});
  }
  torch::Tensor x = torch::randn({sh.M, sh.D}).set_requires_grad(true);
  torch::Tensor w = torch::softmax(torch::randn({sh.M, sh.J}), -1).detach().set_requires_grad(true);
  torch::Tensor seg = torch::randint(static_cast<int64_t>(tables.size()), {sh.M, sh.J});
  // Few rows per segment, so many tokens share rows and the gradient sums are exercised.
  torch::Tensor idx = torch::zeros({sh.M, sh.J}, torch::kLong);
  for (size_t s = 0; s < tables.size(); ++s)
    idx = torch::where(seg == static_cast<int64_t>(s), torch::randint(sh.rows[s], {sh.M, sh.J}), idx);

  torch::Tensor y = kernels::ExpertMixture(x, w, seg, idx, tables);
  torch::Tensor y_ref = Reference(x, w, seg, idx, tables);
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-4, 1e-5)) << (y - y_ref).abs().max().item<float>();

  torch::Tensor gy = torch::randn({sh.M, sh.D});
  std::vector<torch::Tensor> inputs = {x, w};
  for (const auto& t : tables)
    if (t.down.requires_grad()) inputs.insert(inputs.end(), {t.down, t.up});
  auto fused = torch::autograd::grad({y}, inputs, {gy}, /*retain_graph=*/true);
  auto ref = torch::autograd::grad({y_ref}, inputs, {gy});
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(torch::allclose(Dense(fused[i]), ref[i], 1e-4, 1e-5))
        << "gradient " << i << " differs by " << (Dense(fused[i]) - ref[i]).abs().max().item<float>();
  // A table's gradient is sparse and holds exactly the rows its segment's tokens retrieved.
  for (size_t s = 0, i = 2; s < tables.size(); ++s) {
    if (!tables[s].down.requires_grad()) continue;
    torch::Tensor retrieved = Distinct(idx.masked_select(seg == static_cast<int64_t>(s)));
    for (size_t t = i; t < i + 2; ++t) {
      ASSERT_TRUE(fused[t].is_sparse()) << "gradient " << t;
      EXPECT_TRUE(torch::equal(fused[t]._indices()[0], retrieved)) << "gradient " << t << " rows";
    }
    i += 2;
  }
  // Deterministic: a second backward gives the same bits.
  auto again = torch::autograd::grad({y}, inputs, {gy});
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(torch::equal(Dense(fused[i]), Dense(again[i]))) << "gradient " << i;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ExpertMixture,
    ::testing::Values(Shape{1, 8, 4, {16}, {torch::kFloat}}, Shape{37, 32, 16, {64}, {torch::kFloat}},
                      Shape{64, 24, 8, {25, 49, 16}, {torch::kDouble, torch::kBFloat16, torch::kFloat}},
                      Shape{200, 64, 32, {1024, 256}, {torch::kBFloat16, torch::kFloat}},
                      Shape{50, 16, 12, {36, 36}, {torch::kDouble, torch::kDouble}},
                      // More rows in all than one 16-bit pass of the grouping's radix sort sorts
                      Shape{40, 16, 8, {9, 70000}, {torch::kFloat, torch::kFloat}}));

struct RetrievalShape {
  int64_t h, M, dk, k;
  std::vector<int64_t> n_keys;  // per segment
  std::vector<bool> training;   // sub-keys require a gradient
};

class Retrieval : public ::testing::TestWithParam<RetrievalShape> {};

// More segments than the CPU kernel scores in one pass (32), of varied sizes, the last training.
RetrievalShape ManySegments() {
  RetrievalShape sh{2, 45, 8, 4, {}, {}};
  for (int s = 0; s < 70; ++s) {
    sh.n_keys.push_back(4 + s % 5);
    sh.training.push_back(s == 69);
  }
  return sh;
}

// Fused retrieval returns the brute-force top-k over every expert of every segment (scores equal
// to q·key, best first), and its gradients equal autograd's through the same selected sums.
TEST_P(Retrieval, FindsTheBruteForceTopKAndMatchesTheReferenceGradients) {
  const RetrievalShape& sh = GetParam();
  std::random_device rd;
  const uint64_t seed = rd();
  torch::manual_seed(seed);
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int64_t half = sh.dk / 2;
  torch::Tensor q = torch::randn({sh.h, sh.M, sh.dk}).set_requires_grad(true);
  std::vector<torch::Tensor> keys;
  for (size_t s = 0; s < sh.n_keys.size(); ++s)
    keys.push_back(torch::randn({sh.h, 2, sh.n_keys[s], half}).set_requires_grad(sh.training[s]));
  kernels::RetrievedExperts r = kernels::ProductKeyRetrieval(q, keys, sh.k);
  ASSERT_EQ(r.scores.sizes(), (std::vector<int64_t>{sh.M, sh.h, sh.k}));

  // Brute force: every expert's full score, [h, M, Σ n_s²], and its k best.
  std::vector<torch::Tensor> full;
  for (const auto& kt : keys) {
    torch::Tensor s1 = torch::bmm(q.narrow(2, 0, half), kt.select(1, 0).transpose(1, 2));     // [h, M, n]
    torch::Tensor s2 = torch::bmm(q.narrow(2, half, half), kt.select(1, 1).transpose(1, 2));  // [h, M, n]
    full.push_back((s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2));
  }
  torch::Tensor all = torch::cat(full, -1).detach();                     // [h, M, Σ n²]
  torch::Tensor best = std::get<0>(all.topk(sh.k, -1)).transpose(0, 1);  // [M, h, k]
  EXPECT_TRUE(torch::allclose(r.scores, best, 1e-4, 1e-4)) << (r.scores - best).abs().max().item<float>();
  // Each returned (segment, index) really has the returned score.
  torch::Tensor offset = torch::zeros({(int64_t)keys.size()}, torch::kLong);
  for (size_t s = 1; s < keys.size(); ++s) offset[s] = offset[s - 1] + sh.n_keys[s - 1] * sh.n_keys[s - 1];
  torch::Tensor flat = (offset.index_select(0, r.segment.flatten()).view_as(r.segment) + r.index).transpose(0, 1);
  EXPECT_TRUE(torch::allclose(all.gather(-1, flat).transpose(0, 1), r.scores, 1e-4, 1e-4));
  EXPECT_TRUE((r.scores.slice(2, 1) <= r.scores.slice(2, 0, sh.k - 1)).all().item<bool>()) << "best first";

  // Gradients: the reference recomputes the selected scores from the same (segment, i, j).
  torch::Tensor g = torch::randn({sh.M, sh.h, sh.k});
  std::vector<torch::Tensor> inputs = {q};
  for (size_t s = 0; s < keys.size(); ++s)
    if (sh.training[s]) inputs.push_back(keys[s]);
  auto fused = torch::autograd::grad({r.scores}, inputs, {g});
  torch::Tensor ref_scores = torch::zeros({sh.h, sh.M, sh.k});
  torch::Tensor seg = r.segment.transpose(0, 1), idx = r.index.transpose(0, 1);  // [h, M, k]
  for (size_t s = 0; s < keys.size(); ++s) {
    const int64_t n = sh.n_keys[s];
    torch::Tensor mine = seg == static_cast<int64_t>(s);
    torch::Tensor i = torch::where(mine, idx.div(n, "floor"), torch::zeros_like(idx));
    torch::Tensor j = torch::where(mine, idx.remainder(n), torch::zeros_like(idx));
    auto pick = [&](int part, const torch::Tensor& row) {  // [h, M, k, dk/2]
      torch::Tensor table = keys[s].select(1, part);       // [h, n, dk/2]
      return table.unsqueeze(1)
          .expand({sh.h, sh.M, n, half})
          .gather(2, row.unsqueeze(-1).expand({sh.h, sh.M, sh.k, half}));
    };
    torch::Tensor sc = (pick(0, i) * q.narrow(2, 0, half).unsqueeze(2)).sum(-1) +
                       (pick(1, j) * q.narrow(2, half, half).unsqueeze(2)).sum(-1);
    ref_scores = ref_scores + mine.to(torch::kFloat) * sc;
  }
  auto ref = torch::autograd::grad({ref_scores.transpose(0, 1)}, inputs, {g});
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(torch::allclose(fused[i], ref[i], 1e-4, 1e-4))
        << "gradient " << i << " differs by " << (fused[i] - ref[i]).abs().max().item<float>();
}

INSTANTIATE_TEST_SUITE_P(Shapes, Retrieval,
                         ::testing::Values(RetrievalShape{1, 1, 4, 2, {2}, {true}},
                                           RetrievalShape{2, 33, 8, 4, {8}, {true}},
                                           RetrievalShape{4, 70, 16, 8, {12, 9, 16}, {false, false, true}},
                                           RetrievalShape{3, 50, 32, 16, {40, 16}, {false, true}},
                                           RetrievalShape{2, 129, 6, 3, {5, 5}, {false, false}},
                                           // More tokens than the scores' row block (256), not a multiple
                                           RetrievalShape{2, 600, 8, 4, {24, 10}, {true, false}}, ManySegments()));

// Scores that tie (sub-keys repeated: every row of scores holds three distinct values, so the
// top-k's candidates far outnumber k) and rows with fewer than k numbers (NaN queries) take the
// top-k's general path: the values must still be the brute-force k best, each (i, j) named once
// (a NaN query's experts are only required to exist).
TEST(Retrieval, TiedAndNaNScoresStillGiveTheKBestDistinctExperts) {
  const int64_t h = 2, M = 40, dk = 8, n = 256, k = 16;
  torch::manual_seed(7);
  torch::Tensor distinct = torch::randn({h, 2, 3, dk / 2});
  torch::Tensor keys = distinct.index_select(2, torch::arange(n) % 3).contiguous();  // [h, 2, n, dk/2]
  torch::Tensor q = torch::randn({h, M, dk});
  q[0][5].fill_(std::numeric_limits<float>::quiet_NaN());  // one token of head 0: no numbers at all
  kernels::RetrievedExperts r = kernels::ProductKeyRetrieval(q, {keys}, k);

  torch::Tensor s1 = torch::bmm(q.narrow(2, 0, dk / 2), keys.select(1, 0).transpose(1, 2));
  torch::Tensor s2 = torch::bmm(q.narrow(2, dk / 2, dk / 2), keys.select(1, 1).transpose(1, 2));
  torch::Tensor all = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2);                // [h, M, n²]
  torch::Tensor best = std::get<0>(all.nan_to_num(-1e30).topk(k, -1)).transpose(0, 1);  // [M, h, k]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t hh = 0; hh < h; ++hh) {
      std::set<int64_t> seen;
      for (int64_t j = 0; j < k; ++j) seen.insert(r.index[m][hh][j].item<int64_t>());
      EXPECT_TRUE(*seen.begin() >= 0 && *seen.rbegin() < n * n) << "token " << m << " head " << hh;
      if (m == 5 && hh == 0) continue;  // NaN scores: which experts come back is not defined
      EXPECT_EQ(static_cast<int64_t>(seen.size()), k) << "token " << m << " head " << hh << " repeats an expert";
      EXPECT_TRUE(torch::allclose(r.scores[m][hh], best[m][hh], 1e-4, 1e-4)) << "token " << m << " head " << hh;
    }
}

// The whole layer: the same pool (a bf16-frozen, an fp32-frozen and a training segment) computed
// with each implementation gives the same output and the same gradients.
TEST(PeerLayerFused, SameOutputAndGradientsAsTheReferenceLayer) {
  std::random_device rd;
  const uint64_t seed = rd();
  SCOPED_TRACE("seed " + std::to_string(seed));
  auto build = [&](PeerImpl impl) {
    torch::manual_seed(seed);
    PeerConfig c = testing::SmallPeer(/*n_keys=*/8, /*heads=*/2, /*topk=*/4, /*query_dim=*/8);
    c.set_impl(impl);
    PeerLayer layer(16, c);
    EXPECT_TRUE(layer->AddSegment(6).ok());
    EXPECT_TRUE(layer->AddSegment(8).ok());
    EXPECT_TRUE(layer->FreezeSegment(0, torch::kBFloat16).ok());
    EXPECT_TRUE(layer->FreezeSegment(1).ok());
    return layer;
  };
  PeerLayer ref = build(PEER_IMPL_REFERENCE), fused = build(PEER_IMPL_FUSED);
  torch::manual_seed(seed + 1);
  torch::Tensor x = torch::randn({3, 20, 16});
  torch::Tensor xr = x.clone().requires_grad_(true), xf = x.clone().requires_grad_(true);
  ASSERT_TRUE(fused->UsesFusedKernel(x.view({-1, 16})));
  ASSERT_FALSE(ref->UsesFusedKernel(x.view({-1, 16})));
  torch::Tensor yr = ref->forward(xr), yf = fused->forward(xf);
  EXPECT_TRUE(torch::allclose(yf, yr, 1e-4, 1e-5)) << (yf - yr).abs().max().item<float>();
  torch::Tensor gy = torch::randn_like(yr);
  yr.backward(gy);
  yf.backward(gy);
  EXPECT_TRUE(torch::allclose(xf.grad(), xr.grad(), 1e-4, 1e-5));
  auto pr = ref->named_parameters(), pf = fused->named_parameters();
  int compared = 0;
  for (const auto& item : pr) {
    if (!item.value().requires_grad()) continue;
    const torch::Tensor& gr = item.value().grad();
    const torch::Tensor& gf = pf[item.key()].grad();
    ASSERT_TRUE(gr.defined() && gf.defined()) << item.key();
    EXPECT_TRUE(torch::allclose(Dense(gf), gr, 1e-4, 1e-5))
        << item.key() << " differs by " << (Dense(gf) - gr).abs().max().item<float>();
    ++compared;
  }
  EXPECT_GE(compared, 6);  // query projection, norm affine, training sub-keys, down, up
}

// A segment whose rows sit behind a cache gives the fused layer the same output and gradients as
// the same rows held in memory, and each distinct retrieved row is fetched once per forward.
class TableRowSource : public ExpertRowSource {
 public:
  TableRowSource(torch::Tensor down, torch::Tensor up) : down_(std::move(down)), up_(std::move(up)) {}
  Status Fetch(const int64_t* experts, int64_t n, float* down, float* up) override {
    const int64_t D = down_.size(1);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(down + i * D, down_[experts[i]].data_ptr<float>(), D * sizeof(float));
      std::memcpy(up + i * D, up_[experts[i]].data_ptr<float>(), D * sizeof(float));
    }
    fetched += n;
    return Status::OK();
  }
  int64_t fetched = 0;

 private:
  torch::Tensor down_, up_;
};

TEST(PeerLayerFused, CachedSegmentMatchesTheSameRowsHeldInMemory) {
  std::random_device rd;
  const uint64_t seed = rd();
  SCOPED_TRACE("seed " + std::to_string(seed));
  torch::manual_seed(seed);
  const int64_t D = 16, n = 10;
  PeerConfig c = testing::SmallPeer(/*n_keys=*/8, /*heads=*/2, /*topk=*/4, /*query_dim=*/8);
  c.set_impl(PEER_IMPL_FUSED);
  torch::Tensor keys = torch::randn({2, 2, n, 4}), down = torch::randn({n * n, D}) / 4,
                up = torch::randn({n * n, D}) / 4;
  auto source = std::make_shared<TableRowSource>(down, up);
  auto build = [&](bool cached) {
    torch::manual_seed(seed);
    PeerLayer layer(D, c);
    ExpertSegment frozen =
        cached ? ExpertSegment(1, keys.clone(), D, source) : ExpertSegment(1, keys.clone(), down.clone(), up.clone());
    EXPECT_TRUE(layer->InsertFrozenSegment(frozen).ok());
    return layer;
  };
  PeerLayer resident = build(false), cached = build(true);
  ASSERT_FALSE(cached->segments()[1]->resident());
  torch::Tensor x = torch::randn({2, 30, D});
  torch::Tensor xr = x.clone().requires_grad_(true), xc = x.clone().requires_grad_(true);
  cached->StartUsageRecording();
  torch::Tensor yr = resident->forward(xr), yc = cached->forward(xc);
  EXPECT_TRUE(torch::equal(yc, yr)) << (yc - yr).abs().max().item<float>();
  EXPECT_EQ(source->fetched, (cached->UsageCounts(1) > 0).sum().item<int64_t>()) << "each distinct row once";
  EXPECT_GT(source->fetched, 0);
  torch::Tensor gy = torch::randn_like(yr);
  yr.backward(gy);
  yc.backward(gy);
  EXPECT_TRUE(torch::equal(xc.grad(), xr.grad()));
  EXPECT_TRUE(torch::equal(cached->query_proj->weight.grad(), resident->query_proj->weight.grad()));
  EXPECT_TRUE(torch::equal(Dense(cached->segments()[0]->down.grad()), Dense(resident->segments()[0]->down.grad())));
}

// The row-wise update (lazy AdamW) against the formula applied by hand to each touched row, over
// steps that touch different rows, none, and the same row twice (a gradient that needs coalescing).
TEST(AdamWRows, SparseStepsUpdateExactlyTheirRowsAsAdamWWould) {
  std::random_device rd;
  const uint64_t seed = rd();
  SCOPED_TRACE("seed " + std::to_string(seed));
  torch::manual_seed(seed);
  const int64_t N = 40, D = 8;
  torch::Tensor p = torch::randn({N, D}), start = p.clone();
  AdamW::Options o;
  o.weight_decay = 0.1;
  AdamW opt(o);
  opt.SetParameters({{p, /*decay=*/true, /*lr_scale=*/0.5}});
  const double lr = 0.01, plr = lr * 0.5;
  torch::Tensor ref = p.clone(), m = torch::zeros({N, D}), v = torch::zeros({N, D});
  const std::vector<std::vector<int64_t>> steps = {{0, 3, 7}, {3, 4, 39}, {}, {9, 2, 9}, {7}};
  for (size_t t = 0; t < steps.size(); ++t) {
    const int64_t R = static_cast<int64_t>(steps[t].size());
    torch::Tensor rows = torch::tensor(steps[t], torch::kLong).view({R});
    torch::Tensor values = torch::randn({R, D});
    p.mutable_grad() = at::_sparse_coo_tensor_unsafe(rows.unsqueeze(0), values, {N, D});
    opt.Step(lr);
    const double bc1 = 1 - std::pow(o.beta1, t + 1), bc2 = 1 - std::pow(o.beta2, t + 1);
    torch::Tensor g = torch::zeros({N, D}).index_add_(0, rows, values);
    for (int64_t e : std::set<int64_t>(steps[t].begin(), steps[t].end())) {
      m[e] = o.beta1 * m[e] + (1 - o.beta1) * g[e];
      v[e] = o.beta2 * v[e] + (1 - o.beta2) * g[e] * g[e];
      ref[e] = ref[e] * (1 - plr * o.weight_decay) - plr / bc1 * m[e] / ((v[e] / bc2).sqrt() + o.eps);
    }
  }
  EXPECT_TRUE(torch::allclose(p, ref, 1e-5, 1e-6)) << (p - ref).abs().max().item<float>();
  const std::set<int64_t> touched = {0, 2, 3, 4, 7, 9, 39};
  for (int64_t e = 0; e < N; ++e)
    if (!touched.count(e)) {
      EXPECT_TRUE(torch::equal(p[e], start[e])) << "row " << e << " was never retrieved";
    }
  EXPECT_TRUE(torch::equal(opt.StateOf(p).m[5], torch::zeros({D})));
}

TEST(AdamWRows, ClipGradNormScalesSparseAndDenseGradientsTogether) {
  torch::Tensor dense = torch::zeros({5}), table = torch::zeros({6, 2});
  AdamW opt({});
  opt.SetParameters({{dense}, {table}});
  dense.mutable_grad() = torch::full({5}, 3.0);  // |g|² = 45
  table.mutable_grad() =
      at::_sparse_coo_tensor_unsafe(torch::tensor({{1, 4}}), torch::full({2, 2}, 4.0), {6, 2});  // 64
  EXPECT_NEAR(opt.ClipGradNorm(1.0), std::sqrt(109.0), 1e-9);
  const double after =
      std::sqrt(dense.grad().square().sum().item<double>() + table.grad()._values().square().sum().item<double>());
  EXPECT_NEAR(after, 1.0, 1e-5);
  EXPECT_NEAR(opt.ClipGradNorm(INFINITY), after, 1e-6) << "infinity only measures";
}

// The retrieval's GEMMs run inside parallel tasks with one BLAS thread each; scopes nest (and may
// overlap on several threads), and the last to leave puts back the count the first one found —
// or one set meanwhile.
TEST(SingleThreadedBlas, NestedScopesUseOneThreadAndRestoreTheCountTheyFoundOrWereGiven) {
  using kernels::cpu::BlasThreads;
  using kernels::cpu::SetBlasThreads;
  if (BlasThreads() == 0) GTEST_SKIP() << "libblas.so.3 is not OpenBLAS here: there are no BLAS threads to set";
  const int before = BlasThreads();
  SetBlasThreads(2);
  {
    kernels::cpu::SingleThreadedBlas outer;
    EXPECT_EQ(BlasThreads(), 1);
    {
      kernels::cpu::SingleThreadedBlas inner;
      EXPECT_EQ(BlasThreads(), 1);
    }
    EXPECT_EQ(BlasThreads(), 1) << "the inner scope must not restore while the outer one is alive";
    SetBlasThreads(3);  // as SetComputeThreads would, meanwhile
    EXPECT_EQ(BlasThreads(), 1) << "a count set inside a scope waits for the scope to end";
  }
  EXPECT_EQ(BlasThreads(), 3);
  SetBlasThreads(before);
}

// The retrieval's top-k against a sort, on rows of fresh random scores: widths around the
// AVX-512 path's 16 lanes, k up to 16 (that path) and past it (the general one), rows drawn from a
// handful of values (ties: more candidates than the fast path takes), rows with +inf, and rows
// with NaN, some with fewer than k numbers.
TEST(TopKRows, SameAsASortForRandomTiedInfiniteAndNaNRows) {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  kernels::cpu::TopKScratch scratch;
  for (const int64_t n : {1, 5, 16, 17, 40, 256, 1000}) {
    for (const int64_t k : {1, 3, 16, 20}) {
      if (k > n) continue;
      const int64_t rows = 24;
      std::vector<float> scores(rows * n);
      for (int64_t m = 0; m < rows; ++m) {
        for (int64_t i = 0; i < n; ++i) {
          float& v = scores[m * n + i];
          v = normal(rng);
          if (m % 4 == 1) v = std::round(v * 2) / 2;  // ties
          if (m % 4 == 2 && i % 7 == 3) v = inf;
          if (m % 4 == 3 && (m % 8 == 3 ? i % 2 == 0 : i >= 2)) v = nan;  // half NaN, or all but two
        }
      }
      std::vector<float> val(rows * k);
      std::vector<int64_t> ids(rows * k);
      kernels::cpu::TopKRows(scores.data(), n, k, 0, rows, val.data(), ids.data(), scratch);
      for (int64_t m = 0; m < rows; ++m) {
        // Numbers best first, ties to the lower index; then NaN places as -inf, lower index first.
        std::vector<std::pair<float, int64_t>> order;
        for (int64_t i = 0; i < n; ++i) order.emplace_back(scores[m * n + i], i);
        std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
          if (std::isnan(a.first) || std::isnan(b.first)) return !std::isnan(a.first) && std::isnan(b.first);
          return a.first > b.first;
        });
        for (int64_t j = 0; j < k; ++j) {
          const bool number = !std::isnan(order[j].first);
          const std::string where = "n " + std::to_string(n) + " k " + std::to_string(k) + " row " + std::to_string(m) +
                                    " place " + std::to_string(j);
          ASSERT_EQ(val[m * k + j], number ? order[j].first : -inf) << where;
          if (number) {
            ASSERT_EQ(ids[m * k + j], order[j].second) << where;
          }
        }
      }
    }
  }
}

// The AVX-512 GEMM against double-precision sums: row counts around its 8-row tile and 128-row
// block, column counts around its 32-column panel, depths around its 256-deep pass, A in place
// with strided rows and as a strided transpose, B packed from either layout, C overwritten and
// accumulated into — and nothing written past each row's N columns.
TEST(PackedGemm, EqualsExactSumsForEveryLayoutAndBlockRemainder) {
  if (!kernels::cpu::PackedMatrix::Available()) GTEST_SKIP() << "no AVX-512 here: callers use BLAS";
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  const float canary = 12345.f;
  for (const int64_t K : {1, 3, 128, 257, 600}) {
    for (const int64_t N : {1, 5, 31, 33, 100}) {
      for (const int64_t M : {1, 7, 8, 13, 130}) {
        for (const bool a_transposed : {false, true}) {
          for (const bool b_transposed : {false, true}) {
            for (const bool accumulate : {false, true}) {
              // A [M, K] inside a wider buffer (a gap of 3 per row or column); B [K, N] either
              // row-major or as a row-major [N, K] seen transposed; C rows 2 wider than N.
              const int64_t a_rs = a_transposed ? 1 : K + 3, a_cs = a_transposed ? M + 3 : 1;
              const int64_t b_ks = b_transposed ? 1 : N, b_ns = b_transposed ? K : 1, ldc = N + 2;
              std::vector<float> a(a_transposed ? K * (M + 3) : M * (K + 3)), b(K * N), c(M * ldc);
              for (float& v : a) v = normal(rng);
              for (float& v : b) v = normal(rng);
              for (float& v : c) v = normal(rng);
              const std::vector<float> c0 = c;
              for (int64_t m = 0; m < M; ++m) c[m * ldc + N] = c[m * ldc + N + 1] = canary;
              kernels::cpu::PackedMatrix packed;
              packed.Pack(b.data(), K, N, b_ks, b_ns);
              packed.Multiply(a.data(), a_rs, a_cs, M, c.data(), ldc, accumulate);
              for (int64_t m = 0; m < M; ++m) {
                for (int64_t n = 0; n < N; ++n) {
                  double exact = accumulate ? c0[m * ldc + n] : 0, scale = std::abs(exact);
                  for (int64_t k = 0; k < K; ++k) {
                    const double term = double(a[m * a_rs + k * a_cs]) * b[k * b_ks + n * b_ns];
                    exact += term;
                    scale += std::abs(term);
                  }
                  ASSERT_NEAR(c[m * ldc + n], exact, 1e-6 * scale + 1e-6)
                      << "K " << K << " N " << N << " M " << M << " A transposed " << a_transposed << " B transposed "
                      << b_transposed << " accumulate " << accumulate << " at [" << m << ", " << n << "]";
                }
                ASSERT_EQ(c[m * ldc + N], canary) << "wrote past row " << m << "'s N columns";
                ASSERT_EQ(c[m * ldc + N + 1], canary) << "wrote past row " << m << "'s N columns";
              }
            }
          }
        }
      }
    }
  }
}

// The query projection's kernel against ATen's linear: output and both gradients, with a batch
// dimension, shapes off every block size, and x as a non-contiguous view.
TEST(Linear, SameOutputAndGradientsAsATenLinear) {
  for (const auto& [rows, D, F] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {37, 50, 70}, {300, 260, 33}}) {
    torch::Tensor x0 = torch::randn({2, D, rows}).transpose(1, 2);  // [2, rows, D], not contiguous
    torch::Tensor w0 = torch::randn({F, D}), gy = torch::randn({2, rows, F});
    torch::Tensor x1 = x0.detach().clone().requires_grad_(true), w1 = w0.clone().requires_grad_(true);
    torch::Tensor x2 = x0.detach().clone().requires_grad_(true), w2 = w0.clone().requires_grad_(true);
    torch::Tensor y1 = kernels::Linear(x1, w1), y2 = at::linear(x2, w2);
    ASSERT_EQ(y1.sizes(), y2.sizes());
    (y1 * gy).sum().backward();
    (y2 * gy).sum().backward();
    const std::string shape = "rows " + std::to_string(rows) + " D " + std::to_string(D) + " F " + std::to_string(F);
    EXPECT_TRUE(torch::allclose(y1, y2, 1e-4, 1e-4)) << shape << ": output";
    EXPECT_TRUE(torch::allclose(x1.grad(), x2.grad(), 1e-4, 1e-4)) << shape << ": gradient of x";
    EXPECT_TRUE(torch::allclose(w1.grad(), w2.grad(), 1e-4, 1e-4)) << shape << ": gradient of the weight";
  }
}

}  // namespace
}  // namespace peerd
