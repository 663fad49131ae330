// Freezing: a frozen segment leaves the optimizer and stays bit-identical however long training
// goes on; adding a segment changes old outputs only through the router; policies select groups.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model.h"
#include "core/rank_sync.h"
#include "core/trainer.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

torch::Tensor RandomTokens(int64_t batch, int64_t len) { return torch::randint(256, {batch, len + 1}); }

bool InOptimizer(const Trainer& t, const torch::Tensor& p) {
  for (const auto& q : t.optimizer().parameters())
    if (q.tensor.is_same(p)) return true;
  return false;
}

TEST(Freeze, FrozenSegmentIsBitIdenticalAfter50StepsWhileTheTrainingSegmentChanges) {
  torch::manual_seed(1);
  Config c = testing::TinyModel();
  c.mutable_train()->set_weight_decay(0.1f);  // decay must not reach frozen rows either
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  for (int i = 0; i < 5; ++i) trainer.Step(RandomTokens(4, 16));  // momentum is non-zero now

  PeerLayer layer = model->PeerLayers()[0];
  ExpertSegment frozen = layer->segments()[0];
  ASSERT_TRUE(trainer.FreezeSegment(0, frozen->id()).ok());
  int64_t new_id = -1;
  ASSERT_TRUE(trainer.AddSegment(0, 8, &new_id).ok());
  ExpertSegment fresh = layer->segments()[1];
  ASSERT_EQ(fresh->id(), new_id);

  const uint64_t checksum = frozen->frozen_checksum();
  EXPECT_EQ(frozen->Checksum(), checksum);
  std::vector<torch::Tensor> frozen_before, fresh_before;
  for (const auto& p : frozen->parameters()) frozen_before.push_back(p.clone());
  for (const auto& p : fresh->parameters()) fresh_before.push_back(p.clone());
  for (const auto& p : frozen->parameters()) EXPECT_FALSE(InOptimizer(trainer, p));
  for (const auto& p : fresh->parameters()) EXPECT_TRUE(InOptimizer(trainer, p));

  for (int i = 0; i < 50; ++i) trainer.Step(RandomTokens(4, 16));

  auto frozen_after = frozen->parameters();
  for (size_t i = 0; i < frozen_before.size(); ++i)
    EXPECT_TRUE(torch::equal(frozen_after[i], frozen_before[i])) << "frozen tensor " << i << " moved";
  EXPECT_EQ(frozen->Checksum(), checksum);
  auto fresh_after = fresh->parameters();
  for (size_t i = 0; i < fresh_before.size(); ++i)
    EXPECT_FALSE(torch::equal(fresh_after[i], fresh_before[i])) << "training tensor " << i << " did not train";
}

TEST(Freeze, ChecksumSeesASingleFlippedBit) {
  torch::manual_seed(2);
  PeerLayer layer(16, testing::SmallPeer());
  ASSERT_TRUE(layer->FreezeSegment(0).ok());
  ExpertSegment seg = layer->segments()[0];
  torch::NoGradGuard no_grad;
  auto* bits = static_cast<uint32_t*>(seg->up.data_ptr());
  bits[17] ^= 1u;
  EXPECT_NE(seg->Checksum(), seg->frozen_checksum());
  bits[17] ^= 1u;
  EXPECT_EQ(seg->Checksum(), seg->frozen_checksum());
}

