// StoreDb: the one RocksDB database of a peerd data directory, opened with all of peerd's column
// families (experts_store/format.h) and its schema version checked. The expert store, the ingest
// spool and checkpoints are views of it, so that one WriteBatch can change several of them
// atomically (a freeze is rows + manifest; a checkpoint is parameters + spool cursor).
//
// Thread-safe, as RocksDB is.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class Status;
}  // namespace rocksdb

namespace peerd {

struct StoreOptions {
  bool create_if_missing = true;
};

// Column families, in the order StoreDb opens them.
enum class Family { kDefault = 0, kExperts, kSubKeys, kManifests, kSpool, kCheckpoints, kEvals };

class StoreDb {
 public:
  // Opens (or creates) the database in directory `dir`. Errors name the directory and say what to
  // do: not a store, a store of a newer schema version, a read-only or unreadable directory.
  static Status Open(const std::string& dir, const StoreOptions& options, std::shared_ptr<StoreDb>* out);
  ~StoreDb();
  StoreDb(const StoreDb&) = delete;
  StoreDb& operator=(const StoreDb&) = delete;

  rocksdb::DB* db() const { return db_.get(); }
  rocksdb::ColumnFamilyHandle* family(Family f) const { return handles_[static_cast<size_t>(f)]; }
  const std::string& dir() const { return dir_; }

 private:
  StoreDb() = default;
  std::string dir_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
};

// A RocksDB status as a peerd Status, with `what` in front of its message.
Status FromRocks(const rocksdb::Status& s, const std::string& what);

}  // namespace peerd
