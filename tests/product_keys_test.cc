// Product-key retrieval equals brute-force top-k over all N = n² full keys (docs/DESIGN.md §1: the
// layer's first test), for one segment and for the union of several.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/peer_layer.h"
#include "core/product_keys.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

// Full keys [h, n², dk] of a segment: expert i·n + j has key [K1_i ; K2_j].
torch::Tensor FullKeys(const torch::Tensor& sub_keys) {
  const int64_t h = sub_keys.size(0), n = sub_keys.size(2), half = sub_keys.size(3);
  torch::Tensor k1 = sub_keys.select(1, 0).unsqueeze(2).expand({h, n, n, half});
  torch::Tensor k2 = sub_keys.select(1, 1).unsqueeze(1).expand({h, n, n, half});
  return torch::cat({k1, k2}, -1).reshape({h, n * n, 2 * half});
}

// Both are [.., k] and sorted by descending score; ties (scores closer than tol) may order
// differently, so an index mismatch counts only where the score is not tied with a neighbour.
void ExpectSameTopK(const torch::Tensor& got_scores, const torch::Tensor& got_index, const torch::Tensor& want_scores,
                    const torch::Tensor& want_index) {
  ASSERT_TRUE(torch::allclose(got_scores, want_scores, 1e-5, 1e-5))
      << "max score difference " << (got_scores - want_scores).abs().max().item<float>();
  torch::Tensor gap = want_scores.narrow(-1, 0, want_scores.size(-1) - 1) -
                      want_scores.narrow(-1, 1, want_scores.size(-1) - 1);  // [.., k-1]
  torch::Tensor tied = gap.abs() < 1e-5;
  torch::Tensor tied_any = torch::zeros_like(want_index, torch::kBool);
  tied_any.narrow(-1, 0, gap.size(-1)).logical_or_(tied);
  tied_any.narrow(-1, 1, gap.size(-1)).logical_or_(tied);
  torch::Tensor mismatched = (got_index != want_index).logical_and(tied_any.logical_not());
  EXPECT_EQ(mismatched.sum().item<int64_t>(), 0);
}

TEST(ProductKeys, TopKEqualsBruteForceOverAllFullKeys) {
  struct Shape {
    int64_t h, m, dk, n, k;
  };
  for (Shape s : {Shape{1, 7, 4, 5, 1}, Shape{2, 50, 8, 16, 4}, Shape{4, 33, 16, 32, 8}, Shape{3, 20, 6, 9, 9}}) {
    for (int seed = 0; seed < 3; ++seed) {
      torch::manual_seed(seed * 100 + s.n);
      torch::Tensor q = torch::randn({s.h, s.m, s.dk});
      torch::Tensor sub = torch::randn({s.h, 2, s.n, s.dk / 2});
      TopK got = ProductKeyTopK(q, sub, s.k);
      auto [want_scores, want_index] = torch::bmm(q, FullKeys(sub).transpose(1, 2)).topk(s.k, -1);
      SCOPED_TRACE("h=" + std::to_string(s.h) + " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k));
      ExpectSameTopK(got.scores, got.index, want_scores, want_index);
    }
  }
}

TEST(ProductKeys, RetrievalOverSeveralSegmentsEqualsBruteForceOverTheirUnion) {
  torch::manual_seed(7);
  PeerLayer layer(16, testing::SmallPeer(/*n_keys=*/8, /*heads=*/3, /*topk=*/5, /*query_dim=*/8));
  ASSERT_TRUE(layer->AddSegment(12).ok());
  ASSERT_TRUE(layer->AddSegment(6).ok());
  torch::NoGradGuard no_grad;
  torch::Tensor query = torch::randn({3, 40, 8});  // [h, M, dk]
  Retrieval r = layer->Retrieve(query);            // [M, h, k]

  // Brute force: every expert of every segment, numbered globally in segment order.
  std::vector<torch::Tensor> keys;
  std::vector<int64_t> offset;
  int64_t total = 0;
  for (const auto& seg : layer->segments()) {
    keys.push_back(FullKeys(seg->sub_keys));
    offset.push_back(total);
    total += seg->num_experts();
  }
  auto [want_scores, want_global] = torch::bmm(query, torch::cat(keys, 1).transpose(1, 2)).topk(5, -1);
  torch::Tensor offsets = torch::tensor(offset);
  torch::Tensor got_global = offsets.index_select(0, r.segment.reshape(-1)).view_as(r.index) + r.index;
  ExpectSameTopK(r.scores, got_global, want_scores.transpose(0, 1), want_global.transpose(0, 1));
  // The union really is used: all three segments win some places.
  for (int64_t s = 0; s < 3; ++s) EXPECT_GT((r.segment == s).sum().item<int64_t>(), 0) << "segment " << s;
}

}  // namespace
}  // namespace peerd
