// TrainingHistory: every training step's loss, learning rate, gradient norm and speed, kept in the
// data directory (column family "evals", keys "history/…") for the life of the service, in bounded
// space: recent steps one record each, older ones merged into means of `merge` records, level by
// level (like a round-robin database). With L levels of at most `per_level` records, a history of
// N steps holds at most per_level · L records, L ≈ log_merge(N / per_level) + 1.
//
// Records are buffered in memory and written by Flush(), which the training loop calls right
// before each checkpoint: what a restart rolls back to the checkpoint is trained (and recorded)
// again, and Open() drops the records of steps past the checkpoint that a crash left behind.
// Bytes only; no LibTorch. Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "experts_store/data_dir_db.h"
#include "proto/admin.pb.h"

namespace peerd {

struct HistoryOptions {
  uint32_t per_level = 4096;  // records a level holds before its oldest are merged into the next
  uint32_t merge = 16;        // records merged into one of the next level
};

class TrainingHistory {
 public:
  explicit TrainingHistory(std::shared_ptr<DataDirDb> db, HistoryOptions options = {})
      : db_(std::move(db)), options_(options) {}

  // Reads how many records each level holds, and deletes those of steps after `last_step` (the
  // checkpoint the model was restored from).
  Status Open(uint64_t last_step);
  // Buffers one step's record (its `steps` is 1). While Flush keeps failing (a full disk), the
  // buffer's oldest records are merged in memory so that it stays bounded too.
  void Add(const HistoryPoint& point);
  // Writes the buffered records in one synced batch, then merges the oldest records of every level
  // over per_level into the next.
  Status Flush();
  // Up to `limit` records (written or buffered) of steps after `since`, oldest first; *more when
  // there were more.
  Status Read(uint64_t since, size_t limit, std::vector<HistoryPoint>* out, bool* more) const;
  // Records on disk, all levels (what bounds its size).
  size_t stored_records() const;

 private:
  Status Downsample(uint32_t level);

  std::shared_ptr<DataDirDb> db_;
  HistoryOptions options_;
  mutable std::mutex mu_;
  std::vector<HistoryPoint> pending_;   // guarded by mu_
  std::map<uint32_t, uint64_t> count_;  // records per level; guarded by mu_
};

// Merges consecutive records into one: the step-weighted mean of loss, bits per byte, gradient
// norm and speed, the last one's learning rate and time.
HistoryPoint MergeHistory(const std::vector<HistoryPoint>& points);

}  // namespace peerd
