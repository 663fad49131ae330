// TaskStore: held-out tasks (name -> text) and the evaluation history R[phase][task], in the data
// directory's database (column family "evals"). Bytes only; no LibTorch. Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "experts_store/data_dir_db.h"
#include "proto/admin.pb.h"

namespace peerd {

struct HeldOutTask {
  std::string name, text;
  std::string measures;  // the ingest task whose training it measures
};

class TaskStore {
 public:
  explicit TaskStore(std::shared_ptr<DataDirDb> db) : db_(std::move(db)) {}

  // Registers (or replaces) a task's held-out text, and the ingest task it measures ("": its own
  // name). Names follow data-port task names.
  Status PutTask(const std::string& name, const std::string& text, const std::string& measures = "");
  Status Tasks(std::vector<HeldOutTask>* out) const;  // in name order
  // Removes a task's held-out text and its column from every evaluation row (the rows stay, with
  // their other tasks), in one synced batch. NotFound when there is no such task.
  Status DeleteTask(const std::string& name);
  Status AppendRow(const EvalRow& row);
  Status Rows(std::vector<EvalRow>* out) const;  // oldest first
  // Changes after every write that changes the rows (AppendRow, DeleteTask), so that what was
  // computed from Rows() under one version still holds while it stays.
  uint64_t rows_version() const { return rows_version_.load(); }

 private:
  std::shared_ptr<DataDirDb> db_;
  std::atomic<uint64_t> rows_version_{0};
};

// The continual-learning metrics of docs/DESIGN.md §4 over the history (lower bits/byte is better).
// The phases come from each row's trained_tokens, not from labels: a task's phase ends at the last
// row for which its ingest task was 10 % or more of the fresh text trained since the row before (a
// batch's tail trained after an evaluation is not a phase), and the initial row is the last one
// before any ingest task measured by the final row's columns was trained.
ForgettingReport ComputeForgetting(const std::vector<EvalRow>& rows);

}  // namespace peerd
