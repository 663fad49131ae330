// The CUDA kernels (kernels/cuda/) compute the same functions as the CPU kernels (kernels/cpu/):
// forward and every gradient, on fresh random inputs (the seed is printed on failure), several
// shapes, several segments, training and frozen (fp32 and bf16) tables. Each test skips itself
// where there is no CUDA device; a build without kernels/cuda has one skipped test saying so.
//
// Float results are compared by relative L2 error and by the largest elementwise error against
// the reference's largest entry: the two sides sum in different orders, nothing more.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/adamw_rows.h"
#include "kernels/expert_mixture.h"
#include "kernels/product_key_retrieval.h"
#ifdef PEERD_WITH_CUDA_KERNELS
#include "kernels/cuda/kernels_cuda.h"
#endif

namespace peerd {
namespace {

#ifdef PEERD_WITH_CUDA_KERNELS

using torch::indexing::Slice;

// A fresh seed for LibTorch's generator, returned so a failure can name it.
uint64_t FreshSeed() {
  std::random_device rd;
  const uint64_t seed = (static_cast<uint64_t>(rd()) << 32) | rd();
  torch::manual_seed(seed);
  return seed;
}

torch::Tensor Cuda(const torch::Tensor& t) { return t.detach().to(torch::kCUDA); }

// got (any device) against want (CPU); sparse tensors by their indices, then their values.
void ExpectClose(const torch::Tensor& got_any, const torch::Tensor& want, const std::string& what, double tol = 2e-5) {
  ASSERT_TRUE(got_any.defined() && want.defined()) << what;
  torch::Tensor got = got_any.detach().cpu(), ref = want.detach();
  if (ref.is_sparse()) {
    ASSERT_TRUE(got.is_sparse()) << what << ": expected a sparse gradient";
    EXPECT_TRUE(torch::equal(got._indices(), ref._indices())) << what << ": rows differ";
    got = got._values();
    ref = ref._values();
  }
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  got = got.to(torch::kDouble);
  ref = ref.to(torch::kDouble);
  EXPECT_FALSE(got.isnan().any().item<bool>()) << what << ": NaN";
  if (ref.numel() == 0) return;
  const double norm = ref.norm().item<double>(), top = ref.abs().max().item<double>();
  const double err = (got - ref).norm().item<double>(), worst = (got - ref).abs().max().item<double>();
  EXPECT_LE(err, tol * norm + 1e-12) << what << ": relative L2 error " << err / norm;
  EXPECT_LE(worst, 10 * tol * top + 1e-12) << what << ": largest error " << worst << " of " << top;
}

// ---- ExpertMixture -----------------------------------------------------------------------------

enum Kind { kTraining, kFrozenF32, kFrozenBf16 };

struct MixtureShape {
  int64_t M, D, J;
  std::vector<int64_t> rows;  // experts per segment
  std::vector<Kind> kind;
};

class CudaExpertMixture : public ::testing::TestWithParam<MixtureShape> {};

TEST_P(CudaExpertMixture, MatchesTheCpuKernelForwardAndEveryGradient) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const MixtureShape& sh = GetParam();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::vector<kernels::ExpertTable> cpu, gpu;
  for (size_t s = 0; s < sh.rows.size(); ++s) {
    const bool training = sh.kind[s] == kTraining;
    const auto dtype = sh.kind[s] == kFrozenBf16 ? torch::kBFloat16 : torch::kFloat;
    const torch::Tensor d = (torch::randn({sh.rows[s], sh.D}) / std::sqrt(sh.D)).to(dtype);
    const torch::Tensor u = (torch::randn({sh.rows[s], sh.D}) / std::sqrt(sh.D)).to(dtype);
    cpu.push_back({d.clone().requires_grad_(training), u.clone().requires_grad_(training)});
    gpu.push_back({Cuda(d).requires_grad_(training), Cuda(u).requires_grad_(training)});
  }
  const torch::Tensor x = torch::randn({sh.M, sh.D});
  const torch::Tensor w = torch::softmax(torch::randn({sh.M, sh.J}), -1);
  const torch::Tensor seg = torch::randint(static_cast<int64_t>(sh.rows.size()), {sh.M, sh.J}, torch::kLong);
  // Few rows per segment, so many tokens share rows and the row sums are exercised.
  torch::Tensor idx = torch::zeros({sh.M, sh.J}, torch::kLong);
  for (size_t s = 0; s < sh.rows.size(); ++s)
    idx = torch::where(seg == static_cast<int64_t>(s), torch::randint(sh.rows[s], {sh.M, sh.J}, torch::kLong), idx);

