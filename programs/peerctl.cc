// peerctl: a thin client of peerd's admin API — tables for people, --json for scripts.
//
//   peerctl [--admin 127.0.0.1:7071] [--token-file peerd-data/admin.token] [--json] [--version] COMMAND
//     (--admin and --token-file default to $PEERD_ADMIN and $PEERD_TOKEN_FILE when set)
//     status | segments [list | add [--layer L] [--n-keys N] | freeze ID [--layer L] [--dtype bf16|fp32]]
//     tasks [list | add NAME FILE [--measures INGEST_TASK] | delete NAME] | eval [run [--label L] | report]
//     history [--since STEP] [--limit N] | checkpoint | pause | resume
//     wait trained [--timeout S]           (exit 0: trained; 3: the timeout ran out; 1: paused or stopped)
//     score [TEXT | -] [--log-probs]       (no TEXT or -: stdin)
//     export DIR                           (DIR/model.safetensors, DIR/config.json)
//     report DIR                           (DIR/report.md, heatmap.png/.svg, curves.png/.svg; needs matplotlib)
//     generate [PROMPT | -] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//              [--stop STRING]... [--stream]
//     policy [get | set KEY=VALUE...]     (keys: trainGroups=a,b  replayRatio=0.25  distillWeight=1  lr=0.001
//                                          freezeDtype=bf16  routed=true  keepTrainedText=false
//                                          routeCandidates=4)
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>

#include "core/host_port.h"
#include "proto/admin.pb.h"
#include "proto/export.pb.h"
#include "service/embedded_files.h"

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
    beast::tcp_stream stream(io);
    Send(stream, verb, target, body);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    http::read(stream, buffer, res);
    beast::error_code ec;
    stream.socket().shutdown(asio::ip::tcp::socket::shutdown_both, ec);
    return {res.result_int(), res.body()};
  }

  // Sends one request whose answer comes in chunks as it is made, passing each piece of a 200
  // answer's body to on_bytes as it arrives. Returns the HTTP status, 200 only when the whole
  // answer arrived; the body of any other answer, or why it was cut short, goes to *error_body.
  int Chunked(http::verb verb, const std::string& target, const std::string& body,
              const std::function<void(std::string_view)>& on_bytes, std::string* error_body) {
    asio::io_context io;
    beast::tcp_stream stream(io);
    Send(stream, verb, target, body);
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(std::numeric_limits<std::uint64_t>::max());
    http::read_header(stream, buffer, parser);
    const int status = parser.get().result_int();
    if (status != 200) {
      http::read(stream, buffer, parser);
      *error_body = parser.get().body();
      return status;
    }
    auto on_chunk = [&](std::uint64_t, beast::string_view data, beast::error_code&) -> std::size_t {
      on_bytes(std::string_view(data.data(), data.size()));
      return data.size();
    };
    parser.on_chunk_body(on_chunk);
    beast::error_code ec;
    while (!parser.is_done() && !ec) http::read_some(stream, buffer, parser, ec);
    if (!parser.is_done()) {
      *error_body = "the answer was cut off before its end" + (ec ? " (" + ec.message() + ")" : std::string()) +
                    "; see peerd's log";
      return 502;
    }
    return status;
  }

 private:
  void Send(beast::tcp_stream& stream, http::verb verb, const std::string& target, const std::string& body) {
    asio::ip::tcp::resolver resolver(stream.get_executor());
    stream.connect(resolver.resolve(host, port));
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, host);
    req.set(http::field::authorization, "Bearer " + token);
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
    http::write(stream, req);
  }
};

std::string Fixed(double v, int digits = 3) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", digits, v);
  return b;
}

void PrintSegments(const google::protobuf::RepeatedPtrField<peerd::SegmentInfo>& segments) {
  std::printf("%-6s %-4s %-9s %8s %10s %-5s %12s %7s %8s %s\n", "layer", "id", "state", "n_keys", "experts", "dtype",
              "bytes", "usage", "KL nats", "checksum");
  for (const peerd::SegmentInfo& s : segments)
    std::printf("%-6u %-4u %-9s %8u %10llu %-5s %12llu %6.1f%% %8s %s\n", s.layer(), s.id(), s.state().c_str(),
                s.n_keys(), static_cast<unsigned long long>(s.experts()), s.dtype().c_str(),
                static_cast<unsigned long long>(s.bytes()), 100 * s.usage(), Fixed(s.usage_kl(), 2).c_str(),
                s.frozen() ? std::to_string(s.checksum()).c_str() : "-");
}

