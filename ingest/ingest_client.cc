#include "ingest/ingest_client.h"

#include <poll.h>

#include <boost/asio.hpp>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "core/host_port.h"
#include "proto/frame.h"
#include "proto/wire.pb.h"

namespace peerd {

namespace asio = boost::asio;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

// Errors a client cannot cure by reconnecting (all but a busy or timed-out server).
bool FatalCode(ErrorReply::Code c) { return c != ErrorReply::UNAVAILABLE && c != ErrorReply::TIMEOUT; }

// peerd's replies (hello, acks, errors with clipped messages) are small: a longer length is not a
// peerd frame, and is refused before anything is allocated for it.
constexpr uint32_t kMaxServerFrameBytes = 1 << 20;

struct Pending {
  uint64_t seq;
  IngestDocument doc;
};

// One connection: a socket, the hello exchange, and a thread that reads acks.
class Stream {
 public:
  Stream(asio::io_context& io) : socket_(io) {}
  ~Stream() {
    Shutdown();
    boost::system::error_code ignored;
    socket_.close(ignored);
  }

  // Connects and says hello. A refusal by the server (token, version) is fatal: *fatal = true.
  Status Open(const std::string& host, uint16_t port, const IngestOptions& o, bool* fatal) {
    *fatal = false;
    boost::system::error_code ec;
    tcp::resolver resolver(socket_.get_executor());
    auto endpoints = resolver.resolve(host, std::to_string(port), ec);
    if (!ec) asio::connect(socket_, endpoints, ec);
    if (ec) return Status::IOError("cannot connect to " + host + ":" + std::to_string(port) + ": " + ec.message());
    ClientFrame hello;
    hello.mutable_hello()->set_protocol_version(wire::kProtocolVersion);
    hello.mutable_hello()->set_token(o.token);
    hello.mutable_hello()->set_task(o.task);
    hello.mutable_hello()->set_client(o.client_name);
    if (Status st = Write(wire::EncodeFrame(hello)); !st.ok()) return st;
    // Whatever answers must answer the hello soon: a silent peer (another service's port, the
    // admin API waiting for the rest of an HTTP request) would otherwise hold us here for ever.
    const std::string where = host + ":" + std::to_string(port);
    pollfd readable{socket_.native_handle(), POLLIN, 0};
    if (::poll(&readable, 1, o.hello_timeout_ms) == 0) {
      *fatal = true;
      return Status::IOError("no answer to the hello from " + where + " within " + std::to_string(o.hello_timeout_ms) +
                             " ms: is it peerd's data port (--data-listen; the admin API is another port)?");
    }
    ServerFrame reply;
    if (Status st = Read(&reply); !st.ok()) {
      *fatal = not_peerd_;
      return not_peerd_
                 ? Status::InvalidArgument(st.message() + " from " + where +
                                           ": is it peerd's data port (--data-listen; the admin API is another port)?")
                 : st;
    }
    if (reply.has_error()) {
      *fatal = FatalCode(reply.error().code());
      return Status::InvalidArgument("server refused the stream: " + reply.error().message());
    }
    if (!reply.has_hello()) return Status::IOError("server did not answer the hello");
    max_document_bytes_ = reply.hello().max_document_bytes();
    return Status::OK();
  }

  Status Write(const std::string& bytes) {
    boost::system::error_code ec;
    asio::write(socket_, asio::buffer(bytes), ec);
    return ec ? Status::IOError("connection lost while sending: " + ec.message()) : Status::OK();
  }

  Status Read(ServerFrame* frame) {
    unsigned char header[wire::kHeaderBytes];
    boost::system::error_code ec;
    asio::read(socket_, asio::buffer(header), ec);
    if (ec) return Status::IOError("connection lost: " + ec.message());
    const uint32_t length = wire::DecodeLength(header);
    if (length > kMaxServerFrameBytes) {
      not_peerd_ = true;
      const bool http = std::string(reinterpret_cast<const char*>(header), sizeof header) == "HTTP";
      return Status::IOError(http ? "an HTTP answer, not a peerd frame"
                                  : "a frame of " + std::to_string(length) + " bytes announced, more than peerd sends");
    }
    std::string body(length, '\0');
    asio::read(socket_, asio::buffer(body), ec);
    if (ec) return Status::IOError("connection lost: " + ec.message());
    if (!frame->ParseFromString(body)) {
      not_peerd_ = true;
      return Status::IOError("an unreadable frame");
    }
    return Status::OK();
  }

