// Frozen segments live in and come back from the expert store: reopened in a new process the
// model computes exactly what it did (fp32 bit-identical; bf16 as held since freezing), a cache
// smaller than the frozen rows gives the same outputs and training as resident rows, and a
// corrupted segment is refused by name.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/model.h"
#include "core/runtime.h"
#include "core/trainer.h"
#include "experts_store/format.h"
#include "service/expert_pool_store.h"
#include "tests/raw_rocksdb.h"
#include "tests/test_util.h"

namespace peerd::testing {

namespace fs = std::filesystem;

namespace {

Config StoreModel() {
  Config c = TinyModel();
  c.mutable_model()->mutable_peer()->set_n_keys(16);  // 256 experts × 32 wide per segment
  return c;
}

std::string FreshDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/peerd_pool_" + name + "_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Trains a model, freezes segment 0 as fp32 and segment 1 as bf16 into the store at dir/store,
// leaves segment 2 training. Returns the model.
TransformerLM BuildAndFreeze(const std::string& dir) {
  torch::manual_seed(42);
  Config c = StoreModel();
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  std::unique_ptr<ExpertStore> store;
  Status st = ExpertStore::Open(dir + "/store", {}, &store);
  EXPECT_TRUE(st.ok()) << st.ToString();
  ExpertPoolStore pool(store.get(), {});
  for (int i = 0; i < 3; ++i) trainer.Step(torch::randint(256, {4, 17}));
  EXPECT_TRUE(trainer.FreezeSegment(0, 0, pool.Freezing(ROW_DTYPE_FP32, 3, 192)).ok());
  EXPECT_TRUE(trainer.AddSegment(0, 16).ok());
  for (int i = 0; i < 3; ++i) trainer.Step(torch::randint(256, {4, 17}));
  EXPECT_TRUE(trainer.FreezeSegment(0, 1, pool.Freezing(ROW_DTYPE_BF16, 6, 384)).ok());
  EXPECT_TRUE(trainer.AddSegment(0, 16).ok());
  for (int i = 0; i < 2; ++i) trainer.Step(torch::randint(256, {4, 17}));
  return model;
}

// Loads what a restored model lacks — the parameters that still train — from `from`.
void CopyTrainable(TransformerLM& to, const TransformerLM& from) {
  torch::NoGradGuard no_grad;
  auto src = from->ClassifiedParameters(), dst = to->ClassifiedParameters();
  ASSERT_EQ(src.size(), dst.size());
  for (size_t i = 0; i < src.size(); ++i) {
    ASSERT_EQ(src[i].name, dst[i].name);
    dst[i].tensor.copy_(src[i].tensor);
  }
}

// Restores a fresh model from the store in `residency`.
TransformerLM Restored(ExpertStore* store, Residency residency, size_t cache_bytes,
                       std::unique_ptr<ExpertPoolStore>* pool) {
  torch::manual_seed(7);  // different from BuildAndFreeze: nothing may come from the seed
  TransformerLM model(StoreModel().model());
  *pool = std::make_unique<ExpertPoolStore>(store, PoolStoreOptions{residency, cache_bytes});
  Status st = (*pool)->Restore(model);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(model->PeerLayers()[0]->AddSegment(16).ok());  // segment 2, training
  return model;
}

}  // namespace

// The second process of RoundTripInANewProcess: restore, load the training parameters the first
// process saved, compute, save.
int PoolStoreReader(const char* dir_c) {
  const std::string dir = dir_c;
  // The writer's thread counts: a parallel reduction split another way rounds differently.
  int threads = 1;
  std::ifstream(dir + "/threads") >> threads;
  SetComputeThreads(static_cast<uint32_t>(threads));
  std::unique_ptr<ExpertStore> store;
  if (Status st = ExpertStore::Open(dir + "/store", {}, &store); !st.ok()) {
    std::fprintf(stderr, "reader: %s\n", st.ToString().c_str());
    return 1;
  }
  std::unique_ptr<ExpertPoolStore> pool;
  TransformerLM model = Restored(store.get(), Residency::kResident, 0, &pool);
  std::vector<torch::Tensor> trainable;
  torch::load(trainable, dir + "/trainable.pt");
  auto params = model->ClassifiedParameters();
  if (params.size() != trainable.size()) return 2;
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) params[i].tensor.copy_(trainable[i]);
  }
  std::vector<torch::Tensor> input;
  torch::load(input, dir + "/input.pt");
  model->eval();
  torch::NoGradGuard no_grad;
  PeerLayer layer = model->PeerLayers()[0];
  Retrieval r = layer->Retrieve(layer->Query(input[0]));
  std::vector<int64_t> checksums;
  for (const auto& s : layer->segments())
    checksums.push_back(static_cast<int64_t>(s->frozen() ? s->frozen_checksum() : 0));
  std::vector<torch::Tensor> out = {layer->forward(input[0]), model->forward(input[1]), r.segment, r.index,
                                    torch::tensor(checksums)};
  torch::save(out, dir + "/reader_out.pt");
  return 0;
}

