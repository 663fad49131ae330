// Generation (core/generator.*): the key/value cache computes what the whole window computes,
// greedy and seeded sampling are reproducible, stop strings and the end of a document end it, and
// streamed pieces never split a character or a stop string.
#include <gtest/gtest.h>

#include <cmath>

#include "core/generator.h"
#include "core/utf8.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

TransformerLM TinyLM(uint64_t seed = 7) {
  torch::manual_seed(seed);
  TransformerLM model(testing::TinyModel().model());
  model->eval();
  return model;
}

TEST(KvCache, LogitsInPiecesWithTheCacheMatchTheWholeWindowAtOnce) {
  TransformerLM model = TinyLM();
  torch::NoGradGuard no_grad;
  const torch::Tensor tokens = torch::randint(0, 256, {2, 16}, torch::kLong);  // a full context
  const torch::Tensor whole = model->forward(tokens);
  KvCache cache;
  std::vector<torch::Tensor> pieces;
  for (auto [from, to] : std::vector<std::pair<int64_t, int64_t>>{{0, 5}, {5, 6}, {6, 13}, {13, 16}})
    pieces.push_back(model->forward(tokens.slice(1, from, to), &cache));
  EXPECT_EQ(cache.length, 16);
  EXPECT_TRUE(torch::allclose(torch::cat(pieces, 1), whole, 1e-5, 1e-5))
      << "max difference " << (torch::cat(pieces, 1) - whole).abs().max().item<float>();
  EXPECT_THROW(model->forward(tokens.slice(1, 0, 1), &cache), c10::Error) << "past the context must be refused";
}

TEST(Generate, GreedyIsTheSameWithAndWithoutTheCacheAcrossWindowRestarts) {
  TransformerLM model = TinyLM();
  GenerateOptions o;
  o.temperature = 0;
  o.max_tokens = 60;  // the tiny context is 16: the window restarts several times
  Generated cached = Generate(model, "In the beginning", o);
  o.kv_cache = false;
  Generated whole = Generate(model, "In the beginning", o);
  EXPECT_EQ(cached.tokens, whole.tokens);
  EXPECT_EQ(cached.text, whole.text);
  // Deterministic: again, the same.
  o.kv_cache = true;
  EXPECT_EQ(Generate(model, "In the beginning", o).tokens, cached.tokens);
}

TEST(Generate, ASeedMakesSamplingReproducibleAndAnotherSeedSamplesOtherwise) {
  TransformerLM model = TinyLM();
  GenerateOptions o;
  o.temperature = 1.0;
  o.max_tokens = 40;
  o.seed = 1;
  const Generated a = Generate(model, "abc", o), b = Generate(model, "abc", o);
  EXPECT_EQ(a.tokens, b.tokens);
  o.seed = 2;
  EXPECT_NE(Generate(model, "abc", o).tokens, a.tokens);  // an untrained model: near uniform over 257
}

TEST(Generate, AStopStringEndsTheTextShortOfItAndTheStreamNeverShowsIt) {
  TransformerLM model = TinyLM();
  GenerateOptions o;
  o.temperature = 0;
  o.max_tokens = 30;
  const Generated free_run = Generate(model, "hello", o);
  ASSERT_GE(free_run.text.size(), 12u);
  // A stop string from the middle of what greedy decoding writes.
  o.stop = {"zzzz-never", free_run.text.substr(8, 3)};
  std::string streamed;
  o.on_text = [&](std::string_view piece) {
    streamed += piece;
    return true;
  };
  const Generated stopped = Generate(model, "hello", o);
  EXPECT_EQ(stopped.finish_reason, "stop");
  EXPECT_EQ(stopped.text, free_run.text.substr(0, free_run.text.find(o.stop[1])));
  EXPECT_EQ(streamed, stopped.text);
  EXPECT_EQ(free_run.finish_reason, "length");
  EXPECT_EQ(free_run.tokens.size(), 30u);
}

TEST(Generate, AStreamConsumerCanCancelAndPiecesNeverSplitACharacter) {
  TransformerLM model = TinyLM();
  GenerateOptions o;
  o.temperature = 1.0;
  o.seed = 3;
  o.max_tokens = 200;  // random bytes: many invalid or multi-byte sequences
  int pieces = 0;
  bool split = false;
  o.on_text = [&](std::string_view piece) {
    split |= Utf8SafePrefix(piece) != piece.size();
    return ++pieces < 5;
  };
  const Generated g = Generate(model, "x", o);
  EXPECT_EQ(g.finish_reason, "cancelled");
  EXPECT_EQ(pieces, 5);
  EXPECT_FALSE(split) << "a piece ended inside a character that more bytes could complete";
}

TEST(PickToken, TemperatureTopKAndTopPChooseFromTheRightTokens) {
  // p = softmax([0, ln 3, ln 6]) = [0.1, 0.3, 0.6]
  const std::vector<float> logits = {0.0f, std::log(3.0f), std::log(6.0f)};
  GenerateOptions o;
  o.temperature = 0;
  EXPECT_EQ(PickToken(logits, o, 0.99), 2);
  o.temperature = 1;
  EXPECT_EQ(PickToken(logits, o, 0.59), 2);  // most likely first: [0, 0.6) -> 2
  EXPECT_EQ(PickToken(logits, o, 0.61), 1);  // [0.6, 0.9) -> 1
  EXPECT_EQ(PickToken(logits, o, 0.95), 0);  // [0.9, 1) -> 0
  o.top_k = 2;                               // {2, 1}, renormalised: 2 below 2/3
  EXPECT_EQ(PickToken(logits, o, 0.65), 2);
  EXPECT_EQ(PickToken(logits, o, 0.99), 1);
  o.top_k = 0;
  o.top_p = 0.5;  // token 2 alone reaches 0.5
  EXPECT_EQ(PickToken(logits, o, 0.99), 2);
  o.top_p = 0.8;  // tokens 2 and 1
  EXPECT_EQ(PickToken(logits, o, 0.99), 1);
}

TEST(Utf8, InvalidBytesBecomeReplacementCharactersAndUnfinishedOnesAreHeldBack) {
  EXPECT_EQ(ValidUtf8("a\xff"
                      "b"),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(ValidUtf8("\xC3\xA9"), "\xC3\xA9");  // é stays
  EXPECT_EQ(ValidUtf8("\xC3"), "\xEF\xBF\xBD");  // cut short
  EXPECT_EQ(Utf8SafePrefix("ab\xC3"), 2u);
  EXPECT_EQ(Utf8SafePrefix("ab\xE2\x82"), 2u);
  EXPECT_EQ(Utf8SafePrefix("ab\xE2\x82\xAC"), 5u);  // € complete
  EXPECT_EQ(Utf8SafePrefix("ab\xff"), 3u);          // never valid: no reason to wait
}

}  // namespace
}  // namespace peerd
