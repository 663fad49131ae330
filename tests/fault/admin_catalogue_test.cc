// The admin API's bad-input catalogue end to end: the real peerd (a tiny model, loopback ports it
// picks itself) is sent every kind of malformed admin request over raw HTTP — bad JSON, wrong
// types, huge numbers, escaping task paths, segments that do not exist or are frozen, a segment
// too large for any machine, an over-long target, an over-size body, bytes that are not HTTP —
// and must answer each with its 4xx status and message (README "Admin API: bad input"), refuse a
// bad token with 401 and change nothing, keep serving good requests, and never write the admin
// token to its log.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "tests/peerd_process.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using namespace std::chrono_literals;

using peerd::testing::Slurp;

struct HttpReply {
  int status = 0;  // 0: no reply (connection closed or timed out)
  std::string body;
  std::string Message() const {
    json j = json::parse(body, nullptr, false);
    if (j.is_discarded() || !j.contains("error")) return "(no error body: " + body.substr(0, 200) + ")";
    EXPECT_EQ(j["error"].value("code", 0), status) << body;
    return j["error"].value("message", "");
  }
};

// Sends `raw` bytes to 127.0.0.1:port and reads the reply until the server closes (every request
// says Connection: close), at most 10 s.
HttpReply SendRaw(int port, const std::string& raw) {
  HttpReply reply;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return reply;
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return reply;
  }
  for (size_t sent = 0; sent < raw.size();) {
    const ssize_t n = send(fd, raw.data() + sent, raw.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may answer and close before it has read everything
    sent += static_cast<size_t>(n);
  }
  std::string in;
  char buf[8192];
  for (ssize_t n; (n = recv(fd, buf, sizeof buf, 0)) > 0;) in.append(buf, static_cast<size_t>(n));
  close(fd);
  std::smatch m;
  if (std::regex_search(in, m, std::regex("^HTTP/1\\.[01] ([0-9]{3})"))) reply.status = std::stoi(m[1]);
  const size_t head_end = in.find("\r\n\r\n");
  if (head_end != std::string::npos) reply.body = in.substr(head_end + 4);
  return reply;
}

std::string Request(const std::string& method, const std::string& target, const std::string& body,
                    const std::string& authorization) {
  std::string r = method + " " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\n";
  if (!authorization.empty()) r += "Authorization: " + authorization + "\r\n";
  r += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
       "\r\nConnection: close\r\n\r\n";
  return r + body;
}

class AdminCatalogue : public ::testing::Test {
 protected:
  // One peerd per test binary run (gtest_discover_tests runs each test in its own process).
  static void SetUpTestSuite() {
    dir_ = ::testing::TempDir() + "/peerd_admin_catalogue_" + std::to_string(getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_ + "/root/sub");
    fs::create_directories(dir_ + "/outside");
    std::ofstream(dir_ + "/config.json")
        << R"({"model": {"dModel": 32, "context": 32, "peer": {"nKeys": 8, "queryDim": 16}},
                                               "train": {"batchSize": 8}})";
    std::ofstream(dir_ + "/root/sub/held.txt") << "held-out text for the catalogue test";
    std::ofstream(dir_ + "/outside/secret.txt") << "not for peerd";
    fs::create_symlink(dir_ + "/outside/secret.txt", dir_ + "/root/link-out.txt");
    fs::create_directories(dir_ + "/rootx");
    std::ofstream(dir_ + "/rootx/x.txt") << "a sibling that only looks like the root";

    log_ = dir_ + "/peerd.log";
    peerd_ = new peerd::testing::PeerdProcess(dir_);
    peerd_->Start("--task-root " + dir_ + "/root --log-level debug");
    if (peerd_->running()) port_ = std::stoi(peerd_->admin_port());
    std::getline(std::ifstream(dir_ + "/data/admin.token"), token_);
  }
  static void TearDownTestSuite() {
    if (peerd_) peerd_->Kill(SIGTERM);
    delete peerd_;
    peerd_ = nullptr;
    fs::remove_all(dir_);
  }
  void SetUp() override {
    ASSERT_NE(port_, 0) << "peerd did not start: " << Slurp(log_);
    ASSERT_FALSE(token_.empty());
  }

  HttpReply Call(const std::string& method, const std::string& target, const std::string& body = "") {
    return SendRaw(port_, Request(method, target, body, "Bearer " + token_));
  }
  json CallJson(const std::string& method, const std::string& target, const std::string& body = "") {
    HttpReply r = Call(method, target, body);
    EXPECT_EQ(r.status, 200) << method << " " << target << ": " << r.body;
    return json::parse(r.body, nullptr, false);
  }

  static std::string dir_, log_, token_;
  static peerd::testing::PeerdProcess* peerd_;  // one per test process, for the whole suite
  static int port_;
};

