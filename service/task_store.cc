#include "service/task_store.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/forgetting.h"
#include "proto/frame.h"

namespace peerd {

namespace {

std::string RowKey(uint64_t n) {
  std::string k = "row/";
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>(n >> (8 * i)));
  return k;
}

constexpr double kPhaseShare = 0.1;

double Score(const EvalRow& row, const std::string& task) {
  for (int i = 0; i < row.tasks_size(); ++i)
    if (row.tasks(i) == task) return row.bits_per_byte(i);
  return NAN;
}

}  // namespace

Status TaskStore::PutTask(const std::string& name, const std::string& text, const std::string& measures) {
  if (!wire::ValidTaskName(name))
    return Status::InvalidArgument("task name must be 1-64 characters of A-Z a-z 0-9 _ . -");
  if (!measures.empty() && !wire::ValidTaskName(measures))
    return Status::InvalidArgument("measures must name an ingest task: 1-64 characters of A-Z a-z 0-9 _ . -");
  if (text.size() < 2) return Status::InvalidArgument("task '" + name + "' needs at least 2 bytes of held-out text");
  rocksdb::WriteBatch batch;
  batch.Put(db_->family(Family::kEvals), "task/" + name, text);
  batch.Put(db_->family(Family::kEvals), "measures/" + name, measures.empty() ? name : measures);
  return db_->SyncedWrite(&batch, "registering task " + name);
}

Status TaskStore::Tasks(std::vector<HeldOutTask>* out) const {
  out->clear();
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kEvals)));
  for (it->Seek("task/"); it->Valid() && it->key().starts_with("task/"); it->Next()) {
    const std::string name = it->key().ToString().substr(5);
    out->push_back({name, it->value().ToString(), name});
  }
  for (it->Seek("measures/"); it->Valid() && it->key().starts_with("measures/"); it->Next())
    for (HeldOutTask& t : *out)
      if (t.name == it->key().ToString().substr(9)) t.measures = it->value().ToString();
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
  batch.Delete(db_->family(Family::kEvals), "measures/" + name);
  for (size_t n = 0; n < rows.size(); ++n) {
    EvalRow kept = rows[n];
    kept.clear_tasks();
    kept.clear_bits_per_byte();
    kept.clear_measures();
    for (int i = 0; i < rows[n].tasks_size() && i < rows[n].bits_per_byte_size(); ++i)
      if (rows[n].tasks(i) != name) {
        kept.add_tasks(rows[n].tasks(i));
        kept.add_bits_per_byte(rows[n].bits_per_byte(i));
        if (i < rows[n].measures_size()) kept.add_measures(rows[n].measures(i));
      }
    if (kept.tasks_size() != rows[n].tasks_size())
      batch.Put(db_->family(Family::kEvals), RowKey(n), kept.SerializeAsString());
  }
  Status st = db_->SyncedWrite(&batch, "deleting task " + name);
  if (st.ok()) ++rows_version_;
  return st;
}

Status TaskStore::AppendRow(const EvalRow& row) {
  std::vector<EvalRow> rows;
  if (Status st = Rows(&rows); !st.ok()) return st;
  rocksdb::WriteBatch batch;
  batch.Put(db_->family(Family::kEvals), RowKey(rows.size()), row.SerializeAsString());
  Status st = db_->SyncedWrite(&batch, "recording an evaluation");
  if (st.ok()) ++rows_version_;
  return st;
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
  r.set_init(-1);
  if (rows.empty()) return r;
  // Columns are the tasks of the last row, each measuring an ingest task.
  const EvalRow& last = rows.back();
  std::vector<std::string> measured;
  for (int j = 0; j < last.tasks_size(); ++j)
    measured.push_back(j < last.measures_size() ? last.measures(j) : last.tasks(j));
  auto trained = [&](size_t i, const std::string& task) -> uint64_t {
    const auto& m = rows[i].trained_tokens();
    auto it = m.find(task);
    return it == m.end() ? 0 : it->second;
  };
  // Row i trained task X when X is at least kPhaseShare of the fresh text trained since row i − 1:
  // the tail of a batch that trained after an evaluation does not move X's phase, and the last
  // stretch of a phase counts however short it is.
  auto growth = [&](size_t i, const std::string& task) {
    const uint64_t now = trained(i, task), before = i == 0 ? 0 : trained(i - 1, task);
    return now > before ? now - before : 0;
  };
  std::vector<uint64_t> interval_total(rows.size(), 0);
  for (size_t i = 0; i < rows.size(); ++i)
    for (const auto& [task, tokens] : rows[i].trained_tokens()) interval_total[i] += growth(i, task);
  auto grew = [&](size_t i, const std::string& task) {
    const uint64_t g = growth(i, task);
    return g > 0 && double(g) >= kPhaseShare * double(interval_total[i]);
  };
  ForgettingInput in;
  in.trained_at.assign(last.tasks_size(), -1);
  in.before_trained.assign(last.tasks_size(), -1);
  for (size_t i = 0; i < rows.size(); ++i) {
    std::string since;
    const std::map<std::string, uint64_t> by_name(rows[i].trained_tokens().begin(), rows[i].trained_tokens().end());
    for (const auto& [task, tokens] : by_name)
      if (grew(i, task)) since += (since.empty() ? "" : ",") + task;
    r.add_trained_since_previous(since);
    bool any_measured_trained = false;
    std::vector<double> scores;
    for (int j = 0; j < last.tasks_size(); ++j) {
      scores.push_back(Score(rows[i], last.tasks(j)));
      // A row after which nothing trained measures the model of the row before: a phase that
      // ended there goes on through it (an evaluation a client asks for once training is done).
      if (grew(i, measured[j]) || (interval_total[i] == 0 && i > 0 && in.trained_at[j] == static_cast<int>(i) - 1))
        in.trained_at[j] = static_cast<int>(i);
      if (trained(i, measured[j]) == 0) in.before_trained[j] = static_cast<int>(i);
      any_measured_trained |= trained(i, measured[j]) > 0;
    }
    if (!any_measured_trained) in.init = static_cast<int>(i);
    in.rows.push_back(std::move(scores));
  }
  const ForgettingMetrics m = ComputeForgettingMetrics(in);
  for (int j = 0; j < last.tasks_size(); ++j) {
    if (!std::isnan(m.forgetting[j])) (*r.mutable_forgetting())[last.tasks(j)] = m.forgetting[j];
    (*r.mutable_trained_at())[last.tasks(j)] = in.trained_at[j];
  }
  r.set_init(in.init);
  r.set_acc(m.acc);
  r.set_mean_forgetting(m.mean_forgetting);
  r.set_bwt(m.bwt);
  r.set_fwt(m.fwt);
  return r;
}

}  // namespace peerd
