// Routing isolation (docs/DESIGN.md): a segment owns its experts and its adapter, a route runs
// one of them, and what a frozen route computes never changes while later ones train; the
// bigram router picks a route from the text alone; the evaluator never shows a route a byte it
// scores.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <filesystem>
#include <random>

#include "core/evaluator.h"
#include "core/model.h"
#include "core/text_router.h"
#include "core/trainer.h"
#include "experts_store/data_dir_db.h"
#include "service/checkpoint.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

// Two blocks: a dense FFN in block 0, PEER in block 1, so an adapter has every kind of map.
Config TwoBlockModel() {
  Config c = testing::TinyModel();
  c.mutable_model()->set_n_layers(2);
  c.mutable_model()->clear_peer_blocks();
  c.mutable_model()->add_peer_blocks(1);
  c.mutable_model()->set_dense_hidden(48);
  return c;
}

torch::Tensor RandomTokens(int64_t batch, int64_t len) { return torch::randint(256, {batch, len + 1}); }

// Freezes the training segments (their adapters with them), adds a segment and its adapter under
// one id, and routes training there.
int64_t GrowRouted(Trainer& trainer, int64_t base, int64_t rank) {
  TransformerLM& model = trainer.model();
  for (const auto& s : model->PeerLayers()[0]->segments()) {
    if (!s->frozen()) {
      EXPECT_TRUE(trainer.FreezeSegment(0, s->id()).ok());
    }
  }
  int64_t id = -1;
  EXPECT_TRUE(trainer.AddSegment(0, 8, &id).ok());
  EXPECT_TRUE(model->AddAdapter(id, rank).ok());
  EXPECT_TRUE(model->SetRoute({id, {base, id}}).ok());
  TrainConfig owned = trainer.config();
  owned.clear_train_groups();
  owned.add_train_groups("new-segment");
  trainer.SetConfig(owned);
  return id;
}

// The model's logits for `probe` under `route` (the model left on that route).
torch::Tensor OutputUnder(TransformerLM& model, const Route& route, const torch::Tensor& probe) {
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(model->SetRoute(route).ok());
  return model->forward(probe).clone();
}

TEST(Routing, ANewAdapterChangesNothingUntilItTrains) {
  torch::manual_seed(3);
  TransformerLM model(TwoBlockModel().model());
  model->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor tokens = RandomTokens(2, 16).slice(1, 0, 16);
  const torch::Tensor before = model->forward(tokens);
  int64_t id = 7;
  for (const int64_t rank : {int64_t{4}, SegmentAdapterImpl::kFullRank})
    for (const bool trunk_deltas : {true, false}) {
      ASSERT_TRUE(model->AddAdapter(++id, rank, trunk_deltas).ok());
      ASSERT_TRUE(model->SetRoute({id, {}}).ok());
      EXPECT_TRUE(torch::equal(model->forward(tokens), before)) << "rank " << rank;  // a zero delta
      // Once its deltas are non-zero, the route changes the output.
      for (auto& p : model->adapters().at(id)->parameters()) p.fill_(0.05);
      EXPECT_FALSE(torch::allclose(model->forward(tokens), before)) << "rank " << rank;
    }
}