std::string AdminCatalogue::dir_, AdminCatalogue::log_, AdminCatalogue::token_;
peerd::testing::PeerdProcess* AdminCatalogue::peerd_ = nullptr;
int AdminCatalogue::port_ = 0;

TEST_F(AdminCatalogue, BadTokenIs401AndChangesNothing) {
  const json segments_before = CallJson("GET", "/v1/segments");
  const json policy_before = CallJson("GET", "/v1/policy");
  const std::string wrong = token_.substr(0, token_.size() - 1) + (token_.back() == 'x' ? "y" : "x");
  const std::string expected =
      "missing or wrong token: send 'Authorization: Bearer <token>' with the token in DATA_DIR/admin.token";
  for (const std::string& authorization :
       std::vector<std::string>{"", "Bearer " + wrong, "Bearer " + token_ + "x", "Bearer", "Bearer  " + token_,
                                "bearer " + token_, "Basic " + token_, token_}) {
    for (auto [method, target, body] : std::vector<std::tuple<std::string, std::string, std::string>>{
             {"POST", "/v1/segments", "{}"},
             {"POST", "/v1/segments/0/freeze", "{}"},
             {"PUT", "/v1/policy", R"({"replayRatio": 0.5})"},
             {"POST", "/v1/train/pause", ""},
             {"POST", "/v1/tasks", R"({"name": "sneaky", "text": "abc"})"},
             {"GET", "/v1/status", ""},
             {"POST", "/v1/nothing", "garbage"}}) {
      HttpReply r = SendRaw(port_, Request(method, target, body, authorization));
      EXPECT_EQ(r.status, 401) << authorization << " " << method << " " << target;
      EXPECT_EQ(r.Message(), expected);
    }
  }
  EXPECT_EQ(CallJson("GET", "/v1/segments"), segments_before) << "a request with a bad token changed the segments";
  EXPECT_EQ(CallJson("GET", "/v1/policy"), policy_before) << "a request with a bad token changed the policy";
  EXPECT_FALSE(CallJson("GET", "/v1/status").value("paused", false)) << "a request with a bad token paused training";
  EXPECT_EQ(CallJson("GET", "/v1/tasks").dump().find("sneaky"), std::string::npos) << "a bad token registered a task";
}

TEST_F(AdminCatalogue, ProbesAnswerWithoutTheTokenAndSayNothingElse) {
  for (const std::string& authorization : std::vector<std::string>{"", "Bearer wrong", "Bearer " + token_}) {
    HttpReply alive = SendRaw(port_, Request("GET", "/healthz", "", authorization));
    EXPECT_EQ(alive.status, 200) << authorization;
    EXPECT_EQ(alive.body, R"({"status":"alive"})");
    HttpReply ready = SendRaw(port_, Request("GET", "/readyz?verbose=1", "", authorization));
    EXPECT_EQ(ready.status, 200) << authorization;
    EXPECT_EQ(ready.body, R"({"status":"ready"})");
  }
  // Only GET, and only those two paths, pass without the token.
  EXPECT_EQ(SendRaw(port_, Request("POST", "/healthz", "", "")).status, 401);
  EXPECT_EQ(SendRaw(port_, Request("GET", "/healthzz", "", "")).status, 401);
  EXPECT_EQ(SendRaw(port_, Request("GET", "/v1/status", "", "")).status, 401);
}

struct Case {
  std::string method, target, body;
  int status;
  std::string message;  // exact, or a prefix when it ends in "…"
};

