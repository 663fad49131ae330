#include "service/admin_server.h"

#include <google/protobuf/util/json_util.h>
#include <sys/socket.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "service/listen.h"
#include "service/token.h"

#include <spdlog/spdlog.h>

namespace peerd {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using asio::ip::tcp;
namespace fs = std::filesystem;

namespace {

struct Reply {
  http::status status = http::status::ok;
  std::string body;
  std::string content_type = "application/json";
};

std::string ToJson(const google::protobuf::Message& m) {
  std::string json;
  google::protobuf::util::JsonPrintOptions o;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &json, o);
  return json;
}

Reply Error(http::status status, const std::string& message) {
  ErrorBody body;
  body.mutable_error()->set_code(static_cast<int>(status));
  body.mutable_error()->set_message(message);
  return {status, ToJson(body)};
}

Reply FromStatus(const Status& st) {
  switch (st.code()) {
    case Status::Code::kOk: return {};
    case Status::Code::kInvalidArgument: return Error(http::status::bad_request, st.message());
    case Status::Code::kNotFound: return Error(http::status::not_found, st.message());
    case Status::Code::kFailedPrecondition: return Error(http::status::conflict, st.message());
    default: return Error(http::status::internal_server_error, st.ToString());
  }
}

Reply Ok(const google::protobuf::Message& m) { return {http::status::ok, ToJson(m)}; }

// Parses a request body (empty = all defaults) into `m`; unknown fields and wrong types are errors.
std::optional<Reply> ParseBody(const std::string& body, google::protobuf::Message* m) {
  if (body.find_first_not_of(" \t\r\n") == std::string::npos) return std::nullopt;
  google::protobuf::util::JsonParseOptions o;
  o.ignore_unknown_fields = false;
  auto st = google::protobuf::util::JsonStringToMessage(body, m, o);
  if (!st.ok())
    return Error(http::status::bad_request, "request body is not valid JSON for " + m->GetTypeName() + ": " +
                                                std::string(st.message()));
  return std::nullopt;
}

std::optional<RowDtype> ParseDtype(const std::string& s, std::optional<Reply>* error) {
  if (s.empty()) return std::nullopt;
  if (s == "bf16") return ROW_DTYPE_BF16;
  if (s == "fp32") return ROW_DTYPE_FP32;
  *error = Error(http::status::bad_request, "dtype must be \"bf16\" or \"fp32\", got \"" + s + "\"");
  return std::nullopt;
}

}  // namespace

struct AdminServer::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  TrainingLoop* loop = nullptr;
  const DataServer* data = nullptr;
  AdminServerOptions options;
  std::thread accept_thread;
  std::mutex mu;
  std::set<int> open_sockets;
  std::atomic<int> active{0};  // connection threads running (detached; Stop waits for zero)
  uint16_t port = 0;
  std::atomic<uint64_t> requests{0}, request_errors{0};
  std::atomic<bool> stopping{false};

  Reply Route(const http::request<http::string_body>& req);
  Reply Handle(const http::request<http::string_body>& req);
  void Serve(tcp::socket socket);
  std::optional<Reply> ReadTaskFile(const std::string& path, std::string* text);
};

