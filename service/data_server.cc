#include "service/data_server.h"

#include <boost/asio.hpp>

#include <deque>
#include <mutex>

#include "proto/frame.h"
#include "proto/wire.pb.h"
#include "service/listen.h"
#include "service/token.h"

namespace peerd {

namespace asio = boost::asio;
using asio::ip::tcp;

Status ParseHostPort(const std::string& text, std::string* host, uint16_t* port) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size())
    return Status::InvalidArgument("'" + text + "' is not HOST:PORT (e.g. 127.0.0.1:7070)");
  try {
    size_t used = 0;
    unsigned long p = std::stoul(text.substr(colon + 1), &used);
    if (used != text.size() - colon - 1 || p > 65535) throw std::out_of_range("port");
    *host = text.substr(0, colon);
    *port = static_cast<uint16_t>(p);
  } catch (const std::exception&) {
    return Status::InvalidArgument("'" + text + "' has no valid port (0-65535)");
  }
  return Status::OK();
}

// The spool's writer thread hands results back to the I/O thread through this; once the server
// stops, nothing more is posted (the io_context may be gone by the time a late result arrives).
struct Mailbox {
  std::mutex mu;
  bool open = true;
};

struct DataServer::Impl {
  asio::io_context io;
  std::shared_ptr<Mailbox> mailbox = std::make_shared<Mailbox>();
  uint16_t port = 0;
  tcp::acceptor acceptor{io};
  Spool* spool = nullptr;
  DataServerOptions options;
  std::thread thread;
  std::atomic<uint64_t> connections{0}, documents{0}, bytes{0}, acks{0}, errors{0};
  // Bytes handed to the spool, not yet durable, over all connections. Shared, so that a
  // connection destroyed with the io_context can still give its share back.
  std::shared_ptr<std::atomic<uint64_t>> inflight = std::make_shared<std::atomic<uint64_t>>(0);

  void Accept();
};

