// libFuzzer target for the admin API's request parser (service/net/admin_requests.h): any method,
// target and body must give either a request whose values passed every check or an AdminError
// with a 4xx status and a short, printable, valid UTF-8 message — never a crash, a leak or
// undefined behaviour (built with -fsanitize=fuzzer,address,undefined; tests/fuzz/CMakeLists.txt).
//
// Input: the first byte picks the route (method and target) from kRoutes; the rest is the body.
// The last entries take the target, or the method and the target, from the input's first lines,
// so the router and the segment-id parsing are fuzzed too.
#include <google/protobuf/stubs/common.h>
#include <google/protobuf/util/json_util.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "service/net/admin_requests.h"

namespace {

using peerd::AdminError;
using peerd::AdminRequest;

struct Route {
  const char* method;  // nullptr: the input's first line
  const char* target;  // nullptr: the input's next line
};

constexpr Route kRoutes[] = {
    {"POST", "/v1/segments"},   {"POST", "/v1/segments/0/freeze"},
    {"POST", "/v1/tasks"},      {"POST", "/v1/eval"},
    {"PUT", "/v1/policy"},      {"GET", "/v1/status"},
    {"POST", "/v1/checkpoint"}, {"POST", "/v1/train/pause"},
    {"GET", "/metrics"},        {"POST", nullptr},
    {"GET", nullptr},           {nullptr, nullptr},
    {"POST", "/v1/generate"},
};

[[noreturn]] void Broken(const char* what, std::string_view detail) {
  std::fprintf(stderr, "admin_requests_fuzz: %s: %.*s\n", what, static_cast<int>(detail.size()), detail.data());
  std::abort();
}

bool ValidUtf8(const std::string& s) { return google::protobuf::internal::IsStructurallyValidUTF8(s); }

// Takes the text up to the next '\n' off the front of `rest`.
std::string_view Line(std::string_view* rest) {
  const size_t nl = rest->find('\n');
  std::string_view line = rest->substr(0, nl);
  *rest = nl == std::string_view::npos ? std::string_view() : rest->substr(nl + 1);
  return line;
}

void CheckAccepted(const AdminRequest& request) {
  if (const auto* a = std::get_if<peerd::admin::AddSegments>(&request))
    if (a->n_keys && (*a->n_keys == 0 || *a->n_keys > peerd::kMaxSegmentKeys)) Broken("nKeys passed", "");
  if (const auto* f = std::get_if<peerd::admin::FreezeSegment>(&request))
    if (f->id > peerd::kMaxSegmentId) Broken("segment id passed", std::to_string(f->id));
  if (const auto* t = std::get_if<peerd::admin::AddTask>(&request)) {
    if (t->text.empty() == t->path.empty()) Broken("task text/path passed", t->name);
    if (t->name.empty() || t->name.size() > 64) Broken("task name passed", t->name);
    // Confinement on a root that exists; nothing is read.
    std::filesystem::path real;
    AdminError e;
    if (!t->path.empty() && !peerd::ConfineTaskPath(t->path, {"/usr/share"}, &real, &e) && e.http_status != 403 &&
        e.http_status != 400)
      Broken("task path status", e.message);
  }
  if (const auto* t = std::get_if<peerd::admin::Score>(&request))
    if (t->text.size() < 2 || t->text.size() > peerd::kMaxScoreBytes)
      Broken("score text passed", t->text.substr(0, 64));
  if (const auto* g = std::get_if<peerd::admin::Generate>(&request)) {
    const peerd::GenerateRequest& r = g->request;
    if (r.prompt().empty() || r.prompt().size() > peerd::kMaxPromptBytes)
      Broken("prompt passed", r.prompt().substr(0, 64));
    if (r.has_max_tokens() && (r.max_tokens() == 0 || r.max_tokens() > peerd::kMaxGenerateTokens))
      Broken("maxTokens passed", std::to_string(r.max_tokens()));
    if (r.has_temperature() && !(r.temperature() >= 0 && r.temperature() <= 100)) Broken("temperature passed", "");
    if (r.has_top_p() && !(r.top_p() > 0 && r.top_p() <= 1)) Broken("topP passed", "");
  }
  if (const auto* d = std::get_if<peerd::admin::DeleteTask>(&request))
    if (d->name.empty() || d->name.size() > 64) Broken("deleted task name passed", d->name);
  if (const auto* p = std::get_if<peerd::admin::SetPolicy>(&request))
    if (!peerd::CheckPolicyNumbers(p->policy).ok()) Broken("policy passed", p->policy.ShortDebugString());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const Route& route = kRoutes[data[0] % (sizeof kRoutes / sizeof kRoutes[0])];
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::string_view method = route.method ? std::string_view(route.method) : Line(&rest);
  const std::string_view target = route.target ? std::string_view(route.target) : Line(&rest);

  AdminRequest request;
  AdminError error;
  if (peerd::ParseAdminRequest(method, target, rest, &request, &error)) {
    CheckAccepted(request);
    return 0;
  }
  switch (error.http_status) {
    case 400:
    case 403:
    case 404:
    case 405:
    case 414: break;
    default: Broken("unexpected status", std::to_string(error.http_status) + " " + error.message);
  }
  // The message goes back in a JSON body and into the log: short, printable, valid UTF-8.
  if (error.message.empty()) Broken("empty message", "");
  if (error.message.size() > 1024) Broken("message not clipped", error.message.substr(0, 200));
  if (!ValidUtf8(error.message)) Broken("message not UTF-8", error.message);
  for (unsigned char c : error.message)
    if (c < 0x20 || c == 0x7f) Broken("control character in message", error.message);
  peerd::ErrorBody body;
  body.mutable_error()->set_code(error.http_status);
  body.mutable_error()->set_message(error.message);
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(body, &json).ok()) Broken("error body not printable", error.message);

  const std::string clipped = peerd::ClipForMessage(rest, 16);
  if (clipped.size() > 16 + 3 || !ValidUtf8(clipped)) Broken("ClipForMessage", clipped);
  return 0;
}
