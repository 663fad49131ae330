// Routing isolation (docs/DESIGN.md): a segment owns its experts and its adapter, a route runs
// one of them, and what a frozen route computes never changes while later ones train; the
// bigram router picks a route from the text alone; the evaluator never shows a route a byte it
// scores.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/evaluator.h"
#include "core/model.h"
#include "core/routed_branches.h"
#include "core/text_router.h"
#include "core/trainer.h"
#include "experts_store/data_dir_db.h"
#include "service/checkpoint.h"
#include "service/segment_report.h"
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

// Text of "domain" d: a byte Markov chain of its own over 12 letters, each followed by one of 3
// (chain and probabilities drawn from d; the sample from `seed`).
std::string ChainText(int domain, size_t bytes, uint64_t seed) {
  std::mt19937_64 chain(1000 + domain), rng(seed);
  std::vector<std::array<char, 3>> next(12);
  for (auto& n : next)
    for (char& c : n) c = static_cast<char>('a' + 2 * domain + chain() % 12);
  std::string out;
  int at = 0;
  while (out.size() < bytes) {
    const uint64_t roll = rng() % 10;
    const char c = next[at][roll < 6 ? 0 : roll < 9 ? 1 : 2];
    out.push_back(c);
    at = (c - 'a' - 2 * domain + 24) % 12;
  }
  return out;
}

// 8 domains, `per_domain` routes each, every route its own 9 KB sample: route r is of domain r % 8.
BigramRouter ManyRoutes(int per_domain) {
  BigramRouter router;
  for (int r = 0; r < 8 * per_domain; ++r) router.Observe(r, ChainText(r % 8, 9 << 10, 77 + r));
  return router;
}

// With many routes Choose scores the clusters and the best clusters' members only, and a window
// still goes to a route of its own domain; a route not in a cluster yet is always a candidate.
TEST(BigramRouter, ManyRoutesAreSearchedThroughClustersAndWindowsStillReachTheirDomain) {
  BigramRouter router = ManyRoutes(25);
  const auto clusters = router.clusters();
  EXPECT_GE(clusters.size(), 8u) << "fewer clusters than domains";
  EXPECT_LE(clusters.size(), 15u) << "more than ⌈√200⌉ clusters";
  std::vector<int64_t> clustered;
  for (const auto& k : clusters) {
    clustered.insert(clustered.end(), k.begin(), k.end());
    for (int64_t r : k) EXPECT_EQ(r % 8, k[0] % 8) << "a cluster mixes domains";
  }
  std::sort(clustered.begin(), clustered.end());
  EXPECT_EQ(clustered, router.routes()) << "every route in exactly one cluster";
  // A new domain's route with less text than a cluster needs.
  router.Observe(1000, ChainText(9, 2000, 5));
  for (int d : {0, 3, 7, 9}) {
    for (int w = 0; w < 5; ++w) {
      const std::string window = ChainText(d, 65, 9000 + w);
      size_t scored = 0;
      const int64_t chosen = router.Choose(window, &scored);
      EXPECT_LT(scored, 100u) << "the clusters and the best of them searched, not all 201 routes";
      if (d == 9) {
        EXPECT_EQ(chosen, 1000) << "the unclustered route was not considered";
      } else {
        EXPECT_EQ(chosen % 8, d) << "window " << w << " of domain " << d << " went to route " << chosen;
      }
      router.set_probes(0);
      const int64_t all = router.Choose(window, &scored);
      EXPECT_EQ(scored, 201u);
      EXPECT_EQ(d == 9 ? all == 1000 : all % 8 == d, true) << "scoring every route";
      router.set_probes(4);
    }
  }
}

// Ranked lists the routes by their likelihood of the text, best first, whether it scores every
// route or searches the clusters; Choose is its first.
TEST(BigramRouter, RankedListsTheMostLikelyRoutesBestFirstAndChooseIsItsFirst) {
  BigramRouter few = ManyRoutes(1);  // 8 routes: every one scored
  const std::string text = ChainText(3, 400, 11);
  const std::vector<double> ll = few.LogLikelihoods(text);
  std::vector<int64_t> by_likelihood = few.routes();
  std::stable_sort(by_likelihood.begin(), by_likelihood.end(), [&](int64_t a, int64_t b) { return ll[a] > ll[b]; });
  EXPECT_EQ(few.Ranked(text, 8), by_likelihood);
  EXPECT_EQ(few.Ranked(text, 100), by_likelihood) << "no more than there are";
  EXPECT_EQ(few.Ranked(text, 3), std::vector<int64_t>(by_likelihood.begin(), by_likelihood.begin() + 3));
  ASSERT_EQ(few.Ranked(text, 1).size(), 1u);
  EXPECT_EQ(few.Ranked(text, 1).front(), few.Choose(text));
  EXPECT_EQ(few.Ranked(text, 1).front(), 3);
  EXPECT_TRUE(few.Ranked("a", 4).empty()) << "no bigram";

  BigramRouter many = ManyRoutes(25);  // 200 routes: the clusters searched
  for (int d : {0, 5}) {
    const std::string window = ChainText(d, 65, 700 + d);
    size_t scored = 0;
    const std::vector<int64_t> best = many.Ranked(window, 6, &scored);
    ASSERT_EQ(best.size(), 6u);
    EXPECT_LT(scored, 100u) << "the clusters searched, not every route";
    EXPECT_EQ(best.front(), many.Choose(window));
    for (int64_t r : best) EXPECT_EQ(r % 8, d) << "route " << r << " ranked among the best for domain " << d;
    const std::vector<double> lls = many.LogLikelihoods(window);
    for (size_t i = 1; i < best.size(); ++i) EXPECT_GE(lls[best[i - 1]], lls[best[i]]) << "not best first at " << i;
  }
}