  const torch::Tensor xc = x.clone().requires_grad_(true), wc = w.clone().requires_grad_(true);
  const torch::Tensor xg = Cuda(x).requires_grad_(true), wg = Cuda(w).requires_grad_(true);
  const torch::Tensor yc = kernels::ExpertMixture(xc, wc, seg, idx, cpu);
  const torch::Tensor yg = kernels::cuda::ExpertMixture(xg, wg, Cuda(seg), Cuda(idx), gpu);
  ASSERT_TRUE(yg.is_cuda());
  ExpectClose(yg, yc, "y");

  const torch::Tensor gy = torch::randn({sh.M, sh.D});
  std::vector<torch::Tensor> in_c = {xc, wc}, in_g = {xg, wg};
  for (size_t s = 0; s < cpu.size(); ++s) {
    if (sh.kind[s] != kTraining) continue;
    in_c.insert(in_c.end(), {cpu[s].down, cpu[s].up});
    in_g.insert(in_g.end(), {gpu[s].down, gpu[s].up});
  }
  const auto want = torch::autograd::grad({yc}, in_c, {gy});
  const auto got = torch::autograd::grad({yg}, in_g, {Cuda(gy)}, /*retain_graph=*/true);
  const char* names[] = {"gx", "gw"};
  for (size_t i = 0; i < in_c.size(); ++i)
    ExpectClose(got[i], want[i], i < 2 ? names[i] : "table gradient " + std::to_string(i - 2));
  // No atomics in the mixture: a second backward gives the same bits.
  const auto again = torch::autograd::grad({yg}, in_g, {Cuda(gy)});
  for (size_t i = 0; i < in_g.size(); ++i) {
    const bool sparse = got[i].is_sparse();
    EXPECT_TRUE(torch::equal(sparse ? got[i]._values() : got[i], sparse ? again[i]._values() : again[i]))
        << "gradient " << i << " changed between runs";
  }
}

INSTANTIATE_TEST_SUITE_P(
    KernelsCuda, CudaExpertMixture,
    ::testing::Values(MixtureShape{1, 8, 4, {16}, {kTraining}}, MixtureShape{37, 32, 16, {64}, {kTraining}},
                      MixtureShape{64, 24, 8, {25, 49, 16}, {kFrozenF32, kFrozenBf16, kTraining}},
                      MixtureShape{200, 64, 32, {1024, 256}, {kFrozenBf16, kTraining}},
                      MixtureShape{50, 16, 12, {36, 36}, {kFrozenF32, kFrozenF32}},
                      MixtureShape{300, 200, 128, {4096, 64}, {kTraining, kFrozenBf16}},  // D not a multiple of 32
                      MixtureShape{129, 1000, 64, {512}, {kTraining}},                    // D over a block's threads
                      MixtureShape{2048, 256, 128, {65536, 1024}, {kFrozenBf16, kTraining}}));  // h·k = 8·16

// ---- ProductKeyRetrieval ------------------------------------------------------------------------

struct RetrievalShape {
  int64_t h, M, dk, k;
  std::vector<int64_t> n;      // sub-keys per half, per segment
  std::vector<bool> training;  // whose sub-keys get a gradient
};

struct RetrievalInputs {
  torch::Tensor query;              // [h, M, dk]
  std::vector<torch::Tensor> keys;  // [h, 2, n, dk/2] each
};

// Inputs whose scores are exact in fp32 whatever the summation order, and all distinct, so the
// CPU and the GPU must select the same experts in the same order. Entries are multiples of 1/4 in
// [−1, 1] (products are multiples of 1/16), except each half's last coordinate: the query has 1
// there, and sub-keys carry a distinct multiple of eps < 1/16 — segment s, first-half row i:
// (s·n² + i·n)·eps; second-half row j: j·eps — which separates every two candidates.
RetrievalInputs ExactRetrievalInputs(const RetrievalShape& sh) {
  const int64_t half = sh.dk / 2, S = static_cast<int64_t>(sh.n.size());
  const int64_t n_max = *std::max_element(sh.n.begin(), sh.n.end());
  const int eps_bits = 4 + static_cast<int>(std::ceil(std::log2(static_cast<double>(S * n_max * n_max))));
  const int score_bits = static_cast<int>(std::ceil(std::log2(2.0 * (half - 1) + 1)));
  EXPECT_LE(score_bits + eps_bits, 24) << "shape too large for exact fp32 scores";
  const double eps = std::ldexp(1.0, -eps_bits);
  RetrievalInputs in;
  in.query = torch::randint(-4, 5, {sh.h, sh.M, sh.dk}, torch::kLong).to(torch::kFloat) / 4;
  in.query.index_put_({Slice(), Slice(), half - 1}, 1.0);
  in.query.index_put_({Slice(), Slice(), sh.dk - 1}, 1.0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = sh.n[s];
    torch::Tensor keys = torch::randint(-4, 5, {sh.h, 2, n, half}, torch::kLong).to(torch::kFloat) / 4;
    const torch::Tensor rows = torch::arange(n, torch::kDouble);
    keys.index_put_({Slice(), 0, Slice(), half - 1}, ((s * n_max * n_max + rows * n_max) * eps).to(torch::kFloat));
    keys.index_put_({Slice(), 1, Slice(), half - 1}, (rows * eps).to(torch::kFloat));
    in.keys.push_back(keys);
  }
  return in;
}

RetrievalInputs GaussianRetrievalInputs(const RetrievalShape& sh) {
  RetrievalInputs in;
  in.query = torch::randn({sh.h, sh.M, sh.dk});
  for (int64_t n : sh.n) in.keys.push_back(torch::randn({sh.h, 2, n, sh.dk / 2}));
  return in;
}

// One side's retrieval and its gradients, with the inputs on `device`.
struct RetrievalRun {
  kernels::RetrievedExperts out;
  std::vector<torch::Tensor> grads;  // query, then each training segment's sub-keys
};

RetrievalRun RunRetrieval(const RetrievalShape& sh, const RetrievalInputs& in, const torch::Tensor& g, bool on_gpu) {
  auto place = [&](const torch::Tensor& t) { return on_gpu ? Cuda(t) : t.clone(); };
  std::vector<torch::Tensor> inputs = {place(in.query).requires_grad_(true)}, keys;
  for (size_t s = 0; s < in.keys.size(); ++s) {
    keys.push_back(place(in.keys[s]).requires_grad_(sh.training[s]));
    if (sh.training[s]) inputs.push_back(keys.back());
  }
  RetrievalRun r;
  r.out = on_gpu ? kernels::cuda::ProductKeyRetrieval(inputs[0], keys, sh.k)
                 : kernels::ProductKeyRetrieval(inputs[0], keys, sh.k);
  r.grads = torch::autograd::grad({r.out.scores}, inputs, {place(g)});
  return r;
}

// The scores of the experts `segment`/`index` [M, h, k] name, recomputed in double from the
// sub-keys with autograd: the reference for the gradients of any selection.
torch::Tensor ScoresOf(const torch::Tensor& query, const std::vector<torch::Tensor>& keys, const torch::Tensor& segment,
                       const torch::Tensor& index) {
  const int64_t h = query.size(0), half = query.size(2) / 2;
  const torch::Tensor q = query.permute({1, 0, 2});  // [M, h, dk]
  const torch::Tensor head = torch::arange(h).view({1, h, 1}).expand_as(index);
  torch::Tensor scores = torch::zeros(index.sizes(), query.options());
  for (size_t s = 0; s < keys.size(); ++s) {
    const int64_t n = keys[s].size(2);
    // Slots of other segments may index past this one's rows: clamped, then masked out below.
    const torch::Tensor i = index.div(n, "floor").clamp_max(n - 1), j = index.remainder(n);
    const torch::Tensor k1 = keys[s].select(1, 0).index({head, i}), k2 = keys[s].select(1, 1).index({head, j});
    const torch::Tensor full = (k1 * q.slice(2, 0, half).unsqueeze(2)).sum(-1) +
                               (k2 * q.slice(2, half, 2 * half).unsqueeze(2)).sum(-1);  // [M, h, k]
    scores = torch::where(segment == static_cast<int64_t>(s), full, scores);
  }
  return scores;
}

class CudaRetrievalExact : public ::testing::TestWithParam<RetrievalShape> {};

// Exact, distinct scores: the same experts, the same scores to the bit, gradients to rounding.
TEST_P(CudaRetrievalExact, SelectsWhatTheCpuKernelSelects) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const RetrievalShape& sh = GetParam();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const RetrievalInputs in = ExactRetrievalInputs(sh);
  const torch::Tensor g = torch::randn({sh.M, sh.h, sh.k});
  const RetrievalRun cpu = RunRetrieval(sh, in, g, false), gpu = RunRetrieval(sh, in, g, true);
  ASSERT_TRUE(gpu.out.scores.is_cuda());
  EXPECT_TRUE(torch::equal(gpu.out.segment.cpu(), cpu.out.segment)) << "segments differ";
  EXPECT_TRUE(torch::equal(gpu.out.index.cpu(), cpu.out.index)) << "indices differ";
  EXPECT_TRUE(torch::equal(gpu.out.scores.detach().cpu(), cpu.out.scores.detach())) << "scores differ";
  ASSERT_EQ(gpu.grads.size(), cpu.grads.size());
  for (size_t i = 0; i < cpu.grads.size(); ++i)
    ExpectClose(gpu.grads[i], cpu.grads[i], i == 0 ? "query gradient" : "sub-key gradient " + std::to_string(i));
}

