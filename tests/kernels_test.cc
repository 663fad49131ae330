// The fused CPU expert mixture (kernels/) computes the same function as the reference LibTorch
// composition — forward and every gradient — on fresh random inputs, several shapes, several
// segments, training and frozen (fp32 and bf16) tables.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <random>

#include "core/peer_layer.h"
#include "kernels/expert_mixture.h"
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
    EXPECT_TRUE(torch::allclose(fused[i], ref[i], 1e-4, 1e-5))
        << "gradient " << i << " differs by " << (fused[i] - ref[i]).abs().max().item<float>();
  // Deterministic: a second backward gives the same bits.
  auto again = torch::autograd::grad({y}, inputs, {gy});
  for (size_t i = 0; i < inputs.size(); ++i) EXPECT_TRUE(torch::equal(fused[i], again[i])) << "gradient " << i;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ExpertMixture,
    ::testing::Values(Shape{1, 8, 4, {16}, {torch::kFloat}},
                      Shape{37, 32, 16, {64}, {torch::kFloat}},
                      Shape{64, 24, 8, {25, 49, 16}, {torch::kDouble, torch::kBFloat16, torch::kFloat}},
                      Shape{200, 64, 32, {1024, 256}, {torch::kBFloat16, torch::kFloat}},
                      Shape{50, 16, 12, {36, 36}, {torch::kDouble, torch::kDouble}}));

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
    EXPECT_TRUE(torch::allclose(gf, gr, 1e-4, 1e-5)) << item.key() << " differs by " << (gf - gr).abs().max().item<float>();
    ++compared;
  }
  EXPECT_GE(compared, 6);  // query projection, norm affine, training sub-keys, down, up
}

}  // namespace
}  // namespace peerd
