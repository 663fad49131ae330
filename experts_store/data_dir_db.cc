#include "experts_store/data_dir_db.h"

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/options.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "experts_store/format.h"
#include "proto/store.pb.h"

namespace peerd {

namespace fs = std::filesystem;
using namespace store;

namespace {

class StderrLogger : public rocksdb::Logger {
 public:
  StderrLogger() : rocksdb::Logger(rocksdb::InfoLogLevel::WARN_LEVEL) {}
  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override {
    char line[1024];
    std::vsnprintf(line, sizeof line, format, ap);
    std::fprintf(stderr, "rocksdb: %s\n", line);
  }
};

}  // namespace

Status DataDirDb::SyncedWrite(rocksdb::WriteBatch* batch, const std::string& what) {
  std::lock_guard<std::mutex> lock(write_mu_);
  if (!write_error_.empty()) {
    rocksdb::Status r = db_->Resume();
    if (!r.ok())
      return Status::IOError(what + ": the store still cannot write (" + write_error_ + "; " + r.ToString() + ")");
    write_error_.clear();
  }
  rocksdb::WriteOptions sync;
  sync.sync = true;
  rocksdb::Status s = db_->Write(sync, batch);
  if (!s.ok()) write_error_ = s.ToString();
  return FromRocks(s, what);
}

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::OK();
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  if (s.IsNotFound()) return Status::NotFound(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}

namespace {

// Creates and removes a file: the honest test of "can this process write here" (permission bits
// alone do not tell, e.g. on a read-only mount).
Status ProbeWritable(const std::string& dir) {
  const std::string probe = dir + "/.peerd-write-probe";
  std::FILE* f = std::fopen(probe.c_str(), "w");
  if (!f)
    return Status::IOError("data directory '" + dir + "' is not writable (" + std::strerror(errno) +
                           "): the expert store must write there; give a writable directory");
  std::fclose(f);
  std::remove(probe.c_str());
  return Status::OK();
}

}  // namespace

Status DataDirDb::Open(const std::string& dir, const DataDirOptions& options, std::shared_ptr<DataDirDb>* out) {
  std::error_code ec;
  const bool exists = fs::exists(dir, ec);
  if (exists && !fs::is_directory(dir, ec))
    return Status::InvalidArgument("'" + dir + "' is a file, not a data directory: give a directory");
  if (!exists) {
    if (!options.create_if_missing) return Status::NotFound("no store at '" + dir + "'");
    if (!fs::create_directories(dir, ec))
      return Status::IOError("cannot create data directory '" + dir + "': " + ec.message());
  }
  const bool is_rocksdb = fs::exists(dir + "/CURRENT", ec);
  if (!is_rocksdb && !fs::is_empty(dir, ec))
    return Status::InvalidArgument("'" + dir +
                                   "' is not a peerd store (no RocksDB database in it) and is not "
                                   "empty: give a new or empty directory, or the data directory of a peerd store");
  if (Status st = ProbeWritable(dir); !st.ok()) return st;

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = !is_rocksdb;
  db_options.create_missing_column_families = true;
  db_options.paranoid_checks = true;
  if (options.env) db_options.env = options.env;
  // RocksDB's own log goes to peerd's stderr, warnings and errors only, not to a LOG file in the
  // data directory: on a full disk, Debian's RocksDB 7.8 aborts the process on its second failed
  // write to that file (an assertion in WritableFileWriter), which would turn "disk full" into a
  // crash.
  db_options.info_log = std::make_shared<StderrLogger>();
  std::vector<std::string> cf_names = {
      rocksdb::kDefaultColumnFamilyName, kExpertsCF, kSubKeysCF, kManifestsCF, kSpoolCF, kCheckpointsCF, kEvalsCF};
  if (is_rocksdb) {
    std::vector<std::string> existing;
    rocksdb::Status s = rocksdb::DB::ListColumnFamilies(db_options, dir, &existing);
    if (!s.ok()) return FromRocks(s, "cannot read the store in '" + dir + "'");
    for (const auto& name : existing)  // keep families a newer version added: RocksDB requires it
      if (std::find(cf_names.begin(), cf_names.end(), name) == cf_names.end()) cf_names.push_back(name);
  }
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  for (const auto& name : cf_names) descriptors.emplace_back(name, rocksdb::ColumnFamilyOptions());
  // Expert rows are float bits: compression buys nothing and costs time on every read and write;
  // big blocks suit reads of whole segments and batches of rows.
  rocksdb::BlockBasedTableOptions table;
  table.block_size = 64 << 10;
  descriptors[1].options.compression = rocksdb::kNoCompression;
  descriptors[1].options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));

  std::shared_ptr<DataDirDb> store(new DataDirDb());
  store->dir_ = dir;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, dir, descriptors, &store->handles_, &db);
  if (!s.ok()) return FromRocks(s, "cannot open the store in '" + dir + "'");
  store->db_.reset(db);

  // The schema version: written once at creation; a newer one than ours is refused.
  std::string meta_bytes;
  s = db->Get(rocksdb::ReadOptions(), kMetaKey, &meta_bytes);
  StoreMeta meta;
  if (s.IsNotFound()) {
    if (is_rocksdb)
      return Status::InvalidArgument("'" + dir +
                                     "' holds a RocksDB database that is not a peerd store (no meta "
                                     "record): give a new or empty directory");
    meta.set_schema_version(kSchemaVersion);
    meta.set_created_by("peerd");
    rocksdb::WriteOptions sync;
    sync.sync = true;
    s = db->Put(sync, kMetaKey, meta.SerializeAsString());
    if (!s.ok()) return FromRocks(s, "cannot initialise the store in '" + dir + "'");
  } else if (!s.ok()) {
    return FromRocks(s, "cannot read the store's meta record in '" + dir + "'");
  } else if (!meta.ParseFromString(meta_bytes)) {
    return Status::Corruption("the store's meta record in '" + dir + "' is unreadable");
  } else if (meta.schema_version() > kSchemaVersion) {
    return Status::FailedPrecondition("the store in '" + dir + "' has schema version " +
                                      std::to_string(meta.schema_version()) + ", newer than this peerd understands (" +
                                      std::to_string(kSchemaVersion) +
                                      "): run the peerd version that wrote it, or a newer one");
  }
  *out = std::move(store);
  return Status::OK();
}

DataDirDb::~DataDirDb() {
  if (!db_) return;
  for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  db_->Close();
}

}  // namespace peerd