// Ranks compare ModelDigest: it must see every training weight, and a frozen segment through the
// checksum taken of its bytes when it froze (its rows are not hashed again at each comparison).
TEST(Freeze, ModelDigestSeesTrainingWeightsAndEachFrozenSegmentsChecksum) {
  auto build = [](bool perturb_before_freeze) {
    torch::manual_seed(5);
    TransformerLM model(testing::TinyModel().model());
    if (perturb_before_freeze) {
      torch::NoGradGuard no_grad;
      model->PeerLayers()[0]->segments()[0]->down[3].add_(1.0);
    }
    return model;
  };
  TransformerLM a = build(false), b = build(false), c = build(true);
  EXPECT_EQ(ModelDigest(a), ModelDigest(b));
  const uint64_t training = ModelDigest(a);
  ASSERT_TRUE(a->PeerLayers()[0]->FreezeSegment(0).ok());
  ASSERT_TRUE(b->PeerLayers()[0]->FreezeSegment(0).ok());
  ASSERT_TRUE(c->PeerLayers()[0]->FreezeSegment(0).ok());
  EXPECT_NE(ModelDigest(a), training) << "freezing must show";
  EXPECT_EQ(ModelDigest(a), ModelDigest(b));
  EXPECT_NE(ModelDigest(a), ModelDigest(c)) << "segments frozen with different rows have different checksums";

  // A training weight (not in the frozen segment) moves: the digest moves with it.
  torch::Tensor w;
  for (const auto& p : b->named_parameters())
    if (p.value().requires_grad()) {
      w = p.value();
      break;
    }
  ASSERT_TRUE(w.defined());
  torch::NoGradGuard no_grad;
  w.view(-1)[0].add_(1e-3);
  EXPECT_NE(ModelDigest(a), ModelDigest(b));
}

TEST(Freeze, UnknownOrAlreadyFrozenSegmentIsAnError) {
  torch::manual_seed(3);
  TransformerLM model(testing::TinyModel().model());
  Trainer trainer(model, testing::TinyModel().train());
  EXPECT_EQ(trainer.FreezeSegment(0, 42).code(), Status::Code::kNotFound);
  EXPECT_EQ(trainer.FreezeSegment(3, 0).code(), Status::Code::kNotFound);
  ASSERT_TRUE(trainer.FreezeSegment(0, 0).ok());
  EXPECT_EQ(trainer.FreezeSegment(0, 0).code(), Status::Code::kFailedPrecondition);
}

TEST(Freeze, AddingASegmentMidTrainingChangesOldOutputsOnlyThroughTheRouter) {
  torch::manual_seed(4);
  Config c = testing::TinyModel();
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  for (int i = 0; i < 10; ++i) trainer.Step(RandomTokens(4, 16));

  PeerLayer layer = model->PeerLayers()[0];
  layer->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({64, 32});
  torch::Tensor before = layer->forward(x);
  Retrieval chosen_before = layer->Retrieve(layer->Query(x));

  ASSERT_TRUE(trainer.AddSegment(0, 8).ok());
  const std::vector<bool> old_only = {true, false};
  torch::Tensor masked = layer->forward(x, &old_only);
  Retrieval chosen_masked = layer->Retrieve(layer->Query(x), &old_only);
  EXPECT_TRUE(torch::equal(masked, before)) << "old experts' contribution changed";
  EXPECT_TRUE(torch::equal(chosen_masked.index, chosen_before.index));
  EXPECT_TRUE(torch::equal(chosen_masked.scores, chosen_before.scores));

  // With the new segment's scores visible, the router does pick some of its experts.
  torch::Tensor all = layer->forward(x);
  Retrieval chosen_all = layer->Retrieve(layer->Query(x));
  EXPECT_GT((chosen_all.segment == 1).sum().item<int64_t>(), 0);
  EXPECT_FALSE(torch::equal(all, before));
}

TEST(Freeze, NewSegmentPolicyTrainsOnlyTheNewestSegment) {
  torch::manual_seed(5);
  Config c = testing::TinyModel();
  c.mutable_train()->clear_train_groups();
  c.mutable_train()->add_train_groups("new-segment");
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  ASSERT_TRUE(trainer.AddSegment(0, 8).ok());  // segment 1 is the newest; 0 still training

  PeerLayer layer = model->PeerLayers()[0];
  torch::Tensor attn = model->blocks[0]->attn->qkv->weight.clone();
  torch::Tensor query = layer->query_proj->weight.clone();
  torch::Tensor old_down = layer->segments()[0]->down.clone();
  torch::Tensor new_down = layer->segments()[1]->down.clone();
  for (int i = 0; i < 5; ++i) trainer.Step(RandomTokens(4, 16));
  EXPECT_TRUE(torch::equal(model->blocks[0]->attn->qkv->weight, attn));
  EXPECT_TRUE(torch::equal(layer->query_proj->weight, query));
  EXPECT_TRUE(torch::equal(layer->segments()[0]->down, old_down));
  EXPECT_FALSE(torch::equal(layer->segments()[1]->down, new_down));
}

}  // namespace
}  // namespace peerd
