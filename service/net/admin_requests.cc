#include "service/net/admin_requests.h"

#include "core/utf8.h"
#include "experts_store/row_dtype.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <google/protobuf/util/json_util.h>

#include <cerrno>
#include <cfloat>
#include <charconv>
#include <cstdio>
#include <cstring>

#include "proto/frame.h"

namespace peerd {

namespace fs = std::filesystem;

namespace {

constexpr int kBadRequest = 400, kForbidden = 403, kNotFound = 404, kMethodNotAllowed = 405, kUriTooLong = 414;

bool Fail(AdminError* error, int status, std::string message) {
  error->http_status = status;
  error->message = std::move(message);
  return false;
}

std::string Quote(std::string_view value) { return "'" + ClipForMessage(value) + "'"; }

// protobuf's JSON errors are "what\nexcerpt of the input\n    ^" (the caret under the fault):
// on one line that is "what (near: excerpt)".
std::string OneLine(const std::string& text, size_t max_bytes) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    if (line.find_first_not_of(" ^\r") != std::string::npos) lines.push_back(line);
    start = end + 1;
  }
  std::string out = lines.empty() ? "" : lines[0];
  for (size_t i = 1; i < lines.size(); ++i) out += (i == 1 ? " (near: " : " ") + lines[i];
  if (lines.size() > 1) out += ")";
  return ClipForMessage(out, max_bytes);
}

// Parses `body` (empty or whitespace: every field omitted) into `m`. Unknown fields, wrong types
// and integers out of their field's range are errors; so is anything but a JSON object.
bool ParseBody(std::string_view body, google::protobuf::Message* m, AdminError* error) {
  const size_t first = body.find_first_not_of(" \t\r\n");
  if (first == std::string_view::npos) return true;
  if (body[first] != '{')
    return Fail(
        error, kBadRequest,
        "request body must be a JSON object ({...}) for " + m->GetTypeName() + ", got " + Quote(body.substr(first)));
  google::protobuf::util::JsonParseOptions o;
  o.ignore_unknown_fields = false;  // a misspelt field is an error, not a silent default
  auto st = google::protobuf::util::JsonStringToMessage(google::protobuf::StringPiece(body.data(), body.size()), m, o);
  if (!st.ok())
    return Fail(
        error, kBadRequest,
        "request body is not valid JSON for " + m->GetTypeName() + ": " + OneLine(std::string(st.message()), 200));
  return true;
}

bool ParseDtype(const std::string& s, std::optional<RowDtype>* dtype, AdminError* error) {
  if (s.empty()) return true;
  *dtype = ParseRowDtype(s);
  if (!*dtype)
    return Fail(error, kBadRequest,
                std::string("dtype must be ") + kRowDtypeChoices + ", got \"" + ClipForMessage(s) + "\"");
  return true;
}

std::string Number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

bool CheckPolicy(const Policy& p, AdminError* error) {
  if (Status st = CheckPolicyNumbers(p); !st.ok()) return Fail(error, kBadRequest, st.message());
  for (const std::string& g : p.train_groups())
    if (g.empty() || g.size() > 64)
      return Fail(error, kBadRequest, "trainGroups entries must be group names of 1-64 bytes, got " + Quote(g));
  return true;
}

bool ParseTask(std::string_view body, AdminRequest* request, AdminError* error) {
  TaskRequest r;
  if (!ParseBody(body, &r, error)) return false;
  if (r.name().empty()) return Fail(error, kBadRequest, "a task needs a name");
  if (!wire::ValidTaskName(r.name()))
    return Fail(error, kBadRequest, "task name must be 1-64 characters of A-Z a-z 0-9 _ . -, got " + Quote(r.name()));
  if (!r.text().empty() && !r.path().empty())
    return Fail(error, kBadRequest, "give the task's text or its path, not both");
  if (r.text().empty() && r.path().empty())
    return Fail(error, kBadRequest, "give the task's held-out text (\"text\") or a file under --task-root (\"path\")");
  if (r.path().find('\0') != std::string::npos) return Fail(error, kBadRequest, "task path contains a NUL byte");
  if (!r.measures().empty() && !wire::ValidTaskName(r.measures()))
    return Fail(error, kBadRequest,
                "measures must name an ingest task (peer-ingest --task): 1-64 characters of A-Z a-z 0-9 _ . -, got " +
                    Quote(r.measures()));
  *request = admin::AddTask{r.name(), r.text(), r.path(), r.measures()};
  return true;
}