// Every trunk delta an adapter owns enters the forward pass: made non-zero alone, each one changes
// the output (the token embedding's through the input and the tied head, a layer norm's through
// its gain or bias, a map's bias through the map).
TEST(Routing, EachTrunkDeltaOfAnAdapterMovesTheOutputOnItsOwn) {
  torch::manual_seed(6);
  TransformerLM model(TwoBlockModel().model());
  model->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor tokens = RandomTokens(2, 16).slice(1, 0, 16);
  const torch::Tensor before = model->forward(tokens);
  ASSERT_TRUE(model->AddAdapter(1, 4, /*trunk_deltas=*/true).ok());
  ASSERT_TRUE(model->SetRoute({1, {}}).ok());
  const SegmentAdapter& adapter = model->adapters().at(1);
  const std::vector<std::string> names = {
      "tok_emb",   "pos_emb",         "block0.ln1.weight", "block0.ln2.bias", "block1.ln1.bias",     "ln_f.weight",
      "ln_f.bias", "block0.qkv.bias", "block0.proj.bias",  "block0.fc.bias",  "block0.fc_proj.bias", "block1.qkv.bias"};
  int64_t owned = 0;
  for (const auto& p : adapter->named_parameters())
    owned += p.key().size() > 2 && p.key().compare(p.key().size() - 2, 2, "_d") == 0;
  EXPECT_EQ(owned, 18) << "tok, pos, 5 norms × 2, 4 dense-block biases, 2 PEER-block biases";
  for (const std::string& name : names) {
    torch::Tensor delta = adapter->TrunkDelta(name);
    ASSERT_TRUE(delta.defined()) << name;
    delta.fill_(0.1);
    EXPECT_FALSE(torch::allclose(model->forward(tokens), before)) << name << " does not reach the output";
    delta.zero_();
    EXPECT_TRUE(torch::equal(model->forward(tokens), before)) << name;
  }
  ASSERT_TRUE(model->AddAdapter(2, 4, /*trunk_deltas=*/false).ok());
  EXPECT_FALSE(model->adapters().at(2)->TrunkDelta("tok_emb").defined());
  Status st = model->CopyBranch(1, 2);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("trunk deltas"), std::string::npos) << st.message();
}

TEST(Routing, AFrozenRouteComputesBitIdenticallyWhileALaterRouteTrains) {
  torch::manual_seed(4);
  Config c = TwoBlockModel();
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  for (int i = 0; i < 5; ++i) trainer.Step(RandomTokens(4, 16));  // the base phase: everything trains
  const int64_t base = model->PeerLayers()[0]->segments()[0]->id();
  const int64_t first = GrowRouted(trainer, base, 4);
  for (int i = 0; i < 10; ++i) trainer.Step(RandomTokens(4, 16));

  model->eval();
  const torch::Tensor probe = RandomTokens(3, 16).slice(1, 0, 16);
  auto output_of = [&](const Route& r) { return OutputUnder(model, r, probe); };
  const Route base_route{-1, {base}}, first_route{first, {base, first}};
  const torch::Tensor base_out = output_of(base_route), first_out = output_of(first_route);
  EXPECT_FALSE(torch::equal(base_out, first_out)) << "the first route trained, so it must differ from the base";

  model->train();
  const int64_t second = GrowRouted(trainer, base, 4);
  EXPECT_TRUE(model->adapters().at(first)->frozen()) << "freezing a segment must freeze its adapter";
  for (int i = 0; i < 20; ++i) trainer.Step(RandomTokens(4, 16));
  model->eval();
  EXPECT_TRUE(torch::equal(output_of(base_route), base_out)) << "the base moved while a later route trained";
  EXPECT_TRUE(torch::equal(output_of(first_route), first_out)) << "a frozen route moved while a later one trained";
  EXPECT_FALSE(torch::equal(output_of({second, {base, second}}), first_out));
  // The global route (every segment, no adapter) is what routing isolates from: the new segment
  // reaches it.
  EXPECT_FALSE(torch::equal(output_of({}), base_out));
}

TEST(Routing, SetRouteRefusesPartsTheModelLacks) {
  TransformerLM model(TwoBlockModel().model());
  Status st = model->SetRoute({3, {}});
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("adapter 3"), std::string::npos) << st.message();
  st = model->SetRoute({-1, {42}});
  EXPECT_NE(st.message().find("segment 42"), std::string::npos) << st.message();
  EXPECT_EQ(model->AddAdapter(1, -1).code(), Status::Code::kInvalidArgument);
  ASSERT_TRUE(model->AddAdapter(1, 2).ok());
  EXPECT_EQ(model->AddAdapter(1, 2).code(), Status::Code::kFailedPrecondition);
}

