// peerd's trainer thread (service/training_loop.*) on a real spool and store, without the network:
// what happens when a training step throws.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <stdexcept>
#include <thread>

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
    EXPECT_TRUE(StoreDb::Open(dir, {}, &db).ok());
    EXPECT_TRUE(Spool::Open(db, &spool).ok());
    std::vector<Spool::NewDocument> docs;
    for (int i = 0; i < 30; ++i) docs.push_back({"doc" + std::to_string(i), std::string(339, static_cast<char>('a' + i % 26))});
    EXPECT_TRUE(spool->AppendAndWait("t", std::move(docs)).ok());
    LoopOptions o;
    o.config = testing::TinyModel();
    o.config.mutable_train()->set_replay_ratio(0);
    o.config.mutable_train()->set_distill_weight(0);
    o.checkpoint_every_steps = 1000;
    o.checkpoint_every_seconds = 1000;
    o.before_step = std::move(before_step);
    Status st = TrainingLoop::Open(o, db, spool.get(), &loop);
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
  std::shared_ptr<StoreDb> db;
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

}  // namespace
}  // namespace peerd