INSTANTIATE_TEST_SUITE_P(KernelsCuda, CudaRetrievalExact,
                         ::testing::Values(RetrievalShape{1, 5, 8, 4, {4}, {true}},
                                           RetrievalShape{2, 17, 16, 5, {8, 6}, {true, false}},  // k not a power of two
                                           RetrievalShape{4, 33, 16, 8, {16, 32}, {false, true}},
                                           RetrievalShape{2, 64, 32, 16, {64, 32, 16}, {false, false, true}},
                                           RetrievalShape{8, 200, 16, 16, {128, 64}, {false, true}},
                                           RetrievalShape{
                                               3, 40, 64, 32, {64, 32}, {true, true}}));  // k = 32: the widest lists

// Exact ties everywhere (entries in {-1, 0, 1}: every score and sum is exact in fp32) and one
// NaN query row: the CPU's tie order — the lower column within a half's top-k; segment, then
// first-half rank, then second-half rank in the merge — and its NaN rules (a NaN sum never
// enters; an empty slot reads −inf, segment 0, index 0) must come out of the GPU as well.
TEST(KernelsCudaRetrievalTies, TiesAndANaNQuerySelectWhatTheCpuKernelSelects) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const RetrievalShape sh{2, 24, 8, 8, {16, 16}, {true, false}};
  RetrievalInputs in;
  in.query = torch::randint(-1, 2, {sh.h, sh.M, sh.dk}).to(torch::kFloat);
  for (int64_t n : sh.n) in.keys.push_back(torch::randint(-1, 2, {sh.h, 2, n, sh.dk / 2}).to(torch::kFloat));
  in.query[1][5].fill_(std::numeric_limits<float>::quiet_NaN());
  const torch::Tensor g = torch::randn({sh.M, sh.h, sh.k});
  const RetrievalRun cpu = RunRetrieval(sh, in, g, false), gpu = RunRetrieval(sh, in, g, true);
  EXPECT_TRUE(torch::equal(gpu.out.segment.cpu(), cpu.out.segment)) << "segments differ";
  EXPECT_TRUE(torch::equal(gpu.out.index.cpu(), cpu.out.index)) << "indices differ";
  EXPECT_TRUE(torch::equal(gpu.out.scores.detach().cpu(), cpu.out.scores.detach())) << "scores differ";
}

