// DataDirDb: the one RocksDB database of a peerd data directory, opened with all of peerd's column
// families (experts_store/format.h) and its schema version checked. The expert store, the ingest
// spool, checkpoints and the held-out tasks and evaluations are views of it, so that one WriteBatch
// can change several of them atomically (a freeze is rows + manifest; a checkpoint is parameters +
// spool cursor).
//
// Thread-safe, as RocksDB is.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/status.h"

namespace rocksdb {
class DB;
class Env;
class ColumnFamilyHandle;
class Status;
class WriteBatch;
}  // namespace rocksdb

namespace peerd {

struct DataDirOptions {
  bool create_if_missing = true;
  // The environment RocksDB does its file I/O through (not owned; null: the default). Tests put a
  // simulated power loss here (tests/fault/power_loss_fs.h).
  rocksdb::Env* env = nullptr;
};

// Column families, in the order DataDirDb opens them.
enum class Family { kDefault = 0, kExperts, kSubKeys, kManifests, kSpool, kCheckpoints, kEvals };

class DataDirDb {
 public:
  // Opens (or creates) the database in directory `dir`. Errors name the directory and say what to
  // do: not a store, a store of a newer schema version, a read-only or unreadable directory.
  static Status Open(const std::string& dir, const DataDirOptions& options, std::shared_ptr<DataDirDb>* out);
  ~DataDirDb();
  DataDirDb(const DataDirDb&) = delete;
  DataDirDb& operator=(const DataDirDb&) = delete;

  rocksdb::DB* db() const { return db_.get(); }

  // Every write of peerd goes through here: synced (what is acknowledged is on disk) and one at a
  // time. After a failed write (disk full) RocksDB must not be written again before it is resumed
  // — Debian's RocksDB 7.8 aborts the process on a write after a failed WAL write — so the next
  // write first resumes it, and fails without writing while it cannot. `what` goes in front of
  // the error message.
  Status SyncedWrite(rocksdb::WriteBatch* batch, const std::string& what);
  rocksdb::ColumnFamilyHandle* family(Family f) const { return handles_[static_cast<size_t>(f)]; }
  const std::string& dir() const { return dir_; }

 private:
  DataDirDb() = default;
  std::string dir_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::mutex write_mu_;
  std::string write_error_;  // guarded by write_mu_; "" while writes succeed
};

// A RocksDB status as a peerd Status, with `what` in front of its message.
Status FromRocks(const rocksdb::Status& s, const std::string& what);

}  // namespace peerd
