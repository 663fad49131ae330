// The training history (service/training_history.h): bounded however long it runs, every step
// covered exactly once with its means kept, and what a restart rolls back dropped.
#include <gtest/gtest.h>

#include <unistd.h>
#include <cmath>

#include <filesystem>

#include "service/training_history.h"

namespace peerd {
namespace {

HistoryPoint Step(uint64_t step) {
  HistoryPoint p;
  p.set_step(step);
  p.set_unix_ms(1000 * step);
  p.set_loss(std::sin(0.01 * step) + 2);
  p.set_bits_per_byte(p.loss() / std::log(2.0));
  p.set_learning_rate(1e-3);
  p.set_grad_norm(0.5 + (step % 7));
  p.set_tokens_per_second(1000 + step % 13);
  return p;
}

// A fresh data directory's database, removed with the object.
struct TempDb {
  explicit TempDb(const std::string& name)
      : dir(::testing::TempDir() + "/peerd_history_" + name + "_" + std::to_string(getpid())) {
    std::filesystem::remove_all(dir);
    EXPECT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
  }
  ~TempDb() {
    db.reset();
    std::filesystem::remove_all(dir);
  }
  std::string dir;
  std::shared_ptr<DataDirDb> db;
};

TEST(TrainingHistory, StaysBoundedCoversEveryStepOnceAndKeepsTheMeans) {
  TempDb t("bounded");
  auto db = t.db;
  const HistoryOptions o{64, 4};
  TrainingHistory h(db, o);
  ASSERT_TRUE(h.Open(0).ok());
  const uint64_t steps = 20000;
  double loss_sum = 0;
  for (uint64_t s = 1; s <= steps; ++s) {
    h.Add(Step(s));
    loss_sum += Step(s).loss();
    if (s % 100 == 0) {
      ASSERT_TRUE(h.Flush().ok());
    }
  }
  // Every level holds at most per_level records: with log_4(20000 / 64) + 1 ≈ 5 levels, at most 320.
  EXPECT_LE(h.stored_records(), 5u * o.per_level);
  std::vector<HistoryPoint> all;
  bool more = true;
  ASSERT_TRUE(h.Read(0, 100000, &all, &more).ok());
  EXPECT_FALSE(more);
  EXPECT_EQ(all.size(), h.stored_records());
  uint64_t next = 1;
  double weighted = 0;
  for (const HistoryPoint& p : all) {
    ASSERT_EQ(p.step(), next) << "steps covered once each, in order";
    next += p.steps();
    weighted += p.loss() * p.steps();
  }
  EXPECT_EQ(next, steps + 1);
  EXPECT_NEAR(weighted, loss_sum, 1e-6 * loss_sum) << "merging keeps the step-weighted mean";
  EXPECT_EQ(all.back().steps(), 1u) << "the newest steps are kept one by one";
  EXPECT_GT(all.front().steps(), 16u) << "the oldest are merged more than once";
  EXPECT_EQ(all.back().unix_ms(), 1000 * steps);

  // since= and limit= page through it; a reopened history reads the same.
  std::vector<HistoryPoint> page;
  ASSERT_TRUE(h.Read(steps - 10, 4, &page, &more).ok());
  ASSERT_EQ(page.size(), 4u);
  EXPECT_TRUE(more);
  EXPECT_EQ(page[0].step(), steps - 9);
  // Pages of 7 from every `since` a client could hold — mid-record in merged levels too — give the
  // same records as one read: those that end after `since`, in order (what /v1/history pages by).
  for (uint64_t since = 0; since < steps; since += 997) {
    ASSERT_TRUE(h.Read(since, 7, &page, &more).ok());
    std::vector<HistoryPoint> want;
    for (const HistoryPoint& p : all)
      if (p.step() + p.steps() - 1 > since && want.size() < 7) want.push_back(p);
    ASSERT_EQ(page.size(), want.size()) << "since " << since;
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_EQ(page[i].SerializeAsString(), want[i].SerializeAsString()) << "since " << since << ", record " << i;
    EXPECT_EQ(more, want.back().step() + want.back().steps() <= steps) << "since " << since;
  }
  TrainingHistory reopened(db, o);
  ASSERT_TRUE(reopened.Open(steps).ok());
  std::vector<HistoryPoint> again;
  ASSERT_TRUE(reopened.Read(0, 100000, &again, &more).ok());
  ASSERT_EQ(again.size(), all.size());
  EXPECT_EQ(again.back().SerializeAsString(), all.back().SerializeAsString());
}

TEST(TrainingHistory, UnwrittenStepsAreReadFromMemoryAndARestartDropsWhatItRollsBack) {
  TempDb t("restart");
  auto db = t.db;
  {
    TrainingHistory h(db);
    ASSERT_TRUE(h.Open(0).ok());
    for (uint64_t s = 1; s <= 30; ++s) {
      h.Add(Step(s));
      if (s == 20) {
        ASSERT_TRUE(h.Flush().ok());  // a checkpoint at step 20
      }
    }
    std::vector<HistoryPoint> all;
    bool more = false;
    ASSERT_TRUE(h.Read(0, 100, &all, &more).ok());
    EXPECT_EQ(all.size(), 30u) << "buffered steps are served too";
    ASSERT_TRUE(h.Flush().ok());  // written, but the crash comes before the checkpoint at 30
  }
  TrainingHistory h(db);
  ASSERT_TRUE(h.Open(20).ok());  // restored from the checkpoint at step 20
  std::vector<HistoryPoint> all;
  bool more = false;
  ASSERT_TRUE(h.Read(0, 100, &all, &more).ok());
  ASSERT_EQ(all.size(), 20u);
  EXPECT_EQ(all.back().step(), 20u);
  h.Add(Step(21));
  ASSERT_TRUE(h.Read(15, 100, &all, &more).ok());
  ASSERT_EQ(all.size(), 6u);
  EXPECT_EQ(all.back().step(), 21u);
}

TEST(TrainingHistory, AnUnwritableHistoryStaysBoundedInMemory) {
  TempDb t("memory");
  TrainingHistory h(t.db, {64, 4});
  ASSERT_TRUE(h.Open(0).ok());
  for (uint64_t s = 1; s <= 100000; ++s) h.Add(Step(s));  // never flushed (a full disk)
  std::vector<HistoryPoint> all;
  bool more = false;
  ASSERT_TRUE(h.Read(0, 1000000, &all, &more).ok());
  EXPECT_LE(all.size(), 4u * 64);
  uint64_t next = 1;
  for (const HistoryPoint& p : all) {
    ASSERT_EQ(p.step(), next);
    next += p.steps();
  }
  EXPECT_EQ(next, 100001u);
}

}  // namespace
}  // namespace peerd
