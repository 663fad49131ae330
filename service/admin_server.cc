#include "service/admin_server.h"

#include <google/protobuf/util/json_util.h>
#include <sys/socket.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <chrono>
#include <condition_variable>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <variant>
#include <vector>

#include "core/utf8.h"
#include "service/embedded_files.h"
#include "service/net/admin_requests.h"
#include "service/net/listen.h"
#include "service/net/token.h"
#include "service/net/web_login.h"

#include <spdlog/spdlog.h>

namespace peerd {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using asio::ip::tcp;

namespace {

// The request line and headers together: room for a target of kMaxTargetBytes (admin_requests.h)
// and ordinary headers; longer is 431 before the target is looked at.
constexpr size_t kMaxHeaderBytes = 16 << 10;
// A sign-in form: the token and little else.
constexpr size_t kMaxLoginBody = 4096;

struct Reply {
  http::status status = http::status::ok;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers = {};  // more headers (the live page's)
  // Set for an answer sent as it is made (chunked): called with a function that sends the next
  // bytes (false once the client is gone). An error it returns before its first bytes is answered
  // as any error; after them, server-sent events get a last event holding the error, and any other
  // answer is cut off without its last chunk, so the client sees it incomplete.
  std::function<Status(const std::function<bool(std::string_view)>& send)> stream = nullptr;
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
    case Status::Code::kUnavailable: return Error(http::status::service_unavailable, st.message());
    default: return Error(http::status::internal_server_error, st.ToString());
  }
}

Reply Ok(const google::protobuf::Message& m) { return {http::status::ok, ToJson(m)}; }

Reply Ok(const std::string& message, const std::vector<uint32_t>& ids = {}) {
  OkReply ok;
  ok.set_message(message);
  for (uint32_t id : ids) ok.add_ids(id);
  return Ok(ok);
}

Reply FromAdminError(const AdminError& e) { return Error(static_cast<http::status>(e.http_status), e.message); }

// Requests that the log quotes are clipped: a 2 KB target or a control character stays out of it.
std::string ForLog(const http::request<http::string_body>& req) {
  return ClipForMessage(std::string(req.method_string()), 16) + " " + ClipForMessage(std::string(req.target()), 200);
}

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

}  // namespace

using Clock = std::chrono::steady_clock;

struct AdminServer::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  TrainingLoop* loop = nullptr;
  const DataServer* data = nullptr;
  AdminServerOptions options;
  std::thread accept_thread, watchdog_thread;
  std::mutex mu;
  std::condition_variable watchdog_wake;
  // Every open connection's socket and the deadline of what it is doing now (max(): none, while
  // a request is being handled); the watchdog shuts down a socket past its deadline.
  std::map<int, Clock::time_point> deadlines;
  std::atomic<int> active{0};  // connection threads running (detached; Stop waits for zero)
  uint16_t port = 0;
  std::string address;  // as bound: "127.0.0.1:7070", "[::1]:7070"
  std::atomic<uint64_t> requests{0}, request_errors{0};
  std::atomic<bool> stopping{false};
  // The live page's session cookie value (service/net/web_login.h), drawn at start.
  const std::string session = RandomToken();

  Reply Route(const http::request<http::string_body>& req);
  Reply Dispatch(const AdminRequest& request);
  Reply GenerateReplyFor(const GenerateRequest& request);
  // Sends what r.stream makes as a chunked answer of r.content_type; the connection closes after it.
  void Stream(tcp::socket& socket, int fd, Clock::duration timeout, unsigned version, Reply& r,
              const std::string& what);
  bool Authorized(const http::request_parser<http::string_body>::value_type& req) const;
  // What is answered before the token is checked (AdminRoute::needs_token false): the probes,
  // the live page's files, and signing out; nullopt for anything else. POST /login needs its
  // body and is answered by SignIn.
  std::optional<Reply> PublicReply(const http::request_parser<http::string_body>::value_type& req);
  Reply SignIn(const std::string& form_body);
  Reply Handle(const http::request<http::string_body>& req);
  void Serve(tcp::socket socket);
  void SetDeadline(int fd, Clock::duration within);
  void Watchdog();
};