// The candidates a text's windows choose among when the model routes: the router's most likely,
// and the newest branch in the last place when they leave it out; never more than k.
TEST(RoutedBranches, CandidatesAreTheRoutersMostLikelyWithTheNewestBranchLast) {
  RoutedBranches branches;
  branches.router = ManyRoutes(1);  // branches 0..7; 7 is the newest
  const std::string text = ChainText(2, 400, 12);
  const std::vector<int64_t> ranked = branches.router.Ranked(text, 3);
  ASSERT_EQ(std::count(ranked.begin(), ranked.end(), 7), 0) << "the test needs the newest out of the top 3";
  EXPECT_EQ(branches.Candidates(text, 3), (std::vector<int64_t>{ranked[0], ranked[1], 7}));
  EXPECT_EQ(branches.Candidates(text, 1), std::vector<int64_t>{7});
  const std::string newest_text = ChainText(7, 400, 13);
  EXPECT_EQ(branches.Candidates(newest_text, 3), branches.router.Ranked(newest_text, 3)) << "already among them";
  std::vector<int64_t> all = branches.Candidates(text, 64);
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, branches.router.routes()) << "every branch when k is at least their number";
  EXPECT_TRUE(branches.Candidates(text, 0).empty());
}

TEST(BigramRouter, ClustersSurviveItsBytesAndOldBytesAreClusteredAfresh) {
  BigramRouter router = ManyRoutes(10);
  router.Observe(500, "a route with little text, in no cluster");
  const std::string bytes = router.Serialize();
  BigramRouter copy;
  ASSERT_TRUE(copy.Parse(bytes).ok());
  EXPECT_EQ(copy.clusters(), router.clusters());
  EXPECT_EQ(copy.Serialize(), bytes);
  for (int d = 0; d < 8; ++d) {
    const std::string window = ChainText(d, 65, 300 + d);
    EXPECT_EQ(copy.Choose(window), router.Choose(window));
  }
  // Bytes of the first format (no clusters): read, and clustered afresh.
  const size_t cluster_section = 8 + 4 * router.routes().size();
  std::string v1 = "BGR1" + bytes.substr(4, bytes.size() - 4 - cluster_section);
  BigramRouter old;
  const Status st = old.Parse(v1);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(old.routes(), router.routes());
  EXPECT_GE(old.clusters().size(), 8u);
  EXPECT_LE(old.clusters().size(), 9u) << "⌈√80⌉";
  // A route named into a cluster that does not exist.
  std::string damaged = bytes;
  damaged[damaged.size() - 8] = 0x7f;  // route 79's cluster (route 500 is in none)
  EXPECT_EQ(BigramRouter().Parse(damaged).code(), Status::Code::kCorruption);
}