// "?since=N&limit=M" of GET /v1/history: whole numbers, each at most once, nothing else.
bool ParseHistory(std::string_view query, AdminRequest* request, AdminError* error) {
  admin::History h;
  bool seen_since = false, seen_limit = false;
  while (!query.empty()) {
    const std::string_view pair = query.substr(0, query.find('&'));
    query = pair.size() < query.size() ? query.substr(pair.size() + 1) : std::string_view();
    if (pair.empty()) continue;
    const size_t eq = pair.find('=');
    const std::string_view name = pair.substr(0, eq), value = eq == std::string_view::npos ? "" : pair.substr(eq + 1);
    bool* seen = name == "since" ? &seen_since : name == "limit" ? &seen_limit : nullptr;
    if (!seen) return Fail(error, kBadRequest, "GET /v1/history takes since=STEP and limit=N, got " + Quote(name));
    if (*seen) return Fail(error, kBadRequest, "GET /v1/history: " + std::string(name) + " given twice");
    *seen = true;
    uint64_t n = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
    const bool digits = !value.empty() && value[0] != '-' && ec == std::errc() && end == value.data() + value.size();
    if (!digits || (name == "limit" && (n == 0 || n > kMaxHistoryPoints)))
      return Fail(error, kBadRequest,
                  name == "since"
                      ? "since must be a step (a whole number), got " + Quote(value)
                      : "limit must be 1 to " + std::to_string(kMaxHistoryPoints) + ", got " + Quote(value));
    (name == "since" ? h.since : h.limit) = n;
  }
  *request = h;
  return true;
}

bool ParseFreeze(std::string_view id_text, std::string_view body, AdminRequest* request, AdminError* error) {
  // Digits only (no sign, no spaces), at most nine: every id fits a uint32 with room to spare.
  if (id_text.empty() || id_text.size() > 9 || id_text.find_first_not_of("0123456789") != std::string_view::npos)
    return Fail(error, kBadRequest,
                "segment id in /v1/segments/{id}/freeze must be a whole number in [0, " +
                    std::to_string(kMaxSegmentId) + "], got " + Quote(id_text));
  admin::FreezeSegment f;
  for (char c : id_text) f.id = f.id * 10 + static_cast<uint32_t>(c - '0');
  FreezeRequest r;
  if (!ParseBody(body, &r, error)) return false;
  if (!ParseDtype(r.dtype(), &f.dtype, error)) return false;
  if (r.has_layer()) f.layer = r.layer();
  *request = f;
  return true;
}

}  // namespace

std::string ClipForMessage(std::string_view value, size_t max_bytes) {
  std::string out;
  size_t i = 0;
  while (i < value.size() && out.size() < max_bytes) {
    const size_t n = Utf8SequenceAt(value, i);
    const auto b = static_cast<unsigned char>(value[i]);
    if (n == 0 || b < 0x20 || b == 0x7f) {  // not UTF-8, or a control character: one '?'
      out += '?';
      ++i;
    } else {
      if (out.size() + n > max_bytes) break;
      out.append(value.substr(i, n));
      i += n;
    }
  }
  if (i < value.size()) out += "…";
  return out;
}