void AdminServer::Impl::SetDeadline(int fd, Clock::duration within) {
  std::lock_guard<std::mutex> lock(mu);
  deadlines[fd] = within == Clock::duration::max() ? Clock::time_point::max() : Clock::now() + within;
}

void AdminServer::Impl::Watchdog() {
  std::unique_lock<std::mutex> lock(mu);
  while (!stopping) {
    watchdog_wake.wait_for(lock, std::chrono::milliseconds(100));
    const auto now = Clock::now();
    for (auto& [fd, deadline] : deadlines)
      if (now > deadline) {
        spdlog::debug("admin connection closed: it ran past its deadline (idle, slow, or not reading its answer)");
        ::shutdown(fd, SHUT_RDWR);  // its thread's blocked read or write fails now
        deadline = Clock::time_point::max();
      }
  }
}

Reply AdminServer::Impl::Route(const http::request<http::string_body>& req) {
  AdminRequest request;
  AdminError error;
  const auto method = req.method_string(), target = req.target();
  if (!ParseAdminRequest(std::string_view(method.data(), method.size()), std::string_view(target.data(), target.size()),
                         req.body(), &request, &error))
    return FromAdminError(error);
  return Dispatch(request);
}

// Runs a request that ParseAdminRequest accepted; what is left to refuse here needs the model or
// the store (a segment that does not exist, a task file that cannot be read).
Reply AdminServer::Impl::Dispatch(const AdminRequest& request) {
  return std::visit(
      Overloaded{
          [&](const admin::GetStatus&) { return Ok(loop->Snapshot()); },
          [&](const admin::ListSegments&) { return Ok(loop->Segments()); },
          [&](const admin::AddSegments& r) {
            std::vector<uint32_t> ids;
            if (Status st = loop->AddSegments(r.layer, r.n_keys, &ids); !st.ok()) return FromStatus(st);
            return Ok("added segment " + std::to_string(ids.empty() ? 0 : ids[0]) + " (training) to " +
                          std::to_string(ids.size()) + " layer(s)",
                      ids);
          },
          [&](const admin::FreezeSegment& r) {
            std::vector<uint32_t> layers;
            if (Status st = loop->FreezeSegment(r.id, r.layer, r.dtype, &layers); !st.ok()) return FromStatus(st);
            return Ok("froze segment " + std::to_string(r.id) + " in " + std::to_string(layers.size()) + " layer(s)",
                      layers);
          },
          [&](const admin::AddTask& r) {
            std::string text = r.text;
            AdminError e;
            if (!r.path.empty() && !ReadConfinedTaskFile(r.path, options.task_roots, options.max_body_bytes, &text, &e))
              return FromAdminError(e);
            if (Status st = loop->tasks().PutTask(r.name, text, r.measures); !st.ok()) return FromStatus(st);
            return Ok("task " + r.name + " registered (" + std::to_string(text.size()) +
                      " held-out bytes, measuring ingest task " + (r.measures.empty() ? r.name : r.measures) + ")");
          },
          [&](const admin::DeleteTask& r) {
            if (Status st = loop->DeleteTask(r.name); !st.ok()) return FromStatus(st);
            return Ok("task " + r.name + " deleted, with its column of the evaluation rows");
          },
          [&](const admin::Score& r) {
            ScoreReply reply;
            if (Status st = loop->Score(r.text, r.log_probs, &reply); !st.ok()) return FromStatus(st);
            return Ok(reply);
          },
          [&](const admin::Generate& g) { return GenerateReplyFor(g.request); },
          [&](const admin::Export&) {
            Reply exported;
            exported.content_type = "application/octet-stream";
            exported.stream = [this](const std::function<bool(std::string_view)>& send) {
              return loop->Export([&](const char* data, size_t size) { return send(std::string_view(data, size)); });
            };
            return exported;
          },
          [&](const admin::History& h) {
            HistoryReply reply;
            if (Status st = loop->History(h.since, h.limit, &reply); !st.ok()) return FromStatus(st);
            return Ok(reply);
          },
          [&](const admin::ListTasks&) {
            std::vector<HeldOutTask> tasks;
            if (Status st = loop->tasks().Tasks(&tasks); !st.ok()) return FromStatus(st);
            TasksReply reply;
            for (const HeldOutTask& task : tasks) {
              TaskInfo* t = reply.add_tasks();
              t->set_name(task.name);
              t->set_bytes(task.text.size());
              t->set_measures(task.measures);
            }
            return Ok(reply);
          },
          [&](const admin::RunEval& r) {
            EvalRow row;
            if (Status st = loop->Evaluate(r.label, &row); !st.ok()) return FromStatus(st);
            return Ok(row);
          },
          [&](const admin::EvalReport&) {
            std::vector<EvalRow> rows;
            if (Status st = loop->tasks().Rows(&rows); !st.ok()) return FromStatus(st);
            return Ok(ComputeForgetting(rows));
          },
          [&](const admin::Checkpoint&) {
            if (Status st = loop->Checkpoint(); !st.ok()) return FromStatus(st);
            return Ok("checkpoint written");
          },
          [&](const admin::SetPaused& r) {
            loop->SetPaused(r.paused);
            return Ok(r.paused ? "training paused" : "training resumed");
          },
          [&](const admin::GetPolicy&) { return Ok(loop->GetPolicy()); },
          [&](const admin::SetPolicy& r) {
            if (Status st = loop->SetPolicy(r.policy); !st.ok()) return FromStatus(st);
            return Ok(loop->GetPolicy());
          },
          [&](const admin::Metrics&) {
            PrometheusText m;
            loop->Metrics(&m);
            if (data) {
              const DataServerStats d = data->stats();
              m.Counter("peerd_ingest_connections_total", "Data-port connections accepted.", double(d.connections));
              m.Counter("peerd_ingest_documents_total", "Documents received on the data port.", double(d.documents));
              m.Counter("peerd_ingest_acks_total", "Acknowledgements sent on the data port.", double(d.acks));
              m.Counter("peerd_ingest_errors_total", "Data-port errors answered to clients.", double(d.errors));
              m.Gauge("peerd_ingest_open_connections", "Data-port connections open now.", double(d.open_connections));
            }
            m.Counter("peerd_admin_requests_total", "Admin API requests answered (the probes included).",
                      double(requests.load()));
            m.Counter("peerd_admin_request_errors_total", "Admin API requests answered with an error.",
                      double(request_errors.load()));
            return Reply{http::status::ok, m.text(), "text/plain; version=0.0.4"};
          },
      },
      request);
}

