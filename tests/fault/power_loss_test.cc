// Power loss, not only process death: the trainer thread, the spool and the store run in this
// process over a file system that can lose power (tests/fault/power_loss_fs.h). While documents are
// appended and acknowledged, and segments are added and frozen, the policy changed and checkpoints
// written on another thread, the power goes at a random moment: from then on nothing reaches the
// disk, and every file is cut back to what was synced. The data directory must then open with
// every acknowledged document (its text exact), every acknowledged add and freeze (the frozen rows
// verifying against their checksum, never changed), a checkpoint at least as new as the last
// acknowledged one, and the policy last acknowledged or the one in flight — then train on.
//
// SIGKILL (tests/fault/crash_loop_test.cc) keeps the page cache, so it cannot tell a synced write
// from an unsynced one; this test fails when DataDirDb::SyncedWrite stops syncing.
// PEERD_POWER_CYCLES sets the number of power cuts (default 3); PEERD_FAULT_SEED replays a run.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include <rocksdb/write_batch.h>

#include "service/training_loop.h"
#include "tests/fault/disk_state.h"
#include "tests/fault/power_loss_fs.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

using namespace std::chrono_literals;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoull(v) : fallback;
}

// What was acknowledged: what the disk must hold after any power cut.
struct Acked {
  std::mutex mu;
  std::map<std::string, std::string> documents;  // id -> text
  std::set<uint32_t> adds, freezes;
  double replay_ratio = 0.25;             // the configuration's, until a change is acknowledged
  std::optional<double> ratio_in_flight;  // a change sent and not answered when the power went
  int64_t checkpoint_step = 0;            // of the last acknowledged checkpoint (explicit or by a change)
};

// The trainer as a restart builds it has every acknowledged segment (training ones live in the
// checkpoint, not in a manifest) and the acknowledged policy, or the one in flight at the cut.
void CheckRestored(TrainingLoop& loop, uint64_t cycle, Acked* acked) {
  std::set<uint32_t> present;
  const SegmentsReply segments = loop.Segments();
  for (const SegmentInfo& s : segments.segments()) present.insert(s.id());
  for (uint32_t id : acked->adds)
    EXPECT_TRUE(present.count(id)) << "cycle " << cycle << ": acknowledged add of segment " << id << " lost";
  const double ratio = loop.GetPolicy().replay_ratio();
  EXPECT_TRUE(std::abs(ratio - acked->replay_ratio) < 1e-6 ||
              (acked->ratio_in_flight && std::abs(ratio - *acked->ratio_in_flight) < 1e-6))
      << "cycle " << cycle << ": replayRatio " << ratio << " is neither the acknowledged " << acked->replay_ratio
      << " nor the one in flight";
  acked->replay_ratio = ratio;  // where this cycle starts
  acked->ratio_in_flight.reset();
}