// Few sub-keys and many tokens: each sub-key collects hundreds of contributions, the case where
// a sum's order shows in its last bits. Two backward passes must give the same bits, as on the CPU.
TEST(KernelsCudaRetrievalDeterminism, SubKeyGradientsAreTheSameBitsOnEveryRun) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const RetrievalShape sh{4, 2048, 32, 8, {8, 16}, {true, true}};
  const RetrievalInputs in = GaussianRetrievalInputs(sh);
  const torch::Tensor g = torch::randn({sh.M, sh.h, sh.k});
  const RetrievalRun first = RunRetrieval(sh, in, g, true), second = RunRetrieval(sh, in, g, true);
  ASSERT_EQ(first.grads.size(), 3u);
  for (size_t i = 0; i < first.grads.size(); ++i)
    EXPECT_TRUE(torch::equal(first.grads[i].cpu(), second.grads[i].cpu()))
        << "gradient " << i << " changed between runs";
}

class CudaRetrievalGaussian : public ::testing::TestWithParam<RetrievalShape> {};

// Continuous scores: near-ties may order differently on the two sides, so the checks are
// ones every valid answer passes — the k best scores agree with the CPU kernel's (sorted values
// move continuously with the inputs), each returned score is the score of the expert returned
// beside it, and the gradients are those of the returned selection.
TEST_P(CudaRetrievalGaussian, ReturnsTheBestScoresAndTheirGradients) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const RetrievalShape& sh = GetParam();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const RetrievalInputs in = GaussianRetrievalInputs(sh);
  const torch::Tensor g = torch::randn({sh.M, sh.h, sh.k});
  const RetrievalRun cpu = RunRetrieval(sh, in, g, false), gpu = RunRetrieval(sh, in, g, true);
  ExpectClose(gpu.out.scores, cpu.out.scores, "scores");
  const torch::Tensor picked_segment = gpu.out.segment.cpu(), picked_index = gpu.out.index.cpu();
  EXPECT_TRUE((picked_segment >= 0).all().item<bool>() &&
              (picked_segment < static_cast<int64_t>(sh.n.size())).all().item<bool>());

  std::vector<torch::Tensor> inputs = {in.query.to(torch::kDouble).requires_grad_(true)}, keys;
  for (size_t s = 0; s < in.keys.size(); ++s) {
    keys.push_back(in.keys[s].to(torch::kDouble).requires_grad_(sh.training[s]));
    if (sh.training[s]) inputs.push_back(keys.back());
  }
  const torch::Tensor ref = ScoresOf(inputs[0], keys, picked_segment, picked_index);
  ExpectClose(gpu.out.scores, ref, "scores of the returned experts");
  const auto want = torch::autograd::grad({ref}, inputs, {g.to(torch::kDouble)});
  for (size_t i = 0; i < want.size(); ++i)
    ExpectClose(gpu.grads[i], want[i], i == 0 ? "query gradient" : "sub-key gradient " + std::to_string(i));
}

