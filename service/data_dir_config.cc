#include "service/data_dir_config.h"

#include <google/protobuf/util/message_differencer.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include "core/config.h"

namespace peerd {

namespace {

const char kConfigKey[] = "config";

// The model fields of `a` and `b` that differ, one "field: a -> b" per line (protobuf's report).
std::string ModelDifferences(const ModelConfig& recorded, const ModelConfig& given) {
  std::string report;
  google::protobuf::util::MessageDifferencer differ;
  differ.ReportDifferencesToString(&report);
  differ.Compare(recorded, given);
  return report;
}

}  // namespace

Status ResolveDataDirConfig(DataDirDb& db, const std::optional<Config>& given, Config* out) {
  rocksdb::ColumnFamilyHandle* family = db.family(Family::kDefault);
  std::string bytes;
  rocksdb::Status s = db.db()->Get(rocksdb::ReadOptions(), family, kConfigKey, &bytes);
  if (!s.ok() && !s.IsNotFound()) return FromRocks(s, "reading the data directory's configuration");
  if (s.IsNotFound()) {
    *out = given ? *given : DefaultConfig();
    return Status::OK();
  }
  Config recorded;
  if (!recorded.ParseFromString(bytes))
    return Status::Corruption("the configuration recorded in data directory '" + db.dir() + "' is unreadable");
  if (!given) {
    *out = recorded;
    return ValidateConfig(*out);
  }
  if (!google::protobuf::util::MessageDifferencer::Equals(recorded.model(), given->model()))
    return Status::InvalidArgument(
        "--config describes another model than data directory '" + db.dir() + "' was created with (recorded -> " +
        "--config):\n" + ModelDifferences(recorded.model(), given->model()) +
        "start without --config to use the data directory's, or give a new --data-dir for this model");
  *out = *given;
  return Status::OK();
}

Status RecordDataDirConfig(DataDirDb& db, const Config& config) {
  rocksdb::ColumnFamilyHandle* family = db.family(Family::kDefault);
  std::string bytes;
  rocksdb::Status s = db.db()->Get(rocksdb::ReadOptions(), family, kConfigKey, &bytes);
  if (s.ok()) return Status::OK();
  if (!s.IsNotFound()) return FromRocks(s, "reading the data directory's configuration");
  rocksdb::WriteBatch batch;
  batch.Put(family, kConfigKey, config.SerializeAsString());
  return db.SyncedWrite(&batch, "recording the configuration in '" + db.dir() + "'");
}

}  // namespace peerd