// One run of the service's writers until the power goes.
void RunUntilPowerLoss(const std::string& dir, const Config& config, uint64_t cycle, std::mt19937_64& rng, Acked* acked,
                       uint64_t* dropped_bytes) {
  auto fs = std::make_shared<testing::PowerLossFs>();
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(fs);
  DataDirOptions options;
  options.env = env.get();
  std::shared_ptr<DataDirDb> db;
  Status st = DataDirDb::Open(dir, options, &db);
  ASSERT_TRUE(st.ok()) << "cycle " << cycle << ": " << st.ToString();
  std::unique_ptr<Spool> spool;
  ASSERT_TRUE(Spool::Open(db, &spool).ok());
  LoopOptions lo;
  lo.config = config;
  lo.checkpoint_every_steps = 20;
  lo.checkpoint_every_seconds = 0.5;
  std::unique_ptr<TrainingLoop> loop;
  st = TrainingLoop::Open(lo, db, spool.get(), &loop);
  ASSERT_TRUE(st.ok()) << "cycle " << cycle << ": " << st.ToString();
  CheckRestored(*loop, cycle, acked);
  loop->Start();

  std::atomic<bool> stop{false};
  // Ingest: small appends, each acknowledged only once its batch is synced.
  std::thread ingest([&, irng = std::mt19937_64(rng())]() mutable {
    for (int i = 0; !stop; ++i) {
      std::vector<Spool::NewDocument> docs;
      for (int j = 0; j < 3; ++j) {
        const std::string id = "c" + std::to_string(cycle) + "-" + std::to_string(i) + "-" + std::to_string(j);
        std::string text(40 + irng() % 200, ' ');
        for (char& ch : text) ch = static_cast<char>('a' + irng() % 26);
        docs.push_back({id, text});
      }
      std::vector<Spool::NewDocument> sent = docs;
      if (!spool->AppendAndWait("t", std::move(docs)).ok()) break;  // the power is gone
      std::lock_guard<std::mutex> lock(acked->mu);
      for (const auto& d : sent) acked->documents[d.id] = d.text;
      std::this_thread::sleep_for(std::chrono::milliseconds(irng() % 20));
    }
  });
  // Admin: adds, freezes, policy changes and checkpoints, answered only once written.
  std::thread admin([&, arng = std::mt19937_64(rng())]() mutable {
    while (!stop) {
      const int op = static_cast<int>(arng() % 4);
      if (op == 0) {
        std::vector<uint32_t> ids;
        if (loop->AddSegments(std::nullopt, std::nullopt, &ids).ok()) {
          std::lock_guard<std::mutex> lock(acked->mu);
          acked->adds.insert(ids.begin(), ids.end());
          acked->checkpoint_step = std::max<int64_t>(acked->checkpoint_step, loop->Snapshot().last_checkpoint_step());
        }
      } else if (op == 1) {
        std::optional<uint32_t> training;
        int count = 0;
        const SegmentsReply segments = loop->Segments();
        for (const SegmentInfo& s : segments.segments())
          if (!s.frozen()) ++count, training = training.value_or(s.id());
        std::vector<uint32_t> layers;
        if (count > 1 && loop->FreezeSegment(*training, std::nullopt, std::nullopt, &layers).ok()) {
          std::lock_guard<std::mutex> lock(acked->mu);
          acked->freezes.insert(*training);
          acked->checkpoint_step = std::max<int64_t>(acked->checkpoint_step, loop->Snapshot().last_checkpoint_step());
        }
      } else if (op == 2) {
        const double ratio = 0.1 * static_cast<double>(1 + arng() % 3);
        {
          std::lock_guard<std::mutex> lock(acked->mu);
          acked->ratio_in_flight = ratio;
        }
        Policy p;
        p.set_replay_ratio(ratio);
        const bool ok = loop->SetPolicy(p).ok();
        std::lock_guard<std::mutex> lock(acked->mu);
        if (ok) {
          acked->replay_ratio = ratio;
          acked->ratio_in_flight.reset();
          acked->checkpoint_step = std::max<int64_t>(acked->checkpoint_step, loop->Snapshot().last_checkpoint_step());
        }
      } else if (loop->Checkpoint().ok()) {
        std::lock_guard<std::mutex> lock(acked->mu);
        acked->checkpoint_step = std::max<int64_t>(acked->checkpoint_step, loop->Snapshot().last_checkpoint_step());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20 + arng() % 150));
    }
  });

  std::this_thread::sleep_for(std::chrono::milliseconds(400 + rng() % 1600));
  fs->PowerLoss();
  stop = true;
  ingest.join();
  admin.join();
  (void)loop->Stop(/*checkpoint=*/false);
  loop.reset();
  spool.reset();
  db.reset();
  *dropped_bytes = fs->DropUnsyncedData();
}