TEST_F(AdminCatalogue, EveryMalformedRequestGetsItsStatusAndMessageAndPeerdKeepsServing) {
  const std::string nkeys_range = "nKeys must be in [top-k, 65536], got ";
  const std::vector<Case> catalogue = {
      {"POST", "/v1/segments", "null", 400,
       "request body must be a JSON object ({...}) for peerd.AddSegmentRequest, got 'null'"},
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
      {"POST", "/v1/segments", "{\"layer\": \"zero\"}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: (layer): invalid value \"zero\" for type "
       "TYPE_UINT32"},
      {"POST", "/v1/segments", "{\"nkeys\": 8}", 400,
       "request body is not valid JSON for peerd.AddSegmentRequest: nkeys: Cannot find field."},
      {"POST", "/v1/segments", "{\"nKeys\": 0}", 400, nkeys_range + "0"},
      // Needs the model: fewer sub-keys than top-k, a layer that does not exist, a size no machine has.
      {"POST", "/v1/segments", "{\"nKeys\": 2}", 400,
       "a segment needs between top-k (8) and 65536 sub-keys per half, got n_keys = 2"},
      {"POST", "/v1/segments", "{\"layer\": 9}", 404, "PEER layer 9 does not exist; the model has 1 (0-based)"},
      {"POST", "/v1/segments", "{\"nKeys\": 65536}", 400,
       "a segment with nKeys = 65536 holds 4294967296 experts: 1024 GiB of fp32 rows at dModel 32, about 4096 GiB "
       "while it trains, more than this machine's …"},
      {"POST", "/v1/segments/1234567890/freeze", "", 400,
       "segment id in /v1/segments/{id}/freeze must be a whole number in [0, 999999999], got '1234567890'"},
      {"POST", "/v1/segments/x1/freeze", "", 400,
       "segment id in /v1/segments/{id}/freeze must be a whole number in [0, 999999999], got 'x1'"},
      {"POST", "/v1/segments/999999999/freeze", "", 404, "no segment 999999999"},
      {"POST", "/v1/segments/0/freeze", "{\"layer\": 5}", 404, "no segment 0 in layer 5"},
      {"POST", "/v1/segments/0/freeze", "{\"dtype\": \"fp8\"}", 400, "dtype must be \"bf16\" or \"fp32\", got \"fp8\""},
      {"POST", "/v1/tasks", "{\"name\": \"\", \"text\": \"abc\"}", 400, "a task needs a name"},
      {"POST", "/v1/tasks", "{\"name\": \"a/b\", \"text\": \"abc\"}", 400,
       "task name must be 1-64 characters of A-Z a-z 0-9 _ . -, got 'a/b'"},
      {"POST", "/v1/tasks", "{\"name\": \"t\", \"text\": \"abc\", \"path\": \"x\"}", 400,
       "give the task's text or its path, not both"},
      {"POST", "/v1/tasks", "{\"name\": \"t\", \"text\": \"a\"}", 400,
       "task 't' needs at least 2 bytes of held-out text"},
      {"POST", "/v1/tasks", "{\"name\": \"t\", \"path\": \"" + dir_ + "/root/../outside/secret.txt\"}", 403,
       "path '" + dir_.substr(0, 64) + "…"},
      {"POST", "/v1/tasks", "{\"name\": \"t\", \"path\": \"" + dir_ + "/root/link-out.txt\"}", 403, "path '…"},
      {"POST", "/v1/tasks", "{\"name\": \"t\", \"path\": \"" + dir_ + "/rootx/x.txt\"}", 403, "path '…"},
      {"POST", "/v1/tasks", "{\"name\": \"t\", \"path\": \"/etc/passwd\"}", 403,
       "path '/etc/passwd' is outside the allowed task roots (" + dir_ +
           "/root): start peerd with --task-root, or send the text itself"},
      {"POST", "/v1/tasks", "{\"name\": \"t\", \"path\": \"" + dir_ + "/root/sub\"}", 400, "task path '…"},
      {"POST", "/v1/eval", "{\"label\": \"x\"}", 409, "no held-out tasks registered: POST /v1/tasks first"},
      {"POST", "/v1/eval", "{\"label\": \"a\\u001b[2J\"}", 400,
       "label must be at most 256 bytes without control characters (it names a row of the report), got 'a?[2J' (5 "
       "bytes)"},
      {"PUT", "/v1/policy", "{\"replayRatio\": 2}", 400, "config field 'train.replayRatio' must be in [0, 1), got 2"},
      {"PUT", "/v1/policy", "{\"lr\": 1e300}", 400,
       "config field 'train.lr' must be a positive number (a float: at most 3.4e38, not rounding to 0), got 1e+300"},
      {"PUT", "/v1/policy", "{\"distillWeight\": \"NaN\"}", 400,
       "config field 'train.distillWeight' must be in [0, 1000] (0 = no distillation), got nan"},
      {"PUT", "/v1/policy", "{\"trainGroups\": [\"nope\"]}", 400,
       "config field 'train.trainGroups' names unknown group 'nope' …"},
      {"PUT", "/v1/policy", "{\"freezeDtype\": \"int4\"}", 400,
       "freezeDtype must be \"bf16\" or \"fp32\", got \"int4\""},
      {"POST", "/v1/score", "{\"text\": \"a\"}", 400, "text to score must be 2 to 1048576 bytes, got 1"},
      {"POST", "/v1/score", "[1]", 400, "request body must be a JSON object ({...}) for peerd.ScoreRequest, got '[1]'"},
      {"POST", "/v1/generate", "{\"prompt\": \"\"}", 400, "prompt must be 1 to 65536 bytes, got 0"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"maxTokens\": 0}", 400, "maxTokens must be 1 to 4096, got 0"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"temperature\": -1}", 400,
       "temperature must be in [0, 100] (0: greedy), got -1"},
      {"POST", "/v1/generate", "{\"prompt\": \"a\", \"topP\": 2}", 400, "topP must be in (0, 1], got 2"},
      {"DELETE", "/v1/tasks/nope", "", 404, "no task nope (GET /v1/tasks lists them)"},
      {"DELETE", "/v1/tasks/a..b%2F", "", 400,
       "task name in /v1/tasks/{name} must be 1-64 characters of A-Z a-z 0-9 _ . -, got 'a..b%2F'"},
      {"DELETE", "/v1/segments", "", 405, "DELETE is not allowed on /v1/segments"},
      {"GET", "/v1/segments/0/freeze", "", 405, "GET is not allowed on /v1/segments/0/freeze"},
      {"GET", "/v1/secrets", "", 404, "no route /v1/secrets (see README: admin API)"},
      {"GET", "/v1/" + std::string(3000, 'a'), "", 414,
       "request target is 3004 bytes; the limit is 2048 (see README: admin API)"},
      {"GET", "/v1/" + std::string(20000, 'a'), "", 431, "request line and headers over 16384 bytes"},
  };
  for (const Case& c : catalogue) {
    HttpReply r = Call(c.method, c.target, c.body);
    const std::string what = c.method + " " + c.target.substr(0, 60) + " " + c.body.substr(0, 80);
    EXPECT_EQ(r.status, c.status) << what << ": " << r.body;
    const std::string message = r.Message();
    if (c.message.size() >= 3 && c.message.compare(c.message.size() - 3, 3, "…") == 0)
      EXPECT_EQ(message.substr(0, c.message.size() - 3), c.message.substr(0, c.message.size() - 3)) << what;
    else
      EXPECT_EQ(message, c.message) << what;
  }

  // Requests the parser never sees: a body over the server's limit (64 MiB; only the header is
  // sent), and bytes that are not HTTP.
  HttpReply big = SendRaw(port_, "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token_ +
                                     "\r\nContent-Length: 100000000\r\n\r\n{\"name\":");
  EXPECT_EQ(big.status, 413) << big.body;
  EXPECT_EQ(big.Message(), "request body over 67108864 bytes");
  HttpReply garbage = SendRaw(port_, "HELLO\x01\x02 there\r\n\r\n");
  EXPECT_EQ(garbage.status, 400) << garbage.body;
  EXPECT_EQ(garbage.Message().rfind("malformed HTTP request: ", 0), 0u) << garbage.body;

  // Still serving, and what was refused changed nothing: one training segment, no tasks.
  json status = CallJson("GET", "/v1/status");
  ASSERT_EQ(status["segments"].size(), 1u) << status.dump();
  EXPECT_EQ(status["segments"][0].value("state", ""), "training");
  EXPECT_TRUE(CallJson("GET", "/v1/tasks")["tasks"].empty());
  // Good requests: a task from a file under the root, a new segment, freezing it, freezing it twice.
  json task = CallJson("POST", "/v1/tasks", "{\"name\": \"held\", \"path\": \"" + dir_ + "/root/sub/held.txt\"}");
  EXPECT_EQ(task.value("message", ""), "task held registered (36 held-out bytes, measuring ingest task held)");
  json added = CallJson("POST", "/v1/segments", "{\"nKeys\": 8}");
  ASSERT_EQ(added["ids"].size(), 1u) << added.dump();
  const std::string id = added["ids"][0].dump();
  CallJson("POST", "/v1/segments/" + id + "/freeze", "{\"dtype\": \"fp32\"}");
  HttpReply twice = Call("POST", "/v1/segments/" + id + "/freeze");
  EXPECT_EQ(twice.status, 409);
  EXPECT_EQ(twice.Message(), "segment " + id + " is already frozen");
}

TEST_F(AdminCatalogue, TheAdminTokenNeverAppearsInTheLog) {
  // Requests that are logged (changes, failures, and reads at debug level), with the token in its
  // header and a wrong one.
  CallJson("GET", "/v1/status");
  CallJson("POST", "/v1/train/pause");
  CallJson("POST", "/v1/train/resume");
  EXPECT_EQ(Call("POST", "/v1/segments", "{\"bad\": 1}").status, 400);
  EXPECT_EQ(SendRaw(port_, Request("GET", "/v1/status", "", "Bearer wrong-" + token_)).status, 401);
  std::this_thread::sleep_for(200ms);  // spdlog writes as it goes; leave it a moment
  const std::string log = Slurp(log_);
  EXPECT_NE(log.find("admin POST /v1/train/pause -> 200"), std::string::npos) << "the requests should be logged:\n"
                                                                              << log;
  EXPECT_EQ(log.find(token_), std::string::npos) << "the admin token is in peerd's log";
  EXPECT_EQ(log.find(token_.substr(0, token_.size() / 2)), std::string::npos) << "half the admin token is in the log";
}

}  // namespace