// scripts/load_export.py routes a routed export's windows as peerd does: beyond kScoreAll
// branches it must search the same clusters, read from the same bytes, and pick the same branch —
// windows part one domain, part another, and a few bytes long (several clusters searched) — and
// propose the same candidates for the model to choose among (RoutedBranches::Candidates).
TEST(BigramRouter, TheExportScriptSearchesTheSameClustersAndChoosesAndProposesAsPeerdDoes) {
  BigramRouter router = ManyRoutes(12);
  router.Observe(500, ChainText(2, 3000, 8));  // not clustered yet
  ASSERT_GT(router.routes().size(), BigramRouter::kScoreAll);
  ASSERT_GT(router.clusters().size(), 1u);
  RoutedBranches branches;  // and the candidates the model would choose among, newest (500) last
  branches.router = router;
  std::vector<std::string> expected_candidates;
  const std::string dir = ::testing::TempDir() + "/peerd_router_script_" + std::to_string(getpid());
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/router.bin", std::ios::binary) << router.Serialize();
  std::ofstream windows(dir + "/windows.txt");
  std::vector<int64_t> expected;
  int beyond_the_first_cluster = 0;  // windows whose choice searching one cluster would miss
  for (int d = 0; d < 8; ++d)
    for (int e = 0; e < 8; ++e)
      for (int split : {1, 2, 3, 8, 24, 40, 57}) {  // short windows leave the clusters' posterior spread
        const std::string text = split <= 3 ? ChainText(d, split, 40 + e) + ChainText(e, 2, 50 + d)
                                            : ChainText(d, split, 40 + e) + ChainText(e, 65 - split, 50 + d);
        expected.push_back(router.Choose(text));
        std::string joined;
        for (int64_t b : branches.Candidates(text, 4)) joined += (joined.empty() ? "" : " ") + std::to_string(b);
        expected_candidates.push_back(joined);
        router.set_probes(1);
        beyond_the_first_cluster += router.Choose(text) != expected.back();
        router.set_probes(4);
        windows << text << "\n";
      }
  windows.close();
  EXPECT_GT(beyond_the_first_cluster, 0) << "no window needed a second cluster: the test would not see one missed";
  std::ofstream(dir + "/choose.py") << "import sys\nsys.path.insert(0, '" PEERD_SOURCE_DIR
                                       "/scripts')\n"
                                       "import load_export\n"
                                       "class Bytes:\n"
                                       "    def tolist(self):\n"
                                       "        return list(open(sys.argv[1] + '/router.bin', 'rb').read())\n"
                                       "router = load_export.BigramRouter(Bytes())\n"
                                       "for line in open(sys.argv[1] + '/windows.txt', 'rb'):\n"
                                       "    text = line.rstrip(b'\\n')\n"
                                       "    print(router.choose(text))\n"
                                       "    print(' '.join(str(b) for b in router.candidates(text, 4)))\n";
  FILE* p = popen(("/usr/bin/python3 " + dir + "/choose.py " + dir + " 2>&1").c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  ASSERT_EQ(pclose(p), 0) << out;
  std::istringstream lines(out);
  for (size_t i = 0; i < expected.size(); ++i) {
    std::string chosen, candidates;
    std::getline(lines, chosen);
    std::getline(lines, candidates);
    EXPECT_EQ(chosen, std::to_string(expected[i])) << "window " << i << "\n" << out.substr(0, 2000);
    EXPECT_EQ(candidates, expected_candidates[i]) << "window " << i;
  }
  std::filesystem::remove_all(dir);
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

// A model (context 16) with two branches over its base: one trained on letters, then one on digits.
struct LettersAndDigits {
  bool seeded = (torch::manual_seed(7), true);  // before the model's initialisation
  Config c = TwoBlockModel();
  TransformerLM model{c.model()};
  int64_t base = -1, on_letters = -1, on_digits = -1;
  std::string letters = TextOf("abcdefgh ", 4000, 1), digits = TextOf("0123456789,", 4000, 2);

  // The branches over the base, their router having counted `on_letters_text` under the letters
  // branch and `on_digits_text` under the digits one.
  RoutedBranches Branches(const std::string& on_letters_text, const std::string& on_digits_text) const {
    RoutedBranches branches;
    branches.base = base;
    branches.base_segments = {base};
    branches.router.Observe(on_letters, on_letters_text);
    branches.router.Observe(on_digits, on_digits_text);
    return branches;
  }

  LettersAndDigits() {
    Trainer trainer(model, c.train());
    base = model->PeerLayers()[0]->segments()[0]->id();
    auto train_on = [&](const std::string& text) {
      for (int i = 0; i < 30; ++i) {
        std::string window = text.substr((i * 97) % static_cast<int64_t>(text.size() - 17), 17);
        trainer.Step(torch::from_blob(window.data(), {1, 17}, torch::kUInt8).to(torch::kInt64).repeat({4, 1}));
      }
    };
    on_letters = GrowRouted(trainer, base, 4);
    train_on(letters);
    on_digits = GrowRouted(trainer, base, 4);
    train_on(digits);
  }
};

TEST(Evaluator, RoutingByCandidatesRunsEachWindowUnderTheRouteThatPredictedTheBytesBeforeItBest) {
  LettersAndDigits trained;
  TransformerLM& model = trained.model;
  const std::string &letters = trained.letters, &digits = trained.digits;
  const int64_t base = trained.base, on_letters = trained.on_letters, on_digits = trained.on_digits;
  const Route letters_route{on_letters, {base, on_letters}}, digits_route{on_digits, {base, on_digits}};

  // Windows start every 16 bytes and alternate: even ones letters, odd ones digits.
  std::string text;
  for (int w = 0; w < 20; ++w) text += (w % 2 ? digits : letters).substr(100 + 16 * w, 16);
  text += "0";
  EvalOptions o;
  o.route_context = 16;  // the window before
  o.candidates = [&](std::string_view) { return std::vector<Route>{letters_route, digits_route}; };
  o.route = [&](std::string_view) { return digits_route; };  // what decides before anything is scored
  const TextScore score = ScoreText(model, text, o);
  ASSERT_EQ(score.chosen.size(), 20u);
  EXPECT_EQ(score.chosen[0], 1u) << "the first window falls back to the text's router";
  // Each window runs the route of the window before it, never chosen by its own bytes.
  for (size_t w = 1; w < 20; ++w) EXPECT_EQ(score.chosen[w], w % 2 ? 0u : 1u) << "window " << w;

  // The score is each window's under the route chosen for it.
  double nats = 0;
  for (size_t w = 0; w < 20; ++w) {
    ASSERT_TRUE(model->SetRoute(score.chosen[w] == 0 ? letters_route : digits_route).ok());
    nats += BitsPerByte(model, text.substr(16 * w, 17)) * 16 * std::log(2.0);
  }
  EXPECT_NEAR(score.bits_per_byte, nats / 320 / std::log(2.0), 1e-5);
  // The log-probabilities kept are those of the routes chosen.
  const TextScore kept = ScoreText(model, text, o, /*keep_log_probs=*/true);
  ASSERT_EQ(kept.log_probs.size(), 320u);
  double kept_nats = 0;
  for (float lp : kept.log_probs) kept_nats -= lp;
  EXPECT_NEAR(kept_nats, nats, 1e-3);
}

// Routing by the model where the bigram router is wrong (its statistics swapped: letters counted
// under the digits branch and digits under the letters one): the windows of a letters text run the
// letters branch, which scores the text better than the router's choice; a prompt of letters
// (generation's choice, BestBranchFor among the candidates) goes there too.
TEST(RoutedBranches, ModelOptionsRouteWindowsToTheBranchThatPredictsThemBestWhereTheRouterErrs) {
  LettersAndDigits trained;
  TransformerLM& model = trained.model;
  const RoutedBranches branches = trained.Branches(trained.digits, trained.letters);  // swapped
  const std::string text = trained.letters.substr(200, 16 * 12 + 1);
  EvalOptions o;
  const EvalOptions by_router = branches.ModelOptions(o, 16, 0);
  const EvalOptions by_model = branches.ModelOptions(o, 16, 2);
  ASSERT_FALSE(by_router.candidates) << "0 candidates: the router alone";
  const TextScore routed = ScoreText(model, text, by_router), chosen = ScoreText(model, text, by_model);
  ASSERT_EQ(chosen.chosen.size(), 12u);
  // The first window has nothing before it: it runs the router's pick from its first byte alone —
  // no bigram, so the base, which is no candidate and joins them.
  ASSERT_EQ(chosen.candidates.size(), 3u);
  EXPECT_EQ(chosen.candidates[chosen.chosen[0]].adapter, -1) << "the first window: the router's (the base)";
  for (size_t w = 1; w < chosen.chosen.size(); ++w)
    EXPECT_EQ(chosen.candidates[chosen.chosen[w]].adapter, trained.on_letters) << "window " << w;
  EXPECT_LT(chosen.bits_per_byte, routed.bits_per_byte - 0.1);
  EXPECT_EQ(BestBranchFor(model, branches, text, branches.Candidates(text, 2)), trained.on_letters);
}

// The segments a routed evaluation reports as used are those of the routes its windows ran, not
// of every candidate the choosing passes scored: letters text, routed by the model, never runs the
// digits branch, so the digits segment counts no retrieval.
TEST(RoutedBranches, SegmentUsageCountsTheScoringPassNotThePassesThatChoose) {
  LettersAndDigits trained;
  TransformerLM& model = trained.model;
  const RoutedBranches branches = trained.Branches(trained.letters, trained.digits);
  const std::string text = trained.letters.substr(300, 16 * 12 + 1);
  EvalOptions o = branches.ModelOptions(EvalOptions{}, 16, 2);
  StartUsageRecording(model);
  CountUsageWhileScoring(model, &o);
  const TextScore score = ScoreText(model, text, o);
  const UsageBySegment usage = StopUsageRecording(model);
  ASSERT_EQ(score.candidates.size(), 3u) << "both branches, and the base the first window runs";
  for (size_t w = 0; w < score.chosen.size(); ++w)
    ASSERT_NE(score.candidates[score.chosen[w]].adapter, trained.on_digits) << "window " << w;
  auto retrievals = [&](int64_t segment) {
    const auto it = usage.find({0u, static_cast<uint32_t>(segment)});
    return it == usage.end() ? 0.0 : it->second.retrievals;
  };
  EXPECT_GT(retrievals(trained.on_letters), 0);
  EXPECT_EQ(retrievals(trained.on_digits), 0) << "the passes that chose the routes were counted";
}

}  // namespace
}  // namespace peerd
