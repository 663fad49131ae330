// The continual-learning recipe's parts in the trainer: the teacher copy, distillation on replayed
// rows, and per-group learning-rate scales.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model.h"
#include "core/trainer.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

torch::Tensor RandomTokens(int64_t batch, int64_t len) { return torch::randint(256, {batch, len + 1}); }

// A model with one frozen and one training segment, trained a few steps.
Trainer GrownTrainer(const Config& c) {
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  for (int i = 0; i < 3; ++i) trainer.Step(RandomTokens(4, 16));
  EXPECT_TRUE(trainer.FreezeSegment(0, 0).ok());
  EXPECT_TRUE(trainer.AddSegment(0, 8).ok());
  for (int i = 0; i < 3; ++i) trainer.Step(RandomTokens(4, 16));
  return trainer;
}

TEST(Teacher, CopyComputesTheSameFunctionAndStaysPutWhileTheModelTrains) {
  torch::manual_seed(3);
  Trainer trainer = GrownTrainer(testing::TinyModel());
  TransformerLM model = trainer.model();
  TransformerLM teacher = CopyForTeacher(model);
  const torch::Tensor x = RandomTokens(2, 15);
  model->eval();
  const torch::Tensor before = model->forward(x).detach();
  EXPECT_TRUE(torch::equal(teacher->forward(x), before));
  // Frozen segments are shared, not copied; training ones are copies.
  auto ms = model->PeerLayers()[0]->segments(), ts = teacher->PeerLayers()[0]->segments();
  ASSERT_EQ(ts.size(), 2u);
  EXPECT_TRUE(ts[0]->down.is_same(ms[0]->down));
  EXPECT_FALSE(ts[1]->down.is_same(ms[1]->down));
  for (const auto& p : teacher->parameters()) EXPECT_FALSE(p.requires_grad());

  for (int i = 0; i < 3; ++i) trainer.Step(RandomTokens(4, 16));
  model->eval();
  EXPECT_FALSE(torch::equal(model->forward(x), before)) << "the model should have trained";
  EXPECT_TRUE(torch::equal(teacher->forward(x), before)) << "the teacher must not move";
}

TEST(Distillation, KlIsZeroAgainstItselfAndTheLossIsPlainCrossEntropy) {
  torch::manual_seed(4);
  Config c = testing::TinyModel();
  c.mutable_train()->set_distill_weight(1.0f);
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  trainer.SetTeacher(CopyForTeacher(model));
  const torch::Tensor batch = RandomTokens(4, 16);
  model->train();
  const double ce = model->Loss(batch).item<double>();
  StepStats s = trainer.Step(batch, 2);
  EXPECT_NEAR(s.distill, 0.0, 1e-6);
  EXPECT_NEAR(s.loss, ce, 1e-5);
}

// Trains from one start on text the teacher never saw, every row counted as replayed; returns the
// final KL between the model and the teacher on fresh inputs.
double KlAfterTraining(float distill_weight) {
  torch::manual_seed(5);
  Config c = testing::TinyModel();
  c.mutable_train()->set_distill_weight(distill_weight);
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  TransformerLM teacher = CopyForTeacher(model);
  trainer.SetTeacher(teacher);
  torch::manual_seed(6);
  const torch::Tensor repeated = torch::arange(17).remainder(5).unsqueeze(0).repeat({4, 1});  // "01234..."
  for (int i = 0; i < 40; ++i) trainer.Step(repeated, 4);
  torch::NoGradGuard no_grad;
  model->eval();
  const torch::Tensor x = RandomTokens(8, 15).slice(1, 0, 16);
  auto t = torch::log_softmax(teacher->forward(x), -1), m = torch::log_softmax(model->forward(x), -1);
  return (t.exp() * (t - m)).sum(-1).mean().item<double>();
}

TEST(Distillation, PullsTheModelTowardsTheTeacher) {
  const double free = KlAfterTraining(0.0f), distilled = KlAfterTraining(5.0f);
  EXPECT_GT(free, 0.05);
  EXPECT_LT(distilled, 0.5 * free) << "free " << free << " distilled " << distilled;
}

TEST(LearningRateScale, ZeroBackboneScaleTrainsOnlyExperts) {
  torch::manual_seed(7);
  Config c = testing::TinyModel();
  c.mutable_train()->set_backbone_lr_scale(0.0f);
  c.mutable_train()->set_weight_decay(0.1f);
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  std::vector<std::pair<ParamInfo, torch::Tensor>> before;
  for (const ParamInfo& p : model->ClassifiedParameters()) before.push_back({p, p.tensor.clone()});
  for (int i = 0; i < 3; ++i) trainer.Step(RandomTokens(4, 16));
  for (const auto& [p, old] : before) {
    if (p.kind == ParamKind::kExpert) {
      if (p.name.find("sub_keys") == std::string::npos) {
        EXPECT_FALSE(torch::equal(p.tensor, old)) << p.name << " should train";
      }
    } else {
      EXPECT_TRUE(torch::equal(p.tensor, old)) << p.name << " moved with a zero backbone scale";
    }
  }
}

}  // namespace
}  // namespace peerd