// The token as a bearer, or the live page's session cookie on a GET (web_login.h says why GET only).
bool AdminServer::Impl::Authorized(const http::request_parser<http::string_body>::value_type& req) const {
  const std::string auth(req[http::field::authorization]);
  const std::string prefix = "Bearer ";
  if (auth.rfind(prefix, 0) == 0) return ConstantTimeEquals(auth.substr(prefix.size()), options.token);
  const auto header = req[http::field::cookie];
  const std::string cookie = CookieValue(std::string_view(header.data(), header.size()), kSessionCookieName);
  return req.method() == http::verb::get && !cookie.empty() && ConstantTimeEquals(cookie, session);
}

namespace {

// A 303 to `location`, setting `cookie`.
Reply SeeOther(const std::string& location, const std::string& cookie) {
  Reply r{http::status::see_other, "", "text/plain"};
  r.headers = {{"Location", location}, {"Set-Cookie", cookie}, {"Cache-Control", "no-store"}};
  return r;
}

}  // namespace

Reply AdminServer::Impl::SignIn(const std::string& form_body) {
  std::string token;
  if (FormField(form_body, "token", &token) && ConstantTimeEquals(token, options.token)) {
    spdlog::info("admin: a browser signed in to the live page");
    return SeeOther("/", SessionCookie(session));
  }
  request_errors++;
  spdlog::warn("admin: a sign-in to the live page with a wrong token was refused");
  return SeeOther("/?login=failed", ExpiredSessionCookie());
}

