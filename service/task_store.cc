#include "service/task_store.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cmath>

#include "core/forgetting.h"
#include "proto/frame.h"

namespace peerd {

namespace {

std::string RowKey(uint64_t n) {
  std::string k = "row/";
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>(n >> (8 * i)));
  return k;
}

double Score(const EvalRow& row, const std::string& task) {
  for (int i = 0; i < row.tasks_size(); ++i)
    if (row.tasks(i) == task) return row.bits_per_byte(i);
  return NAN;
}

}  // namespace

Status TaskStore::PutTask(const std::string& name, const std::string& text) {
  if (!wire::ValidTaskName(name))
    return Status::InvalidArgument("task name must be 1-64 characters of A-Z a-z 0-9 _ . -");
  if (text.size() < 2) return Status::InvalidArgument("task '" + name + "' needs at least 2 bytes of held-out text");
  rocksdb::WriteBatch batch;
  batch.Put(db_->family(Family::kEvals), "task/" + name, text);
  return db_->SyncedWrite(&batch, "registering task " + name);
}

Status TaskStore::Tasks(std::vector<std::pair<std::string, std::string>>* out) const {
  out->clear();
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kEvals)));
  for (it->Seek("task/"); it->Valid() && it->key().starts_with("task/"); it->Next())
    out->emplace_back(it->key().ToString().substr(5), it->value().ToString());
  return FromRocks(it->status(), "listing tasks");
}

Status TaskStore::DeleteTask(const std::string& name) {
  std::string text;
  rocksdb::Status s = db_->db()->Get(rocksdb::ReadOptions(), db_->family(Family::kEvals), "task/" + name, &text);
  if (s.IsNotFound()) return Status::NotFound("no task " + name + " (GET /v1/tasks lists them)");
  if (!s.ok()) return FromRocks(s, "reading task " + name);
  std::vector<EvalRow> rows;
  if (Status st = Rows(&rows); !st.ok()) return st;
  rocksdb::WriteBatch batch;
  batch.Delete(db_->family(Family::kEvals), "task/" + name);
  for (size_t n = 0; n < rows.size(); ++n) {
    EvalRow kept = rows[n];
    kept.clear_tasks();
    kept.clear_bits_per_byte();
    for (int i = 0; i < rows[n].tasks_size() && i < rows[n].bits_per_byte_size(); ++i)
      if (rows[n].tasks(i) != name) {
        kept.add_tasks(rows[n].tasks(i));
        kept.add_bits_per_byte(rows[n].bits_per_byte(i));
      }
    if (kept.tasks_size() != rows[n].tasks_size())
      batch.Put(db_->family(Family::kEvals), RowKey(n), kept.SerializeAsString());
  }
  return db_->SyncedWrite(&batch, "deleting task " + name);
}

Status TaskStore::AppendRow(const EvalRow& row) {
  std::vector<EvalRow> rows;
  if (Status st = Rows(&rows); !st.ok()) return st;
  rocksdb::WriteBatch batch;
  batch.Put(db_->family(Family::kEvals), RowKey(rows.size()), row.SerializeAsString());
  return db_->SyncedWrite(&batch, "recording an evaluation");
}

Status TaskStore::Rows(std::vector<EvalRow>* out) const {
  out->clear();
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kEvals)));
  for (it->Seek("row/"); it->Valid() && it->key().starts_with("row/"); it->Next()) {
    EvalRow row;
    if (!row.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return Status::Corruption("an evaluation row is unreadable");
    out->push_back(std::move(row));
  }
  return FromRocks(it->status(), "reading evaluations");
}

ForgettingReport ComputeForgetting(const std::vector<EvalRow>& rows) {
  ForgettingReport r;
  for (const auto& row : rows) *r.add_rows() = row;
  if (rows.empty()) return r;
  // Columns are the tasks of the last row; "after X" marks where task X was (last) trained.
  const EvalRow& last = rows.back();
  ForgettingInput in;
  in.trained_at.assign(last.tasks_size(), -1);
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].label() == "init") in.init = static_cast<int>(i);
    std::vector<double> scores;
    for (const std::string& task : last.tasks()) {
      scores.push_back(Score(rows[i], task));
      if (rows[i].label() == "after " + task) in.trained_at[scores.size() - 1] = static_cast<int>(i);
    }
    in.rows.push_back(std::move(scores));
  }
  const ForgettingMetrics m = ComputeForgettingMetrics(in);
  for (int j = 0; j < last.tasks_size(); ++j)
    if (!std::isnan(m.forgetting[j])) (*r.mutable_forgetting())[last.tasks(j)] = m.forgetting[j];
  r.set_acc(m.acc);
  r.set_mean_forgetting(m.mean_forgetting);
  r.set_bwt(m.bwt);
  r.set_fwt(m.fwt);
  return r;
}

}  // namespace peerd