std::string Ids(const google::protobuf::RepeatedField<uint32_t>& ids) {
  std::string out;
  for (uint32_t id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return "[" + out + "]";
}

void PrintStatus(const peerd::StatusReply& s) {
  std::printf("state %s, step %llu, %llu tokens trained, loss %s (%s bits/byte), %s tokens/s, learning rate %g\n",
              s.state().c_str(), static_cast<unsigned long long>(s.step()),
              static_cast<unsigned long long>(s.tokens_trained()), Fixed(s.recent_loss()).c_str(),
              Fixed(s.recent_bits_per_byte()).c_str(), Fixed(s.tokens_per_second(), 0).c_str(), s.learning_rate());
  // What stopped: the README sends operators here to find out why.
  if (!s.training_error().empty()) std::printf("training error: %s\n", s.training_error().c_str());
  if (!s.ingest_error().empty()) std::printf("ingest error: %s\n", s.ingest_error().c_str());
  if (!s.checkpoint_error().empty()) std::printf("checkpoint error: %s\n", s.checkpoint_error().c_str());
  std::printf(
      "spool: %llu documents, %llu bytes received, %llu bytes kept, %llu bytes in %llu documents not yet trained; "
      "last checkpoint at step %llu\n",
      static_cast<unsigned long long>(s.spool_documents()), static_cast<unsigned long long>(s.spool_bytes()),
      static_cast<unsigned long long>(s.spool_kept_bytes()), static_cast<unsigned long long>(s.spool_backlog_bytes()),
      static_cast<unsigned long long>(s.spool_backlog_documents()),
      static_cast<unsigned long long>(s.last_checkpoint_step()));
  if (s.has_routing()) {
    const peerd::RoutingInfo& r = s.routing();
    std::printf("routing: base segments %s, branches %s, training branch %s, router statistics %llu bytes\n",
                Ids(r.base_segments()).c_str(), Ids(r.branches()).c_str(),
                r.training_branch() < 0 ? "none" : std::to_string(r.training_branch()).c_str(),
                static_cast<unsigned long long>(r.router_statistics_bytes()));
  }
  if (s.world_size() > 1)
    std::printf("ranks: %u, models %s\n", s.world_size(), s.ranks_agree() ? "agree" : "DIFFER (see peerd's log)");
  std::printf("parameters: %llu total, %llu active per token\n", static_cast<unsigned long long>(s.total_parameters()),
              static_cast<unsigned long long>(s.active_parameters()));
  PrintSegments(s.segments());
}

void PrintReport(const peerd::ForgettingReport& report) {
  std::vector<std::string> tasks;
  for (const auto& r : report.rows())
    for (const auto& t : r.tasks())
      if (std::find(tasks.begin(), tasks.end(), t) == tasks.end()) tasks.push_back(t);
  // Each row with what the spool says was trained since the row before (the phases the metrics use).
  std::printf("%-20s %8s", "row", "step");
  for (const auto& t : tasks) std::printf(" %10s", t.c_str());
  std::printf("  trained since the row before\n");
  for (int n = 0; n < report.rows_size(); ++n) {
    const peerd::EvalRow& r = report.rows(n);
    std::printf("%-20s %8llu", r.label().c_str(), static_cast<unsigned long long>(r.step()));
    for (const auto& t : tasks) {
      std::string v = "-";
      for (int i = 0; i < r.tasks_size() && i < r.bits_per_byte_size(); ++i)
        if (r.tasks(i) == t) v = Fixed(r.bits_per_byte(i));
      std::printf(" %10s", v.c_str());
    }
    const std::string since = n < report.trained_since_previous_size() ? report.trained_since_previous(n) : "";
    std::printf("  %s%s\n", since.empty() ? "-" : since.c_str(), n == report.init() ? " (initial row)" : "");
  }
  if (!report.forgetting().empty()) {
    std::printf("%-29s", "forgetting");
    for (const auto& t : tasks) {
      auto f = report.forgetting().find(t);
      std::printf(" %10s", f == report.forgetting().end() ? "-" : Fixed(f->second).c_str());
    }
    std::printf("\n");
  }
  std::printf("ACC %s bits/byte, BWT %s, FWT %s, mean forgetting %s\n", Fixed(report.acc()).c_str(),
              Fixed(report.bwt()).c_str(), Fixed(report.fwt()).c_str(), Fixed(report.mean_forgetting()).c_str());
}

// Parses the server's JSON into the reply type the command gets (unknown fields skipped: a newer
// peerd may say more).
template <typename Message>
bool Parse(const std::string& body, Message* out) {
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  return google::protobuf::util::JsonStringToMessage(body, out, options).ok();
}

// How a generation ended, on stderr (stdout holds the text alone).
void PrintGenerationSummary(const peerd::GenerateReply& g) {
  std::fprintf(stderr, "(%s after %d tokens; seed %llu; model of step %llu; %.2f s)\n", g.finish_reason().c_str(),
               g.tokens_size(), static_cast<unsigned long long>(g.seed()), static_cast<unsigned long long>(g.step()),
               g.seconds());
}

// Prints a reply for people; false when the body is not the reply the command expects.
bool PrintHuman(const std::string& command, const std::string& action, const std::string& body) {
  if (command == "status") {
    peerd::StatusReply s;
    if (!Parse(body, &s)) return false;
    PrintStatus(s);
  } else if ((command == "segments" && action == "list")) {
    peerd::SegmentsReply s;
    if (!Parse(body, &s)) return false;
    PrintSegments(s.segments());
  } else if (command == "tasks" && action == "list") {
    peerd::TasksReply t;
    if (!Parse(body, &t)) return false;
    for (const auto& task : t.tasks())
      std::printf("%-24s %10llu bytes  measures ingest task %s\n", task.name().c_str(),
                  static_cast<unsigned long long>(task.bytes()), task.measures().c_str());
  } else if (command == "history") {
    peerd::HistoryReply h;
    if (!Parse(body, &h)) return false;
    std::printf("%10s %6s %-19s %8s %9s %10s %9s %10s\n", "step", "steps", "time (UTC)", "loss", "bits/byte", "lr",
                "grad norm", "tokens/s");
    for (const peerd::HistoryPoint& p : h.steps()) {
      char when[32] = "-";
      const std::time_t t = static_cast<std::time_t>(p.unix_ms() / 1000);
      std::tm tm{};
      if (gmtime_r(&t, &tm)) std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
      std::printf("%10llu %6u %-19s %8s %9s %10.3g %9s %10s\n", static_cast<unsigned long long>(p.step()), p.steps(),
                  when, Fixed(p.loss()).c_str(), Fixed(p.bits_per_byte()).c_str(), p.learning_rate(),
                  Fixed(p.grad_norm(), 2).c_str(), Fixed(p.tokens_per_second(), 0).c_str());
    }
    for (const peerd::EvalRow& r : h.evals()) {
      std::printf("evaluation at step %llu '%s':", static_cast<unsigned long long>(r.step()), r.label().c_str());
      for (int i = 0; i < r.tasks_size() && i < r.bits_per_byte_size(); ++i)
        std::printf(" %s %s", r.tasks(i).c_str(), Fixed(r.bits_per_byte(i)).c_str());
      std::printf("\n");
    }
    if (h.more())
      std::printf("(more: peerctl history --since %llu)\n", static_cast<unsigned long long>(h.next_since()));
  } else if (command == "eval" && action == "report") {
    peerd::ForgettingReport report;
    if (!Parse(body, &report)) return false;
    PrintReport(report);
  } else if (command == "eval") {
    peerd::EvalRow row;
    if (!Parse(body, &row)) return false;
    for (int i = 0; i < row.tasks_size() && i < row.bits_per_byte_size(); ++i)
      std::printf("%-24s %s bits/byte\n", row.tasks(i).c_str(), Fixed(row.bits_per_byte(i)).c_str());
  } else if (command == "score") {
    peerd::ScoreReply s;
    if (!Parse(body, &s)) return false;
    std::printf("%llu bytes, %llu predicted: %s bits/byte\n", static_cast<unsigned long long>(s.bytes()),
                static_cast<unsigned long long>(s.predicted_bytes()), Fixed(s.bits_per_byte()).c_str());
    for (const auto& seg : s.segments())
      std::printf("layer %u segment %u: %5.1f%% of the experts retrieved\n", seg.layer(), seg.id(), 100 * seg.share());
  } else if (command == "generate") {
    peerd::GenerateReply g;
    if (!Parse(body, &g)) return false;
    std::printf("%s\n", g.text().c_str());
    PrintGenerationSummary(g);
  } else if (command == "policy") {
    peerd::Policy policy;
    if (!Parse(body, &policy)) return false;
    std::string text;
    google::protobuf::util::JsonPrintOptions options;
    options.add_whitespace = true;
    (void)google::protobuf::util::MessageToJsonString(policy, &text, options);
    std::printf("%s", text.c_str());
  } else {
    peerd::OkReply ok;
    if (!Parse(body, &ok)) return false;
    std::printf("%s\n", ok.message().c_str());
  }
  return true;
}

// The error an answer other than 200 carries, for stderr.
std::string ErrorMessage(const std::string& body) {
  peerd::ErrorBody error;
  return Parse(body, &error) && !error.error().message().empty() ? error.error().message() : body;
}

// One admin request made by `call`: true with the answer's body in *body when peerd answered 200;
// otherwise false, having said on stderr why (peerd not reached, or its error).
bool Answered(const std::function<std::pair<int, std::string>()>& call, const std::string& admin, std::string* body) {
  std::pair<int, std::string> res;
  try {
    res = call();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peerctl: cannot reach peerd at %s: %s\n", admin.c_str(), e.what());
    return false;
  }
  if (res.first != 200) {
    std::fprintf(stderr, "peerctl: %d: %s\n", res.first, ErrorMessage(res.second).c_str());
    return false;
  }
  *body = std::move(res.second);
  return true;
}

// peerctl generate --stream: each piece of text printed as it comes, the summary at the end.
int StreamGeneration(Client& client, const std::string& target, const std::string& body, bool as_json,
                     const std::string& admin) {
  bool failed = false;
  auto on_event = [&](const std::string& data) {
    if (as_json) {
      std::printf("%s\n", data.c_str());
    } else if (peerd::GenerateReply g; data.find("\"error\"") == std::string::npos && Parse(data, &g)) {
      if (g.finish_reason().empty()) {
        std::printf("%s", g.text().c_str());
      } else {
        std::printf("\n");
        PrintGenerationSummary(g);
      }
    } else {
      std::fprintf(stderr, "\npeerctl: %s\n", ErrorMessage(data).c_str());
      failed = true;
    }
    std::fflush(stdout);
  };
  std::string pending, error;  // bytes of an event not yet complete
  auto on_bytes = [&](std::string_view data) {
    pending.append(data);
    for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (event.rfind("data: ", 0) == 0) on_event(event.substr(6));
    }
  };
  int status = 0;
  try {
    status = client.Chunked(http::verb::post, target, body, on_bytes, &error);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peerctl: cannot reach peerd at %s: %s\n", admin.c_str(), e.what());
    return 1;
  }
  if (status != 200) {
    std::fprintf(stderr, "peerctl: %d: %s\n", status, ErrorMessage(error).c_str());
    return 1;
  }
  return failed ? 1 : 0;
}