bool ParseAdminRequest(std::string_view method, std::string_view target, std::string_view body, AdminRequest* request,
                       AdminError* error) {
  if (target.size() > kMaxTargetBytes)
    return Fail(error, kUriTooLong,
                "request target is " + std::to_string(target.size()) + " bytes; the limit is " +
                    std::to_string(kMaxTargetBytes) + " (see README: admin API)");
  const std::string_view path = target.substr(0, target.find('?'));
  const std::string_view query = path.size() < target.size() ? target.substr(path.size() + 1) : std::string_view();
  const bool get = method == "GET", post = method == "POST", put = method == "PUT";

  // The routes; a known path with another method is 405 below.
  if (path == "/v1/status" && get) return *request = admin::GetStatus{}, true;
  if (path == "/v1/segments" && get) return *request = admin::ListSegments{}, true;
  if (path == "/v1/segments" && post) {
    AddSegmentRequest r;
    if (!ParseBody(body, &r, error)) return false;
    if (r.has_n_keys() && (r.n_keys() == 0 || r.n_keys() > kMaxSegmentKeys))
      return Fail(
          error, kBadRequest,
          "nKeys must be in [top-k, " + std::to_string(kMaxSegmentKeys) + "], got " + std::to_string(r.n_keys()));
    admin::AddSegments a;
    if (r.has_layer()) a.layer = r.layer();
    if (r.has_n_keys()) a.n_keys = r.n_keys();
    *request = a;
    return true;
  }
  constexpr std::string_view kSegments = "/v1/segments/", kFreeze = "/freeze";
  const bool freeze_path = path.size() >= kSegments.size() + kFreeze.size() &&
                           path.substr(0, kSegments.size()) == kSegments &&
                           path.substr(path.size() - kFreeze.size()) == kFreeze &&
                           path.substr(kSegments.size(), path.size() - kSegments.size() - kFreeze.size()).find('/') ==
                               std::string_view::npos;
  if (freeze_path && post)
    return ParseFreeze(path.substr(kSegments.size(), path.size() - kSegments.size() - kFreeze.size()), body, request,
                       error);
  if (path == "/v1/tasks" && post) return ParseTask(body, request, error);
  if (path == "/v1/tasks" && get) return *request = admin::ListTasks{}, true;
  constexpr std::string_view kTasks = "/v1/tasks/";
  const bool task_path = path.size() > kTasks.size() && path.substr(0, kTasks.size()) == kTasks;
  if (task_path && method == "DELETE") {
    const std::string name(path.substr(kTasks.size()));
    if (!wire::ValidTaskName(name))
      return Fail(error, kBadRequest,
                  "task name in /v1/tasks/{name} must be 1-64 characters of A-Z a-z 0-9 _ . -, got " + Quote(name));
    *request = admin::DeleteTask{name};
    return true;
  }
  if (path == "/v1/score" && post) {
    ScoreRequest r;
    if (!ParseBody(body, &r, error)) return false;
    if (r.text().size() < 2 || r.text().size() > kMaxScoreBytes)
      return Fail(error, kBadRequest,
                  "text to score must be 2 to " + std::to_string(kMaxScoreBytes) + " bytes, got " +
                      std::to_string(r.text().size()));
    *request = admin::Score{r.text(), r.log_probs()};
    return true;
  }
  if (path == "/v1/generate" && post) {
    admin::Generate g;
    if (!ParseBody(body, &g.request, error)) return false;
    const GenerateRequest& r = g.request;
    if (r.prompt().empty() || r.prompt().size() > kMaxPromptBytes)
      return Fail(error, kBadRequest,
                  "prompt must be 1 to " + std::to_string(kMaxPromptBytes) + " bytes, got " +
                      std::to_string(r.prompt().size()));
    if (r.has_max_tokens() && (r.max_tokens() == 0 || r.max_tokens() > kMaxGenerateTokens))
      return Fail(
          error, kBadRequest,
          "maxTokens must be 1 to " + std::to_string(kMaxGenerateTokens) + ", got " + std::to_string(r.max_tokens()));
    if (r.has_temperature() && !(r.temperature() >= 0 && r.temperature() <= 100))
      return Fail(error, kBadRequest, "temperature must be in [0, 100] (0: greedy), got " + Number(r.temperature()));
    if (r.has_top_p() && !(r.top_p() > 0 && r.top_p() <= 1))
      return Fail(error, kBadRequest, "topP must be in (0, 1], got " + Number(r.top_p()));
    if (r.stop_size() > 4)
      return Fail(error, kBadRequest, "at most 4 stop strings, got " + std::to_string(r.stop_size()));
    for (const std::string& stop : r.stop())
      if (stop.empty() || stop.size() > 64)
        return Fail(error, kBadRequest, "stop strings must be 1 to 64 bytes, got " + Quote(stop));
    *request = std::move(g);
    return true;
  }
  if (path == "/v1/eval" && post) {
    EvalRequest r;
    if (!ParseBody(body, &r, error)) return false;
    bool control = false;
    for (char c : r.label()) control |= static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
    if (r.label().size() > kMaxEvalLabelBytes || control)
      return Fail(error, kBadRequest,
                  "label must be at most " + std::to_string(kMaxEvalLabelBytes) +
                      " bytes without control characters (it names a row of the report), got " + Quote(r.label()) +
                      " (" + std::to_string(r.label().size()) + " bytes)");
    *request = admin::RunEval{r.label()};
    return true;
  }
  if (path == "/v1/eval" && get) return *request = admin::EvalReport{}, true;
  if (path == "/v1/checkpoint" && post) return *request = admin::Checkpoint{}, true;
  if (path == "/v1/train/pause" && post) return *request = admin::SetPaused{true}, true;
  if (path == "/v1/train/resume" && post) return *request = admin::SetPaused{false}, true;
  if (path == "/v1/policy" && get) return *request = admin::GetPolicy{}, true;
  if (path == "/v1/policy" && put) {
    admin::SetPolicy s;
    if (!ParseBody(body, &s.policy, error) || !CheckPolicy(s.policy, error)) return false;
    *request = std::move(s);
    return true;
  }
  if (path == "/metrics" && get) return *request = admin::Metrics{}, true;
  if (path == "/v1/export" && get) return *request = admin::Export{}, true;
  if (path == "/v1/history" && get) return ParseHistory(query, request, error);

  bool known = freeze_path || task_path;
  for (const AdminRoute& route : AdminRoutes()) known |= path == route.path;
  if (known)
    return Fail(error, kMethodNotAllowed,
                ClipForMessage(method, 32) + " is not allowed on " + ClipForMessage(path, 128));
  return Fail(error, kNotFound, "no route " + ClipForMessage(path, 128) + " (see README: admin API)");
}

