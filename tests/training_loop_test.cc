// peerd's trainer thread (service/training_loop.*) on a real spool and store, without the network:
// what happens when a training step throws.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <stdexcept>
#include <thread>

#include <rocksdb/db.h>

#include "experts_store/format.h"
#include "service/training_loop.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

using namespace std::chrono_literals;

// A fresh store with 30 documents of 339 bytes in its spool, and a trainer thread over it: with
// their end-of-document tokens, exactly 600 windows of the tiny model's 16 + 1 tokens (150 batches
// of 4), so every byte trains in full batches.
struct Loop {
  explicit Loop(const std::string& name, std::function<void(int64_t)> before_step = {})
      : dir(::testing::TempDir() + "/peerd_loop_" + name + "_" + std::to_string(getpid())) {
    std::filesystem::remove_all(dir);
    EXPECT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
    EXPECT_TRUE(Spool::Open(db, &spool).ok());
    std::vector<Spool::NewDocument> docs;
    for (int i = 0; i < 30; ++i)
      docs.push_back({"doc" + std::to_string(i), std::string(339, static_cast<char>('a' + i % 26))});
    EXPECT_TRUE(spool->AppendAndWait("t", std::move(docs)).ok());
    options.config = testing::TinyModel();
    options.config.mutable_train()->set_replay_ratio(0);
    options.config.mutable_train()->set_distill_weight(0);
    options.checkpoint_every_steps = 1000;
    options.checkpoint_every_seconds = 1000;
    options.before_step = std::move(before_step);
    Reopen();
  }
  // A new trainer over the same data dir, as peerd builds after a restart.
  void Reopen() {
    if (loop) loop->Stop(false);
    loop.reset();
    Status st = TrainingLoop::Open(options, db, spool.get(), &loop);
    EXPECT_TRUE(st.ok()) << st.ToString();
  }
  ~Loop() {
    if (loop) loop->Stop(false);
    loop.reset();
    spool.reset();
    db.reset();
    std::filesystem::remove_all(dir);
  }
  // Polls the status until `done` holds of it, or `limit` passes (then fails, saying what was awaited).
  StatusReply WaitFor(const std::function<bool(const StatusReply&)>& done, const std::string& what,
                      std::chrono::seconds limit = 60s) {
    StatusReply s;
    for (auto deadline = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < deadline;) {
      s = loop->Snapshot();
      if (done(s)) return s;
      std::this_thread::sleep_for(20ms);
    }
    ADD_FAILURE() << "waited " << limit.count() << " s for " << what << "; state: " << s.state();
    return s;
  }
  StatusReply WaitUntilAllTrained() {
    return WaitFor([](const StatusReply& s) { return s.spool_backlog_bytes() == 0 && s.state() == "waiting for data"; },
                   "every document to be trained");
  }

  std::string dir;
  LoopOptions options;
  std::shared_ptr<DataDirDb> db;
  std::unique_ptr<Spool> spool;
  std::unique_ptr<TrainingLoop> loop;
};

TEST(TrainingLoop, AStepThatThrowsStopsTrainingNotPeerdAndResumeTrainsEveryDocumentOnce) {
  // What the same data trains to when nothing fails.
  StatusReply reference;
  {
    Loop clean("clean");
    clean.loop->Start();
    reference = clean.WaitUntilAllTrained();
  }
  ASSERT_GT(reference.step(), 10u);

  std::atomic<bool> thrown{false};
  Loop failing("throws", [&thrown](int64_t step) {
    if (step == 5 && !thrown.exchange(true)) throw std::runtime_error("injected: out of memory");
  });
  failing.loop->Start();
  StatusReply stopped = failing.WaitFor([](const StatusReply& s) { return !s.training_error().empty(); },
                                        "the injected failure to stop training");
  EXPECT_NE(stopped.training_error().find("injected: out of memory"), std::string::npos) << stopped.training_error();
  EXPECT_NE(stopped.state().find("stopped by an error"), std::string::npos) << stopped.state();
  EXPECT_EQ(stopped.step(), 5u);
  // peerd is still there: the trainer thread answers admin operations, and trains nothing.
  EXPECT_TRUE(failing.loop->Checkpoint().ok());
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(failing.loop->Snapshot().step(), 5u);

  failing.loop->SetPaused(false);  // POST /v1/train/resume
  StatusReply done = failing.WaitUntilAllTrained();
  EXPECT_TRUE(done.training_error().empty());
  // The batch that failed was trained after the resume, not skipped: the same steps and tokens.
  EXPECT_EQ(done.step(), reference.step());
  EXPECT_EQ(done.tokens_trained(), reference.tokens_trained());
}