namespace {

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, DataServer::Impl* server)
      : socket_(std::move(socket)), server_(server), inflight_total_(server->inflight) {}
  // A connection that goes away before its documents were durable gives back their share.
  ~Connection() { *inflight_total_ -= inflight_; }
  void Start() { ReadHeader(); }

 private:
  void ReadHeader() {
    asio::async_read(socket_, asio::buffer(header_), [self = shared_from_this()](auto ec, size_t) {
      if (ec) return self->Close();
      const uint32_t n = wire::DecodeLength(self->header_);
      const uint64_t limit = self->server_->options.max_document_bytes + 4096;
      if (n == 0 || n > limit)
        return self->Fail(ErrorReply::BAD_FRAME, "frame of " + std::to_string(n) + " bytes: frames must be 1 to " +
                                                     std::to_string(limit) + " bytes (documents up to " +
                                                     std::to_string(self->server_->options.max_document_bytes) + ")");
      self->body_.resize(n);
      asio::async_read(self->socket_, asio::buffer(self->body_), [self](auto ec2, size_t) {
        if (ec2) return self->Close();
        self->OnFrame();
      });
    });
  }

  void OnFrame() {
    ClientFrame frame;
    if (!frame.ParseFromString(body_)) return Fail(ErrorReply::BAD_FRAME, "frame is not a peerd.ClientFrame");
    if (frame.has_hello()) return OnHello(frame.hello());
    if (frame.has_document()) return OnDocument(*frame.mutable_document());
    Fail(ErrorReply::BAD_FRAME, "frame carries neither a hello nor a document (newer client?)");
  }

  void OnHello(const Hello& hello) {
    if (!task_.empty()) return Fail(ErrorReply::BAD_HELLO, "hello sent twice on one stream");
    if (hello.protocol_version() != wire::kProtocolVersion)
      return Fail(ErrorReply::BAD_HELLO, "protocol version " + std::to_string(hello.protocol_version()) +
                                             " is not spoken here (peerd speaks " +
                                             std::to_string(wire::kProtocolVersion) + ")");
    if (!ConstantTimeEquals(hello.token(), server_->options.token))
      return Fail(ErrorReply::UNAUTHENTICATED, "wrong data token: use the one in the data directory's data.token");
    if (!wire::ValidTaskName(hello.task()))
      return Fail(ErrorReply::BAD_HELLO, "task name must be 1-64 characters of A-Z a-z 0-9 _ . -");
    task_ = hello.task();
    ServerFrame reply;
    reply.mutable_hello()->set_protocol_version(wire::kProtocolVersion);
    reply.mutable_hello()->set_max_document_bytes(server_->options.max_document_bytes);
    reply.mutable_hello()->set_max_frame_bytes(server_->options.max_document_bytes + 4096);
    Send(wire::EncodeFrame(reply));
    ReadWhenAllowed();
  }

  void OnDocument(Document& doc) {
    if (task_.empty()) return Fail(ErrorReply::BAD_HELLO, "a stream must open with a hello");
    if (doc.seq() != last_seq_ + 1)
      return Fail(ErrorReply::BAD_DOCUMENT, "document seq " + std::to_string(doc.seq()) + " after " +
                                                std::to_string(last_seq_) + ": seq must count up by one from 1");
    if (doc.id().empty()) return Fail(ErrorReply::BAD_DOCUMENT, "document seq " + std::to_string(doc.seq()) + " has no id");
    if (doc.text().empty())
      return Fail(ErrorReply::BAD_DOCUMENT, "document '" + doc.id() + "' is empty: there is nothing to train on");
    if (doc.text().size() > server_->options.max_document_bytes)
      return Fail(ErrorReply::BAD_DOCUMENT, "document '" + doc.id() + "' is over the limit of " +
                                                std::to_string(server_->options.max_document_bytes) + " bytes");
    last_seq_ = doc.seq();
    const uint64_t size = doc.text().size(), seq = doc.seq();
    inflight_ += size;
    *inflight_total_ += size;
    server_->documents++;
    server_->bytes += size;
    std::vector<Spool::NewDocument> docs;
    docs.push_back({std::move(*doc.mutable_id()), std::move(*doc.mutable_text())});
    std::weak_ptr<Connection> weak = shared_from_this();
    server_->spool->Append(task_, std::move(docs),
                           [weak, mailbox = server_->mailbox, io = &server_->io, seq, size](const Status& st, uint64_t dups) {
                             std::lock_guard<std::mutex> lock(mailbox->mu);
                             if (!mailbox->open) return;
                             if (auto self = weak.lock())
                               asio::post(*io, [self, st, seq, size, dups] { self->OnDurable(st, seq, size, dups); });
                           });
    ReadWhenAllowed();
  }

  // Reads the next frame unless the spool or this connection holds too much not yet trained or
  // not yet durable; then checks again shortly.
  void ReadWhenAllowed() {
    if (closed_) return;
    // What is on its way to the spool counts too: it will be backlog in a moment.
    const bool full =
        server_->spool->stats().backlog_bytes + *inflight_total_ > server_->options.backlog_limit_bytes ||
        inflight_ > server_->options.inflight_limit_bytes;
    if (!full) return ReadHeader();
    auto timer = std::make_shared<asio::steady_timer>(server_->io, std::chrono::milliseconds(20));
    timer->async_wait([self = shared_from_this(), timer](auto) { self->ReadWhenAllowed(); });
  }

  void OnDurable(const Status& st, uint64_t seq, uint64_t size, uint64_t dups) {
    inflight_ -= size;
    *inflight_total_ -= size;
    if (!st.ok()) return Fail(ErrorReply::UNAVAILABLE, st.message() + "; resend after a while");
    duplicates_ += dups;
    acked_ = seq;
    if (ack_queued_) return;  // the queued ack will carry the newest seq
    ack_queued_ = true;
    asio::post(server_->io, [self = shared_from_this()] {
      self->ack_queued_ = false;
      ServerFrame frame;
      frame.mutable_ack()->set_seq(self->acked_);
      frame.mutable_ack()->set_duplicates(self->duplicates_);
      self->server_->acks++;
      self->Send(wire::EncodeFrame(frame));
    });
  }

  void Fail(ErrorReply::Code code, const std::string& message) {
    if (closed_ || failing_) return;
    failing_ = true;
    server_->errors++;
    ServerFrame frame;
    frame.mutable_error()->set_code(code);
    frame.mutable_error()->set_message(message);
    Send(wire::EncodeFrame(frame), /*then_close=*/true);
  }

  void Send(std::string bytes, bool then_close = false) {
    if (closed_) return;
    outbox_.push_back({std::move(bytes), then_close});
    if (outbox_.size() == 1) WriteNext();
  }

  void WriteNext() {
    asio::async_write(socket_, asio::buffer(outbox_.front().first), [self = shared_from_this()](auto ec, size_t) {
      const bool close_after = self->outbox_.front().second;
      self->outbox_.pop_front();
      if (ec || close_after) return self->Close();
      if (!self->outbox_.empty()) self->WriteNext();
    });
  }

  void Close() {
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

  tcp::socket socket_;
  DataServer::Impl* server_;
  unsigned char header_[wire::kHeaderBytes];
  std::string body_;
  std::string task_;
  std::shared_ptr<std::atomic<uint64_t>> inflight_total_;
  uint64_t last_seq_ = 0, acked_ = 0, duplicates_ = 0, inflight_ = 0;
  bool ack_queued_ = false, closed_ = false, failing_ = false;
  std::deque<std::pair<std::string, bool>> outbox_;
};

}  // namespace

void DataServer::Impl::Accept() {
  acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (ec) return;  // acceptor closed
    connections++;
    std::make_shared<Connection>(std::move(socket), this)->Start();
    Accept();
  });
}

DataServer::DataServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DataServer::~DataServer() { Stop(); }

Status DataServer::Start(Spool* spool, const DataServerOptions& options, std::unique_ptr<DataServer>* out) {
  auto impl = std::make_unique<Impl>();
  impl->spool = spool;
  impl->options = options;
  if (Status st = Listen(impl->acceptor, options.listen, "the data port", &impl->port); !st.ok()) return st;
  impl->Accept();
  impl->thread = std::thread([p = impl.get()] { p->io.run(); });
  out->reset(new DataServer(std::move(impl)));
  return Status::OK();
}

void DataServer::Stop() {
  if (!impl_ || !impl_->thread.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mailbox->mu);
    impl_->mailbox->open = false;
  }
  asio::post(impl_->io, [p = impl_.get()] {
    boost::system::error_code ignored;
    p->acceptor.close(ignored);
  });
  impl_->io.stop();
  impl_->thread.join();
}

uint16_t DataServer::port() const { return impl_->port; }

DataServerStats DataServer::stats() const {
  return {impl_->connections.load(), impl_->documents.load(), impl_->bytes.load(), impl_->acks.load(),
          impl_->errors.load()};
}

}  // namespace peerd