// peerctl export DIR: the safetensors file as it comes, then its manifest as DIR/config.json.
int Export(Client& client, const std::string& dir, const std::string& admin) {
  std::error_code fs_error;
  std::filesystem::create_directories(dir, fs_error);
  const std::string part = dir + "/model.safetensors.part", file = dir + "/model.safetensors";
  std::string error;
  int status = 0;
  std::ofstream out(part, std::ios::binary | std::ios::trunc);
  try {
    status = client.Chunked(
        http::verb::get, "/v1/export", "",
        [&](std::string_view data) { out.write(data.data(), static_cast<std::streamsize>(data.size())); }, &error);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peerctl: cannot reach peerd at %s: %s\n", admin.c_str(), e.what());
    return 1;
  }
  if (!out.flush()) {
    std::remove(part.c_str());
    std::fprintf(stderr, "peerctl: cannot write %s: %s\n", part.c_str(), std::strerror(errno));
    return 1;
  }
  out.close();
  if (status != 200) {
    std::remove(part.c_str());
    std::fprintf(stderr, "peerctl: %d: %s\n", status, ErrorMessage(error).c_str());
    return 1;
  }
  // The manifest rides in the header's metadata: the file and config.json describe one model.
  std::ifstream in(part, std::ios::binary);
  unsigned char length[8] = {};
  in.read(reinterpret_cast<char*>(length), 8);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = header_bytes << 8 | length[i];
  std::string header(header_bytes < (uint64_t{1} << 30) ? header_bytes : 0, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header.size()));
  const json parsed = json::parse(header, nullptr, false);
  peerd::ExportManifest manifest;
  if (!in || parsed.is_discarded() || !parsed.contains("__metadata__") ||
      !Parse(parsed["__metadata__"].value("peerd", ""), &manifest)) {
    std::fprintf(stderr, "peerctl: the export in %s has no readable header or manifest\n", part.c_str());
    return 1;
  }
  std::string config;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  (void)google::protobuf::util::MessageToJsonString(manifest, &config, options);
  std::ofstream(dir + "/config.json") << config;
  std::filesystem::rename(part, file, fs_error);
  if (fs_error) {
    std::fprintf(stderr, "peerctl: cannot rename %s: %s\n", part.c_str(), fs_error.message().c_str());
    return 1;
  }
  std::printf("wrote %s (%d tensors, %.1f MB, the model of step %llu, %d frozen segments) and %s/config.json\n",
              file.c_str(), manifest.tensors_size(), std::filesystem::file_size(file, fs_error) / 1e6,
              static_cast<unsigned long long>(manifest.step()), manifest.frozen_size(), dir.c_str());
  return 0;
}

