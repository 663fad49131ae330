// Opens a data directory's RocksDB directly, bypassing peerd, to damage it the way a bug or a bad
// disk could (so that only peerd's own checks can tell).
#pragma once

#include <rocksdb/db.h>

#include <algorithm>
#include <string>
#include <vector>

namespace peerd::testing {

class RawRocksDb {
 public:
  explicit RawRocksDb(const std::string& dir) {
    if (!rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), dir, &names_).ok()) return;
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
    for (const auto& n : names_) cfs.emplace_back(n, rocksdb::ColumnFamilyOptions());
    rocksdb::DB::Open(rocksdb::DBOptions(), dir, cfs, &handles_, &db_);
  }
  ~RawRocksDb() {
    if (!db_) return;
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
    delete db_;
  }
  bool ok() const { return db_ != nullptr; }
  rocksdb::DB* db() const { return db_; }
  rocksdb::ColumnFamilyHandle* family(const std::string& name) const {
    return handles_[std::find(names_.begin(), names_.end(), name) - names_.begin()];
  }

 private:
  std::vector<std::string> names_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  rocksdb::DB* db_ = nullptr;
};

}  // namespace peerd::testing
