// The forgetting metrics (docs/DESIGN.md §4) against matrices worked out by hand, both as the pure
// function and through the service's report, which reads task columns and "after X" row labels.
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

TEST(ForgettingMetrics, ServiceReportReadsLabelsAndColumnsByName) {
  const ForgettingInput in = ThreeTasks();
  const char* names[] = {"A", "B", "C"};
  const char* labels[] = {"init", "after A", "after B", "after C"};
  std::vector<EvalRow> rows;
  for (size_t i = 0; i < in.rows.size(); ++i) {
    EvalRow r;
    r.set_label(labels[i]);
    for (int j = 2; j >= 0; --j) {  // columns in another order than the training order
      r.add_tasks(names[j]);
      r.add_bits_per_byte(in.rows[i][j]);
    }
    rows.push_back(r);
    if (i == 1) {  // an evaluation between phases changes nothing but adds a candidate minimum
      EvalRow mid = r;
      mid.set_label("during B");
      rows.push_back(mid);
    }
  }
  const ForgettingReport report = ComputeForgetting(rows);
  const ForgettingMetrics m = ComputeForgettingMetrics(in);
  EXPECT_DOUBLE_EQ(report.acc(), m.acc);
  EXPECT_DOUBLE_EQ(report.mean_forgetting(), m.mean_forgetting);
  EXPECT_DOUBLE_EQ(report.bwt(), m.bwt);
  EXPECT_DOUBLE_EQ(report.fwt(), m.fwt);
  EXPECT_DOUBLE_EQ(report.forgetting().at("A"), 2.0);
  EXPECT_EQ(report.forgetting().count("C"), 0u);
  EXPECT_EQ(report.rows_size(), 5);
}

}  // namespace
}  // namespace peerd