INSTANTIATE_TEST_SUITE_P(KernelsCuda, CudaRetrievalGaussian,
                         ::testing::Values(RetrievalShape{8, 128, 32, 16, {64, 32}, {false, true}},
                                           RetrievalShape{4, 64, 128, 32, {128}, {true}},
                                           RetrievalShape{2, 300, 16, 8, {1024}, {true}},  // many candidates per lane
                                           RetrievalShape{8, 512, 128, 16, {256, 256, 256}, {false, false, true}}));

// ---- AdamWRows ----------------------------------------------------------------------------------

struct AdamWShape {
  int64_t N, D, R;
};

class CudaAdamWRows : public ::testing::TestWithParam<AdamWShape> {};

TEST_P(CudaAdamWRows, UpdatesTheSameRowsAsTheCpuKernelAndNoOthers) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const AdamWShape& sh = GetParam();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  torch::Tensor pc = torch::randn({sh.N, sh.D}), mc = torch::randn({sh.N, sh.D}) * 0.1,
                vc = torch::rand({sh.N, sh.D}) * 0.01;
  torch::Tensor pg = Cuda(pc), mg = Cuda(mc), vg = Cuda(vc);
  const torch::Tensor before = pc.clone();
  const torch::Tensor rows = std::get<0>(torch::randperm(sh.N).slice(0, 0, sh.R).sort());
  for (int t = 1; t <= 3; ++t) {
    const torch::Tensor grad = torch::randn({sh.R, sh.D});
    kernels::AdamWStep st;
    st.lr = 1e-2 * t;
    st.weight_decay = t == 2 ? 0.0 : 0.1;
    st.bias_correction1 = 1 - std::pow(st.beta1, t);
    st.bias_correction2 = 1 - std::pow(st.beta2, t);
    kernels::AdamWRows(pc, mc, vc, rows, grad, st);
    kernels::cuda::AdamWRows(pg, mg, vg, Cuda(rows), Cuda(grad), st);
  }
  ExpectClose(pg, pc, "param", 1e-6);
  ExpectClose(mg, mc, "m", 1e-6);
  ExpectClose(vg, vc, "v", 1e-6);
  torch::Tensor untouched = torch::ones({sh.N}, torch::kBool);
  untouched.index_put_({rows}, false);
  EXPECT_TRUE(torch::equal(pg.cpu().index({untouched}), before.index({untouched}))) << "a row without gradient moved";
}