// peerctl report DIR: the forgetting report and the whole training history as JSON in DIR, then
// the pictures drawn from them by scripts/report.py (compiled into peerctl) with Debian's python3
// and matplotlib: DIR/report.md, heatmap.{png,svg}, curves.{png,svg}.
int Report(Client& client, const std::string& dir, const std::string& admin) {
  std::error_code fs_error;
  std::filesystem::create_directories(dir, fs_error);
  auto fetch = [&](const std::string& target, std::string* body) {
    return Answered([&] { return client.Call(http::verb::get, target); }, admin, body);
  };
  std::string report;
  if (!fetch("/v1/eval", &report)) return 1;
  json steps = json::array();
  for (uint64_t since = 0;;) {  // the history a page at a time
    std::string page;
    if (!fetch("/v1/history?limit=10000&since=" + std::to_string(since), &page)) return 1;
    const json h = json::parse(page, nullptr, false);
    if (!h.is_object()) {
      std::fprintf(stderr, "peerctl: GET /v1/history answered something that is not JSON\n");
      return 1;
    }
    for (const json& p : h.value("steps", json::array())) steps.push_back(p);
    if (!h.value("more", false)) break;
    since = std::stoull(h.value("nextSince", std::string("0")));
  }
  std::ofstream(dir + "/report.json") << report;
  std::ofstream(dir + "/history.json") << json{{"steps", steps}}.dump();
  const peerd::EmbeddedFile* script = peerd::FindPeerctlScript("report.py");
  std::string quoted = "'";
  for (char c : dir) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  quoted += "'";
  // Debian's interpreter first: its matplotlib is the one scripts/setup.sh installs.
  const std::string python = std::filesystem::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
  FILE* run = popen((python + " - " + quoted).c_str(), "w");
  if (!run) {
    std::fprintf(stderr, "peerctl: cannot run %s: %s\n", python.c_str(), std::strerror(errno));
    return 1;
  }
  std::fwrite(script->body.data(), 1, script->body.size(), run);
  const int status = pclose(run);
  return status == 0 ? 0 : 1;
}

