#include "service/task_store.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cmath>
#include <map>

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
  if (!wire::ValidTaskName(name)) return Status::InvalidArgument("task name must be 1-64 characters of A-Z a-z 0-9 _ . -");
  if (text.size() < 2) return Status::InvalidArgument("task '" + name + "' needs at least 2 bytes of held-out text");
  rocksdb::WriteOptions sync;
  sync.sync = true;
  return FromRocks(db_->db()->Put(sync, db_->family(Family::kEvals), "task/" + name, text), "registering task " + name);
}

Status TaskStore::Tasks(std::vector<std::pair<std::string, std::string>>* out) const {
  out->clear();
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kEvals)));
  for (it->Seek("task/"); it->Valid() && it->key().starts_with("task/"); it->Next())
    out->emplace_back(it->key().ToString().substr(5), it->value().ToString());
  return FromRocks(it->status(), "listing tasks");
}

Status TaskStore::AppendRow(const EvalRow& row) {
  std::vector<EvalRow> rows;
  if (Status st = Rows(&rows); !st.ok()) return st;
  rocksdb::WriteOptions sync;
  sync.sync = true;
  return FromRocks(db_->db()->Put(sync, db_->family(Family::kEvals), RowKey(rows.size()), row.SerializeAsString()),
                   "recording an evaluation");
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
  const EvalRow& last = rows.back();
  const size_t T = rows.size() - 1;
  double acc = 0;
  for (double b : last.bits_per_byte()) acc += b;
  r.set_acc(last.bits_per_byte_size() ? acc / last.bits_per_byte_size() : 0);

  // Where each task was last trained, and the row before any training.
  std::map<std::string, size_t> trained_at;
  std::ptrdiff_t init = -1;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].label() == "init") init = static_cast<std::ptrdiff_t>(i);
    if (rows[i].label().rfind("after ", 0) == 0) trained_at[rows[i].label().substr(6)] = i;
  }
  double f_sum = 0, bwt_sum = 0, fwt_sum = 0;
  int f_n = 0, bwt_n = 0, fwt_n = 0;
  for (const std::string& task : last.tasks()) {
    const double now = Score(last, task);
    double best = INFINITY;
    for (size_t l = 0; l < T; ++l) {
      double v = Score(rows[l], task);
      if (!std::isnan(v)) best = std::min(best, v);
    }
    if (std::isfinite(best)) {
      (*r.mutable_forgetting())[task] = now - best;
      f_sum += now - best;
      ++f_n;
    }
    auto at = trained_at.find(task);
    if (at != trained_at.end() && at->second < T) {
      bwt_sum += Score(rows[at->second], task) - now;
      ++bwt_n;
    }
    if (at != trained_at.end() && init >= 0 && at->second > static_cast<size_t>(init) + 1) {
      const double before = Score(rows[at->second - 1], task), untrained = Score(rows[init], task);
      if (!std::isnan(before) && !std::isnan(untrained)) {
        fwt_sum += untrained - before;
        ++fwt_n;
      }
    }
  }
  r.set_mean_forgetting(f_n ? f_sum / f_n : 0);
  r.set_bwt(bwt_n ? bwt_sum / bwt_n : 0);
  r.set_fwt(fwt_n ? fwt_sum / fwt_n : 0);
  return r;
}

}  // namespace peerd