INSTANTIATE_TEST_SUITE_P(KernelsCuda, CudaAdamWRows,
                         ::testing::Values(AdamWShape{1, 1, 1}, AdamWShape{100, 24, 37}, AdamWShape{64, 1000, 64},
                                           AdamWShape{5000, 256, 900}, AdamWShape{10, 8, 0}));

// ---- Wiring -------------------------------------------------------------------------------------

// The public functions send CUDA tensors to these kernels (kernels/cpu/*.cc, built with
// PEERD_WITH_CUDA_KERNELS), and the kernels refuse a current stream they are not ordered with.
TEST(KernelsCudaDispatch, PublicFunctionsRunCudaTensorsOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  FreshSeed();
  const torch::Tensor x = Cuda(torch::randn({16, 32})), w = Cuda(torch::rand({16, 8}));
  const torch::Tensor seg = Cuda(torch::zeros({16, 8}, torch::kLong));
  const torch::Tensor idx = Cuda(torch::randint(64, {16, 8}, torch::kLong));
  const std::vector<kernels::ExpertTable> tables = {{Cuda(torch::randn({64, 32})), Cuda(torch::randn({64, 32}))}};
  const torch::Tensor y = kernels::ExpertMixture(x, w, seg, idx, tables);
  EXPECT_TRUE(y.is_cuda());
  EXPECT_TRUE(torch::equal(y, kernels::cuda::ExpertMixture(x, w, seg, idx, tables)));

  const torch::Tensor query = Cuda(torch::randn({2, 16, 8}));
  const std::vector<torch::Tensor> keys = {Cuda(torch::randn({2, 2, 8, 4}))};
  const kernels::RetrievedExperts r = kernels::ProductKeyRetrieval(query, keys, 4);
  EXPECT_TRUE(r.scores.is_cuda() && r.index.is_cuda());
  EXPECT_TRUE(torch::equal(r.index, kernels::cuda::ProductKeyRetrieval(query, keys, 4).index));

  torch::Tensor p = Cuda(torch::randn({8, 4})), m = torch::zeros_like(p), v = torch::zeros_like(p);
  kernels::AdamWStep st;
  st.lr = 0.1;
  kernels::AdamWRows(p, m, v, Cuda(torch::arange(3)), Cuda(torch::ones({3, 4})), st);
  EXPECT_GT(m.abs().sum().item<float>(), 0) << "AdamWRows did not update CUDA rows";

  const c10::Device device = x.device();
  const c10::Stream side = c10::impl::getDeviceGuardImpl(device.type())->getStreamFromGlobalPool(device);
  const c10::StreamGuard on_side(side);
  EXPECT_THROW(kernels::cuda::ExpertMixture(x, w, seg, idx, tables), c10::Error);
}

#else  // !PEERD_WITH_CUDA_KERNELS

TEST(KernelsCuda, NotBuilt) { GTEST_SKIP() << "built without kernels/cuda (no CUDA compiler found)"; }

#endif

}  // namespace
}  // namespace peerd
