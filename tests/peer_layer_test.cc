// The PEER layer computes y(x) = Σ_heads Σ_top-k softmax(scores)·GELU(u_e·x)·v_e, and its
// gradients (through the router, the query network, the sub-keys and the expert rows) are right.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>

#include "core/peer_layer.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

// The layer's output written token by token from the definition, with brute-force retrieval.
torch::Tensor ExplicitPeer(PeerLayer& layer, const torch::Tensor& x) {
  const PeerConfig& c = layer->config();
  const int64_t h = c.heads(), k = c.topk(), dk = c.query_dim(), half = dk / 2;
  torch::Tensor q = layer->Query(x);  // [h, M, dk]
  torch::Tensor y = torch::zeros_like(x);
  for (int64_t m = 0; m < x.size(0); ++m) {
    for (int64_t head = 0; head < h; ++head) {
      // Every expert of every segment: score, u, v.
      std::vector<torch::Tensor> scores, downs, ups;
      for (const auto& seg : layer->segments()) {
        const int64_t n = seg->n_keys();
        torch::Tensor s1 = torch::mv(seg->sub_keys[head][0], q[head][m].narrow(0, 0, half));     // [n]
        torch::Tensor s2 = torch::mv(seg->sub_keys[head][1], q[head][m].narrow(0, half, half));  // [n]
        scores.push_back((s1.unsqueeze(1) + s2.unsqueeze(0)).reshape({n * n}));
        downs.push_back(seg->down);
        ups.push_back(seg->up);
      }
      auto [top, idx] = torch::cat(scores).topk(k);
      torch::Tensor w = torch::softmax(top, 0);
      torch::Tensor u = torch::cat(downs).index_select(0, idx), v = torch::cat(ups).index_select(0, idx);
      y[m] += torch::mv(v.t(), w * torch::gelu(torch::mv(u, x[m])));
    }
  }
  return y;
}

TEST(PeerLayer, ForwardEqualsTheDefinition) {
  torch::manual_seed(3);
  PeerLayer layer(12, testing::SmallPeer(6, 3, 4, 8));
  ASSERT_TRUE(layer->AddSegment(5).ok());
  layer->to(torch::kDouble);
  layer->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({9, 12}, torch::kDouble);
  torch::Tensor got = layer->forward(x), want = ExplicitPeer(layer, x);
  EXPECT_TRUE(torch::allclose(got, want, 1e-10, 1e-12)) << (got - want).abs().max().item<double>();
  // Leading dimensions are kept: [B, T, D] in, [B, T, D] out, token by token the same.
  torch::Tensor y3 = layer->forward(x.view({3, 3, 12}));
  EXPECT_EQ(y3.sizes(), (std::vector<int64_t>{3, 3, 12}));
  EXPECT_TRUE(torch::allclose(y3.view({9, 12}), got, 1e-12, 1e-12));
}

// Central differences on `count` entries of `param` (the ones with the largest analytic gradient
// plus random ones) against autograd, for the scalar loss(·).
void CheckGradient(const std::string& name, torch::Tensor param, const torch::Tensor& analytic,
                   const std::function<double()>& loss, int count = 12) {
  ASSERT_TRUE(analytic.defined()) << name << " has no gradient";
  torch::Tensor flat = param.detach().view(-1);  // shares storage with the parameter
  torch::Tensor grad = analytic.reshape(-1);
  std::vector<int64_t> picks;
  torch::Tensor top = std::get<1>(grad.abs().topk(std::min<int64_t>(count / 2, grad.numel())));
  for (int64_t i = 0; i < top.numel(); ++i) picks.push_back(top[i].item<int64_t>());
  auto rnd = torch::randint(grad.numel(), {count / 2});
  for (int64_t i = 0; i < rnd.numel(); ++i) picks.push_back(rnd[i].item<int64_t>());
  EXPECT_GT(grad.abs().max().item<double>(), 0) << name << ": gradient is identically zero";
  const double eps = 1e-6;
  for (int64_t i : picks) {
    const double orig = flat[i].item<double>();
    flat[i] = orig + eps;
    const double plus = loss();
    flat[i] = orig - eps;
    const double minus = loss();
    flat[i] = orig;
    const double numeric = (plus - minus) / (2 * eps), got = grad[i].item<double>();
    EXPECT_NEAR(got, numeric, 1e-6 + 1e-5 * std::abs(numeric)) << name << "[" << i << "]";
  }
}

