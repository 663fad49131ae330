// Admin API requests: what every route of peerd's admin API (service/admin_server.cc) accepts,
// parsed and checked before anything runs. No LibTorch and no sockets, so every bad input can be
// tested in the torch-free net_tests binary and fuzzed (tests/fuzz/admin_requests_fuzz.cc) on its
// own; the server only checks the token, calls ParseAdminRequest and dispatches what comes back.
//
// A refused request is an AdminError: the HTTP status the client gets and a message written for
// the person who must fix the request. Values the client sent are quoted clipped (ClipForMessage),
// so a 60 MB field cannot come back in an error or fill the log.
//
// The catalogue of refusals (README: "Admin API: bad input"):
//   400  a query parameter GET /v1/history does not take, or a bad since= or limit=; body not a JSON object, invalid
//   JSON, unknown field, wrong type, integer out of range,
//        nKeys outside [1, 65536], bad dtype, bad task name, text and path both or neither,
//        a non-finite or out-of-range policy number, a bad eval label, a bad segment id,
//        a text to score under 2 bytes or over kMaxScoreBytes; a prompt empty or over
//        kMaxPromptBytes, maxTokens 0 or over kMaxGenerateTokens, temperature < 0 or over 100,
//        topP outside (0, 1], more than 4 stop strings or one empty or over 64 bytes
//   403  a task path outside every --task-root (after resolving "..", symlinks)
//   404  no such route
//   405  a known route with the wrong method
//   414  a request target over kMaxTargetBytes
// (413, a body over the server's limit, and 401, a bad token, are answered by the server itself.)
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "core/status.h"
#include "proto/admin.pb.h"
#include "proto/store.pb.h"

namespace peerd {

struct AdminError {
  int http_status = 0;
  std::string message;
};

// Longest request target (path and query) accepted: every route is a short fixed path.
inline constexpr size_t kMaxTargetBytes = 2048;
// Longest evaluation label: it names a row of the forgetting matrix in reports.
inline constexpr size_t kMaxEvalLabelBytes = 256;
// Largest segment id in /v1/segments/{id}/freeze (nine decimal digits).
inline constexpr uint32_t kMaxSegmentId = 999'999'999;
// Longest text POST /v1/score takes: it is scored on the trainer thread, between two steps.
inline constexpr size_t kMaxScoreBytes = size_t{1} << 20;
// Longest prompt POST /v1/generate takes, and most tokens it generates in one request.
inline constexpr size_t kMaxPromptBytes = size_t{1} << 16;
inline constexpr uint32_t kMaxGenerateTokens = 4096;
// Most training-history points GET /v1/history returns at once (limit=); 2000 when not given.
inline constexpr uint64_t kMaxHistoryPoints = 10000;
// The largest sub-key count a segment may have per half (it holds nKeys² experts); the same bound
// as the configuration's model.peer.nKeys.
inline constexpr uint32_t kMaxSegmentKeys = 65536;

namespace admin {
// One struct per route; the variant below says which route a request is for.
struct GetStatus {};
struct ListSegments {};
struct AddSegments {
  std::optional<uint32_t> layer;   // omitted: every PEER layer
  std::optional<uint32_t> n_keys;  // omitted: the configured nKeys
};
struct FreezeSegment {
  uint32_t id = 0;
  std::optional<uint32_t> layer;
  std::optional<RowDtype> dtype;  // omitted: the policy's freezeDtype
};
struct AddTask {
  std::string name;
  std::string text;  // exactly one of text and path is non-empty
  std::string path;
  std::string measures;  // the ingest task it measures ("": its own name)
};
struct ListTasks {};
struct DeleteTask {
  std::string name;
};
struct Score {
  std::string text;
  bool log_probs = false;
};
struct Generate {
  GenerateRequest request;  // checked: every field in range
};
struct Export {};
struct History {
  uint64_t since = 0;  // points after this step
  uint64_t limit = 2000;
};
struct RunEval {
  std::string label;
};
struct EvalReport {};
struct Checkpoint {};
struct SetPaused {
  bool paused = false;
};
struct GetPolicy {};
struct SetPolicy {
  Policy policy;  // every number given is finite and in range; trainGroups are checked by the loop
};
struct Metrics {};
}  // namespace admin

using AdminRequest =
    std::variant<admin::GetStatus, admin::ListSegments, admin::AddSegments, admin::FreezeSegment, admin::AddTask,
                 admin::ListTasks, admin::DeleteTask, admin::RunEval, admin::EvalReport, admin::Checkpoint,
                 admin::SetPaused, admin::GetPolicy, admin::SetPolicy, admin::Metrics, admin::Score, admin::Generate,
                 admin::Export, admin::History>;

// Every route of the admin API: its method and path ("{id}" stands for a segment id, "{name}"
// for a task name), and whether it needs the token (the probes and the live page's files and
// sign-in do not, and ParseAdminRequest does not parse them). docs/openapi.json documents exactly
// these (tests/admin_requests_test.cc).
struct AdminRoute {
  const char* method;
  const char* path;
  bool needs_token = true;
};
const std::vector<AdminRoute>& AdminRoutes();

// Parses one request: `method` as sent ("GET"), `target` the request target (its query string is
// read by GET /v1/history and ignored elsewhere), `body` the raw body (empty or whitespace = every field omitted).
// Returns true and sets *request, or returns false and sets *error. Never throws; any input is safe.
bool ParseAdminRequest(std::string_view method, std::string_view target, std::string_view body, AdminRequest* request,
                       AdminError* error);

// Resolves `path` (relative to the working directory) and checks that the file it names lies
// under one of `roots`: "..", symlinks (in the path or in a root) and a root "/a/b" next to a
// path "/a/bc/x" cannot escape. A root that does not exist allows nothing. Returns true and sets
// *real to the resolved file, or false with a 403 (outside) or 400 (empty, NUL byte) error.
bool ConfineTaskPath(const std::string& path, const std::vector<std::string>& roots, std::filesystem::path* real,
                     AdminError* error);

// ConfineTaskPath, then reads the file: it must be a regular file (not a FIFO or device that
// could block the server or never end) of at most `max_bytes`. 400 when it cannot be read.
bool ReadConfinedTaskFile(const std::string& path, const std::vector<std::string>& roots, uint64_t max_bytes,
                          std::string* text, AdminError* error);

// The checks of a policy change that need no model: replayRatio in [0, 1), distillWeight in
// [0, 1000], lr positive and a float, freezeDtype "bf16" or "fp32" (worded like core/config.cc,
// which checks the same fields, and the group names, once merged). The numbers arrive as doubles
// and the trainer keeps floats: a double a float cannot hold would be undefined behaviour to
// convert, so TrainingLoop::SetPolicy calls this too.
Status CheckPolicyNumbers(const Policy& policy);

// Refuses a new training segment that could not fit in memory: nKeys² experts, each a down and an
// up row of d_model fp32 numbers, about four times that with gradients and AdamW state. LibTorch
// would otherwise throw (or the kernel kill peerd) half-way through allocating it.
Status CheckNewSegmentSize(uint32_t n_keys, uint32_t d_model, uint64_t memory_bytes);

// `value` for an error message: at most `max_bytes` of it, control characters as '?', and "…"
// when it was longer.
std::string ClipForMessage(std::string_view value, size_t max_bytes = 64);

}  // namespace peerd