std::optional<Reply> AdminServer::Impl::PublicReply(const http::request_parser<http::string_body>::value_type& req) {
  const std::string_view target(req.target().data(), req.target().size());
  const std::string_view path = target.substr(0, target.find('?'));
  if (req.method() == http::verb::post && path == "/logout") return SeeOther("/", ExpiredSessionCookie());
  if (req.method() != http::verb::get) return std::nullopt;
  if (const EmbeddedFile* file = FindDashboardFile(path); file) {
    Reply r{http::status::ok, std::string(file->body), std::string(file->content_type) + "; charset=utf-8"};
    // Its own files only: no inline script, no other origin, never inside another site's frame.
    r.headers = {{"Content-Security-Policy",
                  "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors "
                  "'none'; form-action 'self'"},
                 {"X-Content-Type-Options", "nosniff"},
                 {"Cache-Control", "no-cache"}};
    return r;
  }
  auto answer = [](http::status status, const char* what) {
    return Reply{status, std::string("{\"status\":\"") + what + "\"}"};
  };
  if (path == "/healthz") return answer(http::status::ok, "alive");  // this thread answered
  if (path != "/readyz") return std::nullopt;
  if (stopping) return answer(http::status::service_unavailable, "stopping");
  const StatusReply s = loop->Snapshot();
  if (!s.training_error().empty()) return answer(http::status::service_unavailable, "training stopped by an error");
  if (!s.ingest_error().empty()) return answer(http::status::service_unavailable, "ingest stopped");
  return answer(http::status::ok, "ready");
}

// POST /v1/generate: one JSON answer, or with "stream" an event per piece of text as it is
// generated and a last one with everything but the text.
Reply AdminServer::Impl::GenerateReplyFor(const GenerateRequest& r) {
  GenerateOptions o;
  o.max_tokens = r.has_max_tokens() ? r.max_tokens() : 128;
  o.temperature = r.has_temperature() ? r.temperature() : 1.0;
  o.top_k = r.top_k();
  o.top_p = r.has_top_p() ? r.top_p() : 1.0;
  if (r.has_seed()) {
    o.seed = r.seed();
  } else {
    std::random_device random;
    o.seed = (uint64_t{random()} << 32) | random();
  }
  o.stop.assign(r.stop().begin(), r.stop().end());
  // One server-sent event: "data: JSON", a blank line.
  auto event = [](const std::function<bool(std::string_view)>& send, const std::string& json) {
    return send("data: " + json + "\n\n");
  };
  auto run = [this, event, prompt = r.prompt(), o](const std::function<bool(std::string_view)>* send,
                                                   GenerateReply* reply) -> Status {
    GenerateOptions options = o;
    if (send)
      options.on_text = [send, event](std::string_view piece) {
        GenerateReply chunk;  // {"text": "..."}: the other fields come in the last event
        chunk.set_text(ValidUtf8(piece));
        std::string json;
        (void)google::protobuf::util::MessageToJsonString(chunk, &json);
        return event(*send, json);
      };
    const auto start = Clock::now();
    Generated out;
    uint64_t step = 0;
    if (Status st = loop->Generate(prompt, options, &out, &step); !st.ok()) return st;
    if (!send) reply->set_text(ValidUtf8(out.text));
    for (int64_t t : out.tokens) reply->add_tokens(static_cast<uint32_t>(t));
    reply->set_finish_reason(out.finish_reason);
    reply->set_seed(options.seed);
    reply->set_step(step);
    reply->set_seconds(std::chrono::duration<double>(Clock::now() - start).count());
    return Status::OK();
  };
  if (!r.stream()) {
    GenerateReply reply;
    if (Status st = run(nullptr, &reply); !st.ok()) return FromStatus(st);
    return Ok(reply);
  }
  Reply streamed;
  streamed.content_type = "text/event-stream";
  streamed.stream = [run, event](const std::function<bool(std::string_view)>& send) -> Status {
    GenerateReply last;
    if (Status st = run(&send, &last); !st.ok()) return st;
    if (last.finish_reason() != "cancelled") event(send, ToJson(last));
    return Status::OK();
  };
  return streamed;
}