namespace {

TEST(PoolStore, RoundTripInANewProcessGivesIdenticalRetrievalAndOutputs) {
  const std::string dir = FreshDir("roundtrip");
  // Both processes compute with the same thread counts (LibTorch's, and one BLAS thread).
  const int threads = SetComputeThreads(static_cast<uint32_t>(at::get_num_threads()));
  TransformerLM model = BuildAndFreeze(dir);
  std::ofstream(dir + "/threads") << threads;
  std::vector<torch::Tensor> trainable;
  for (const auto& p : model->ClassifiedParameters()) trainable.push_back(p.tensor.detach().clone());
  torch::save(trainable, dir + "/trainable.pt");
  torch::Tensor x = torch::randn({64, 32}), tokens = torch::randint(256, {2, 16});
  std::vector<torch::Tensor> input = {x, tokens};
  torch::save(input, dir + "/input.pt");

  model->eval();
  torch::NoGradGuard no_grad;
  PeerLayer layer = model->PeerLayers()[0];
  torch::Tensor y = layer->forward(x), logits = model->forward(tokens);
  Retrieval r = layer->Retrieve(layer->Query(x));
  ASSERT_EQ(layer->segments()[1]->down.scalar_type(), torch::kBFloat16) << "bf16 segment should be held as bf16";

  const std::string self = fs::read_symlink("/proc/self/exe").string();
  ASSERT_EQ(std::system((self + " --pool-store-reader " + dir).c_str()), 0);
  std::vector<torch::Tensor> got;
  torch::load(got, dir + "/reader_out.pt");
  EXPECT_TRUE(torch::equal(got[2], r.segment)) << "retrieval chose other segments";
  EXPECT_TRUE(torch::equal(got[3], r.index)) << "retrieval chose other experts";
  EXPECT_TRUE(torch::equal(got[0], y)) << "layer output differs: " << (got[0] - y).abs().max().item<float>();
  EXPECT_TRUE(torch::equal(got[1], logits)) << "model output differs";
  for (int s = 0; s < 2; ++s)
    EXPECT_EQ(static_cast<uint64_t>(got[4][s].item<int64_t>()), layer->segments()[s]->frozen_checksum())
        << "segment " << s;
  EXPECT_TRUE((r.segment == 0).any().item<bool>() && (r.segment == 1).any().item<bool>())
      << "the fixed input should retrieve from both frozen segments";
}

TEST(PoolStore, Bf16FreezeStaysWithinItsRoundingOfTheFp32Output) {
  torch::manual_seed(3);
  const std::string dir = FreshDir("bf16");
  Config c = StoreModel();
  TransformerLM model(c.model());
  Trainer trainer(model, c.train());
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir + "/store", {}, &store).ok());
  ExpertPoolStore pool(store.get(), {});
  PeerLayer layer = model->PeerLayers()[0];
  layer->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({64, 32});
  torch::Tensor fp32 = layer->forward(x);
  ASSERT_TRUE(trainer.FreezeSegment(0, 0, pool.Freezing(ROW_DTYPE_BF16, 0, 0)).ok());
  torch::Tensor bf16 = layer->forward(x);
  EXPECT_FALSE(torch::equal(bf16, fp32));
  EXPECT_TRUE(torch::allclose(bf16, fp32, 2e-2, 1e-3)) << (bf16 - fp32).abs().max().item<float>();
}