TEST(Routing, OnlyTheNewestAdapterTrainsUnderTheNewSegmentGroup) {
  Config c = TwoBlockModel();
  TransformerLM model(c.model());
  ASSERT_TRUE(model->AddAdapter(1, 2).ok());
  ASSERT_TRUE(model->AddAdapter(2, 2).ok());
  TrainConfig t = c.train();
  t.clear_train_groups();
  t.add_train_groups("new-segment");
  Trainer trainer(model, t);
  for (const auto& p : model->adapters().at(1)->parameters()) EXPECT_FALSE(p.requires_grad());
  for (const auto& p : model->adapters().at(2)->parameters()) EXPECT_TRUE(p.requires_grad());
  EXPECT_FALSE(model->tok_emb->weight.requires_grad());
}

TEST(Routing, ABranchSeededFromAnotherStartsWithItsFunctionAndLeavesItUntouched) {
  torch::manual_seed(5);
  Config c = TwoBlockModel();
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  const int64_t base = model->PeerLayers()[0]->segments()[0]->id();
  const int64_t first = GrowRouted(trainer, base, 4);
  for (int i = 0; i < 10; ++i) trainer.Step(RandomTokens(4, 16));
  const int64_t second = GrowRouted(trainer, base, 4);
  model->eval();
  const torch::Tensor probe = RandomTokens(2, 16).slice(1, 0, 16);
  auto output_of = [&](const Route& r) { return OutputUnder(model, r, probe); };
  const torch::Tensor first_out = output_of({first, {base, first}});
  ASSERT_TRUE(model->CopyBranch(first, second).ok());
  EXPECT_TRUE(torch::equal(output_of({second, {base, second}}), first_out));
  model->train();
  ASSERT_TRUE(model->SetRoute({second, {base, second}}).ok());
  for (int i = 0; i < 10; ++i) trainer.Step(RandomTokens(4, 16));
  model->eval();
  EXPECT_TRUE(torch::equal(output_of({first, {base, first}}), first_out)) << "the seed moved";
  EXPECT_FALSE(torch::equal(output_of({second, {base, second}}), first_out));
  EXPECT_EQ(model->CopyBranch(second, first).code(), Status::Code::kFailedPrecondition) << "a frozen branch is seeded";
  EXPECT_EQ(model->CopyBranch(9, second).code(), Status::Code::kNotFound);
}

// An adapter's trunk deltas train at train.trunkDeltaLrScale × the learning rate, its low-rank
// factors at train.adapterLrScale ×: at a trunk scale of 0 the trunk deltas stay zero while the
// factors move; at 3 both move.
TEST(Routing, TrunkDeltasTrainAtTheirOwnLearningRateScale) {
  for (const float trunk_scale : {0.0f, 3.0f}) {
    torch::manual_seed(9);
    Config c = TwoBlockModel();
    c.mutable_train()->set_trunk_delta_lr_scale(trunk_scale);
    TransformerLM model(c.model());
    Trainer trainer(model, c.train());
    const int64_t base = model->PeerLayers()[0]->segments()[0]->id();
    const int64_t id = GrowRouted(trainer, base, 4);
    for (int i = 0; i < 3; ++i) trainer.Step(RandomTokens(4, 16));
    const SegmentAdapter& adapter = model->adapters().at(id);
    double trunk = 0, factors = 0;  // both start at zero (B of B·A, and the trunk deltas)
    for (const auto& p : adapter->named_parameters()) {
      const bool b_factor = p.key().size() > 2 && p.key().compare(p.key().size() - 2, 2, "_b") == 0;
      if (adapter->IsTrunkDelta(p.value()))
        trunk += p.value().abs().sum().item<double>();
      else if (b_factor)
        factors += p.value().abs().sum().item<double>();
    }
    EXPECT_GT(factors, 0.0) << "scale " << trunk_scale;
    if (trunk_scale == 0) {
      EXPECT_EQ(trunk, 0.0);
    } else {
      EXPECT_GT(trunk, 0.0);
    }
  }
}