void AdminServer::Impl::Stream(tcp::socket& socket, int fd, Clock::duration timeout, unsigned version, Reply& r,
                               const std::string& what) {
  beast::error_code ec;
  bool started = false, gone = false;
  uint64_t bytes = 0;
  auto send = [&](std::string_view data) -> bool {
    if (gone) return false;
    SetDeadline(fd, timeout);  // a client that stops reading is closed, and the work stops
    if (!started) {
      http::response<http::empty_body> head{http::status::ok, version};
      head.set(http::field::content_type, r.content_type);
      head.set(http::field::cache_control, "no-cache");
      head.chunked(true);
      head.keep_alive(false);
      http::response_serializer<http::empty_body> serializer{head};
      http::write_header(socket, serializer, ec);
      started = true;
    }
    if (!ec && !data.empty()) asio::write(socket, http::make_chunk(asio::buffer(data.data(), data.size())), ec);
    gone = static_cast<bool>(ec);
    bytes += gone ? 0 : data.size();
    return !gone;
  };
  Status st;
  try {
    st = r.stream(send);
  } catch (const std::exception& e) {
    st = Status::Corruption(std::string("internal error: ") + e.what());
  }
  if (!st.ok()) request_errors++;
  if (!started) {  // failed before its first bytes: an ordinary error answer
    Reply error = FromStatus(st);
    spdlog::warn("admin {} -> {}: {}", what, static_cast<int>(error.status), error.body);
    http::response<http::string_body> res{error.status, version};
    res.set(http::field::content_type, error.content_type);
    res.keep_alive(false);
    res.body() = std::move(error.body);
    res.prepare_payload();
    SetDeadline(fd, timeout);
    http::write(socket, res, ec);
    return;
  }
  const bool events = r.content_type == "text/event-stream";
  if (!st.ok() && !gone && events) send("data: " + FromStatus(st).body + "\n\n");
  if (!gone && (st.ok() || events)) {
    SetDeadline(fd, timeout);
    asio::write(socket, http::make_chunk_last(), ec);
  }
  if (!st.ok())
    spdlog::warn("admin {} -> 200, failed after {} bytes: {}", what, bytes, st.ToString());
  else
    spdlog::info("admin {} -> 200, {} bytes streamed{}", what, bytes,
                 gone ? "; the client left before the end (the work stopped)" : "");
}