TEST(PoolStore, CacheSmallerThanTheFrozenRowsGivesTheSameOutputsAndTrainingAsResident) {
  const std::string dir = FreshDir("cached");
  TransformerLM original = BuildAndFreeze(dir);
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir + "/store", {}, &store).ok());
  std::unique_ptr<ExpertPoolStore> resident_pool, cached_pool;
  TransformerLM resident = Restored(store.get(), Residency::kResident, 0, &resident_pool);
  const size_t frozen_bytes = 256 * 32 * 2 * 4 + 256 * 32 * 2 * 2;  // fp32 + bf16 segments
  const size_t cache_bytes = 4 << 10;
  ASSERT_LT(cache_bytes * 4, frozen_bytes);
  TransformerLM cached = Restored(store.get(), Residency::kCached, cache_bytes, &cached_pool);
  CopyTrainable(resident, original);
  CopyTrainable(cached, original);
  EXPECT_FALSE(cached->PeerLayers()[0]->segments()[0]->resident());
  EXPECT_EQ(cached->TotalParameters(), resident->TotalParameters());

  {
    torch::NoGradGuard no_grad;
    resident->eval();
    cached->eval();
    torch::Tensor tokens = torch::randint(256, {8, 16});
    EXPECT_TRUE(torch::equal(cached->forward(tokens), resident->forward(tokens)));
    // Under a route that leaves cached segment 1 out, the step passes it over and computes the same.
    ASSERT_TRUE(cached->SetRoute(Route{-1, {0, 2}}).ok());
    ASSERT_TRUE(resident->SetRoute(Route{-1, {0, 2}}).ok());
    EXPECT_TRUE(torch::equal(cached->forward(tokens), resident->forward(tokens)));
    ASSERT_TRUE(cached->SetRoute(Route{}).ok());
    ASSERT_TRUE(resident->SetRoute(Route{}).ok());
  }
  // Train both the same way: the frozen segments are read, segment 2 trains.
  Config c = StoreModel();
  Trainer t_resident(resident, c.train()), t_cached(cached, c.train());
  for (int i = 0; i < 5; ++i) {
    torch::Tensor batch = torch::randint(256, {4, 17});
    const double cached_loss = t_cached.Step(batch).loss, resident_loss = t_resident.Step(batch).loss;
    EXPECT_EQ(cached_loss, resident_loss) << "step " << i << ": " << cached_loss << " vs " << resident_loss;
  }
  RowCache::Stats s = cached_pool->cache_stats();
  EXPECT_GT(s.misses, 0u);
  EXPECT_GT(s.hits, 0u);
  EXPECT_GT(s.misses * 128, s.capacity_bytes) << "the rows read should not all fit in the cache";
  EXPECT_LE(s.usage_bytes, s.capacity_bytes + 1024);
  std::printf("cache: %llu hits, %llu rows fetched, %zu of %zu bytes used (frozen rows: %zu bytes)\n",
              (unsigned long long)s.hits, (unsigned long long)s.misses, s.usage_bytes, s.capacity_bytes, frozen_bytes);
}

TEST(PoolStore, RestoreRefusesACorruptedSegmentByName) {
  const std::string dir = FreshDir("corrupt");
  BuildAndFreeze(dir);
  {  // Change one byte of one bf16 row of segment 1 through RocksDB itself.
    RawRocksDb raw(dir + "/store");
    ASSERT_TRUE(raw.ok());
    std::string row;
    ASSERT_TRUE(raw.db()->Get(rocksdb::ReadOptions(), raw.family("experts"), store::ExpertKey(0, 1, 100), &row).ok());
    row[10] ^= 0x01;
    ASSERT_TRUE(raw.db()->Put(rocksdb::WriteOptions(), raw.family("experts"), store::ExpertKey(0, 1, 100), row).ok());
  }
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir + "/store", {}, &store).ok());
  // Resident rows are verified as they load; cached ones too when asked to at open.
  for (bool verify_cached_at_open : {false, true}) {
    TransformerLM model(StoreModel().model());
    ExpertPoolStore pool(store.get(), {Residency::kResident, 1 << 20, verify_cached_at_open});
    Status st = pool.Restore(model);
    EXPECT_EQ(st.code(), Status::Code::kCorruption);
    EXPECT_NE(st.message().find("layer 0 segment 1"), std::string::npos) << st.message();
  }
  {
    TransformerLM model(StoreModel().model());
    ExpertPoolStore pool(store.get(), {Residency::kCached, 1 << 20, true});
    Status st = pool.Restore(model);
    EXPECT_EQ(st.code(), Status::Code::kCorruption);
    EXPECT_NE(st.message().find("layer 0 segment 1"), std::string::npos) << st.message();
  }
  // Cached, by default: opening reads no rows, and the check afterwards finds the segment.
  TransformerLM model(StoreModel().model());
  ExpertPoolStore pool(store.get(), {Residency::kCached, 1 << 20});
  ASSERT_TRUE(pool.Restore(model).ok());
  EXPECT_EQ(pool.unverified(), 2u) << "segments 0 and 1";
  size_t verified = 99;
  Status st = pool.VerifyRestored(nullptr, &verified);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_NE(st.message().find("layer 0 segment 1"), std::string::npos) << st.message();
  EXPECT_EQ(verified, 1u) << "segment 0 is sound";
  EXPECT_EQ(pool.unverified(), 1u);
}

