// peerctl: a thin client of peerd's admin API — tables for people, --json for scripts.
//
//   peerctl [--admin 127.0.0.1:7071] [--token-file peerd-data/admin.token] [--json] COMMAND
//     status | segments [list | add [--layer L] [--n-keys N] | freeze ID [--layer L] [--dtype bf16|fp32]]
//     tasks [list | add NAME FILE] | eval [run [--label L] | report] | checkpoint | pause | resume
//     policy [get | set KEY=VALUE...]     (keys: trainGroups=a,b  replayRatio=0.25  distillWeight=1  lr=0.001
//                                          freezeDtype=bf16  routed=true  keepTrainedText=false)
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "core/host_port.h"

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using nlohmann::json;

namespace {

struct Client {
  std::string host, port, token;

  // Sends one request; returns (HTTP status, body). Throws on connection errors.
  std::pair<int, std::string> Call(http::verb verb, const std::string& target, const std::string& body = "") {
    asio::io_context io;
    asio::ip::tcp::resolver resolver(io);
    beast::tcp_stream stream(io);
    stream.connect(resolver.resolve(host, port));
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, host);
    req.set(http::field::authorization, "Bearer " + token);
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
    http::write(stream, req);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    http::read(stream, buffer, res);
    beast::error_code ec;
    stream.socket().shutdown(asio::ip::tcp::socket::shutdown_both, ec);
    return {res.result_int(), res.body()};
  }
};

std::string Fixed(double v, int digits = 3) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", digits, v);
  return b;
}

std::string Str(const json& j, const char* key) {
  if (!j.contains(key)) return "";
  return j[key].is_string() ? j[key].get<std::string>() : j[key].dump();
}

void PrintSegments(const json& segs) {
  std::printf("%-6s %-4s %-9s %8s %10s %-5s %12s %7s %8s %s\n", "layer", "id", "state", "n_keys", "experts", "dtype",
              "bytes", "usage", "KL nats", "checksum");
  for (const auto& s : segs)
    std::printf("%-6s %-4s %-9s %8s %10s %-5s %12s %6.1f%% %8s %s\n", Str(s, "layer").c_str(), Str(s, "id").c_str(),
                Str(s, "state").c_str(), Str(s, "nKeys").c_str(), Str(s, "experts").c_str(), Str(s, "dtype").c_str(),
                Str(s, "bytes").c_str(), 100 * s.value("usage", 0.0), Fixed(s.value("usageKl", 0.0), 2).c_str(),
                s.value("state", "") == "frozen" ? Str(s, "checksum").c_str() : "-");
}

