// The continual-learning metrics of docs/DESIGN.md §4 over an evaluation matrix R[row][task] of held-out
// bits per byte (lower is better, so the signs flip against the accuracy-based definitions).
// Shared by the service's forgetting report and `peer-bench forgetting`. No LibTorch.
#pragma once

#include <vector>

namespace peerd {

struct ForgettingInput {
  // R[row][task]; NaN where a task was not scored in a row. The last row is the final one (T).
  std::vector<std::vector<double>> rows;
  // Per task: the row right after the task was (last) trained, or -1 if it never was.
  std::vector<int> trained_at;
  // Per task: the last row before it was first trained (-1: none). Empty: trained_at − 1, which is
  // the same when every phase has one row.
  std::vector<int> before_trained;
  // The row scored before any training, or -1 if there is none.
  int init = -1;
};

struct ForgettingMetrics {
  double acc = 0;  // mean of the final row over the tasks scored there
  // Chaudhry et al. 2018, per task trained before the final row: F_j = R[T][j] − min_{l<T} R[l][j]
  // (how far the final score is above the best it ever was); NaN for the other tasks.
  std::vector<double> forgetting;
  double mean_forgetting = 0;  // mean of F_j over the tasks that have one
  // mean over tasks trained before T of R[t_j][j] − R[T][j]: negative means forgetting.
  double bwt = 0;
  // mean over tasks trained after the first phase of R[init][j] − R[b_j][j], b_j the last row
  // before task j was trained: positive means earlier domains already helped task j.
  double fwt = 0;
};

ForgettingMetrics ComputeForgettingMetrics(const ForgettingInput& in);

}  // namespace peerd
