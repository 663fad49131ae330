// Loading and validating peerd's configuration (proto/config.proto). No LibTorch.
//
// A configuration is the embedded defaults with a JSON file merged over them: a field the file
// sets replaces the default, a field it omits keeps it. Validation names the offending field by
// its JSON path (e.g. "model.peer.topk") and says what would be accepted.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"
#include "proto/config.pb.h"

namespace peerd {

// The embedded defaults: a small byte-level model that a 2-core CPU trains visibly in minutes.
Config DefaultConfig();

// Merges JSON text over DefaultConfig() into *out and validates the result.
Status ParseConfigJson(const std::string& json, Config* out);

// Reads the file at `path` and does ParseConfigJson; an unreadable file is an IOError naming it.
Status LoadConfigFile(const std::string& path, Config* out);

// Checks every field of a complete configuration; the first problem found is reported.
Status ValidateConfig(const Config& config);

// The blocks that carry PEER layers (empty for a dense model).
std::vector<int> PeerBlocks(const ModelConfig& model);

// The configuration as JSON (protobuf's mapping), for logs and reports.
std::string ConfigToJson(const Config& config);

}  // namespace peerd
