// The expert store on its own (bytes, no LibTorch): freeze and read back, refuse bad directories,
// detect corruption naming the segment, and survive SIGKILL during a freeze.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "experts_store/bf16.h"
#include "experts_store/expert_store.h"
#include "experts_store/format.h"
#include "tests/raw_rocksdb.h"

namespace peerd {
namespace {

namespace fs = std::filesystem;

std::string FreshDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/peerd_store_" + name + "_" + std::to_string(getpid());
  fs::remove_all(dir);
  return dir;
}

SegmentManifest Manifest(uint32_t layer, uint32_t segment, uint32_t n_keys, uint32_t d, RowDtype dtype) {
  SegmentManifest m;
  m.set_layer(layer);
  m.set_segment(segment);
  m.set_n_keys(n_keys);
  m.set_d_model(d);
  m.set_heads(2);
  m.set_query_dim(4);
  m.set_dtype(dtype);
  m.set_frozen_at_step(123);
  m.set_tokens_seen(4567);
  return m;
}

std::string SubKeys(const SegmentManifest& m, uint8_t fill) {
  return std::string(size_t{m.heads()} * m.n_keys() * m.query_dim() * 4, static_cast<char>(fill));
}

// Deterministic row bytes: a function of (segment, expert, byte position).
ExpertStore::RowWriter Rows(const SegmentManifest& m) {
  const size_t bytes = ExpertStore::RowBytes(m.dtype(), m.d_model());
  const uint32_t seg = m.segment();
  return [bytes, seg](uint32_t e, std::string* row) {
    row->resize(bytes);
    for (size_t i = 0; i < bytes; ++i) (*row)[i] = static_cast<char>((e * 131 + i * 7 + seg * 17) & 0xff);
  };
}

std::string ExpectedRow(const SegmentManifest& m, uint32_t e) {
  std::string r;
  Rows(m)(e, &r);
  return r;
}

TEST(Bf16, RoundsToNearestEvenAndKeepsSpecialValues) {
  EXPECT_EQ(store::Bf16ToFloat(store::FloatToBf16(1.0f)), 1.0f);
  EXPECT_EQ(store::Bf16ToFloat(store::FloatToBf16(-2.5f)), -2.5f);
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one, 1.
  EXPECT_EQ(store::Bf16ToFloat(store::FloatToBf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(store::Bf16ToFloat(store::FloatToBf16(1.0f + 3.0f / 512)), 1.0f + 1.0f / 128);
  EXPECT_TRUE(std::isnan(store::Bf16ToFloat(store::FloatToBf16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(store::Bf16ToFloat(store::FloatToBf16(INFINITY))));
  const float x = 0.123456f;
  EXPECT_NEAR(store::Bf16ToFloat(store::FloatToBf16(x)), x, x / 256);
}

TEST(ExpertStore, FrozenSegmentsComeBackAfterReopenWithManifestsRowsAndSubKeys) {
  const std::string dir = FreshDir("roundtrip");
  SegmentManifest a = Manifest(0, 0, 8, 16, ROW_DTYPE_FP32), b = Manifest(0, 1, 4, 16, ROW_DTYPE_BF16),
                  c = Manifest(1, 0, 5, 8, ROW_DTYPE_BF16);
  {
    std::unique_ptr<ExpertStore> store;
    ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
    for (const auto* m : {&c, &a, &b}) {
      SegmentManifest written;
      Status st = store->FreezeSegment(*m, SubKeys(*m, m->segment() + 1), Rows(*m), &written);
      ASSERT_TRUE(st.ok()) << st.ToString();
      EXPECT_EQ(written.state(), SEGMENT_STATE_FROZEN);
      EXPECT_NE(written.checksum(), 0u);
    }
  }
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
  std::vector<SegmentManifest> ms;
  ASSERT_TRUE(store->Manifests(&ms).ok());
  ASSERT_EQ(ms.size(), 3u);  // ordered by (layer, segment) whatever the freeze order
  EXPECT_EQ(std::make_pair(ms[0].layer(), ms[0].segment()), std::make_pair(0u, 0u));
  EXPECT_EQ(std::make_pair(ms[1].layer(), ms[1].segment()), std::make_pair(0u, 1u));
  EXPECT_EQ(std::make_pair(ms[2].layer(), ms[2].segment()), std::make_pair(1u, 0u));
  EXPECT_EQ(ms[1].dtype(), ROW_DTYPE_BF16);
  EXPECT_EQ(ms[1].frozen_at_step(), 123u);
  EXPECT_EQ(ms[1].tokens_seen(), 4567u);
  for (const auto& m : ms) {
    Status st = store->VerifySegment(m);
    EXPECT_TRUE(st.ok()) << st.ToString();
    std::string sub;
    ASSERT_TRUE(store->ReadSubKeys(m.layer(), m.segment(), &sub).ok());
    EXPECT_EQ(sub, SubKeys(m, m.segment() + 1));
    uint32_t seen = 0;
    ASSERT_TRUE(store
                    ->ScanSegment(m,
                                  [&](uint32_t e, std::string_view row) {
                                    EXPECT_EQ(std::string(row), ExpectedRow(m, e));
                                    ++seen;
                                  })
                    .ok());
    EXPECT_EQ(seen, m.n_keys() * m.n_keys());
  }
  std::vector<std::string> rows;
  ASSERT_TRUE(store->ReadRows(0, 0, {63, 0, 17, 17}, &rows).ok());
  EXPECT_EQ(rows[0], ExpectedRow(a, 63));
  EXPECT_EQ(rows[1], ExpectedRow(a, 0));
  EXPECT_EQ(rows[2], ExpectedRow(a, 17));
  EXPECT_EQ(rows[3], ExpectedRow(a, 17));
  EXPECT_EQ(store->ReadRows(0, 0, {64}, &rows).code(), Status::Code::kNotFound);
}

TEST(ExpertStore, FreezingAFrozenSegmentIsRefusedAndChangesNothing) {
  const std::string dir = FreshDir("twice");
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
  SegmentManifest m = Manifest(0, 0, 4, 8, ROW_DTYPE_FP32), written;
  ASSERT_TRUE(store->FreezeSegment(m, SubKeys(m, 1), Rows(m), &written).ok());
  Status st = store->FreezeSegment(m, SubKeys(m, 9), [](uint32_t, std::string* r) { r->assign(64, 'x'); });
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_NE(st.message().find("layer 0 segment 0"), std::string::npos) << st.message();
  EXPECT_TRUE(store->VerifySegment(written).ok());
}

TEST(ExpertStore, RowsOfTheWrongSizeAreRefusedAndNothingIsWritten) {
  const std::string dir = FreshDir("badrows");
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
  SegmentManifest m = Manifest(0, 0, 4, 8, ROW_DTYPE_FP32);
  Status st =
      store->FreezeSegment(m, SubKeys(m, 1), [](uint32_t e, std::string* r) { r->assign(e == 9 ? 3 : 64, 'x'); });
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("row 9"), std::string::npos) << st.message();
  std::vector<SegmentManifest> ms;
  ASSERT_TRUE(store->Manifests(&ms).ok());
  EXPECT_TRUE(ms.empty());
  EXPECT_EQ(store->FreezeSegment(m, "short", Rows(m)).code(), Status::Code::kInvalidArgument);
}

// 65,536 sub-keys per half is the largest segment a configuration may ask for: 2^32 experts, a
// count that wraps to 0 in 32 bits (a freeze would then store no rows at all and succeed).
TEST(ExpertStore, TheLargestSegmentCountsAllItsRowsWithoutWrapping) {
  const std::string dir = FreshDir("largest");
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
  SegmentManifest m = Manifest(0, 0, 65536, 8, ROW_DTYPE_FP32);
  const size_t row_bytes = ExpertStore::RowBytes(m.dtype(), m.d_model());
  uint64_t asked = 0;
  // The writer gives a short 3rd row, so the freeze stops there, refused.
  Status st = store->FreezeSegment(m, SubKeys(m, 1), [&](uint32_t e, std::string* r) {
    ++asked;
    r->assign(e == 2 ? 3 : row_bytes, 'x');
  });
  EXPECT_EQ(asked, 3u);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("row 2"), std::string::npos) << st.message();
  std::vector<SegmentManifest> ms;
  ASSERT_TRUE(store->Manifests(&ms).ok());
  EXPECT_TRUE(ms.empty());
}

TEST(ExpertStore, AFlippedByteInAFrozenRowIsCorruptionNamingTheSegment) {
  const std::string dir = FreshDir("flip");
  SegmentManifest m = Manifest(2, 5, 4, 8, ROW_DTYPE_BF16);
  {
    std::unique_ptr<ExpertStore> store;
    ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
    ASSERT_TRUE(store->FreezeSegment(m, SubKeys(m, 1), Rows(m), &m).ok());
  }
  {  // Damage one row behind the store's back, through RocksDB itself (so only our checksum can tell).
    testing::RawRocksDb raw(dir);
    ASSERT_TRUE(raw.ok());
    std::string row = ExpectedRow(m, 7);
    row[3] ^= 0x10;
    ASSERT_TRUE(raw.db()->Put(rocksdb::WriteOptions(), raw.family("experts"), store::ExpertKey(2, 5, 7), row).ok());
  }
  std::unique_ptr<ExpertStore> store;
  ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
  Status st = store->VerifySegment(m);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_NE(st.message().find("layer 2 segment 5"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("checksum"), std::string::npos) << st.message();
}

TEST(ExpertStore, DamagedTableFileIsCorruptionNamingTheSegment) {
  const std::string dir = FreshDir("sst");
  SegmentManifest m = Manifest(0, 3, 16, 32, ROW_DTYPE_FP32);
  {
    std::unique_ptr<ExpertStore> store;
    ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
    ASSERT_TRUE(store->FreezeSegment(m, SubKeys(m, 1), Rows(m), &m).ok());
    ASSERT_TRUE(store->Flush().ok());
  }
  // The largest table file holds the rows: flip a byte in its middle.
  fs::path biggest;
  for (const auto& f : fs::directory_iterator(dir))
    if (f.path().extension() == ".sst" && (biggest.empty() || f.file_size() > fs::file_size(biggest)))
      biggest = f.path();
  ASSERT_FALSE(biggest.empty());
  {
    std::fstream f(biggest, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(fs::file_size(biggest) / 3);
    char c;
    f.read(&c, 1);
    c ^= 0x5a;
    f.seekp(fs::file_size(biggest) / 3);
    f.write(&c, 1);
  }
  std::unique_ptr<ExpertStore> store;
  Status st = ExpertStore::Open(dir, {}, &store);
  if (st.ok()) st = store->VerifySegment(m);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  if (store) {
    EXPECT_NE(st.message().find("layer 0 segment 3"), std::string::npos) << st.message();
  }
}

TEST(ExpertStore, RefusesADirectoryThatIsNotAStore) {
  const std::string dir = FreshDir("notastore");
  fs::create_directories(dir);
  std::ofstream(dir + "/notes.txt") << "my files";
  std::unique_ptr<ExpertStore> store;
  Status st = ExpertStore::Open(dir, {}, &store);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("is not a peerd store"), std::string::npos) << st.message();
  EXPECT_TRUE(fs::exists(dir + "/notes.txt"));  // and nothing of the user's was touched

  st = ExpertStore::Open(dir + "/notes.txt", {}, &store);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("is a file"), std::string::npos) << st.message();

  // Some other program's RocksDB database.
  const std::string other = FreshDir("otherdb");
  rocksdb::DB* db = nullptr;
  rocksdb::Options o;
  o.create_if_missing = true;
  ASSERT_TRUE(rocksdb::DB::Open(o, other, &db).ok());
  delete db;
  st = ExpertStore::Open(other, {}, &store);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("not a peerd store"), std::string::npos) << st.message();
}

TEST(ExpertStore, RefusesAStoreFromANewerSchemaVersion) {
  const std::string dir = FreshDir("newer");
  {
    std::unique_ptr<ExpertStore> store;
    ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
  }
  {
    testing::RawRocksDb raw(dir);
    ASSERT_TRUE(raw.ok());
    StoreMeta meta;
    meta.set_schema_version(store::kSchemaVersion + 1);
    ASSERT_TRUE(raw.db()->Put(rocksdb::WriteOptions(), store::kMetaKey, meta.SerializeAsString()).ok());
  }
  std::unique_ptr<ExpertStore> store;
  Status st = ExpertStore::Open(dir, {}, &store);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_NE(st.message().find("schema version 2, newer"), std::string::npos) << st.message();
}

TEST(ExpertStore, RefusesAReadOnlyDirectoryWithAClearMessage) {
  const std::string dir = FreshDir("readonly");
  fs::create_directories(dir);
  ASSERT_EQ(chmod(dir.c_str(), 0555), 0);
  // Root writes anywhere, so the check runs as an unprivileged user in a child process.
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (getuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(3);
    std::unique_ptr<ExpertStore> store;
    Status st = ExpertStore::Open(dir, {}, &store);
    const bool clear = !st.ok() && st.message().find("not writable") != std::string::npos &&
                       st.message().find(dir) != std::string::npos;
    _exit(clear ? 0 : 1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  chmod(dir.c_str(), 0755);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "child could not drop privileges (3) or got an unclear error (1)";
}

// SIGKILL at random moments while a child freezes a large segment: every reopen finds the
// segment either absent (still training) or frozen in full with a valid checksum — never half.
TEST(ExpertStore, SigkillDuringFreezeLeavesTheSegmentTrainingOrFrozenInFull) {
  const std::string dir = FreshDir("crash");
  {
    std::unique_ptr<ExpertStore> store;
    ASSERT_TRUE(ExpertStore::Open(dir, {}, &store).ok());
  }
  // Run the child once to the end: the kill moments are spread over [0, 1.3 × its duration], so
  // both outcomes occur on a fast machine or a slow one.
  auto run_child = [&](const SegmentManifest& m) {
    pid_t pid = fork();
    if (pid == 0) {
      std::unique_ptr<ExpertStore> store;
      if (!ExpertStore::Open(dir, {}, &store).ok()) _exit(2);
      _exit(store->FreezeSegment(m, SubKeys(m, 1), Rows(m)).ok() ? 0 : 1);
    }
    return pid;
  };
  auto t0 = std::chrono::steady_clock::now();
  pid_t timing = run_child(Manifest(1, 0, 128, 128, ROW_DTYPE_FP32));
  ASSERT_GE(timing, 0);
  int timing_status = 0;
  waitpid(timing, &timing_status, 0);
  ASSERT_TRUE(WIFEXITED(timing_status) && WEXITSTATUS(timing_status) == 0);
  const int window_us = static_cast<int>(
      1.3 * std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count());
  std::mt19937 rng(20261122);
  int frozen = 0, training = 0;
  for (uint32_t trial = 0; trial < 24; ++trial) {
    SegmentManifest m = Manifest(0, trial, 128, 128, trial % 2 ? ROW_DTYPE_BF16 : ROW_DTYPE_FP32);
    pid_t pid = run_child(m);
    ASSERT_GE(pid, 0);
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, window_us)(rng)));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);

    std::unique_ptr<ExpertStore> store;
    Status st = ExpertStore::Open(dir, {}, &store);
    ASSERT_TRUE(st.ok()) << "trial " << trial << ": " << st.ToString();
    std::vector<SegmentManifest> ms;
    ASSERT_TRUE(store->Manifests(&ms).ok());
    auto it = std::find_if(ms.begin(), ms.end(), [&](const SegmentManifest& x) { return x.segment() == trial; });
    if (it == ms.end()) {
      ++training;
      std::vector<std::string> rows;  // no stray rows of a half-written segment either
      EXPECT_EQ(store->ReadRows(0, trial, {0}, &rows).code(), Status::Code::kNotFound) << "trial " << trial;
    } else {
      ++frozen;
      Status v = store->VerifySegment(*it);
      EXPECT_TRUE(v.ok()) << "trial " << trial << ": " << v.ToString();
    }
    for (const auto& x : ms) ASSERT_TRUE(store->VerifySegment(x).ok()) << "earlier segment damaged";
  }
  std::printf("24 SIGKILL trials over %d us: %d segments frozen in full, %d left training\n", window_us, frozen,
              training);
  EXPECT_GT(frozen, 0) << "no trial finished: the kill window is too short to test both outcomes";
  EXPECT_GT(training, 0) << "every trial finished: the kill window is too long to test both outcomes";
}

}  // namespace
}  // namespace peerd