TEST(PoolStore, OpeningACachedPoolReadsNoRows) {
  const std::string dir = FreshDir("open-cached");
  BuildAndFreeze(dir);
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir + "/store", {}, &store).ok());
  TransformerLM model(StoreModel().model());
  ExpertPoolStore pool(store.get(), {Residency::kCached, 1 << 20});
  const uint64_t before = store->rows_read();
  ASSERT_TRUE(pool.Restore(model).ok());
  EXPECT_EQ(store->rows_read(), before) << "opening read rows";
  ASSERT_TRUE(pool.VerifyRestored([] { return false; }).ok());
  EXPECT_GT(store->rows_read(), before) << "the check reads every row";
  EXPECT_EQ(pool.unverified(), 0u);
  size_t verified = 99;
  ASSERT_TRUE(pool.VerifyRestored(nullptr, &verified).ok());
  EXPECT_EQ(verified, 0u) << "nothing left to check";
}

// A pool that grows for ever under cached residency must not grow in memory as it freezes: the
// frozen rows leave the model for the store at once, and everything computes as if they stayed.
TEST(PoolStore, FreezingACachedPoolLeavesTheRowsInTheStoreAndComputesWhatResidentDoes) {
  struct Run {
    std::vector<double> losses;
    torch::Tensor logits;
    int64_t held_values = 0, total_parameters = 0;
    bool resident = true, rows_defined = true;
    RowCache::Stats cache;
  };
  torch::manual_seed(11);
  std::vector<torch::Tensor> batches;
  for (int i = 0; i < 6; ++i) batches.push_back(torch::randint(256, {4, 17}));
  const torch::Tensor tokens = torch::randint(256, {4, 16});
  auto run = [&](Residency residency) {
    Run out;
    const std::string dir = FreshDir(residency == Residency::kCached ? "freeze-cached" : "freeze-resident");
    std::unique_ptr<ExpertStore> store;
    EXPECT_TRUE(ExpertStore::Open(dir + "/store", {}, &store).ok());
    ExpertPoolStore pool(store.get(), {residency, 4 << 10});
    torch::manual_seed(5);
    Config c = StoreModel();
    TransformerLM model(c.model());
    Trainer trainer(model, c.train());
    for (int i = 0; i < 3; ++i) out.losses.push_back(trainer.Step(batches[i]).loss);
    EXPECT_TRUE(trainer.FreezeSegment(0, 0, pool.Freezing(ROW_DTYPE_BF16, 3, 192)).ok());
    torch::manual_seed(6);
    EXPECT_TRUE(trainer.AddSegment(0, 16).ok());
    for (int i = 3; i < 6; ++i) out.losses.push_back(trainer.Step(batches[i]).loss);
    const ExpertSegmentImpl& frozen = *model->PeerLayers()[0]->segments()[0];
    out.resident = frozen.resident();
    out.rows_defined = frozen.down.defined() || frozen.up.defined();
    for (const auto& p : model->parameters()) out.held_values += p.numel();
    out.total_parameters = model->TotalParameters();
    torch::NoGradGuard no_grad;
    model->eval();
    out.logits = model->forward(tokens);
    out.cache = pool.cache_stats();
    return out;
  };
  const Run resident = run(Residency::kResident), cached = run(Residency::kCached);
  EXPECT_TRUE(resident.resident);
  EXPECT_FALSE(cached.resident) << "the frozen rows stayed in memory";
  EXPECT_FALSE(cached.rows_defined);
  EXPECT_EQ(resident.held_values - cached.held_values, 2 * 256 * 32) << "the model still holds the rows";
  EXPECT_EQ(cached.total_parameters, resident.total_parameters);
  EXPECT_GT(cached.cache.misses, 0u) << "the frozen rows were not read from the store";
  EXPECT_EQ(resident.cache.misses, 0u);
  ASSERT_EQ(cached.losses.size(), resident.losses.size());
  for (size_t i = 0; i < cached.losses.size(); ++i) EXPECT_EQ(cached.losses[i], resident.losses[i]) << i;
  EXPECT_TRUE(torch::equal(cached.logits, resident.logits));
}

TEST(PoolStore, RestoreRefusesAStoreThatDoesNotFitTheModel) {
  const std::string dir = FreshDir("mismatch");
  BuildAndFreeze(dir);
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir + "/store", {}, &store).ok());
  Config other = StoreModel();
  other.mutable_model()->set_d_model(48);
  other.mutable_model()->set_n_heads(4);
  TransformerLM model(other.model());
  ExpertPoolStore pool(store.get(), {});
  Status st = pool.Restore(model);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("use the configuration this data directory was trained with"), std::string::npos)
      << st.message();
}

}  // namespace
}  // namespace peerd::testing
