#include "service/training_history.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>

namespace peerd {

namespace {

// "history/" + level (one byte) + first step (8 bytes, big-endian): a level's records in step order.
std::string LevelPrefix(uint32_t level) { return std::string("history/") + static_cast<char>(level); }

std::string Key(uint32_t level, uint64_t step) {
  std::string k = LevelPrefix(level);
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>(step >> (8 * i)));
  return k;
}

uint64_t StepOf(const rocksdb::Slice& key) {
  uint64_t step = 0;
  for (size_t i = key.size() - 8; i < key.size(); ++i) step = (step << 8) | static_cast<uint8_t>(key[i]);
  return step;
}

constexpr size_t kPrefixBytes = 8;   // "history/"
constexpr uint32_t kMaxLevels = 16;  // 4096 · 16^15 steps: more than any service lives
constexpr size_t kKeyBytes = kPrefixBytes + 1 + 8;

}  // namespace

HistoryPoint MergeHistory(const std::vector<HistoryPoint>& points) {
  HistoryPoint m;
  if (points.empty()) return m;
  double steps = 0, loss = 0, bits = 0, grad = 0, speed = 0;
  for (const HistoryPoint& p : points) {
    const double w = std::max<uint32_t>(p.steps(), 1);
    steps += w;
    loss += w * p.loss();
    bits += w * p.bits_per_byte();
    grad += w * p.grad_norm();
    speed += w * p.tokens_per_second();
  }
  m.set_step(points.front().step());
  m.set_steps(static_cast<uint32_t>(steps));
  m.set_unix_ms(points.back().unix_ms());
  m.set_loss(loss / steps);
  m.set_bits_per_byte(bits / steps);
  m.set_grad_norm(grad / steps);
  m.set_tokens_per_second(speed / steps);
  m.set_learning_rate(points.back().learning_rate());
  return m;
}

Status TrainingHistory::Open(uint64_t last_step) {
  std::lock_guard<std::mutex> lock(mu_);
  count_.clear();
  pending_.clear();
  rocksdb::WriteBatch batch;
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kEvals)));
  for (it->Seek("history/"); it->Valid() && it->key().starts_with("history/"); it->Next()) {
    if (it->key().size() != kKeyBytes) return Status::Corruption("a training history key has the wrong length");
    const uint32_t level = static_cast<uint8_t>(it->key()[kPrefixBytes]);
    if (StepOf(it->key()) > last_step)
      batch.Delete(db_->family(Family::kEvals), it->key());
    else
      count_[level]++;
  }
  if (Status st = FromRocks(it->status(), "reading the training history"); !st.ok()) return st;
  if (batch.Count() == 0) return Status::OK();
  return db_->SyncedWrite(&batch, "dropping the training history past the checkpoint");
}

void TrainingHistory::Add(const HistoryPoint& point) {
  std::lock_guard<std::mutex> lock(mu_);
  pending_.push_back(point);
  pending_.back().set_steps(1);
  if (pending_.size() < 4 * size_t{options_.per_level}) return;
  std::vector<HistoryPoint> kept;
  for (size_t i = 0; i + options_.merge <= options_.per_level; i += options_.merge)
    kept.push_back(MergeHistory({pending_.begin() + i, pending_.begin() + i + options_.merge}));
  const size_t merged = kept.size() * options_.merge;
  kept.insert(kept.end(), pending_.begin() + merged, pending_.end());
  pending_ = std::move(kept);
}

Status TrainingHistory::Flush() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!pending_.empty()) {
    rocksdb::WriteBatch batch;
    for (const HistoryPoint& p : pending_)
      batch.Put(db_->family(Family::kEvals), Key(0, p.step()), p.SerializeAsString());
    if (Status st = db_->SyncedWrite(&batch, "recording the training history"); !st.ok()) return st;
    count_[0] += pending_.size();
    pending_.clear();
  }
  for (uint32_t level = 0; level + 1 < kMaxLevels; ++level)
    if (count_[level] > options_.per_level)
      if (Status st = Downsample(level); !st.ok()) return st;
  return Status::OK();
}

// Merges the oldest records of `level` into `level + 1`, `merge` at a time, until it holds half of
// per_level: the level then takes per_level / 2 more records before it is merged again.
Status TrainingHistory::Downsample(uint32_t level) {
  const uint64_t excess = count_[level] - options_.per_level / 2;
  const uint64_t merged = excess - excess % options_.merge;
  if (merged == 0) return Status::OK();
  rocksdb::WriteBatch batch;
  std::vector<HistoryPoint> group;
  uint64_t taken = 0, written = 0;
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kEvals)));
  const std::string prefix = LevelPrefix(level);
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix) && taken < merged; it->Next(), ++taken) {
    HistoryPoint p;
    if (!p.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return Status::Corruption("a training history record is unreadable");
    group.push_back(p);
    batch.Delete(db_->family(Family::kEvals), it->key());
    if (group.size() == options_.merge) {
      const HistoryPoint m = MergeHistory(group);
      batch.Put(db_->family(Family::kEvals), Key(level + 1, m.step()), m.SerializeAsString());
      ++written;
      group.clear();
    }
  }
  if (Status st = FromRocks(it->status(), "reading the training history"); !st.ok()) return st;
  if (Status st = db_->SyncedWrite(&batch, "downsampling the training history"); !st.ok()) return st;
  count_[level] -= taken;
  count_[level + 1] += written;
  return Status::OK();
}

Status TrainingHistory::Read(uint64_t since, size_t limit, std::vector<HistoryPoint>* out, bool* more) const {
  out->clear();
  *more = false;
  std::vector<HistoryPoint> all, unwritten;
  std::unique_ptr<rocksdb::Iterator> it;
  {
    // The iterator's snapshot and the buffer taken together (Flush moves records from one to the
    // other under mu_), then read without holding up the trainer.
    std::lock_guard<std::mutex> lock(mu_);
    it.reset(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kEvals)));
    for (const HistoryPoint& p : pending_)
      if (p.step() + p.steps() - 1 > since) unwritten.push_back(p);
  }
  // Levels cover disjoint spans of steps, the higher the older, and a level's records are in step
  // order: so each level is read from the last record that starts at or before `since` (it may
  // cover later steps too), the oldest level first, until more than `limit` are in hand — what is
  // left is newer still. A call costs what it returns, not the whole history.
  for (uint32_t level = kMaxLevels; level-- > 0 && all.size() <= limit;) {
    const std::string prefix = LevelPrefix(level);
    it->SeekForPrev(Key(level, since));
    if (!it->Valid() || !it->key().starts_with(prefix)) it->Seek(prefix);
    for (; it->Valid() && it->key().starts_with(prefix) && all.size() <= limit; it->Next()) {
      HistoryPoint p;
      if (!p.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
        return Status::Corruption("a training history record is unreadable");
      if (p.step() + p.steps() - 1 > since) all.push_back(std::move(p));
    }
  }
  if (Status st = FromRocks(it->status(), "reading the training history"); !st.ok()) return st;
  for (HistoryPoint& p : unwritten) all.push_back(std::move(p));
  std::stable_sort(all.begin(), all.end(),
                   [](const HistoryPoint& a, const HistoryPoint& b) { return a.step() < b.step(); });
  if (all.size() > limit) {
    all.resize(limit);
    *more = true;
  }
  *out = std::move(all);
  return Status::OK();
}

size_t TrainingHistory::stored_records() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& [level, count] : count_) n += count;
  return n;
}

}  // namespace peerd
