// Training on real text: loss falls and held-out bits per byte ends well under the uniform 8.
// Plus the evaluator's units and the learning-rate schedule.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/evaluator.h"
#include "core/runtime.h"
#include "core/text_batcher.h"
#include "core/text_file.h"
#include "core/tokenizer.h"
#include "core/trainer.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

// A slice of the KJV corpus that scripts/corpora.sh extracts (make test runs it first).
void LoadKjv(std::string* train, std::string* heldout) {
  const std::string dir = std::string(PEERD_CORPUS_DIR) + "/kjv";
  Status st = ReadTextFile(dir + "/train.txt", train);
  ASSERT_TRUE(st.ok()) << st.ToString() << " — run scripts/corpora.sh kjv";
  st = ReadTextFile(dir + "/heldout.txt", heldout);
  ASSERT_TRUE(st.ok()) << st.ToString();
  train->resize(std::min<size_t>(train->size(), 400'000));
  heldout->resize(std::min<size_t>(heldout->size(), 20'000));
}

void TrainsOnRealText(FfnKind ffn) {
  std::string train, heldout;
  LoadKjv(&train, &heldout);
  SetComputeThreads(0);
  Config c = DefaultConfig();
  c.mutable_model()->set_ffn(ffn);
  c.mutable_model()->set_n_layers(2);
  c.mutable_model()->set_context(64);
  c.mutable_train()->set_steps(150);
  c.mutable_train()->set_warmup_steps(15);
  ASSERT_TRUE(ValidateConfig(c).ok());
  torch::manual_seed(1);
  TransformerLM model(c.model());
  EXPECT_EQ(model->PeerLayers().size(), ffn == FFN_KIND_PEER ? 1u : 0u);
  Trainer trainer(model, c.train());
  TextBatcher batches(train, c.model().context(), 1);

  const double bpb_start = BitsPerByte(model, heldout);
  double first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    double loss = trainer.Step(batches.Next(16)).loss;
    if (step < 10) first += loss / 10;
    if (step >= 140) last += loss / 10;
  }
  const double bpb = BitsPerByte(model, heldout);
  std::printf("held-out bits/byte: %.3f at start, %.3f after 150 steps; train loss %.3f -> %.3f nats\n", bpb_start, bpb,
              first, last);
  EXPECT_GT(bpb_start, 7.0) << "an untrained model should be near uniform (8 bits/byte)";
  EXPECT_LT(last, first - 1.0) << "training loss did not fall";
  EXPECT_LT(bpb, 4.0) << "held-out bits/byte should end well under the uniform 8";
}

TEST(Train, PeerModelLossFallsOnRealTextAndHeldOutBitsPerByteEndsWellUnderEight) { TrainsOnRealText(FFN_KIND_PEER); }

TEST(Train, DenseBaselineLossFallsOnRealText) { TrainsOnRealText(FFN_KIND_DENSE); }

TEST(ByteTokenizer, EveryByteIsItsOwnTokenInTheVectorAndInTheTensor) {
  std::string text;
  for (int b = 0; b < 256; ++b) text.push_back(static_cast<char>(b));  // UTF-8 lead bytes and NULs included
  const std::vector<int64_t> tokens = ByteTokenizer::Encode(text, /*end_of_document=*/true);
  ASSERT_EQ(tokens.size(), 257u);
  for (int b = 0; b < 256; ++b) ASSERT_EQ(tokens[b], b);
  EXPECT_EQ(tokens.back(), ByteTokenizer::kEndOfDocument);
  const torch::Tensor tensor = ByteTokens(text);
  ASSERT_EQ(tensor.scalar_type(), torch::kLong);
  EXPECT_TRUE(torch::equal(tensor, torch::tensor(std::vector<int64_t>(tokens.begin(), tokens.end() - 1))));
}

TEST(Evaluator, ModelWithUniformPredictionsScoresLog2OfTheVocabulary) {
  Config c = testing::TinyModel();
  TransformerLM model(c.model());
  {
    torch::NoGradGuard no_grad;
    model->tok_emb->weight.zero_();  // the tied output head now gives every symbol logit 0
  }
  std::string text(1000, 'a');
  text += "some other bytes\n";
  const double bpb = BitsPerByte(model, text);
  EXPECT_NEAR(bpb, std::log2(257.0), 1e-4);
}

TEST(Evaluator, PredictsEveryByteAfterTheFirstExactlyOnce) {
  // 40 bytes, context 16: windows [0, 17) and [16, 33), then the tail [32, 40) — 16 + 16 + 7 = 39
  // predictions, one for each byte but the first.
  torch::manual_seed(9);
  Config c = testing::TinyModel();
  TransformerLM model(c.model());
  model->eval();
  std::string text;
  for (int i = 0; i < 40; ++i) text.push_back(static_cast<char>('a' + (i * 7) % 26));
  torch::Tensor bytes = torch::tensor(std::vector<int64_t>(text.begin(), text.end()));
  double nats = 0;
  {
    torch::NoGradGuard no_grad;
    for (auto [from, to] : {std::pair{0, 17}, std::pair{16, 33}, std::pair{32, 40}})
      nats += model->Loss(bytes.slice(0, from, to).unsqueeze(0)).item<double>() * (to - from - 1);
  }
  EXPECT_NEAR(BitsPerByte(model, text), nats / 39 / std::log(2.0), 1e-5);
  // max_bytes scores a prefix: the same as scoring the prefix itself.
  EvalOptions first20;
  first20.max_bytes = 20;
  EXPECT_NEAR(BitsPerByte(model, text, first20), BitsPerByte(model, text.substr(0, 20)), 1e-9);
}

TEST(Trainer, LearningRateWarmsUpLinearlyThenFollowsTheSchedule) {
  Config c = testing::TinyModel();
  TrainConfig* t = c.mutable_train();
  t->set_lr(1e-3f);
  t->set_min_lr(1e-4f);
  t->set_warmup_steps(10);
  t->set_steps(110);
  TransformerLM model(c.model());
  Trainer cosine(model, *t);
  EXPECT_NEAR(cosine.LearningRate(0), 1e-4, 1e-9);
  EXPECT_NEAR(cosine.LearningRate(9), 1e-3, 1e-9);
  EXPECT_NEAR(cosine.LearningRate(10), 1e-3, 1e-9);
  EXPECT_NEAR(cosine.LearningRate(60), 5.5e-4, 1e-9);  // halfway: mean of lr and min_lr
  EXPECT_NEAR(cosine.LearningRate(110), 1e-4, 1e-9);
  EXPECT_NEAR(cosine.LearningRate(500), 1e-4, 1e-9);
  t->set_schedule(LR_SCHEDULE_CONSTANT);
  Trainer constant(model, *t);
  EXPECT_NEAR(constant.LearningRate(100), 1e-3, 1e-9);
}

}  // namespace
}  // namespace peerd