TEST(TrainingLoop, AnOperationTheTrainerCannotTakeInTimeIsRefusedAndNeverRunsLate) {
  std::atomic<bool> in_long_step{false};
  Loop l("busy", [&](int64_t step) {
    if (step != 3) return;
    in_long_step = true;
    std::this_thread::sleep_for(1500ms);  // a step far longer than the wait below
    in_long_step = false;
  });
  l.options.trainer_wait_seconds = 0.3;
  l.Reopen();
  const double lr_before = l.loop->GetPolicy().lr();
  l.loop->Start();
  for (auto deadline = std::chrono::steady_clock::now() + 60s; !in_long_step;) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "the trainer never reached step 3";
    std::this_thread::sleep_for(5ms);
  }
  Policy p;
  p.set_lr(lr_before / 2);
  const auto asked = std::chrono::steady_clock::now();
  Status st = l.loop->SetPolicy(p);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - asked).count();
  EXPECT_EQ(st.code(), Status::Code::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("did not take this request within"), std::string::npos) << st.message();
  EXPECT_LT(waited, 1.2) << "the answer waited for the long step";
  // The step ends and the trainer serves its queue: the refused change must not happen late.
  l.WaitFor([](const StatusReply& s) { return s.step() >= 5; }, "training past the long step");
  EXPECT_EQ(l.loop->GetPolicy().lr(), lr_before) << "an operation answered 'not done' ran afterwards";
  // With the trainer free again the same change is taken and done.
  ASSERT_TRUE(l.loop->SetPolicy(p).ok());
  EXPECT_EQ(l.loop->GetPolicy().lr(), lr_before / 2);
}

TEST(TrainingLoop, APolicySetBeforeARestartIsThePolicyAfterIt) {
  Loop l("policy");
  l.loop->Start();
  l.WaitUntilAllTrained();  // past step 0, where every schedule is at its peak
  // An lr below the configured min_lr (1e-3) pulls min_lr down with it; fp32 frozen rows.
  Policy set;
  set.set_lr(1e-4);
  set.set_freeze_dtype("fp32");
  Status st = l.loop->SetPolicy(set);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const double rate_before = l.loop->Snapshot().learning_rate();
  EXPECT_LE(rate_before, 1e-4 * 1.0001);

  l.Reopen();  // no Stop(true): the checkpoint after the policy change is what restores it
  const Policy restored = l.loop->GetPolicy();
  EXPECT_FLOAT_EQ(restored.lr(), 1e-4f);
  EXPECT_EQ(restored.freeze_dtype(), "fp32");
  const StatusReply s = l.loop->Snapshot();
  EXPECT_GT(s.step(), 10u);
  EXPECT_DOUBLE_EQ(s.learning_rate(), rate_before) << "the schedule decays towards the min_lr the policy set";
  // The restored default dtype is what a freeze without one writes.
  std::vector<uint32_t> layers;
  ASSERT_TRUE(l.loop->FreezeSegment(0, std::nullopt, std::nullopt, &layers).ok());
  const SegmentsReply segments = l.loop->Segments();
  ASSERT_EQ(segments.segments_size(), 1);
  EXPECT_EQ(segments.segments(0).state(), "frozen");
  EXPECT_EQ(segments.segments(0).dtype(), "fp32");
}

TEST(TrainingLoop, RetentionBoundsTheKeptTrainedTextAndNeverPrunesUntrainedDocuments) {
  // 30 documents of 339 bytes (10,170), trained text kept for replay within 2,000 bytes.
  Loop l("retention");
  l.options.config.mutable_train()->set_keep_trained_text(true);
  l.options.retention.max_bytes = 2000;
  l.Reopen();
  // Nothing trained yet: nothing may go, however far over the bound.
  ASSERT_TRUE(l.loop->Checkpoint().ok());
  EXPECT_EQ(l.spool->pruned_before(), 1u);
  EXPECT_EQ(l.spool->stats().kept_bytes, 30u * 339);

  l.loop->Start();
  l.WaitUntilAllTrained();
  ASSERT_TRUE(l.loop->Checkpoint().ok());
  const SpoolStats s = l.spool->stats();
  EXPECT_LE(s.kept_bytes, 2000u);
  EXPECT_GT(s.kept_bytes, 2000u - 339) << "the newest documents stay, as many as fit";
  SpoolEntry newest;
  EXPECT_TRUE(l.spool->Get(30, &newest).ok()) << "the newest trained document is kept for replay";
}

