// TaskStore: held-out tasks (name -> text) and the evaluation history R[phase][task], in the data
// directory's database (column family "evals"). Bytes only; no LibTorch. Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "experts_store/data_dir_db.h"
#include "proto/admin.pb.h"

namespace peerd {

class TaskStore {
 public:
  explicit TaskStore(std::shared_ptr<DataDirDb> db) : db_(std::move(db)) {}

  // Registers (or replaces) a task's held-out text. The name follows data-port task names.
  Status PutTask(const std::string& name, const std::string& text);
  Status Tasks(std::vector<std::pair<std::string, std::string>>* out) const;  // in name order
  // Removes a task's held-out text and its column from every evaluation row (the rows stay, with
  // their other tasks), in one synced batch. NotFound when there is no such task.
  Status DeleteTask(const std::string& name);
  Status AppendRow(const EvalRow& row);
  Status Rows(std::vector<EvalRow>* out) const;  // oldest first

 private:
  std::shared_ptr<DataDirDb> db_;
};

// The continual-learning metrics of docs/DESIGN.md §4 over the history (lower bits/byte is better).
// Row "init" (if any) is the model before training; row "after X" is the one right after task X
// was trained.
ForgettingReport ComputeForgetting(const std::vector<EvalRow>& rows);

}  // namespace peerd