// A checkpoint restores each adapter with the parts it was written with: one with trunk deltas,
// and one without (as every adapter was before they existed), both computing what they computed.
TEST(Routing, ACheckpointRestoresAdaptersWithAndWithoutTrunkDeltas) {
  const std::string dir = ::testing::TempDir() + "/peerd_routing_checkpoint_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  std::shared_ptr<DataDirDb> db;
  ASSERT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
  Checkpointer checkpointer(db);
  torch::manual_seed(8);
  Config c = TwoBlockModel();
  const torch::Tensor probe = RandomTokens(2, 16).slice(1, 0, 16);
  std::map<int64_t, torch::Tensor> outputs;
  {
    TransformerLM model(c.model());
    Trainer trainer(model, c.train());
    ASSERT_TRUE(model->AddAdapter(1, 4, /*trunk_deltas=*/false).ok());
    ASSERT_TRUE(model->AddAdapter(2, 4, /*trunk_deltas=*/true).ok());
    trainer.RefreshParameters();
    for (const int64_t id : {1, 2}) {
      ASSERT_TRUE(model->SetRoute({id, {}}).ok());
      for (int i = 0; i < 3; ++i) trainer.Step(RandomTokens(4, 16));
    }
    ASSERT_TRUE(model->FreezeAdapter(1).ok());
    model->eval();
    for (const int64_t id : {1, 2}) outputs[id] = OutputUnder(model, {id, {}}, probe);
    ASSERT_TRUE(checkpointer.Save(trainer, CheckpointMeta()).ok());
  }
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  CheckpointMeta meta;
  bool found = false;
  Status st = checkpointer.Load(trainer, &meta, &found);
  ASSERT_TRUE(st.ok() && found) << st.ToString();
  ASSERT_EQ(model->adapters().size(), 2u);
  EXPECT_FALSE(model->adapters().at(1)->trunk_deltas());
  EXPECT_TRUE(model->adapters().at(1)->frozen());
  EXPECT_TRUE(model->adapters().at(2)->trunk_deltas());
  model->eval();
  for (const int64_t id : {1, 2}) EXPECT_TRUE(torch::equal(OutputUnder(model, {id, {}}, probe), outputs[id])) << id;
  db.reset();
  std::filesystem::remove_all(dir);
}

// A text of `n` bytes drawn from `alphabet`, reproducibly.
std::string TextOf(const std::string& alphabet, size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string out;
  for (size_t i = 0; i < n; ++i) out.push_back(alphabet[rng() % alphabet.size()]);
  return out;
}

TEST(Routing, ARoutedStreamScoresAnOldDomainExactlyAsBeforeAfterANewOneTrains) {
  torch::manual_seed(6);
  Config c = TwoBlockModel();
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  const std::string letters = TextOf("abcdefgh ", 4000, 1), digits = TextOf("0123456789,", 4000, 2);
  const int64_t base = model->PeerLayers()[0]->segments()[0]->id();
  BigramRouter router;
  router.Observe(base, TextOf("abcdefgh0123456789 ,", 2000, 3));  // the base phase's text
  EvalOptions eval;
  eval.route_context = 32;
  eval.route = [&](std::string_view text) {
    const int64_t r = router.Choose(text);
    return r < 0 || r == base ? Route{-1, {base}} : Route{r, {base, r}};
  };
  auto train_on = [&](const std::string& text, int64_t branch) {
    for (int i = 0; i < 30; ++i) {
      const int64_t at = (i * 97) % static_cast<int64_t>(text.size() - 17);
      std::string window = text.substr(at, 17);
      router.Observe(branch, window);
      trainer.Step(torch::from_blob(window.data(), {1, 17}, torch::kUInt8).to(torch::kInt64).repeat({4, 1}));
    }
  };
  const int64_t first = GrowRouted(trainer, base, 4);
  train_on(letters, first);
  const double letters_after_first = BitsPerByte(model, letters, eval);
  const double digits_before = BitsPerByte(model, digits, eval);
  const int64_t second = GrowRouted(trainer, base, 4);
  train_on(digits, second);
  EXPECT_EQ(BitsPerByte(model, letters, eval), letters_after_first) << "the old domain's score moved";
  EXPECT_LT(BitsPerByte(model, digits, eval), digits_before) << "the new domain was not learnt";
  EXPECT_EQ(router.Choose(digits.substr(0, 64)), second);
  EXPECT_EQ(router.Choose(letters.substr(0, 64)), first);
}