TEST(PowerLoss, AcknowledgedDocumentsFreezesAndCheckpointsSurviveLosingEverythingNotSynced) {
  const uint64_t cycles = EnvOr("PEERD_POWER_CYCLES", 3);
  const uint64_t seed = EnvOr("PEERD_FAULT_SEED", std::random_device{}());
  std::mt19937_64 rng(seed);
  std::cout << "power loss: " << cycles << " cycles, PEERD_FAULT_SEED=" << seed << "\n";
  const std::string dir = ::testing::TempDir() + "/peerd_power_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  Config config = testing::TinyModel();
  config.mutable_train()->set_keep_trained_text(true);  // the spool keeps every text to compare
  config.mutable_train()->set_threads(1);

  Acked acked;
  std::map<uint32_t, uint64_t> frozen_first;  // each segment's checksum when first seen frozen
  uint64_t dropped_total = 0;
  for (uint64_t cycle = 0; cycle < cycles; ++cycle) {
    uint64_t dropped = 0;
    ASSERT_NO_FATAL_FAILURE(RunUntilPowerLoss(dir, config, cycle, rng, &acked, &dropped));
    dropped_total += dropped;

    testing::DiskState disk;
    ASSERT_NO_FATAL_FAILURE(testing::ReadDisk(dir, &disk)) << "cycle " << cycle;
    for (uint32_t id : acked.freezes)
      EXPECT_TRUE(disk.frozen.count(id)) << "acknowledged freeze of segment " << id << " lost";
    for (const auto& [id, checksum] : disk.frozen) {
      auto [it, first] = frozen_first.emplace(id, checksum);
      EXPECT_TRUE(first || it->second == checksum) << "frozen segment " << id << " changed";
    }
    EXPECT_GE(disk.checkpoint.step(), acked.checkpoint_step)
        << "cycle " << cycle << ": an acknowledged checkpoint was lost";
    std::shared_ptr<DataDirDb> db;
    ASSERT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
    std::unique_ptr<Spool> spool;
    ASSERT_TRUE(Spool::Open(db, &spool).ok());
    std::vector<SpoolEntry> stored;
    ASSERT_TRUE(spool->Read(1, 1 << 30, &stored).ok());
    std::map<std::string, std::string> on_disk;
    for (const SpoolEntry& e : stored) on_disk[e.id] = e.text;
    uint64_t lost = 0, changed = 0;
    for (const auto& [id, text] : acked.documents) {
      auto it = on_disk.find(id);
      lost += it == on_disk.end();
      changed += it != on_disk.end() && it->second != text;
    }
    EXPECT_EQ(lost, 0u) << "cycle " << cycle << ": acknowledged documents lost to the power cut";
    EXPECT_EQ(changed, 0u) << "cycle " << cycle << ": acknowledged documents whose text changed";
    std::cout << "power loss: cycle " << cycle << ": " << acked.documents.size() << " documents acknowledged so far, "
              << lost << " lost; " << dropped << " unsynced bytes dropped; checkpoint step " << disk.checkpoint.step()
              << " (acknowledged " << acked.checkpoint_step << "); " << acked.adds.size() << " adds, "
              << acked.freezes.size() << " freezes acknowledged, " << disk.frozen.size() << " frozen on disk\n";
    if (::testing::Test::HasFailure()) break;
  }
  // The last cut, seen by a trainer opened as peerd would open it after the power came back.
  {
    std::shared_ptr<DataDirDb> db;
    ASSERT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
    std::unique_ptr<Spool> spool;
    ASSERT_TRUE(Spool::Open(db, &spool).ok());
    LoopOptions lo;
    lo.config = config;
    std::unique_ptr<TrainingLoop> loop;
    Status st = TrainingLoop::Open(lo, db, spool.get(), &loop);
    ASSERT_TRUE(st.ok()) << st.ToString();
    CheckRestored(*loop, cycles, &acked);
  }
  std::cout << "power loss: " << dropped_total << " unsynced bytes dropped in all\n";
  std::filesystem::remove_all(dir);
}

// The control: the simulation does lose what was written without a sync, and keeps what was
// synced — so the test above would see a missing sync.
TEST(PowerLoss, TheSimulationLosesAWriteThatWasNotSyncedAndKeepsOneThatWas) {
  const std::string dir = ::testing::TempDir() + "/peerd_power_control_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  {
    auto fs = std::make_shared<testing::PowerLossFs>();
    std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(fs);
    DataDirOptions options;
    options.env = env.get();
    std::shared_ptr<DataDirDb> db;
    ASSERT_TRUE(DataDirDb::Open(dir, options, &db).ok());
    rocksdb::WriteBatch synced;
    synced.Put(db->family(Family::kEvals), "synced", "kept");
    ASSERT_TRUE(db->SyncedWrite(&synced, "the synced write").ok());
    ASSERT_TRUE(db->db()->Put(rocksdb::WriteOptions(), db->family(Family::kEvals), "unsynced", "lost").ok());
    fs->PowerLoss();
    db.reset();
    EXPECT_GT(fs->DropUnsyncedData(), 0u);
  }
  std::shared_ptr<DataDirDb> db;
  ASSERT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
  std::string value;
  EXPECT_TRUE(db->db()->Get(rocksdb::ReadOptions(), db->family(Family::kEvals), "synced", &value).ok());
  EXPECT_EQ(value, "kept");
  EXPECT_TRUE(db->db()->Get(rocksdb::ReadOptions(), db->family(Family::kEvals), "unsynced", &value).IsNotFound())
      << "a write that was never synced survived the power cut";
  db.reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace peerd
