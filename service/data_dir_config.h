// The configuration a data directory was created with, recorded in it (key "config" of the
// default column family), so that the model its store, spool and checkpoints were written for is
// the model peerd builds on every later start.
#pragma once

#include <optional>

#include "core/status.h"
#include "experts_store/data_dir_db.h"
#include "proto/config.pb.h"

namespace peerd {

// The configuration to run with, from `given` (a --config file merged over the defaults, or
// nullopt without --config) and the data directory's record:
//  - no record (a new data directory, or one from before records): `given`, else the defaults;
//  - without --config: the recorded configuration;
//  - with --config: `given` when its model equals the recorded model (training settings may
//    change from start to start), else InvalidArgument naming every model field that differs.
Status ResolveDataDirConfig(DataDirDb& db, const std::optional<Config>& given, Config* out);

// Records `config` when the data directory has no record yet. Called once the model was restored
// with it, so that a data directory from before records is not bound to a configuration that
// cannot read it.
Status RecordDataDirConfig(DataDirDb& db, const Config& config);

}  // namespace peerd