TEST(BigramRouter, SendsATextToTheRouteWhoseTrainingTextItResembles) {
  BigramRouter router;
  EXPECT_EQ(router.Choose("anything"), -1) << "no route has counts yet";
  router.Observe(0, "the quick brown fox jumps over the lazy dog and then the dog sleeps in the sun");
  router.Observe(5, "int main(void) { for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; } return 0; }");
  EXPECT_EQ(router.Choose("the fox and the dog"), 0);
  EXPECT_EQ(router.Choose("for (i = 0; i < 3; ++i) { y[i] = 0; }"), 5);
  EXPECT_EQ(router.routes(), (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(router.LogLikelihoods("ab").size(), 2u);
  EXPECT_GT(router.StatisticsBytes(), 2u * 256 * 256);
}

TEST(BigramRouter, RoundTripsThroughItsBytesAndRefusesDamagedOnes) {
  BigramRouter router(8);
  router.Observe(0, "the quick brown fox jumps over the lazy dog");
  router.Observe(9, "int main(void) { return x[i] * 2; }");
  const std::string bytes = router.Serialize();
  EXPECT_LT(bytes.size(), 16u * 1024) << "only the non-zero bigrams are written";
  BigramRouter copy;
  ASSERT_TRUE(copy.Parse(bytes).ok());
  EXPECT_EQ(copy.routes(), router.routes());
  for (const char* text : {"the dog", "x[i] = 2;", "zzz"}) {
    EXPECT_EQ(copy.LogLikelihoods(text), router.LogLikelihoods(text)) << text;
  }
  EXPECT_EQ(copy.Serialize(), bytes);
  // Every truncation, and a flipped magic, is refused with a reason, and leaves nothing half-read.
  for (size_t n : {size_t{0}, size_t{3}, bytes.size() / 2, bytes.size() - 1}) {
    BigramRouter damaged;
    const Status st = damaged.Parse(std::string_view(bytes).substr(0, n));
    EXPECT_EQ(st.code(), Status::Code::kCorruption) << n << ": " << st.ToString();
    EXPECT_TRUE(damaged.routes().empty()) << n;
  }
  std::string flipped = bytes;
  flipped[0] ^= 1;
  EXPECT_EQ(BigramRouter().Parse(flipped).code(), Status::Code::kCorruption);
  EXPECT_EQ(BigramRouter().Parse(bytes + "x").code(), Status::Code::kCorruption) << "trailing bytes";
}

TEST(Evaluator, ARouteSeesOnlyTheBytesBeforeEachWindowAndItsFirstInput) {
  Config c = TwoBlockModel();  // context 16
  TransformerLM model(c.model());
  std::string text;
  for (int i = 0; i < 100; ++i) text.push_back(static_cast<char>('a' + i % 26));
  EvalOptions o;
  o.route_context = 16;
  std::vector<std::string> seen;
  o.route = [&](std::string_view context) {
    seen.emplace_back(context);
    return Route{};
  };
  const double routed = BitsPerByte(model, text, o);
  // Windows start at 0, 16, 32, 48, 64, 80 (the last one shorter): each route call sees the 16
  // bytes before its window and the window's first byte, never a byte the window predicts.
  ASSERT_EQ(seen.size(), 7u);
  EXPECT_EQ(seen[0], text.substr(0, 1));
  EXPECT_EQ(seen[1], text.substr(0, 17));
  EXPECT_EQ(seen[3], text.substr(32, 17));
  EXPECT_EQ(seen[6], text.substr(80, 17));
  EXPECT_DOUBLE_EQ(routed, BitsPerByte(model, text)) << "the default route is the model's own";
}

}  // namespace
}  // namespace peerd