// POST /v1/eval, showing on stderr how far the evaluation has come (from /v1/status, asked on a
// second connection while the first waits for the row): a line redrawn each second on a terminal,
// else one every 10 s once it has taken 10 s.
std::pair<int, std::string> EvaluateWithProgress(Client& client, const std::string& body) {
  std::pair<int, std::string> res;
  std::exception_ptr failed;
  std::atomic<bool> done{false};
  std::thread request([&] {
    try {
      res = client.Call(http::verb::post, "/v1/eval", body);
    } catch (...) {
      failed = std::current_exception();
    }
    done = true;
  });
  const bool tty = isatty(STDERR_FILENO);
  const auto every = std::chrono::seconds(tty ? 1 : 10);
  auto last_said = std::chrono::steady_clock::now();
  bool said = false;
  while (!done) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const auto now = std::chrono::steady_clock::now();
    if (done || now - last_said < every) continue;
    last_said = now;
    peerd::StatusReply s;
    try {
      Client watcher = client;
      const auto status = watcher.Call(http::verb::get, "/v1/status");
      if (status.first != 200 || !Parse(status.second, &s) || !s.has_evaluation()) continue;
    } catch (const std::exception&) {
      continue;
    }
    const peerd::EvalProgress& e = s.evaluation();
    const double share = e.bytes() ? double(e.bytes_done()) / double(e.bytes()) : 0;
    std::string eta = "?";
    if (share > 0.01) eta = std::to_string(static_cast<long>(e.seconds() * (1 - share) / share)) + " s";
    std::fprintf(stderr, "%speerctl: evaluating: %u of %u tasks, %.0f%% of %llu held-out bytes, ETA %s%s",
                 tty ? "\r" : "", e.tasks_done(), e.tasks(), 100 * share, static_cast<unsigned long long>(e.bytes()),
                 eta.c_str(), tty ? "   " : "\n");
    said = true;
  }
  request.join();
  if (said && tty) std::fprintf(stderr, "\n");
  if (failed) std::rethrow_exception(failed);
  return res;
}