void PrintHuman(const std::string& command, const json& j) {
  if (command == "status") {
    std::printf("state %s, step %s, %s tokens trained, loss %s (%s bits/byte), %s tokens/s\n", Str(j, "state").c_str(),
                Str(j, "step").c_str(), Str(j, "tokensTrained").c_str(), Fixed(j.value("recentLoss", 0.0)).c_str(),
                Fixed(j.value("recentBitsPerByte", 0.0)).c_str(), Fixed(j.value("tokensPerSecond", 0.0), 0).c_str());
    std::printf("spool: %s documents, %s bytes received, %s bytes kept, %s bytes not yet trained; last checkpoint at step %s\n",
                Str(j, "spoolDocuments").c_str(), Str(j, "spoolBytes").c_str(), Str(j, "spoolKeptBytes").c_str(),
                Str(j, "spoolBacklogBytes").c_str(), Str(j, "lastCheckpointStep").c_str());
    if (j.contains("routing")) {
      const json& r = j["routing"];
      std::printf("routing: base segments %s, branches %s, training branch %s, router statistics %s bytes\n",
                  r.value("baseSegments", json::array()).dump().c_str(), r.value("branches", json::array()).dump().c_str(),
                  Str(r, "trainingBranch") == "-1" ? "none" : Str(r, "trainingBranch").c_str(),
                  Str(r, "routerStatisticsBytes").c_str());
    }
    std::printf("parameters: %s total, %s active per token\n", Str(j, "totalParameters").c_str(),
                Str(j, "activeParameters").c_str());
    if (j.contains("segments")) PrintSegments(j["segments"]);
  } else if (j.contains("segments")) {
    PrintSegments(j["segments"]);
  } else if (j.contains("tasks") && j["tasks"].is_array() && !j.contains("bitsPerByte")) {
    for (const auto& t : j["tasks"]) std::printf("%-24s %s bytes\n", Str(t, "name").c_str(), Str(t, "bytes").c_str());
  } else if (j.contains("rows")) {  // the forgetting report
    std::vector<std::string> tasks;
    for (const auto& r : j["rows"])
      for (const auto& t : r["tasks"])
        if (std::find(tasks.begin(), tasks.end(), t.get<std::string>()) == tasks.end()) tasks.push_back(t);
    std::printf("%-20s %8s", "after", "step");
    for (const auto& t : tasks) std::printf(" %10s", t.c_str());
    std::printf("\n");
    for (const auto& r : j["rows"]) {
      std::printf("%-20s %8s", Str(r, "label").c_str(), Str(r, "step").c_str());
      for (const auto& t : tasks) {
        std::string v = "-";
        for (size_t i = 0; i < r["tasks"].size(); ++i)
          if (r["tasks"][i] == t) v = Fixed(r["bitsPerByte"][i].get<double>());
        std::printf(" %10s", v.c_str());
      }
      std::printf("\n");
    }
    std::printf("ACC %s bits/byte, BWT %s, FWT %s, mean forgetting %s\n", Fixed(j.value("acc", 0.0)).c_str(),
                Fixed(j.value("bwt", 0.0)).c_str(), Fixed(j.value("fwt", 0.0)).c_str(),
                Fixed(j.value("meanForgetting", 0.0)).c_str());
  } else if (j.contains("bitsPerByte")) {  // one evaluation row
    for (size_t i = 0; i < j["tasks"].size(); ++i)
      std::printf("%-24s %s bits/byte\n", j["tasks"][i].get<std::string>().c_str(), Fixed(j["bitsPerByte"][i].get<double>()).c_str());
  } else if (j.contains("message")) {
    std::printf("%s\n", j["message"].get<std::string>().c_str());
  } else {
    std::printf("%s\n", j.dump(2).c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"peerctl: steer a running peerd"};
  std::string admin = "127.0.0.1:7071", token_file = "peerd-data/admin.token";
  bool as_json = false;
  app.add_option("--admin", admin, "peerd's admin API")->capture_default_str();
  app.add_option("--token-file", token_file, "file holding the admin token")->capture_default_str();
  app.add_flag("--json", as_json, "print the server's JSON");
  app.require_subcommand(1);

  app.add_subcommand("status", "step, loss, tokens/s, spool, segments");
  auto* segments = app.add_subcommand("segments", "list, add or freeze expert segments");
  std::string seg_action = "list", dtype;
  std::optional<uint32_t> seg_id, layer, n_keys;
  segments->add_option("action", seg_action, "list | add | freeze");
  segments->add_option("id", seg_id, "segment id (freeze)");
  segments->add_option("--layer", layer, "one PEER layer (default: all)");
  segments->add_option("--n-keys", n_keys, "sub-keys per half of a new segment");
  segments->add_option("--dtype", dtype, "frozen rows: bf16 | fp32");
  auto* tasks = app.add_subcommand("tasks", "list or add held-out tasks");
  std::string task_action = "list", task_name, task_file;
  tasks->add_option("action", task_action, "list | add");
  tasks->add_option("name", task_name);
  tasks->add_option("file", task_file, "held-out text (sent as text)");
  auto* eval = app.add_subcommand("eval", "run an evaluation or show the forgetting report");
  std::string eval_action = "report", label;
  eval->add_option("action", eval_action, "run | report");
  eval->add_option("--label", label, "name of the row, e.g. 'after kjv'");
  app.add_subcommand("checkpoint", "write a checkpoint now");
  app.add_subcommand("pause", "pause training");
  app.add_subcommand("resume", "resume training");
  auto* policy = app.add_subcommand("policy", "show or change what trains");
  std::string policy_action = "get";
  std::vector<std::string> settings;
  policy->add_option("action", policy_action, "get | set");
  policy->add_option("settings", settings, "KEY=VALUE ...");
  CLI11_PARSE(app, argc, argv);

  Client client;
  uint16_t admin_port = 0;
  if (peerd::Status st = peerd::ParseHostPort(admin, &client.host, &admin_port); !st.ok()) {
    std::fprintf(stderr, "peerctl: --admin: %s\n", st.message().c_str());
    return 2;
  }
  client.port = std::to_string(admin_port);
  {
    std::ifstream in(token_file);
    if (!in || !std::getline(in, client.token)) {
      std::fprintf(stderr, "peerctl: cannot read the admin token from '%s' (peerd writes DATA_DIR/admin.token; --token-file)\n",
                   token_file.c_str());
      return 2;
    }
  }

  const std::string command = app.get_subcommands()[0]->get_name();
  http::verb verb = http::verb::get;
  std::string target, body;
  if (command == "status") target = "/v1/status";
  else if (command == "segments") {
    json b = json::object();
    if (layer) b["layer"] = *layer;
    if (seg_action == "list") target = "/v1/segments";
    else if (seg_action == "add") {
      verb = http::verb::post, target = "/v1/segments";
      if (n_keys) b["nKeys"] = *n_keys;
      body = b.dump();
    } else if (seg_action == "freeze") {
      // No default id: freezing is for ever, and segment 0 may be one that never trained.
      if (!seg_id) {
        std::fprintf(stderr, "peerctl: segments freeze needs the segment's id (peerctl segments lists them)\n");
        return 2;
      }
      verb = http::verb::post, target = "/v1/segments/" + std::to_string(*seg_id) + "/freeze";
      if (!dtype.empty()) b["dtype"] = dtype;
      body = b.dump();
    } else {
      std::fprintf(stderr, "peerctl: segments takes list, add or freeze ID\n");
      return 2;
    }
  } else if (command == "tasks") {
    if (task_action == "list") target = "/v1/tasks";
    else if (task_action == "add" && !task_name.empty() && !task_file.empty()) {
      std::ifstream in(task_file, std::ios::binary);
      if (!in) {
        std::fprintf(stderr, "peerctl: cannot read '%s'\n", task_file.c_str());
        return 2;
      }
      std::ostringstream ss;
      ss << in.rdbuf();
      verb = http::verb::post, target = "/v1/tasks";
      body = json{{"name", task_name}, {"text", ss.str()}}.dump(-1, ' ', false, json::error_handler_t::replace);
    } else {
      std::fprintf(stderr, "peerctl: tasks takes list, or add NAME FILE\n");
      return 2;
    }
  } else if (command == "eval") {
    if (eval_action == "report") target = "/v1/eval";
    else if (eval_action == "run") verb = http::verb::post, target = "/v1/eval", body = json{{"label", label}}.dump();
    else {
      std::fprintf(stderr, "peerctl: eval takes run or report\n");
      return 2;
    }
  } else if (command == "checkpoint") verb = http::verb::post, target = "/v1/checkpoint";
  else if (command == "pause") verb = http::verb::post, target = "/v1/train/pause";
  else if (command == "resume") verb = http::verb::post, target = "/v1/train/resume";
  else if (command == "policy") {
    if (policy_action == "get") target = "/v1/policy";
    else if (policy_action == "set" && !settings.empty()) {
      json b = json::object();
      for (const std::string& kv : settings) {
        auto eq = kv.find('=');
        if (eq == std::string::npos) {
          std::fprintf(stderr, "peerctl: policy set takes KEY=VALUE, got '%s'\n", kv.c_str());
          return 2;
        }
        const std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
        if (k == "trainGroups") {
          json groups = json::array();
          std::stringstream ss(v);
          for (std::string g; std::getline(ss, g, ',');) groups.push_back(g);
          b[k] = groups;
        } else if (k == "freezeDtype") {
          b[k] = v;
        } else if (k == "routed" || k == "keepTrainedText") {
          if (v != "true" && v != "false") {
            std::fprintf(stderr, "peerctl: %s takes true or false, got '%s'\n", k.c_str(), v.c_str());
            return 2;
          }
          b[k] = v == "true";
        } else {
          try {
            b[k] = std::stod(v);
          } catch (const std::exception&) {
            std::fprintf(stderr, "peerctl: %s needs a number, got '%s'\n", k.c_str(), v.c_str());
            return 2;
          }
        }
      }
      verb = http::verb::put, target = "/v1/policy", body = b.dump();
    } else {
      std::fprintf(stderr, "peerctl: policy takes get, or set KEY=VALUE...\n");
      return 2;
    }
  }

  std::pair<int, std::string> res;
  try {
    res = client.Call(verb, target, body);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peerctl: cannot reach peerd at %s: %s\n", admin.c_str(), e.what());
    return 1;
  }
  json j = json::parse(res.second, nullptr, false);
  if (res.first != 200) {
    const std::string msg = !j.is_discarded() && j.contains("error") ? j["error"].value("message", res.second) : res.second;
    std::fprintf(stderr, "peerctl: %d: %s\n", res.first, msg.c_str());
    return 1;
  }
  if (as_json || j.is_discarded()) std::printf("%s\n", res.second.c_str());
  else PrintHuman(command, j);
  return 0;
}