  // Ends the connection: a Read blocked on another thread returns with an error. The socket is
  // closed by the destructor, once that thread is joined: closing it under a blocked read would
  // free the descriptor for the next connection while the read may still use it.
  void Shutdown() {
    boost::system::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
  }

  uint64_t max_document_bytes() const { return max_document_bytes_; }

 private:
  tcp::socket socket_;
  uint64_t max_document_bytes_ = 0;
  bool not_peerd_ = false;  // what came back cannot be peerd's
};

}  // namespace

Status IngestClient::Run(DocumentSource& source, IngestProgress* progress,
                         const std::function<void(const IngestProgress&)>& on_progress) {
  *progress = IngestProgress();
  const auto start = Clock::now();
  std::string host;
  uint16_t port = 0;
  if (Status st = ParseHostPort(options_.server, &host, &port); !st.ok())
    return Status::InvalidArgument("--server: " + st.message());

  // Acked ids of earlier runs, and the file that records this run's.
  std::unordered_set<std::string> acked_before;
  std::ofstream resume;
  if (!options_.resume_path.empty()) {
    std::ifstream in(options_.resume_path);
    for (std::string line; std::getline(in, line);) acked_before.insert(line);
    resume.open(options_.resume_path, std::ios::app);
    if (!resume) return Status::IOError("cannot write the resume file '" + options_.resume_path + "'");
  }

  std::mutex mu;
  std::condition_variable cv;
  std::deque<Pending> unacked;  // in seq order
  uint64_t unacked_bytes = 0;
  Status stream_error;  // set by the reader when the stream ends
  bool stream_fatal = false, stream_dead = true;

  asio::io_context io;
  std::unique_ptr<Stream> stream;
  std::thread reader;
  uint64_t next_seq = 1;
  int failures_in_a_row = 0;

  auto stop_stream = [&] {
    if (stream) stream->Shutdown();
    if (reader.joinable()) reader.join();
    stream.reset();  // closes the socket
  };
  // (Re)connects and resends every unacked document, renumbered from 1.
  bool connected_before = false;
  auto connect = [&]() -> Status {
    if (connected_before) progress->reconnects++;
    connected_before = true;
    for (;;) {
      stop_stream();
      stream = std::make_unique<Stream>(io);
      bool fatal = false;
      Status st = stream->Open(host, port, options_, &fatal);
      if (st.ok()) {
        std::unique_lock<std::mutex> lock(mu);
        stream_dead = false;
        stream_fatal = false;
        stream_error = Status::OK();
        next_seq = 1;
        for (Pending& p : unacked) p.seq = next_seq++;
        reader = std::thread([&, s = stream.get()] {
          for (;;) {
            ServerFrame frame;
            Status rs = s->Read(&frame);
            std::lock_guard<std::mutex> guard(mu);
            if (!rs.ok() || frame.has_error()) {
              stream_dead = true;
              stream_error = rs.ok() ? Status::IOError("server: " + frame.error().message()) : rs;
              stream_fatal = frame.has_error() && FatalCode(frame.error().code());
              cv.notify_all();
              return;
            }
            if (!frame.has_ack()) continue;
            progress->duplicates = frame.ack().duplicates();  // per stream; good enough for a summary
            while (!unacked.empty() && unacked.front().seq <= frame.ack().seq()) {
              progress->acked_documents++;
              progress->acked_bytes += unacked.front().doc.text.size();
              unacked_bytes -= unacked.front().doc.text.size();
              if (resume.is_open()) resume << unacked.front().doc.id << '\n';
              unacked.pop_front();
            }
            if (resume.is_open()) resume.flush();
            failures_in_a_row = 0;
            cv.notify_all();
          }
        });
        std::vector<std::string> frames;
        for (const Pending& p : unacked) {
          ClientFrame f;
          f.mutable_document()->set_seq(p.seq);
          f.mutable_document()->set_id(p.doc.id);
          f.mutable_document()->set_text(p.doc.text);
          frames.push_back(wire::EncodeFrame(f));
        }
        lock.unlock();
        for (const auto& f : frames) stream->Write(f);  // a failure shows up in the reader
        return Status::OK();
      }
      if (fatal) return st;
      if (++failures_in_a_row > options_.max_reconnects)
        return Status::IOError(st.message() + " (gave up after " + std::to_string(options_.max_reconnects) + " tries)");
      std::this_thread::sleep_for(std::chrono::milliseconds(std::min(5000, 100 << std::min(failures_in_a_row, 6))));
    }
  };

  // Waits (holding `lock` on mu) until ready(); a dead stream is reconnected meanwhile, and a
  // refusal by the server ends the run.
  auto wait_until = [&](const std::function<bool()>& ready, std::unique_lock<std::mutex>& lock) -> Status {
    for (;;) {
      if (stream_dead) {
        if (stream_fatal) return stream_error;
        lock.unlock();
        Status c = connect();
        lock.lock();
        if (!c.ok()) return c;
        continue;
      }
      if (ready()) return Status::OK();
      cv.wait_for(lock, std::chrono::milliseconds(200));
    }
  };

  Status st = connect();
  if (!st.ok()) return st;
  // A followed file may stay quiet for hours: a stream lost meanwhile (peerd restarted) is
  // re-opened, and its unacked documents resent, without waiting for the next document.
  Status waiting_error;
  source.WhileWaiting([&] {
    std::unique_lock<std::mutex> lock(mu);
    waiting_error = wait_until([] { return true; }, lock);
    return waiting_error.ok();
  });
  IngestDocument doc;
  auto last_report = Clock::now();
  while (source.Next(&doc)) {
    if (acked_before.count(doc.id)) {
      progress->resumed++;
      continue;
    }
    if (stream->max_document_bytes() && doc.text.size() > stream->max_document_bytes())
      return Status::InvalidArgument(
          "document '" + doc.id + "' is " + std::to_string(doc.text.size()) + " bytes, over the server's limit of " +
          std::to_string(stream->max_document_bytes()) + ": split it smaller (--split line or bytes:N)");
    std::unique_lock<std::mutex> lock(mu);
    if (Status st = wait_until(
            [&] { return unacked_bytes + doc.text.size() <= options_.window_bytes || unacked.empty(); }, lock);
        !st.ok())
      return st;
    Pending p{next_seq++, doc};
    ClientFrame f;
    f.mutable_document()->set_seq(p.seq);
    f.mutable_document()->set_id(p.doc.id);
    f.mutable_document()->set_text(p.doc.text);
    unacked_bytes += p.doc.text.size();
    unacked.push_back(std::move(p));
    progress->sent_documents++;
    progress->sent_bytes += doc.text.size();
    lock.unlock();
    stream->Write(wire::EncodeFrame(f));  // a failure shows up in the reader
    if (on_progress && Clock::now() - last_report > std::chrono::milliseconds(500)) {
      progress->seconds = std::chrono::duration<double>(Clock::now() - start).count();
      on_progress(*progress);
      last_report = Clock::now();
    }
  }
  source.WhileWaiting({});
  if (!waiting_error.ok() || !source.status().ok()) {
    stop_stream();
    return !waiting_error.ok() ? waiting_error : source.status();
  }
  // Wait for the last acks, reconnecting as needed.
  std::unique_lock<std::mutex> lock(mu);
  if (Status st = wait_until([&] { return unacked.empty(); }, lock); !st.ok()) return st;
  lock.unlock();
  stop_stream();
  progress->seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (on_progress) on_progress(*progress);
  return Status::OK();
}

}  // namespace peerd
