// The admin API's bad-input catalogue (service/net/admin_requests.h, README "Admin API: bad input"):
// every refused request with the exact HTTP status and message the client gets, the requests that
// must still be accepted, and task-path confinement against "..", symlinks and look-alike roots on
// a real directory tree. No server, no LibTorch.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include <google/protobuf/descriptor.h>
#include <nlohmann/json.hpp>

#include "service/net/admin_requests.h"
#include "service/net/token.h"
#include "service/net/web_login.h"

namespace peerd {
namespace {

namespace fs = std::filesystem;

struct BadRequest {
  const char* method;
  std::string target;
  std::string body;
  int status;
  std::string message;  // exact
};

std::string Describe(const BadRequest& c) {
  return std::string(c.method) + " " + c.target.substr(0, 80) + " " + c.body.substr(0, 80);
}

TEST(AdminRequests, EveryBadInputInTheCatalogueGetsItsStatusAndExactMessage) {
  const std::string long_name(65, 'a');
  const std::vector<BadRequest> catalogue = {
      // Bodies that are not a JSON object of the route's message.
      {"POST", "/v1/segments", "null", 400,
       "request body must be a JSON object ({...}) for peerd.AddSegmentRequest, got 'null'"},
      {"POST", "/v1/segments", "[1,2]", 400,
       "request body must be a JSON object ({...}) for peerd.AddSegmentRequest, got '[1,2]'"},
      {"PUT", "/v1/policy", " 42", 400, "request body must be a JSON object ({...}) for peerd.Policy, got '42'"},
      {"POST", "/v1/eval", "\"after\"", 400,
       "request body must be a JSON object ({...}) for peerd.EvalRequest, got '\"after\"'"},
      {"POST", "/v1/segments", "{", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: Unexpected end of string. Expected an object key "
       "or }."},
      {"POST", "/v1/segments", "{\"nKeys\": 32} x", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: Parsing terminated before end of input. "
       "(near: {\"nKeys\": 32} x)"},
      // Unknown fields, wrong types.
      {"POST", "/v1/segments", "{\"nkeys\": 32}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: nkeys: Cannot find field."},
      {"POST", "/v1/segments", "{\"layer\": true}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: (layer): invalid value true for type TYPE_UINT32"},
      {"POST", "/v1/segments", "{\"layer\": 1.5}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: (layer): invalid value 1.5 for type TYPE_UINT32"},
      {"POST", "/v1/tasks", "{\"name\": 5, \"text\": \"ab\"}", 400,
       "request body is not valid JSON for peerd.TaskRequest: (name): invalid value 5 for type TYPE_STRING"},
      {"POST", "/v1/tasks", "{\"name\": [\"x\"]}", 400,
       "request body is not valid JSON for peerd.TaskRequest: name: Proto field is not repeating, cannot start list."},
      {"PUT", "/v1/policy", "{\"trainGroups\": [1]}", 400,
       "request body is not valid JSON for peerd.Policy: (train_groups[0]): invalid value 1 for type TYPE_STRING"},
      {"POST", "/v1/segments", "{\"layer\": 1, \"layer\": 2}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: : invalid value oneof field '_layer' is already "
       "set. Cannot set 'layer' for type oneof"},
      // Numbers out of range.
      {"POST", "/v1/segments", "{\"nKeys\": 1e30}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: (n_keys): invalid value 1e+30 for type "
       "TYPE_UINT32"},
      {"POST", "/v1/segments", "{\"nKeys\": 99999999999999999999}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: (n_keys): invalid value 1e+20 for type "
       "TYPE_UINT32"},
      {"POST", "/v1/segments", "{\"nKeys\": -1}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: (n_keys): invalid value -1 for type TYPE_UINT32"},
      {"POST", "/v1/segments", "{\"layer\": 4294967296}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: (layer): invalid value 4294967296 for type "
       "TYPE_UINT32"},
      {"POST", "/v1/segments", "{\"nKeys\": 0}", 400, "nKeys must be in [top-k, 65536], got 0"},
      {"POST", "/v1/segments", "{\"nKeys\": 65537}", 400, "nKeys must be in [top-k, 65536], got 65537"},
      {"POST", "/v1/segments/0/freeze", "{\"layer\": -3}", 400,
       "request body is not valid JSON for peerd.FreezeRequest: (layer): invalid value -3 for type TYPE_UINT32"},
      // Freeze: the id in the path, the dtype.
      {"POST", "/v1/segments/1234567890/freeze", "", 400,
       "segment id in /v1/segments/{id}/freeze must be a whole number in [0, 999999999], got '1234567890'"},
      {"POST", "/v1/segments/-1/freeze", "", 400,
       "segment id in /v1/segments/{id}/freeze must be a whole number in [0, 999999999], got '-1'"},
      {"POST", "/v1/segments/abc/freeze", "", 400,
       "segment id in /v1/segments/{id}/freeze must be a whole number in [0, 999999999], got 'abc'"},
      {"POST", "/v1/segments//freeze", "", 400,
       "segment id in /v1/segments/{id}/freeze must be a whole number in [0, 999999999], got ''"},
      {"POST", "/v1/segments/0/freeze", "{\"dtype\": \"fp16\"}", 400,
       "dtype must be \"bf16\" or \"fp32\", got \"fp16\""},
      {"POST", "/v1/segments/0/freeze", "{\"dtype\": \"BF16\"}", 400,
       "dtype must be \"bf16\" or \"fp32\", got \"BF16\""},
      // Tasks.
      {"POST", "/v1/tasks", "{\"text\": \"abc\"}", 400, "a task needs a name"},
      {"POST", "/v1/tasks", "{\"name\": \"" + long_name + "\", \"text\": \"abc\"}", 400,
       "task name must be 1-64 characters of A-Z a-z 0-9 _ . -, got '" + long_name.substr(0, 64) + "…'"},
      {"POST", "/v1/tasks", "{\"name\": \"a b\", \"text\": \"abc\"}", 400,
       "task name must be 1-64 characters of A-Z a-z 0-9 _ . -, got 'a b'"},
      {"POST", "/v1/tasks", "{\"name\": \"../etc\", \"text\": \"abc\"}", 400,
       "task name must be 1-64 characters of A-Z a-z 0-9 _ . -, got '../etc'"},
      {"POST", "/v1/tasks", "{\"name\": \"a\\u0000b\", \"text\": \"abc\"}", 400,
       "task name must be 1-64 characters of A-Z a-z 0-9 _ . -, got 'a?b'"},
      {"POST", "/v1/tasks", "{\"name\": \"k\\u00e9\", \"text\": \"abc\"}", 400,
       "task name must be 1-64 characters of A-Z a-z 0-9 _ . -, got 'k\u00e9'"},
      {"POST", "/v1/tasks", "{\"name\": \"kjv\", \"text\": \"abc\", \"path\": \"x.txt\"}", 400,
       "give the task's text or its path, not both"},
      {"POST", "/v1/tasks", "{\"name\": \"kjv\"}", 400,
       "give the task's held-out text (\"text\") or a file under --task-root (\"path\")"},
      {"POST", "/v1/tasks", "{\"name\": \"kjv\", \"path\": \"a\\u0000b\"}", 400, "task path contains a NUL byte"},
      // Evaluation labels.
      {"POST", "/v1/eval", "{\"label\": \"a\\nb\"}", 400,
       "label must be at most 256 bytes without control characters (it names a row of the report), got 'a?b' (3 "
       "bytes)"},
      {"POST", "/v1/eval", "{\"label\": \"" + std::string(257, 'x') + "\"}", 400,
       "label must be at most 256 bytes without control characters (it names a row of the report), got '" +
           std::string(64, 'x') + "…' (257 bytes)"},
      // Policy numbers.
      {"PUT", "/v1/policy", "{\"replayRatio\": 1}", 400, "config field 'train.replayRatio' must be in [0, 1), got 1"},
      {"PUT", "/v1/policy", "{\"replayRatio\": \"NaN\"}", 400,
       "config field 'train.replayRatio' must be in [0, 1), got nan"},
      {"PUT", "/v1/policy", "{\"replayRatio\": 1e300}", 400,
       "config field 'train.replayRatio' must be in [0, 1), got 1e+300"},
      {"PUT", "/v1/policy", "{\"distillWeight\": -1}", 400,
       "config field 'train.distillWeight' must be in [0, 1000] (0 = no distillation), got -1"},
      {"PUT", "/v1/policy", "{\"distillWeight\": \"Infinity\"}", 400,
       "config field 'train.distillWeight' must be in [0, 1000] (0 = no distillation), got inf"},
      {"PUT", "/v1/policy", "{\"lr\": 1e300}", 400,
       "config field 'train.lr' must be a positive number (a float: at most 3.4e38, not rounding to 0), got 1e+300"},
      {"PUT", "/v1/policy", "{\"lr\": 1e-300}", 400,
       "config field 'train.lr' must be a positive number (a float: at most 3.4e38, not rounding to 0), got 1e-300"},
      {"PUT", "/v1/policy", "{\"lr\": 0}", 400,
       "config field 'train.lr' must be a positive number (a float: at most 3.4e38, not rounding to 0), got 0"},
      {"PUT", "/v1/policy", "{\"lr\": 1e400}", 400,
       "request body is not valid JSON for peerd.Policy: Number exceeds the range of double. (near: {\"lr\": 1e400})"},
      {"PUT", "/v1/policy", "{\"freezeDtype\": \"int8\"}", 400,
       "freezeDtype must be \"bf16\" or \"fp32\", got \"int8\""},
      {"PUT", "/v1/policy", "{\"trainGroups\": [\"\"]}", 400,
       "trainGroups entries must be group names of 1-64 bytes, got ''"},
      // Scoring and deleting tasks.
      {"POST", "/v1/score", "{}", 400, "text to score must be 2 to 1048576 bytes, got 0"},
      {"POST", "/v1/score", "{\"text\": \"a\"}", 400, "text to score must be 2 to 1048576 bytes, got 1"},
      {"POST", "/v1/score", "{\"text\": \"" + std::string(kMaxScoreBytes + 1, 'a') + "\"}", 400,
       "text to score must be 2 to 1048576 bytes, got 1048577"},
      {"POST", "/v1/score", "{\"text\": \"ab\", \"logprobs\": true}", 400,
       "request body is not valid JSON for peerd.ScoreRequest: logprobs: Cannot find field."},
      {"DELETE", "/v1/tasks/a%20b", "", 400,
       "task name in /v1/tasks/{name} must be 1-64 characters of A-Z a-z 0-9 _ . -, got 'a%20b'"},
      {"GET", "/v1/tasks/kjv", "", 405, "GET is not allowed on /v1/tasks/kjv"},
      {"GET", "/v1/score", "", 405, "GET is not allowed on /v1/score"},
      // Generation.
      {"POST", "/v1/generate", "{}", 400, "prompt must be 1 to 65536 bytes, got 0"},
      {"POST", "/v1/generate", "{\"prompt\": \"" + std::string(kMaxPromptBytes + 1, 'a') + "\"}", 400,
       "prompt must be 1 to 65536 bytes, got 65537"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"maxTokens\": 0}", 400, "maxTokens must be 1 to 4096, got 0"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"maxTokens\": 4097}", 400,
       "maxTokens must be 1 to 4096, got 4097"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"maxTokens\": -1}", 400,
       "request body is not valid JSON for peerd.GenerateRequest: (max_tokens): invalid value -1 for type TYPE_UINT32"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"temperature\": -0.5}", 400,
       "temperature must be in [0, 100] (0: greedy), got -0.5"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"temperature\": \"NaN\"}", 400,
       "temperature must be in [0, 100] (0: greedy), got nan"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"topP\": 0}", 400, "topP must be in (0, 1], got 0"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"topP\": 1.01}", 400, "topP must be in (0, 1], got 1.01"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"stop\": [\"\"]}", 400,
       "stop strings must be 1 to 64 bytes, got ''"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"stop\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}", 400,
       "at most 4 stop strings, got 5"},
      {"POST", "/v1/generate", "{\"prompt\": \"\\udc00\"}", 400,
       "request body is not valid JSON for peerd.GenerateRequest: Invalid unicode code point. (near: {\"prompt\": "
       "\"\\udc00\"})"},
      {"GET", "/v1/generate", "", 405, "GET is not allowed on /v1/generate"},
      // The training history's query.
      {"GET", "/v1/history?limit=0", "", 400, "limit must be 1 to 10000, got '0'"},
      {"GET", "/v1/history?limit=10001", "", 400, "limit must be 1 to 10000, got '10001'"},
      {"GET", "/v1/history?since=-1", "", 400, "since must be a step (a whole number), got '-1'"},
      {"GET", "/v1/history?since=", "", 400, "since must be a step (a whole number), got ''"},
      {"GET", "/v1/history?since=99999999999999999999", "", 400,
       "since must be a step (a whole number), got '99999999999999999999'"},
      {"GET", "/v1/history?since=1&since=2", "", 400, "GET /v1/history: since given twice"},
      {"GET", "/v1/history?from=3", "", 400, "GET /v1/history takes since=STEP and limit=N, got 'from'"},
      {"POST", "/v1/history", "", 405, "POST is not allowed on /v1/history"},
      {"POST", "/v1/tasks", "{\"name\": \"a\", \"text\": \"ab\", \"measures\": \"no way\"}", 400,
       "measures must name an ingest task (peer-ingest --task): 1-64 characters of A-Z a-z 0-9 _ . -, got 'no way'"},
      // Routes and methods.
      {"GET", "/v1/nothing", "", 404, "no route /v1/nothing (see README: admin API)"},
      {"GET", "/v1/segments/0", "", 404, "no route /v1/segments/0 (see README: admin API)"},
      {"POST", "/v1/segments/0/1/freeze", "", 404, "no route /v1/segments/0/1/freeze (see README: admin API)"},
      {"DELETE", "/v1/segments", "", 405, "DELETE is not allowed on /v1/segments"},
      {"GET", "/v1/segments/3/freeze", "", 405, "GET is not allowed on /v1/segments/3/freeze"},
      {"POST", "/v1/status", "", 405, "POST is not allowed on /v1/status"},
      {"GET", "/v1/train/pause", "", 405, "GET is not allowed on /v1/train/pause"},
      {"POST", "/v1/policy", "{}", 405, "POST is not allowed on /v1/policy"},
      {"GET", "/v1/" + std::string(3000, 'a'), "", 414,
       "request target is 3004 bytes; the limit is 2048 (see README: admin API)"},
  };
  for (const BadRequest& c : catalogue) {
    AdminRequest request;
    AdminError error;
    EXPECT_FALSE(ParseAdminRequest(c.method, c.target, c.body, &request, &error)) << Describe(c);
    EXPECT_EQ(error.http_status, c.status) << Describe(c);
    EXPECT_EQ(error.message, c.message) << Describe(c);
  }
}

TEST(AdminRequests, GoodRequestsParseToTheirRouteWithTheirValues) {
  AdminRequest r;
  AdminError e;
  ASSERT_TRUE(ParseAdminRequest("GET", "/v1/status?verbose=1", "", &r, &e)) << e.message;
  EXPECT_TRUE(std::holds_alternative<admin::GetStatus>(r));

  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/segments", "  \n", &r, &e)) << e.message;
  ASSERT_TRUE(std::holds_alternative<admin::AddSegments>(r));
  EXPECT_FALSE(std::get<admin::AddSegments>(r).layer.has_value());
  EXPECT_FALSE(std::get<admin::AddSegments>(r).n_keys.has_value());
  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/segments", R"({"layer": 0, "nKeys": "65536"})", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::AddSegments>(r).layer, 0u);
  EXPECT_EQ(std::get<admin::AddSegments>(r).n_keys, 65536u);

  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/segments/999999999/freeze", R"({"dtype": "fp32", "layer": 1})", &r, &e))
      << e.message;
  ASSERT_TRUE(std::holds_alternative<admin::FreezeSegment>(r));
  EXPECT_EQ(std::get<admin::FreezeSegment>(r).id, 999999999u);
  EXPECT_EQ(std::get<admin::FreezeSegment>(r).dtype, ROW_DTYPE_FP32);
  EXPECT_EQ(std::get<admin::FreezeSegment>(r).layer, 1u);
  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/segments/007/freeze", "{}", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::FreezeSegment>(r).id, 7u);
  EXPECT_FALSE(std::get<admin::FreezeSegment>(r).dtype.has_value());

  ASSERT_TRUE(
      ParseAdminRequest("POST", "/v1/tasks", R"({"name": "kjv.held-out_1", "text": "In the beginning"})", &r, &e))
      << e.message;
  EXPECT_EQ(std::get<admin::AddTask>(r).name, "kjv.held-out_1");
  EXPECT_EQ(std::get<admin::AddTask>(r).text, "In the beginning");
  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/tasks", R"({"name": "c", "path": "data/c.txt"})", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::AddTask>(r).path, "data/c.txt");
  ASSERT_TRUE(
      ParseAdminRequest("POST", "/v1/tasks", R"({"name": ")" + std::string(64, 'n') + R"(", "text": "ab"})", &r, &e))
      << e.message;

  ASSERT_TRUE(
      ParseAdminRequest("POST", "/v1/tasks", R"({"name": "kjv-heldout", "text": "ab", "measures": "kjv"})", &r, &e))
      << e.message;
  EXPECT_EQ(std::get<admin::AddTask>(r).measures, "kjv");

  ASSERT_TRUE(ParseAdminRequest("GET", "/v1/history", "", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::History>(r).since, 0u);
  EXPECT_EQ(std::get<admin::History>(r).limit, 2000u);
  ASSERT_TRUE(ParseAdminRequest("GET", "/v1/history?limit=10000&since=18446744073709551615", "", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::History>(r).since, 18446744073709551615u);
  EXPECT_EQ(std::get<admin::History>(r).limit, 10000u);

  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/eval", R"({"label": "after kjv – Genesis"})", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::RunEval>(r).label, "after kjv – Genesis");
  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/eval", "", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::RunEval>(r).label, "");

  ASSERT_TRUE(ParseAdminRequest(
      "PUT", "/v1/policy",
      R"({"trainGroups": ["non-expert", "new-segment"], "replayRatio": 0, "distillWeight": 1000, "lr": 3e38, "freezeDtype": "fp32"})",
      &r, &e))
      << e.message;
  const Policy& p = std::get<admin::SetPolicy>(r).policy;
  EXPECT_EQ(p.train_groups_size(), 2);
  EXPECT_EQ(p.distill_weight(), 1000);
  // Unknown group names are the trainer's to refuse (ValidateConfig knows the list).
  EXPECT_TRUE(ParseAdminRequest("PUT", "/v1/policy", R"({"trainGroups": ["nope"]})", &r, &e)) << e.message;

  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/score", R"({"text": "In the beginning", "logProbs": true})", &r, &e))
      << e.message;
  EXPECT_EQ(std::get<admin::Score>(r).text, "In the beginning");
  EXPECT_TRUE(std::get<admin::Score>(r).log_probs);
  ASSERT_TRUE(
      ParseAdminRequest("POST", "/v1/generate",
                        R"({"prompt": "In", "maxTokens": 4096, "temperature": 0, "topK": 5, "topP": 1, "seed": "7",
                                    "stop": ["\n\n"], "stream": true})",
                        &r, &e))
      << e.message;
  const GenerateRequest& g = std::get<admin::Generate>(r).request;
  EXPECT_EQ(g.prompt(), "In");
  EXPECT_EQ(g.max_tokens(), 4096u);
  EXPECT_TRUE(g.has_temperature());
  EXPECT_EQ(g.temperature(), 0);
  EXPECT_EQ(g.seed(), 7u);
  EXPECT_EQ(g.stop(0), "\n\n");
  EXPECT_TRUE(g.stream());
  ASSERT_TRUE(ParseAdminRequest("DELETE", "/v1/tasks/kjv.held-out_1", "", &r, &e)) << e.message;
  EXPECT_EQ(std::get<admin::DeleteTask>(r).name, "kjv.held-out_1");

  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/train/pause", "ignored", &r, &e)) << e.message;
  EXPECT_TRUE(std::get<admin::SetPaused>(r).paused);
  ASSERT_TRUE(ParseAdminRequest("POST", "/v1/train/resume", "", &r, &e)) << e.message;
  EXPECT_FALSE(std::get<admin::SetPaused>(r).paused);
  for (auto [method, target] : std::vector<std::pair<const char*, const char*>>{{"GET", "/v1/segments"},
                                                                                {"GET", "/v1/tasks"},
                                                                                {"GET", "/v1/eval"},
                                                                                {"POST", "/v1/checkpoint"},
                                                                                {"GET", "/v1/policy"},
                                                                                {"GET", "/metrics"}})
    EXPECT_TRUE(ParseAdminRequest(method, target, "", &r, &e)) << method << " " << target << ": " << e.message;
  // A target of exactly kMaxTargetBytes is looked up (and not found), not refused for its length.
  EXPECT_FALSE(ParseAdminRequest("GET", "/" + std::string(kMaxTargetBytes - 1, 'a'), "", &r, &e));
  EXPECT_EQ(e.http_status, 404);
}

// docs/openapi.json (written by scripts/openapi.py) documents exactly the routes the server has,
// each of them is one ParseAdminRequest knows, and every schema has exactly its message's fields.
TEST(AdminRequests, TheOpenApiDocumentMatchesTheRoutesAndTheMessages) {
  std::ifstream in(std::string(PEERD_SOURCE_DIR) + "/docs/openapi.json");
  ASSERT_TRUE(in) << "docs/openapi.json is missing: run scripts/openapi.py";
  const nlohmann::json doc = nlohmann::json::parse(in);
  std::set<std::pair<std::string, std::string>> documented, served, public_documented, public_served;
  for (const auto& [path, methods] : doc["paths"].items())
    for (const auto& [method, op] : methods.items()) {
      std::string upper = method;
      for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      documented.insert({upper, path});
      if (op.contains("security") && op["security"].empty()) public_documented.insert({upper, path});
    }
  for (const AdminRoute& r : AdminRoutes()) {
    served.insert({r.method, r.path});
    if (!r.needs_token) public_served.insert({r.method, r.path});
  }
  EXPECT_EQ(documented, served) << "run scripts/openapi.py after changing a route";
  EXPECT_EQ(public_documented, public_served) << "the routes documented without a token are the ones served so";
  for (const AdminRoute& route : AdminRoutes()) {
    if (!route.needs_token) continue;  // answered before parsing, without a token
    const std::string method = route.method, path = route.path;
    std::string target = path;
    for (auto [param, value] : {std::pair{"{id}", "3"}, std::pair{"{name}", "kjv"}})
      if (size_t at = target.find(param); at != std::string::npos) target.replace(at, std::string(param).size(), value);
    AdminRequest r;
    AdminError e;
    if (!ParseAdminRequest(method, target, "{}", &r, &e)) {
      EXPECT_TRUE(e.http_status != 404 && e.http_status != 405) << method << " " << target << ": " << e.message;
    }
  }
  for (const auto& [name, schema] : doc["components"]["schemas"].items()) {
    if (name == "securitySchemes") continue;
    std::string full = "peerd." + name;
    std::replace(full.begin(), full.end(), '_', '.');
    const google::protobuf::Descriptor* d =
        google::protobuf::DescriptorPool::generated_pool()->FindMessageTypeByName(full);
    ASSERT_NE(d, nullptr) << "schema " << name << " names no message";
    std::set<std::string> fields, properties;
    for (int i = 0; i < d->field_count(); ++i) fields.insert(d->field(i)->json_name());
    for (const auto& [property, unused] : schema["properties"].items()) properties.insert(property);
    EXPECT_EQ(properties, fields) << name << ": run scripts/openapi.py after changing proto/admin.proto";
  }
}

// The live page's sign-in (service/net/web_login.h): the session cookie read from a Cookie header
// among others, the token from a form body with its escapes, and malformed escapes refused.
TEST(WebLogin, ReadsTheSessionCookieAndTheFormsTokenAndRefusesMalformedEscapes) {
  EXPECT_EQ(CookieValue("peerd_session=abc", kSessionCookieName), "abc");
  EXPECT_EQ(CookieValue("a=1; peerd_session=abc ;b=2", kSessionCookieName), "abc");
  EXPECT_EQ(CookieValue("xpeerd_session=abc; peerd_sessionx=d", kSessionCookieName), "") << "whole names only";
  EXPECT_EQ(CookieValue("", kSessionCookieName), "");
  EXPECT_EQ(CookieValue("peerd_session", kSessionCookieName), "");
  std::string v;
  ASSERT_TRUE(FormField("token=0123abcd", "token", &v));
  EXPECT_EQ(v, "0123abcd");
  ASSERT_TRUE(FormField("other=x&token=a%2Bb+c%3d&more=y", "token", &v));
  EXPECT_EQ(v, "a+b c=");
  ASSERT_TRUE(FormField("token=", "token", &v));
  EXPECT_EQ(v, "");
  EXPECT_FALSE(FormField("tokens=x", "token", &v));
  EXPECT_FALSE(FormField("token=%2", "token", &v)) << "a cut escape";
  EXPECT_FALSE(FormField("token=%zz", "token", &v));
  EXPECT_FALSE(FormField("token=abc%", "token", &v));
  const std::string cookie = SessionCookie("s3cret");
  for (const char* attribute : {"peerd_session=s3cret", "HttpOnly", "SameSite=Strict", "Path=/"})
    EXPECT_NE(cookie.find(attribute), std::string::npos) << cookie;
  EXPECT_NE(ExpiredSessionCookie().find("Max-Age=0"), std::string::npos);
  EXPECT_EQ(RandomToken().size(), 64u);
  EXPECT_NE(RandomToken(), RandomToken());
}

TEST(AdminRequests, ClipForMessageKeepsMessagesShortPrintableAndValidUtf8) {
  EXPECT_EQ(ClipForMessage("kjv"), "kjv");
  EXPECT_EQ(ClipForMessage(std::string(100, 'x'), 10), std::string(10, 'x') + "…");
  EXPECT_EQ(ClipForMessage("a\nb\x7f"
                           "c"),
            "a?b?c");
  EXPECT_EQ(ClipForMessage("\xff\xfe"), "??");
  EXPECT_EQ(ClipForMessage("\xc3"), "?");  // a truncated sequence
  // Found by tests/fuzz/admin_requests_fuzz.cc: a UTF-16 surrogate encoded in UTF-8 is not UTF-8.
  EXPECT_EQ(ClipForMessage("\xed\xa1\xa1"), "???");
  EXPECT_EQ(ClipForMessage("\xe0\x80\xaf"), "???");                   // an overlong '/'
  EXPECT_EQ(ClipForMessage("\xf4\x90\x80\x80"), "????");              // above U+10FFFF
  EXPECT_EQ(ClipForMessage("\xf0\x9f\x98\x80"), "\xf0\x9f\x98\x80");  // U+1F600 is fine
  EXPECT_EQ(ClipForMessage("\xc3\xa9\xc3\xa9", 3), "\xc3\xa9…");      // never cut inside a character
}

TEST(AdminRequests, NewSegmentSizeIsCheckedAgainstMemory) {
  const uint64_t gib = 1ull << 30;
  EXPECT_TRUE(CheckNewSegmentSize(32, 256, 8 * gib).ok());
  // 512² experts × 2 rows × 256 × 4 bytes = 512 MiB of rows, 2 GiB while training.
  EXPECT_TRUE(CheckNewSegmentSize(512, 256, 2 * gib).ok());
  Status st = CheckNewSegmentSize(512, 256, 2 * gib - 1);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  st = CheckNewSegmentSize(65536, 256, 128 * gib);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(st.message(),
            "a segment with nKeys = 65536 holds 4294967296 experts: 8192 GiB of fp32 rows at dModel 256, about 32768 "
            "GiB while it trains, more than this machine's 128 GiB of memory; use a smaller nKeys (halving it quarters "
            "the size)");
  EXPECT_EQ(CheckNewSegmentSize(0, 256, 8 * gib).message(), "nKeys must be in [top-k, 65536], got 0");
  EXPECT_EQ(CheckNewSegmentSize(65537, 256, UINT64_MAX).message(), "nKeys must be in [top-k, 65536], got 65537");
  // The largest sizes do not overflow: 65536² experts × 2 rows × 65536 × 4 bytes × 4 = 2^53 bytes.
  EXPECT_TRUE(CheckNewSegmentSize(65536, 65536, 1ull << 53).ok());
  EXPECT_FALSE(CheckNewSegmentSize(65536, 65536, (1ull << 53) - 1).ok());
}

class TaskPathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = ::testing::TempDir() + "/peerd_taskpath_" + std::to_string(getpid());
    fs::remove_all(base_);
    // base/root (allowed), base/rootx (a look-alike sibling), base/outside.
    for (const char* d : {"root/sub", "rootx", "outside"}) fs::create_directories(base_ + "/" + d);
    std::ofstream(base_ + "/root/sub/held.txt") << "held-out text";
    std::ofstream(base_ + "/rootx/x.txt") << "sibling";
    std::ofstream(base_ + "/outside/secret.txt") << "secret";
    fs::create_symlink(base_ + "/outside/secret.txt", base_ + "/root/link-out.txt");
    fs::create_symlink(base_ + "/outside", base_ + "/root/dir-out");
    fs::create_symlink(base_ + "/root/sub/held.txt", base_ + "/root/link-in.txt");
    roots_ = {base_ + "/root"};
  }
  void TearDown() override { fs::remove_all(base_); }