const std::vector<AdminRoute>& AdminRoutes() {
  static const std::vector<AdminRoute> routes = {
      {"GET", "/v1/status"},
      {"GET", "/v1/segments"},
      {"POST", "/v1/segments"},
      {"POST", "/v1/segments/{id}/freeze"},
      {"GET", "/v1/tasks"},
      {"POST", "/v1/tasks"},
      {"DELETE", "/v1/tasks/{name}"},
      {"POST", "/v1/eval"},
      {"GET", "/v1/eval"},
      {"GET", "/v1/history"},
      {"POST", "/v1/score"},
      {"POST", "/v1/generate"},
      {"GET", "/v1/export"},
      {"POST", "/v1/checkpoint"},
      {"POST", "/v1/train/pause"},
      {"POST", "/v1/train/resume"},
      {"GET", "/v1/policy"},
      {"PUT", "/v1/policy"},
      {"GET", "/metrics"},
      // Answered by the server before the token is checked (admin_server.cc: PublicReply).
      {"GET", "/healthz", false},
      {"GET", "/readyz", false},
      {"GET", "/", false},
      {"GET", "/dashboard.js", false},
      {"POST", "/login", false},
      {"POST", "/logout", false},
  };
  return routes;
}

namespace {

// Whether `path` is `root` or below it, comparing whole components ("/a/bc" is not under "/a/b").
bool IsWithin(const fs::path& path, const fs::path& root) {
  auto p = path.begin();
  for (auto r = root.begin(); r != root.end(); ++r) {
    if (r->empty()) continue;  // the empty last component of a root written with a trailing '/'
    if (p == path.end() || *p != *r) return false;
    ++p;
  }
  return true;
}

std::string RootList(const std::vector<std::string>& roots) {
  std::string list;
  for (const auto& r : roots) list += (list.empty() ? "" : ", ") + ClipForMessage(r, 256);
  return list.empty() ? "none" : list;
}

}  // namespace

bool ConfineTaskPath(const std::string& path, const std::vector<std::string>& roots, fs::path* real,
                     AdminError* error) {
  if (path.empty()) return Fail(error, kBadRequest, "task path is empty");
  if (path.find('\0') != std::string::npos) return Fail(error, kBadRequest, "task path contains a NUL byte");
  std::error_code ec;
  // Every existing part resolved (symlinks followed, ".." applied to the real directory), the
  // rest normalised lexically: what the kernel would open, or a path that cannot exist.
  const fs::path absolute = fs::absolute(path, ec);
  fs::path resolved;
  if (!ec) resolved = fs::weakly_canonical(absolute, ec);
  if (ec) return Fail(error, kBadRequest, "cannot resolve task path " + Quote(path) + ": " + ec.message());
  for (const auto& root : roots) {
    std::error_code rec;
    const fs::path r = fs::canonical(root, rec);  // a root that does not exist allows nothing
    if (!rec && !r.empty() && IsWithin(resolved, r)) {
      *real = resolved;
      return true;
    }
  }
  return Fail(error, kForbidden,
              "path " + Quote(path) + " is outside the allowed task roots (" + RootList(roots) +
                  "): start peerd with --task-root, or send the text itself");
}