// peerctl wait trained: polls the status until the spool's backlog is shorter than one training
// window (what is left waits for more text), with progress, percent and ETA on stderr. Exits 0
// when trained, kWaitTimedOut when --timeout ran out first, 1 when training is paused or stopped.
constexpr int kWaitTimedOut = 3;
int WaitTrained(Client& client, const std::string& admin, double timeout_seconds) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const bool tty = isatty(STDERR_FILENO);
  uint64_t first_backlog = 0;
  auto last_said = start - std::chrono::hours(1);
  for (bool first = true;; first = false) {
    std::string body;
    if (!Answered([&] { return client.Call(http::verb::get, "/v1/status"); }, admin, &body)) return 1;
    peerd::StatusReply s;
    if (!Parse(body, &s)) {
      std::fprintf(stderr, "peerctl: GET /v1/status answered something that is not a status: %s\n", body.c_str());
      return 1;
    }
    const uint64_t backlog = s.spool_backlog_bytes();
    if (first) first_backlog = std::max<uint64_t>(backlog, 1);
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    // In tokens: each document of the backlog still owes its end-of-document token.
    const uint64_t backlog_tokens = backlog + s.spool_backlog_documents();
    if (backlog_tokens <= s.context()) {
      if (tty) std::fprintf(stderr, "\n");
      std::printf("trained: backlog %llu tokens (under one window of %u) after %.0f s, step %llu\n",
                  static_cast<unsigned long long>(backlog_tokens), s.context() + 1, elapsed,
                  static_cast<unsigned long long>(s.step()));
      return 0;
    }
    if (!s.training_error().empty() || s.paused()) {
      std::fprintf(stderr, "%speerctl: training is %s with %llu bytes left: %s\n", tty ? "\n" : "",
                   s.paused() && s.training_error().empty() ? "paused" : "stopped",
                   static_cast<unsigned long long>(backlog),
                   s.training_error().empty() ? "peerctl resume" : s.training_error().c_str());
      return 1;
    }
    if (timeout_seconds > 0 && elapsed > timeout_seconds) {
      std::fprintf(stderr, "%speerctl: %llu bytes still untrained after %.0f s (--timeout)\n", tty ? "\n" : "",
                   static_cast<unsigned long long>(backlog), elapsed);
      return kWaitTimedOut;
    }
    // Progress: on a terminal a line redrawn each poll; otherwise a line every 10 s.
    const double done = first_backlog > backlog ? double(first_backlog - backlog) / first_backlog : 0;
    if (tty || Clock::now() - last_said > std::chrono::seconds(10)) {
      std::string eta = "?";
      if (done > 0.01) {
        const double left = elapsed * (1 - done) / done;
        eta = std::to_string(static_cast<long>(left) / 60) + "m" + std::to_string(static_cast<long>(left) % 60) + "s";
      }
      std::fprintf(stderr, "%speerctl: %5.1f%% of the backlog trained, %llu bytes left, %.0f tokens/s, ETA %s%s",
                   tty ? "\r" : "", 100 * done, static_cast<unsigned long long>(backlog), s.tokens_per_second(),
                   eta.c_str(), tty ? "   " : "\n");
      last_said = Clock::now();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"peerctl: steer a running peerd"};
  app.set_version_flag("--version", std::string("peerctl ") + PEERD_VERSION);
  std::string admin = "127.0.0.1:7071", token_file = "peerd-data/admin.token";
  bool as_json = false;
  app.add_option("--admin", admin, "peerd's admin API")->capture_default_str()->envname("PEERD_ADMIN");
  app.add_option("--token-file", token_file, "file holding the admin token")
      ->capture_default_str()
      ->envname("PEERD_TOKEN_FILE");
  app.add_flag("--json", as_json, "print the server's JSON");
  app.require_subcommand(1);

  app.add_subcommand("status", "step, loss, tokens/s, spool, segments, and why anything stopped");

  auto* segments = app.add_subcommand("segments", "list, add or freeze expert segments (default: list)");
  segments->require_subcommand(0, 1);
  segments->add_subcommand("list", "every segment of every PEER layer");
  auto* seg_add = segments->add_subcommand("add", "a fresh training segment");
  auto* seg_freeze = segments->add_subcommand("freeze", "freeze a training segment into the store, for ever");
  std::string dtype;
  std::optional<uint32_t> seg_id, layer, n_keys;
  seg_add->add_option("--layer", layer, "one PEER layer (default: all)");
  seg_add->add_option("--n-keys", n_keys, "sub-keys per half of the new segment (default: the configured nKeys)");
  seg_freeze->add_option("id", seg_id, "the segment's id (peerctl segments lists them)");
  seg_freeze->add_option("--layer", layer, "one PEER layer (default: every layer that has it training)");
  seg_freeze->add_option("--dtype", dtype, "frozen rows: bf16 | fp32 (default: the policy's)")
      ->check(CLI::IsMember({"bf16", "fp32"}));

  auto* tasks = app.add_subcommand("tasks", "list, add or delete held-out tasks (default: list)");
  tasks->require_subcommand(0, 1);
  tasks->add_subcommand("list", "the held-out tasks and what they measure");
  auto* task_add = tasks->add_subcommand("add", "register (or replace) a held-out task");
  auto* task_delete = tasks->add_subcommand("delete", "delete a task and its column of the evaluation rows");
  std::string task_name, task_file, measures;
  task_add->add_option("name", task_name, "the task's name")->required();
  task_add->add_option("file", task_file, "its held-out text (sent as text)")->required()->check(CLI::ExistingFile);
  task_add->add_option("--measures", measures, "the ingest task it measures (default: NAME)");
  task_delete->add_option("name", task_name, "the task's name")->required();

  auto* eval = app.add_subcommand("eval", "run an evaluation, or show the forgetting report (default: report)");
  eval->require_subcommand(0, 1);
  auto* eval_run = eval->add_subcommand("run", "score every held-out task now and record the row");
  eval->add_subcommand("report", "the matrix, ACC, BWT, FWT and forgetting per task");
  std::string label;
  eval_run->add_option("--label", label, "name of the row, e.g. 'after kjv'");

  auto* report_cmd =
      app.add_subcommand("report", "the matrix and curves as PNG and SVG in DIR (heatmap, curves, report.md)");
  std::string report_dir;
  report_cmd->add_option("dir", report_dir, "the directory to write (created if missing)")->required();
  auto* history = app.add_subcommand("history", "every step's loss, learning rate, gradient norm, speed; evaluations");
  uint64_t since = 0;
  uint32_t limit = 2000;
  history->add_option("--since", since, "only steps after this one")->capture_default_str();
  history->add_option("--limit", limit, "at most this many points")->capture_default_str()->check(CLI::Range(1, 10000));

  auto* wait = app.add_subcommand("wait", "wait until something is done: trained (the backlog is trained)");
  auto* wait_trained = wait->add_subcommand("trained", "until the spool's backlog is under one training window");
  wait->require_subcommand(1);
  double timeout = 0;
  wait_trained->add_option("--timeout", timeout, "give up after this many seconds (0: never)")->capture_default_str();

  auto* score = app.add_subcommand("score", "bits per byte of a text, and which segments answered (no side effect)");
  std::string score_text = "-";
  bool log_probs = false;
  score->add_option("text", score_text, "the text, or - for stdin")->capture_default_str();
  score->add_flag("--log-probs", log_probs, "also each predicted byte's log-probability (with --json)");
  auto* generate = app.add_subcommand("generate", "continue a prompt with the model as it is now");
  std::string prompt = "-";
  peerd::GenerateRequest gen;
  std::optional<uint32_t> max_tokens, top_k;
  std::optional<double> temperature, top_p;
  std::optional<uint64_t> seed;
  std::vector<std::string> stops;
  bool stream = false;
  generate->add_option("prompt", prompt, "the prompt, or - for stdin")->capture_default_str();
  generate->add_option("--max-tokens", max_tokens, "bytes to generate at most (default 128, at most 4096)");
  generate->add_option("--temperature", temperature, "0: greedy; default 1");
  generate->add_option("--top-k", top_k, "sample among the k most likely bytes only");
  generate->add_option("--top-p", top_p, "sample among the fewest bytes whose probability reaches p");
  generate->add_option("--seed", seed, "the same seed gives the same text (default: random, printed)");
  generate->add_option("--stop", stops, "end before this string (up to 4)");
  generate->add_flag("--stream", stream, "print the text as it is generated");
  auto* export_cmd =
      app.add_subcommand("export", "write the model as it is now to DIR/model.safetensors and DIR/config.json");
  std::string export_dir;
  export_cmd->add_option("dir", export_dir, "the directory to write (created if missing)")->required();
  app.add_subcommand("checkpoint", "write a checkpoint now");
  app.add_subcommand("pause", "pause training");
  app.add_subcommand("resume", "resume training (after a training error: retry)");
  auto* policy = app.add_subcommand("policy", "show or change what trains (default: get)");
  policy->require_subcommand(0, 1);
  policy->add_subcommand("get", "the policy now");
  auto* policy_set = policy->add_subcommand(
      "set",
      "KEY=VALUE...: trainGroups=a,b replayRatio=0.25 distillWeight=1 lr=0.001 freezeDtype=bf16 routed=true "
      "keepTrainedText=false routeCandidates=4");
  std::vector<std::string> settings;
  policy_set->add_option("settings", settings, "KEY=VALUE ...")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;  // a usage error: 2, as the other refusals before any request
  }

  const CLI::App* sub = app.get_subcommands()[0];
  const std::string command = sub->get_name();
  // The nested subcommand ("list", "add", ...), or the group's default.
  const std::string action = !sub->get_subcommands().empty() ? sub->get_subcommands()[0]->get_name()
                             : command == "eval"             ? "report"
                             : command == "policy"           ? "get"
                                                             : "list";
  // No default id: freezing is for ever, and segment 0 may be one that never trained.
  if (command == "segments" && action == "freeze" && !seg_id) {
    std::fprintf(stderr, "peerctl: segments freeze needs the segment's id (peerctl segments lists them)\n");
    return 2;
  }

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
      std::fprintf(stderr,
                   "peerctl: cannot read the admin token from '%s' (peerd writes DATA_DIR/admin.token; --token-file "
                   "or PEERD_TOKEN_FILE)\n",
                   token_file.c_str());
      return 2;
    }
  }

  http::verb verb = http::verb::get;
  std::string target, body;
  if (command == "status")
    target = "/v1/status";
  else if (command == "segments") {
    json b = json::object();
    if (layer) b["layer"] = *layer;
    if (action == "list")
      target = "/v1/segments";
    else if (action == "add") {
      verb = http::verb::post, target = "/v1/segments";
      if (n_keys) b["nKeys"] = *n_keys;
      body = b.dump();
    } else {
      verb = http::verb::post, target = "/v1/segments/" + std::to_string(*seg_id) + "/freeze";
      if (!dtype.empty()) b["dtype"] = dtype;
      body = b.dump();
    }
  } else if (command == "tasks") {
    if (action == "list")
      target = "/v1/tasks";
    else if (action == "add") {
      std::ifstream in(task_file, std::ios::binary);
      if (!in) {
        std::fprintf(stderr, "peerctl: cannot read '%s'\n", task_file.c_str());
        return 2;
      }
      std::ostringstream ss;
      ss << in.rdbuf();
      verb = http::verb::post, target = "/v1/tasks";
      json b{{"name", task_name}, {"text", ss.str()}};
      if (!measures.empty()) b["measures"] = measures;
      body = b.dump(-1, ' ', false, json::error_handler_t::replace);
    } else {
      verb = http::verb::delete_, target = "/v1/tasks/" + task_name;
    }
  } else if (command == "score") {
    std::string text = score_text;
    if (text == "-") text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    peerd::ScoreRequest r;
    r.set_text(text);
    r.set_log_probs(log_probs);
    verb = http::verb::post, target = "/v1/score";
    google::protobuf::util::JsonPrintOptions options;
    options.preserve_proto_field_names = false;
    if (!google::protobuf::util::MessageToJsonString(r, &body, options).ok()) {
      std::fprintf(stderr, "peerctl: the text is not valid UTF-8 (JSON cannot carry it)\n");
      return 2;
    }
  } else if (command == "generate") {
    if (prompt == "-") prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    gen.set_prompt(prompt);
    if (max_tokens) gen.set_max_tokens(*max_tokens);
    if (temperature) gen.set_temperature(*temperature);
    if (top_k) gen.set_top_k(*top_k);
    if (top_p) gen.set_top_p(*top_p);
    if (seed) gen.set_seed(*seed);
    for (const std::string& s : stops) gen.add_stop(s);
    gen.set_stream(stream);
    verb = http::verb::post, target = "/v1/generate";
    if (!google::protobuf::util::MessageToJsonString(gen, &body).ok()) {
      std::fprintf(stderr, "peerctl: the prompt is not valid UTF-8 (JSON cannot carry it)\n");
      return 2;
    }
  } else if (command == "eval") {
    if (action == "report")
      target = "/v1/eval";
    else
      verb = http::verb::post, target = "/v1/eval", body = json{{"label", label}}.dump();
  } else if (command == "history")
    target = "/v1/history?since=" + std::to_string(since) + "&limit=" + std::to_string(limit);
  else if (command == "checkpoint")
    verb = http::verb::post, target = "/v1/checkpoint";
  else if (command == "pause")
    verb = http::verb::post, target = "/v1/train/pause";
  else if (command == "resume")
    verb = http::verb::post, target = "/v1/train/resume";
  else if (command == "policy") {
    if (action == "get")
      target = "/v1/policy";
    else {
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
        } else if (k == "routeCandidates") {
          uint32_t n = 0;
          const auto [end, error] = std::from_chars(v.data(), v.data() + v.size(), n);
          if (v.empty() || error != std::errc() || end != v.data() + v.size()) {
            std::fprintf(stderr, "peerctl: routeCandidates needs a whole number (0, or 2 to 64), got '%s'\n",
                         v.c_str());
            return 2;
          }
          b[k] = n;
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
    }
  }

  if (command == "wait") return WaitTrained(client, admin, timeout);
  if (command == "report") return Report(client, report_dir, admin);
  if (command == "generate" && stream) return StreamGeneration(client, target, body, as_json, admin);
  if (command == "export") return Export(client, export_dir, admin);
  std::string answer;
  if (!Answered(
          [&] {
            return command == "eval" && action == "run" ? EvaluateWithProgress(client, body)
                                                        : client.Call(verb, target, body);
          },
          admin, &answer))
    return 1;
  if (as_json || !PrintHuman(command, action, answer)) std::printf("%s\n", answer.c_str());
  return 0;
}