  // Reads `path` as POST /v1/tasks would; returns the text or "STATUS: message".
  std::string Read(const std::string& path, uint64_t max_bytes = 1 << 20) {
    std::string text;
    AdminError e;
    if (ReadConfinedTaskFile(path, roots_, max_bytes, &text, &e)) return text;
    return std::to_string(e.http_status) + ": " + e.message;
  }
  std::string Outside(const std::string& path) {
    return "403: path '" + ClipForMessage(path) + "' is outside the allowed task roots (" +
           ClipForMessage(roots_[0], 256) + "): start peerd with --task-root, or send the text itself";
  }

  std::string base_;
  std::vector<std::string> roots_;
};

TEST_F(TaskPathTest, FilesUnderTheRootAreRead) {
  EXPECT_EQ(Read(base_ + "/root/sub/held.txt"), "held-out text");
  EXPECT_EQ(Read(base_ + "/root/sub/../sub/./held.txt"), "held-out text");
  EXPECT_EQ(Read(base_ + "/root/link-in.txt"), "held-out text") << "a symlink that stays inside is fine";
  roots_ = {base_ + "/root/"};  // a root written with a trailing slash
  EXPECT_EQ(Read(base_ + "/root/sub/held.txt"), "held-out text");
}

TEST_F(TaskPathTest, EscapesBySymlinkDotDotOrLookAlikeRootAreForbidden) {
  for (const std::string& p :
       {base_ + "/root/link-out.txt", base_ + "/root/dir-out/secret.txt", base_ + "/root/../outside/secret.txt",
        base_ + "/root/sub/../../outside/secret.txt", base_ + "/root/missing/../../outside/secret.txt",
        base_ + "/rootx/x.txt", std::string("/etc/passwd"), std::string("../../../../../../etc/passwd")})
    EXPECT_EQ(Read(p), Outside(p)) << p;
  // A root that is itself a symlink is resolved: its real directory is what is allowed.
  fs::create_symlink(base_ + "/root", base_ + "/root-link");
  roots_ = {base_ + "/root-link"};
  EXPECT_EQ(Read(base_ + "/root/sub/held.txt"), "held-out text");
  EXPECT_EQ(Read(base_ + "/root-link/link-out.txt"), Outside(base_ + "/root-link/link-out.txt"));
  // A root that does not exist allows nothing.
  roots_ = {base_ + "/no-such-root"};
  EXPECT_EQ(Read(base_ + "/root/sub/held.txt"), Outside(base_ + "/root/sub/held.txt"));
  // Nor does one that cannot be resolved (here: a name too long). It used to allow everything:
  // its resolution failed to the empty path, and every path starts with the empty path.
  roots_ = {std::string(5000, 'r')};
  EXPECT_EQ(Read("/etc/passwd"), Outside("/etc/passwd"));
}

TEST_F(TaskPathTest, WhatCannotBeReadIsABadRequest) {
  EXPECT_EQ(
      Read(base_ + "/root/sub/none.txt"),
      "400: cannot read task file '" + ClipForMessage(base_ + "/root/sub/none.txt") + "': No such file or directory");
  EXPECT_EQ(Read(base_ + "/root/sub"),
            "400: task path '" + ClipForMessage(base_ + "/root/sub") + "' is not a regular file");
  ASSERT_EQ(mkfifo((base_ + "/root/fifo").c_str(), 0600), 0);
  EXPECT_EQ(Read(base_ + "/root/fifo"),
            "400: task path '" + ClipForMessage(base_ + "/root/fifo") + "' is not a regular file")
      << "a FIFO would block the server";
  EXPECT_EQ(Read(base_ + "/root/sub/held.txt", 5),
            "400: task file '" + ClipForMessage(base_ + "/root/sub/held.txt") +
                "' is 13 bytes; the limit is 5 (a held-out slice needs far less)");
  EXPECT_EQ(Read(""), "400: task path is empty");
  EXPECT_EQ(Read(std::string("a\0b", 3)), "400: task path contains a NUL byte");
}

}  // namespace
}  // namespace peerd
