// The forgetting metrics (docs/DESIGN.md §4) against matrices worked out by hand, both as the pure
// function and through the service's report, which reads task columns by name and takes its
// phases from each row's record of the text trained per ingest task.
#include <gtest/gtest.h>

#include <cmath>

#include "core/forgetting.h"
#include "service/task_store.h"

namespace peerd {
namespace {

// Tasks A, B, C trained in that order; rows: init, after A, after B, after C.
ForgettingInput ThreeTasks() {
  ForgettingInput in;
  in.rows = {{8, 8, 8}, {2, 7, 7.5}, {3, 2.5, 7}, {4, 3, 2}};
  in.trained_at = {1, 2, 3};
  in.init = 0;
  return in;
}

TEST(ForgettingMetrics, HandComputedThreeTaskMatrix) {
  const ForgettingMetrics m = ComputeForgettingMetrics(ThreeTasks());
  EXPECT_DOUBLE_EQ(m.acc, 3.0);              // (4 + 3 + 2) / 3
  EXPECT_DOUBLE_EQ(m.forgetting[0], 2.0);    // 4 − min(8, 2, 3)
  EXPECT_DOUBLE_EQ(m.forgetting[1], 0.5);    // 3 − min(8, 7, 2.5)
  EXPECT_TRUE(std::isnan(m.forgetting[2]));  // C was trained last: nothing to forget yet
  EXPECT_DOUBLE_EQ(m.mean_forgetting, 1.25);
  EXPECT_DOUBLE_EQ(m.bwt, -1.25);  // ((2 − 4) + (2.5 − 3)) / 2: negative = forgetting
  EXPECT_DOUBLE_EQ(m.fwt, 1.0);    // B: 8 − 7, C: 8 − 7
}

TEST(ForgettingMetrics, ChaudhryTakesTheBestEarlierRowNotTheRowAfterTraining) {
  // A keeps improving after it was trained (B helps it) and only then gets worse.
  ForgettingInput in;
  in.rows = {{8, 8, 8}, {3, 7, 7}, {2.5, 2, 7}, {3.5, 2.2, 2}};
  in.trained_at = {1, 2, 3};
  in.init = 0;
  const ForgettingMetrics m = ComputeForgettingMetrics(in);
  EXPECT_DOUBLE_EQ(m.forgetting[0], 1.0);  // 3.5 − 2.5, not 3.5 − 3
  EXPECT_NEAR(m.forgetting[1], 0.2, 1e-12);
  EXPECT_NEAR(m.bwt, ((3 - 3.5) + (2 - 2.2)) / 2, 1e-12);  // BWT compares with the row after training
}

TEST(ForgettingMetrics, RememberingBetterGivesPositiveBwtAndNegativeForgetting) {
  ForgettingInput in;
  in.rows = {{8, 8}, {3, 6}, {2, 2}};  // A improved while B trained
  in.trained_at = {1, 2};
  in.init = 0;
  const ForgettingMetrics m = ComputeForgettingMetrics(in);
  EXPECT_DOUBLE_EQ(m.bwt, 1.0);
  EXPECT_DOUBLE_EQ(m.mean_forgetting, -1.0);
  EXPECT_DOUBLE_EQ(m.fwt, 2.0);  // B: 8 − 6
}

TEST(ForgettingMetrics, UntrainedTasksAndMissingScoresAreLeftOut) {
  ForgettingInput in;
  in.rows = {{8, 8, 8}, {2, 7, NAN}, {3, 2.5, 6}};
  in.trained_at = {1, 2, -1};  // C is only watched
  in.init = 0;
  const ForgettingMetrics m = ComputeForgettingMetrics(in);
  EXPECT_DOUBLE_EQ(m.acc, (3 + 2.5 + 6) / 3);
  EXPECT_DOUBLE_EQ(m.mean_forgetting, 1.0);  // A only: 3 − 2
  EXPECT_TRUE(std::isnan(m.forgetting[2]));
  EXPECT_DOUBLE_EQ(m.bwt, -1.0);
  EXPECT_DOUBLE_EQ(m.fwt, 1.0);  // B only; C was never trained
}

// Rows as the service records them for ThreeTasks(): held-out tasks "a-heldout", "b-heldout",
// "c-heldout" measure ingest tasks A, B, C, and `tokens[i]` is what row i says was trained of each.
std::vector<EvalRow> ServiceRows(const std::vector<std::vector<uint64_t>>& tokens,
                                 const std::vector<std::string>& labels) {
  const ForgettingInput in = ThreeTasks();
  const char* names[] = {"a-heldout", "b-heldout", "c-heldout"};
  const char* ingest[] = {"A", "B", "C"};
  std::vector<EvalRow> rows;
  for (size_t i = 0; i < tokens.size(); ++i) {
    EvalRow r;
    r.set_label(labels[i]);
    const size_t scores = std::min(i, in.rows.size() - 1);  // rows past the matrix repeat its last
    for (int j = 2; j >= 0; --j) {                          // columns in another order than the training order
      r.add_tasks(names[j]);
      r.add_measures(ingest[j]);
      r.add_bits_per_byte(in.rows[scores][j]);
      if (tokens[i][j]) (*r.mutable_trained_tokens())[ingest[j]] = tokens[i][j];
    }
    rows.push_back(r);
  }
  return rows;
}

TEST(ForgettingMetrics, ServiceReportTakesPhasesFromTheSpoolRecordNotFromLabels) {
  // Labels that say nothing (or lie): the phases come from trained_tokens alone. A's last token
  // trains while B does (the tail of a batch after A's evaluation): not a phase of A.
  std::vector<EvalRow> rows =
      ServiceRows({{0, 0, 0}, {100, 0, 0}, {101, 50, 0}, {101, 50, 70}}, {"first", "after C", "x", "init"});
  // The last stretch of C is short but all that trained then: it is C's phase that ends there.
  rows.push_back(rows.back());
  (*rows.back().mutable_trained_tokens())["C"] = 71;
  // An evaluation while B trains (B half done): a candidate minimum, not the end of B's phase.
  EvalRow during = rows[2];
  during.set_label("during B");
  (*during.mutable_trained_tokens())["B"] = 20;
  rows.insert(rows.begin() + 2, during);
  const ForgettingReport report = ComputeForgetting(rows);
  const ForgettingMetrics m = ComputeForgettingMetrics(ThreeTasks());
  EXPECT_DOUBLE_EQ(report.acc(), m.acc);
  EXPECT_DOUBLE_EQ(report.mean_forgetting(), m.mean_forgetting);
  EXPECT_DOUBLE_EQ(report.bwt(), m.bwt);
  EXPECT_DOUBLE_EQ(report.fwt(), m.fwt);  // B's "before" row is the one before B began, not "during B"
  EXPECT_DOUBLE_EQ(report.forgetting().at("a-heldout"), 2.0);
  EXPECT_EQ(report.forgetting().count("c-heldout"), 0u) << "C was trained last";
  EXPECT_EQ(report.init(), 0);
  EXPECT_EQ(report.trained_at().at("a-heldout"), 1);
  EXPECT_EQ(report.trained_at().at("b-heldout"), 3);
  EXPECT_EQ(report.trained_at().at("c-heldout"), 5);
  ASSERT_EQ(report.trained_since_previous_size(), 6);
  EXPECT_EQ(report.trained_since_previous(0), "");
  EXPECT_EQ(report.trained_since_previous(1), "A");
  EXPECT_EQ(report.trained_since_previous(2), "B");
  EXPECT_EQ(report.trained_since_previous(3), "B");
  EXPECT_EQ(report.trained_since_previous(4), "C");
  EXPECT_EQ(report.trained_since_previous(5), "C");
}

TEST(ForgettingMetrics, ServiceReportSeesATaskTrainedAgainAndTextOfOtherTasks) {
  // A base task nobody measures trains first (its row is still "before" every measured task); A
  // comes back after B, so A's phase ends at the last row whose A count grew.
  std::vector<EvalRow> rows = ServiceRows({{0, 0, 0}, {100, 0, 0}, {100, 50, 0}, {150, 50, 0}}, {"", "", "", ""});
  for (EvalRow& r : rows) (*r.mutable_trained_tokens())["base"] = 1000;
  const ForgettingReport report = ComputeForgetting(rows);
  EXPECT_EQ(report.init(), 0) << "base text is not a task of the matrix";
  EXPECT_EQ(report.trained_since_previous(0), "base");
  EXPECT_EQ(report.trained_at().at("a-heldout"), 3);
  EXPECT_EQ(report.trained_at().at("b-heldout"), 2);
  EXPECT_EQ(report.trained_at().at("c-heldout"), -1);
  EXPECT_EQ(report.forgetting().count("a-heldout"), 0u) << "A trained in the last phase";
  EXPECT_DOUBLE_EQ(report.forgetting().at("b-heldout"), 3 - 2.5);
}

// An evaluation after which nothing trained (asked for once a domain's backlog was done, right
// after one taken while it trained) scores the same model: the phase goes on through it, and the
// last domain still has nothing to forget.
TEST(ForgettingMetrics, ARowAfterWhichNothingTrainedContinuesThePhaseBeforeIt) {
  std::vector<EvalRow> rows = ServiceRows({{0, 0, 0}, {100, 0, 0}, {100, 50, 0}, {100, 50, 0}}, {"", "", "", ""});
  rows[3].set_bits_per_byte(1, rows[3].bits_per_byte(1) + 0.01);  // b-heldout: the same model, a little noise
  const ForgettingReport report = ComputeForgetting(rows);
  EXPECT_EQ(report.trained_since_previous(3), "");
  EXPECT_EQ(report.trained_at().at("b-heldout"), 3);
  EXPECT_EQ(report.forgetting().count("b-heldout"), 0u) << "B was the last to train";
  EXPECT_EQ(report.trained_at().at("a-heldout"), 1) << "B trained after A: A's phase ended";
}

}  // namespace
}  // namespace peerd