std::optional<Reply> AdminServer::Impl::ReadTaskFile(const std::string& path, std::string* text) {
  std::error_code ec;
  fs::path real = fs::weakly_canonical(path, ec);
  bool allowed = false;
  for (const auto& root : options.task_roots) {
    fs::path r = fs::weakly_canonical(root, ec);
    auto [end, unused] = std::mismatch(r.begin(), r.end(), real.begin(), real.end());
    (void)unused;
    if (end == r.end()) allowed = true;
  }
  if (!allowed) {
    std::string roots;
    for (const auto& r : options.task_roots) roots += (roots.empty() ? "" : ", ") + r;
    return Error(http::status::forbidden, "path '" + path + "' is outside the allowed task roots (" + roots +
                                              "): start peerd with --task-root, or send the text itself");
  }
  std::ifstream in(real, std::ios::binary);
  if (!in) return Error(http::status::bad_request, "cannot read '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  *text = ss.str();
  return std::nullopt;
}

Reply AdminServer::Impl::Route(const http::request<http::string_body>& req) {
  const std::string target(req.target());
  const std::string path = target.substr(0, target.find('?'));
  const auto method = req.method();
  auto is = [&](http::verb v, const char* p) { return method == v && path == p; };
  std::smatch match;

  if (is(http::verb::get, "/v1/status")) return Ok(loop->Snapshot());
  if (is(http::verb::get, "/v1/segments")) return Ok(loop->Segments());
  if (is(http::verb::post, "/v1/segments")) {
    AddSegmentRequest r;
    if (auto e = ParseBody(req.body(), &r)) return *e;
    if (r.has_n_keys() && (r.n_keys() == 0 || r.n_keys() > 65536))
      return Error(http::status::bad_request, "nKeys must be in [top-k, 65536], got " + std::to_string(r.n_keys()));
    OkReply ok;
    std::vector<uint32_t> ids;
    Status st = loop->AddSegments(r.has_layer() ? std::optional(r.layer()) : std::nullopt,
                                  r.has_n_keys() ? std::optional(r.n_keys()) : std::nullopt, &ids);
    if (!st.ok()) return FromStatus(st);
    for (uint32_t id : ids) ok.add_ids(id);
    ok.set_message("added segment " + std::to_string(ids.empty() ? 0 : ids[0]) + " (training) to " +
                   std::to_string(ids.size()) + " layer(s)");
    return Ok(ok);
  }
  static const std::regex freeze_re("^/v1/segments/([0-9]{1,9})/freeze$");
  if (method == http::verb::post && std::regex_match(path, match, freeze_re)) {
    FreezeRequest r;
    if (auto e = ParseBody(req.body(), &r)) return *e;
    std::optional<Reply> bad;
    std::optional<RowDtype> dtype = ParseDtype(r.dtype(), &bad);
    if (bad) return *bad;
    const uint32_t id = static_cast<uint32_t>(std::stoul(match[1]));
    std::vector<uint32_t> layers;
    Status st = loop->FreezeSegment(id, r.has_layer() ? std::optional(r.layer()) : std::nullopt, dtype, &layers);
    if (!st.ok()) return FromStatus(st);
    OkReply ok;
    for (uint32_t l : layers) ok.add_ids(l);
    ok.set_message("froze segment " + std::to_string(id) + " in " + std::to_string(layers.size()) + " layer(s)");
    return Ok(ok);
  }
  if (is(http::verb::post, "/v1/tasks")) {
    TaskRequest r;
    if (auto e = ParseBody(req.body(), &r)) return *e;
    if (r.name().empty()) return Error(http::status::bad_request, "a task needs a name");
    if (!r.text().empty() && !r.path().empty())
      return Error(http::status::bad_request, "give the task's text or its path, not both");
    std::string text = r.text();
    if (!r.path().empty())
      if (auto e = ReadTaskFile(r.path(), &text)) return *e;
    if (Status st = loop->tasks().PutTask(r.name(), text); !st.ok()) return FromStatus(st);
    OkReply ok;
    ok.set_message("task " + r.name() + " registered (" + std::to_string(text.size()) + " held-out bytes)");
    return Ok(ok);
  }
  if (is(http::verb::get, "/v1/tasks")) {
    std::vector<std::pair<std::string, std::string>> tasks;
    if (Status st = loop->tasks().Tasks(&tasks); !st.ok()) return FromStatus(st);
    TasksReply reply;
    for (const auto& [name, text] : tasks) {
      TaskInfo* t = reply.add_tasks();
      t->set_name(name);
      t->set_bytes(text.size());
    }
    return Ok(reply);
  }
  if (is(http::verb::post, "/v1/eval")) {
    EvalRequest r;
    if (auto e = ParseBody(req.body(), &r)) return *e;
    EvalRow row;
    if (Status st = loop->Evaluate(r.label(), &row); !st.ok()) return FromStatus(st);
    return Ok(row);
  }
  if (is(http::verb::get, "/v1/eval")) {
    std::vector<EvalRow> rows;
    if (Status st = loop->tasks().Rows(&rows); !st.ok()) return FromStatus(st);
    return Ok(ComputeForgetting(rows));
  }
  if (is(http::verb::post, "/v1/checkpoint")) {
    if (Status st = loop->Checkpoint(); !st.ok()) return FromStatus(st);
    OkReply ok;
    ok.set_message("checkpoint written");
    return Ok(ok);
  }
  if (is(http::verb::post, "/v1/train/pause") || is(http::verb::post, "/v1/train/resume")) {
    const bool pause = path == "/v1/train/pause";
    loop->SetPaused(pause);
    OkReply ok;
    ok.set_message(pause ? "training paused" : "training resumed");
    return Ok(ok);
  }
  if (is(http::verb::get, "/v1/policy")) return Ok(loop->GetPolicy());
  if (is(http::verb::put, "/v1/policy")) {
    Policy p;
    if (auto e = ParseBody(req.body(), &p)) return *e;
    if (Status st = loop->SetPolicy(p); !st.ok()) return FromStatus(st);
    return Ok(loop->GetPolicy());
  }
  if (is(http::verb::get, "/metrics")) {
    std::string text = loop->Metrics();
    if (data) {
      DataServerStats d = data->stats();
      text += "# TYPE peerd_ingest_documents_total counter\npeerd_ingest_documents_total " + std::to_string(d.documents) + "\n";
      text += "# TYPE peerd_ingest_acks_total counter\npeerd_ingest_acks_total " + std::to_string(d.acks) + "\n";
      text += "# TYPE peerd_ingest_errors_total counter\npeerd_ingest_errors_total " + std::to_string(d.errors) + "\n";
    }
    text += "# TYPE peerd_admin_request_errors_total counter\npeerd_admin_request_errors_total " +
            std::to_string(request_errors.load()) + "\n";
    return {http::status::ok, text, "text/plain; version=0.0.4"};
  }
  static const std::set<std::string> known = {"/v1/status", "/v1/segments", "/v1/tasks", "/v1/eval", "/v1/checkpoint",
                                              "/v1/train/pause", "/v1/train/resume", "/v1/policy", "/metrics"};
  if (known.count(path) || std::regex_match(path, freeze_re))
    return Error(http::status::method_not_allowed, std::string(req.method_string()) + " is not allowed on " + path);
  return Error(http::status::not_found, "no route " + path + " (see README: admin API)");
}

Reply AdminServer::Impl::Handle(const http::request<http::string_body>& req) {
  requests++;
  const std::string auth(req[http::field::authorization]);
  const std::string prefix = "Bearer ";
  if (auth.rfind(prefix, 0) != 0 || !ConstantTimeEquals(auth.substr(prefix.size()), options.token)) {
    request_errors++;
    return Error(http::status::unauthorized,
                 "missing or wrong token: send 'Authorization: Bearer <token>' with the token in DATA_DIR/admin.token");
  }
  Reply r;
  try {
    r = Route(req);
  } catch (const std::exception& e) {
    r = Error(http::status::internal_server_error, std::string("internal error: ") + e.what());
  }
  if (r.status != http::status::ok) request_errors++;
  return r;
}

void AdminServer::Impl::Serve(tcp::socket socket) {
  const int fd = socket.native_handle();
  timeval timeout{30, 0};  // an idle keep-alive connection is closed after 30 s
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  beast::flat_buffer buffer;
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(options.max_body_bytes);
    beast::error_code ec;
    http::read(socket, buffer, parser, ec);
    if (ec == http::error::body_limit) {
      Reply r = Error(http::status::payload_too_large, "request body over " + std::to_string(options.max_body_bytes) + " bytes");
      http::response<http::string_body> res{r.status, 11};
      res.set(http::field::content_type, r.content_type);
      res.body() = r.body;
      res.prepare_payload();
      http::write(socket, res, ec);
      break;
    }
    if (ec) break;
    const auto& req = parser.get();
    Reply r = Handle(req);
    // One line per request that changes something or fails; reads stay quiet below debug.
    const std::string what = std::string(req.method_string()) + " " + std::string(req.target());
    if (r.status != http::status::ok)
      spdlog::warn("admin {} -> {}: {}", what, static_cast<int>(r.status), r.body);
    else if (req.method() != http::verb::get)
      spdlog::info("admin {} -> 200 {}", what, r.body.size() > 300 ? r.body.substr(0, 300) + "…" : r.body);
    else
      spdlog::debug("admin {} -> 200", what);
    http::response<http::string_body> res{r.status, req.version()};
    res.set(http::field::content_type, r.content_type);
    res.keep_alive(req.keep_alive());
    res.body() = std::move(r.body);
    res.prepare_payload();
    http::write(socket, res, ec);
    if (ec || !req.keep_alive() || stopping) break;
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    open_sockets.erase(fd);
  }
  beast::error_code ignored;
  socket.shutdown(tcp::socket::shutdown_both, ignored);
  active--;
}