TEST(TrainingLoop, ScoringATextChangesNothingAndScoresAsItsEvaluationDoes) {
  Loop l("score");
  l.loop->Start();
  l.WaitUntilAllTrained();
  std::string text;
  for (int i = 0; i < 40; ++i) text += "abcdefghij klmnop " + std::to_string(i) + "\n";
  ASSERT_TRUE(l.loop->tasks().PutTask("held", text).ok());
  EvalRow row;
  ASSERT_TRUE(l.loop->Evaluate("after held", &row).ok());
  const SegmentsReply segments_before = l.loop->Segments();

  ScoreReply plain, detailed;
  ASSERT_TRUE(l.loop->Score(text, /*log_probs=*/false, &plain).ok());
  ASSERT_TRUE(l.loop->Score(text, /*log_probs=*/true, &detailed).ok());
  EXPECT_DOUBLE_EQ(plain.bits_per_byte(), row.bits_per_byte(0)) << "the same computation as the evaluation row";
  EXPECT_NEAR(detailed.bits_per_byte(), plain.bits_per_byte(), 1e-5);
  EXPECT_EQ(plain.bytes(), text.size());
  EXPECT_EQ(plain.log_probs_size(), 0);
  // Every byte but the first is predicted, once, in text order.
  ASSERT_EQ(detailed.log_probs_size(), static_cast<int>(detailed.predicted_bytes()));
  ASSERT_EQ(detailed.offsets_size(), detailed.log_probs_size());
  double nats = 0;
  for (int i = 0; i < detailed.log_probs_size(); ++i) {
    EXPECT_LE(detailed.log_probs(i), 0.0f);
    EXPECT_EQ(detailed.offsets(i), static_cast<uint64_t>(i + 1));
    nats -= detailed.log_probs(i);
  }
  EXPECT_EQ(detailed.predicted_bytes(), text.size() - 1);
  EXPECT_NEAR(nats / detailed.log_probs_size() / std::log(2.0), detailed.bits_per_byte(), 1e-4);
  // Which segments answered: one layer here, its shares summing to 1.
  double share = 0;
  for (const auto& seg : detailed.segments()) share += seg.share();
  ASSERT_GT(detailed.segments_size(), 0);
  EXPECT_NEAR(share, 1.0, 1e-9);

  // No side effect: one evaluation row, the usage the last evaluation measured (a short text of
  // other bytes, scored last, retrieves other experts).
  ScoreReply other;
  ASSERT_TRUE(l.loop->Score("zzzz", /*log_probs=*/false, &other).ok());
  std::vector<EvalRow> rows;
  ASSERT_TRUE(l.loop->tasks().Rows(&rows).ok());
  EXPECT_EQ(rows.size(), 1u);
  const SegmentsReply segments_after = l.loop->Segments();
  ASSERT_EQ(segments_after.segments_size(), segments_before.segments_size());
  for (int i = 0; i < segments_after.segments_size(); ++i)
    EXPECT_EQ(segments_after.segments(i).usage(), segments_before.segments(i).usage());

  // Deleting the task takes its text and its column of the rows; the row stays.
  ASSERT_TRUE(l.loop->DeleteTask("held").ok());
  std::vector<HeldOutTask> tasks;
  ASSERT_TRUE(l.loop->tasks().Tasks(&tasks).ok());
  EXPECT_TRUE(tasks.empty());
  ASSERT_TRUE(l.loop->tasks().Rows(&rows).ok());
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].tasks_size(), 0);
  EXPECT_EQ(rows[0].label(), "after held");
  EXPECT_EQ(l.loop->DeleteTask("held").code(), Status::Code::kNotFound);
}

// With cached residency a restart reads no frozen rows (its time does not grow with the pool); the
// rows are checked against their checksums beside training, and a segment damaged on disk stops
// training with an error naming it.
TEST(TrainingLoop, ACachedPoolIsCheckedAfterOpeningAndADamagedSegmentStopsTraining) {
  Loop l("verify");
  std::vector<uint32_t> layers;
  ASSERT_TRUE(l.loop->FreezeSegment(0, std::nullopt, std::nullopt, &layers).ok());
  std::vector<uint32_t> ids;
  ASSERT_TRUE(l.loop->AddSegments(std::nullopt, std::nullopt, &ids).ok());
  // One byte of one row of segment 0 changed through RocksDB itself (its block checksums agree).
  const std::string key = store::ExpertKey(0, 0, 5);
  std::string row;
  ASSERT_TRUE(l.db->db()->Get(rocksdb::ReadOptions(), l.db->family(Family::kExperts), key, &row).ok());
  row[3] ^= 0x10;
  ASSERT_TRUE(l.db->db()->Put(rocksdb::WriteOptions(), l.db->family(Family::kExperts), key, row).ok());

  l.options.pool.residency = Residency::kCached;
  l.Reopen();  // opens: the rows are not read yet
  l.loop->Start();
  const StatusReply s =
      l.WaitFor([](const StatusReply& r) { return !r.training_error().empty(); }, "the check to find segment 0");
  EXPECT_NE(s.training_error().find("layer 0 segment 0"), std::string::npos) << s.training_error();
  EXPECT_NE(s.state().find("stopped by an error"), std::string::npos) << s.state();
  EXPECT_TRUE(s.paused());

  // Asked to check at open, the restart itself refuses the damaged segment.
  l.loop->Stop(false);
  l.loop.reset();
  l.options.pool.verify_cached_at_open = true;
  std::unique_ptr<TrainingLoop> refused;
  const Status st = TrainingLoop::Open(l.options, l.db, l.spool.get(), &refused);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
  EXPECT_NE(st.message().find("layer 0 segment 0"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace peerd