bool ReadConfinedTaskFile(const std::string& path, const std::vector<std::string>& roots, uint64_t max_bytes,
                          std::string* text, AdminError* error) {
  fs::path real;
  if (!ConfineTaskPath(path, roots, &real, error)) return false;
  // O_NOFOLLOW: the last component cannot have become a symlink since it was resolved;
  // O_NONBLOCK: opening a FIFO does not wait for a writer.
  const int fd = ::open(real.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return Fail(error, kBadRequest, "cannot read task file " + Quote(path) + ": " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  // A directory on the way swapped for a symlink after the check would show here.
  std::error_code ec;
  const fs::path opened = fs::read_symlink("/proc/self/fd/" + std::to_string(fd), ec);
  if (!ec && opened != real)
    return Fail(error, kForbidden, "task path " + Quote(path) + " changed while it was being opened");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    return Fail(error, kBadRequest, "task path " + Quote(path) + " is not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    return Fail(error, kBadRequest,
                "task file " + Quote(path) + " is " + std::to_string(st.st_size) + " bytes; the limit is " +
                    std::to_string(max_bytes) + " (a held-out slice needs far less)");
  text->assign(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < text->size()) {
    const ssize_t n = ::read(fd, text->data() + got, text->size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  text->resize(got);  // a file that shrank meanwhile gives what it had
  return true;
}

Status CheckPolicyNumbers(const Policy& p) {
  if (p.has_replay_ratio() && !(p.replay_ratio() >= 0 && p.replay_ratio() < 1))
    return Status::InvalidArgument("config field 'train.replayRatio' must be in [0, 1), got " +
                                   Number(p.replay_ratio()));
  if (p.has_distill_weight() && !(p.distill_weight() >= 0 && p.distill_weight() <= 1000))
    return Status::InvalidArgument(
        "config field 'train.distillWeight' must be in [0, 1000] (0 = no distillation), got " +
        Number(p.distill_weight()));
  if (p.has_lr() && !(p.lr() > 0 && p.lr() <= FLT_MAX && static_cast<float>(p.lr()) > 0))
    return Status::InvalidArgument(
        "config field 'train.lr' must be a positive number (a float: at most 3.4e38, not rounding to 0), got " +
        Number(p.lr()));
  if (p.has_freeze_dtype() && !ParseRowDtype(p.freeze_dtype()))
    return Status::InvalidArgument(std::string("freezeDtype must be ") + kRowDtypeChoices + ", got \"" +
                                   ClipForMessage(p.freeze_dtype()) + "\"");
  return Status::OK();
}

Status CheckNewSegmentSize(uint32_t n_keys, uint32_t d_model, uint64_t memory_bytes) {
  if (n_keys == 0 || n_keys > kMaxSegmentKeys)
    return Status::InvalidArgument("nKeys must be in [top-k, " + std::to_string(kMaxSegmentKeys) + "], got " +
                                   std::to_string(n_keys));
  const uint64_t experts = uint64_t{n_keys} * n_keys;
  const uint64_t row_bytes = experts * 2 * uint64_t{d_model} * sizeof(float);  // ≤ 2^51: no overflow
  const uint64_t training_bytes = 4 * row_bytes;                               // + gradients, AdamW m and v
  if (training_bytes <= memory_bytes) return Status::OK();
  auto gib = [](uint64_t b) { return Number(static_cast<double>(b) / (1ull << 30)) + " GiB"; };
  return Status::InvalidArgument("a segment with nKeys = " + std::to_string(n_keys) + " holds " +
                                 std::to_string(experts) + " experts: " + gib(row_bytes) + " of fp32 rows at dModel " +
                                 std::to_string(d_model) + ", about " + gib(training_bytes) +
                                 " while it trains, more than this machine's " + gib(memory_bytes) +
                                 " of memory; use a smaller nKeys (halving it quarters the size)");
}

}  // namespace peerd