AdminServer::AdminServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdminServer::~AdminServer() { Stop(); }

Status AdminServer::Start(TrainingLoop* loop, const DataServer* data, const AdminServerOptions& options,
                          std::unique_ptr<AdminServer>* out) {
  auto impl = std::make_unique<Impl>();
  impl->loop = loop;
  impl->data = data;
  impl->options = options;
  if (Status st = Listen(impl->acceptor, options.listen, "the admin API", &impl->port); !st.ok()) return st;
  impl->accept_thread = std::thread([p = impl.get()] {
    for (;;) {
      tcp::socket socket(p->io);
      boost::system::error_code aec;
      p->acceptor.accept(socket, aec);
      if (p->stopping) return;
      if (aec) continue;
      if (p->active >= p->options.max_connections) {  // refuse politely rather than queue forever
        Reply r = Error(http::status::service_unavailable, "too many admin connections");
        http::response<http::string_body> res{r.status, 11};
        res.body() = r.body;
        res.prepare_payload();
        beast::error_code wec;
        http::write(socket, res, wec);
        continue;
      }
      p->active++;
      std::lock_guard<std::mutex> lock(p->mu);
      p->open_sockets.insert(socket.native_handle());
      std::thread([p, s = std::move(socket)]() mutable { p->Serve(std::move(s)); }).detach();
    }
  });
  out->reset(new AdminServer(std::move(impl)));
  return Status::OK();
}

void AdminServer::Stop() {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  boost::system::error_code ec;
  impl_->acceptor.cancel(ec);
  ::shutdown(impl_->acceptor.native_handle(), SHUT_RDWR);
  impl_->acceptor.close(ec);
  impl_->accept_thread.join();
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    for (int fd : impl_->open_sockets) ::shutdown(fd, SHUT_RDWR);
  }
  // Connection threads end once their socket is shut down (a request in progress finishes first).
  while (impl_->active > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

uint16_t AdminServer::port() const { return impl_->port; }

}  // namespace peerd