Reply AdminServer::Impl::Handle(const http::request<http::string_body>& req) {
  requests++;
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
  const auto timeout =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options.timeout_seconds));
  beast::flat_buffer buffer;
  // Answers a request that is refused before it was read whole, then the connection closes: the
  // stream is out of step after it.
  auto refuse = [&](http::status status, const std::string& message) {
    request_errors++;
    spdlog::warn("admin request refused -> {}: {}", static_cast<int>(status), message);
    Reply r = Error(status, message);
    http::response<http::string_body> res{r.status, 11};
    res.set(http::field::content_type, r.content_type);
    res.keep_alive(false);
    res.body() = r.body;
    res.prepare_payload();
    SetDeadline(fd, timeout);
    beast::error_code wec;
    http::write(socket, res, wec);
    // Closing with unread bytes (the body of a refused upload) would reset the connection, and a
    // reset can discard the answer before the client reads it: stop sending, then read and drop
    // what still comes, for a second or a mebibyte at most.
    socket.shutdown(tcp::socket::shutdown_send, wec);
    SetDeadline(fd, std::chrono::seconds(1));
    char sink[16 << 10];
    for (size_t dropped = 0; !wec && dropped < (1u << 20);) dropped += socket.read_some(asio::buffer(sink), wec);
  };
  // Bytes that are not HTTP/1.1 get a 400; a closed or timed-out connection gets nothing.
  auto malformed = [](const beast::error_code& ec) {
    return ec.category() == http::make_error_code(http::error::bad_target).category() &&
           ec != http::error::end_of_stream && ec != http::error::partial_message;
  };
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(std::numeric_limits<std::uint64_t>::max());  // checked below, once authenticated
    parser.header_limit(kMaxHeaderBytes);
    beast::error_code ec;
    SetDeadline(fd, timeout);  // idle, then the request line and headers
    http::read_header(socket, buffer, parser, ec);
    if (ec == http::error::header_limit) {
      refuse(http::status::request_header_fields_too_large,
             "request line and headers over " + std::to_string(kMaxHeaderBytes) + " bytes");
      break;
    }
    if (ec && malformed(ec)) {
      refuse(http::status::bad_request, "malformed HTTP request: " + ec.message());
      break;
    }
    if (ec) break;
    // Probes answer without the token (an orchestrator or a load balancer has none) and say no more
    // than whether peerd is alive, or ready for work and why not; the live page's files hold no
    // data, and signing in takes the token in a small form body.
    std::optional<Reply> open_reply = PublicReply(parser.get());
    const auto target = parser.get().target();
    if (!open_reply && parser.get().method() == http::verb::post &&
        std::string_view(target.data(), target.size()).substr(0, target.find('?')) == "/login") {
      parser.body_limit(kMaxLoginBody);
      SetDeadline(fd, timeout);
      http::read(socket, buffer, parser, ec);
      if (ec == http::error::body_limit) {
        refuse(http::status::payload_too_large, "a sign-in body over " + std::to_string(kMaxLoginBody) + " bytes");
        break;
      }
      if (ec) break;
      open_reply = SignIn(parser.get().body());
    }
    if (open_reply) {
      requests++;
      http::response<http::string_body> res{open_reply->status, parser.get().version()};
      res.set(http::field::content_type, open_reply->content_type);
      for (const auto& [field, value] : open_reply->headers) res.set(field, value);
      res.keep_alive(false);
      res.body() = std::move(open_reply->body);
      res.prepare_payload();
      SetDeadline(fd, timeout);
      http::write(socket, res, ec);
      break;
    }
    // The token before the body: an unauthenticated client never makes peerd read (or hold) one.
    if (!Authorized(parser.get())) {
      requests++;
      refuse(http::status::unauthorized,
             "missing or wrong token: send 'Authorization: Bearer <token>' with the token in DATA_DIR/admin.token");
      break;
    }
    parser.body_limit(options.max_body_bytes);  // a chunked body is held to it as it comes
    const auto length = parser.content_length();
    if (length && *length > options.max_body_bytes) {
      refuse(http::status::payload_too_large, "request body over " + std::to_string(options.max_body_bytes) + " bytes");
      break;
    }
    if (parser.get()[http::field::expect] == "100-continue") {  // curl waits a second for this
      http::response<http::empty_body> go_on{http::status::continue_, 11};
      SetDeadline(fd, timeout);
      http::write(socket, go_on, ec);
      if (ec) break;
    }
    // The body at a mebibyte a second at least, after the usual grace.
    SetDeadline(fd, timeout + std::chrono::seconds(length.value_or(0) >> 20));
    http::read(socket, buffer, parser, ec);
    if (ec == http::error::body_limit) {
      refuse(http::status::payload_too_large, "request body over " + std::to_string(options.max_body_bytes) + " bytes");
      break;
    }
    if (ec && malformed(ec)) {
      refuse(http::status::bad_request, "malformed HTTP request: " + ec.message());
      break;
    }
    if (ec) break;
    SetDeadline(fd, Clock::duration::max());  // handling may wait for the trainer (an evaluation)
    const auto& req = parser.get();
    Reply r = Handle(req);
    if (r.stream) {
      Stream(socket, fd, timeout, req.version(), r, ForLog(req));
      break;
    }
    // One line per request that changes something or fails; reads stay quiet below debug. Bodies
    // are not logged (they may hold held-out text); the Authorization header never is.
    const std::string what = ForLog(req);
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
    SetDeadline(fd, timeout);  // a client that does not take its answer is closed
    http::write(socket, res, ec);
    if (ec || !req.keep_alive() || stopping) break;
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    deadlines.erase(fd);
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
  if (Status st = Listen(impl->acceptor, options.listen, "the admin API", &impl->port, &impl->address); !st.ok())
    return st;
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
      p->SetDeadline(socket.native_handle(), Clock::duration::max());
      std::thread([p, s = std::move(socket)]() mutable { p->Serve(std::move(s)); }).detach();
    }
  });
  impl->watchdog_thread = std::thread([p = impl.get()] { p->Watchdog(); });
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
  impl_->watchdog_wake.notify_all();
  impl_->watchdog_thread.join();
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    for (const auto& [fd, deadline] : impl_->deadlines) ::shutdown(fd, SHUT_RDWR);
  }
  // Connection threads end once their socket is shut down (a request in progress finishes first:
  // one waiting for the trainer gives up after LoopOptions::trainer_wait_seconds).
  const auto said_at = Clock::now() + std::chrono::seconds(5);
  bool said = false;
  while (impl_->active > 0) {
    if (!said && Clock::now() > said_at) {
      spdlog::warn("stopping: waiting for {} admin requests in progress to finish", impl_->active.load());
      said = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

uint16_t AdminServer::port() const { return impl_->port; }
const std::string& AdminServer::address() const { return impl_->address; }

}  // namespace peerd