void CheckLayerGradients(QueryNorm norm) {
  torch::manual_seed(11);
  PeerLayer layer(10, testing::SmallPeer(5, 2, 3, 6, norm));
  ASSERT_TRUE(layer->AddSegment(4).ok());
  layer->to(torch::kDouble);
  layer->train();
  // Batch-norm running statistics would move on every evaluation of the loss; keep the batch
  // statistics path (training mode) but stop the buffers moving, so each call sees the same layer.
  layer->set_norm_stats_frozen(norm != QUERY_NORM_BATCH);
  torch::Tensor x = torch::randn({8, 10}, torch::kDouble).requires_grad_(true);
  torch::Tensor r = torch::randn({8, 10}, torch::kDouble);
  auto running = [&] {
    if (layer->running_mean.defined()) return std::make_pair(layer->running_mean.clone(), layer->running_var.clone());
    return std::make_pair(torch::Tensor(), torch::Tensor());
  }();
  auto loss = [&] {
    torch::NoGradGuard no_grad;
    double v = (layer->forward(x) * r).sum().item<double>();
    if (running.first.defined()) {  // undo the buffer update of this call
      layer->running_mean.copy_(running.first);
      layer->running_var.copy_(running.second);
    }
    return v;
  };
  (layer->forward(x) * r).sum().backward();
  if (running.first.defined()) {
    layer->running_mean.copy_(running.first);
    layer->running_var.copy_(running.second);
  }
  CheckGradient("x", x, x.grad(), loss);
  CheckGradient("query_proj.weight", layer->query_proj->weight, layer->query_proj->weight.grad(), loss);
  if (layer->norm_weight.defined()) {
    CheckGradient("norm_weight", layer->norm_weight, layer->norm_weight.grad(), loss);
    CheckGradient("norm_bias", layer->norm_bias, layer->norm_bias.grad(), loss);
  }
  for (const auto& seg : layer->segments()) {
    const std::string s = "segment" + std::to_string(seg->id());
    CheckGradient(s + ".sub_keys", seg->sub_keys, seg->sub_keys.grad(), loss);
    CheckGradient(s + ".down", seg->down, seg->down.grad(), loss);
    CheckGradient(s + ".up", seg->up, seg->up.grad(), loss);
  }
}

TEST(PeerLayer, GradientsMatchFiniteDifferencesWithLayerNorm) { CheckLayerGradients(QUERY_NORM_LAYER); }
TEST(PeerLayer, GradientsMatchFiniteDifferencesWithBatchNorm) { CheckLayerGradients(QUERY_NORM_BATCH); }
TEST(PeerLayer, GradientsMatchFiniteDifferencesWithoutNorm) { CheckLayerGradients(QUERY_NORM_NONE); }

TEST(PeerLayer, FrozenBatchNormStatisticsDoNotMove) {
  torch::manual_seed(5);
  PeerLayer layer(8, testing::SmallPeer(4, 2, 2, 4, QUERY_NORM_BATCH));
  layer->train();
  torch::Tensor x = torch::randn({32, 8}) * 3 + 1;
  torch::Tensor mean0 = layer->running_mean.clone();
  layer->set_norm_stats_frozen(true);
  layer->forward(x);
  EXPECT_TRUE(torch::equal(layer->running_mean, mean0));
  layer->set_norm_stats_frozen(false);
  layer->forward(x);
  EXPECT_FALSE(torch::equal(layer->running_mean, mean0));
}

TEST(PeerLayer, UsageRecordingCountsEveryRetrievedExpertOnce) {
  torch::manual_seed(6);
  PeerLayer layer(8, testing::SmallPeer(6, 2, 3, 4));
  ASSERT_TRUE(layer->AddSegment(6).ok());
  layer->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({40, 8});
  layer->forward(x);  // not recording: nothing counted
  EXPECT_FALSE(layer->UsageCounts(0).defined());
  layer->StartUsageRecording();
  layer->forward(x);
  layer->forward(x.narrow(0, 0, 10));
  layer->StopUsageRecording();
  layer->forward(x);
  Retrieval r = layer->Retrieve(layer->Query(x));
  const int64_t total = layer->UsageCounts(0).sum().item<int64_t>() + layer->UsageCounts(1).sum().item<int64_t>();
  EXPECT_EQ(total, (40 + 10) * 2 * 3);  // (tokens) × h × k
  // Expert e of segment 0 counted as often as retrieval chose it.
  torch::Tensor want = torch::bincount(r.index.masked_select(r.segment == 0), {}, 36) +
                       torch::bincount(r.index.narrow(0, 0, 10).masked_select(r.segment.narrow(0, 0, 10) == 0), {}, 36);
  EXPECT_TRUE(torch::equal(layer->UsageCounts(0), want));
}

TEST(PeerLayer, AddSegmentRejectsFewerSubKeysThanTopK) {
  PeerLayer layer(8, testing::SmallPeer(8, 2, 4, 4));
  Status st = layer->AddSegment(3);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("n_keys = 3"), std::string::npos) << st.message();
  EXPECT_EQ(layer->segments().size(), 1u);
}

}  // namespace
}  // namespace peerd
