#include "service/net/data_server.h"

#include <boost/asio.hpp>

#include <deque>
#include <mutex>

#include "proto/frame.h"
#include "proto/wire.pb.h"
#include "service/net/data_protocol.h"
#include "service/net/listen.h"

namespace peerd {

namespace asio = boost::asio;
using asio::ip::tcp;

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
  std::string address;  // as bound: "127.0.0.1:7070", "[::1]:7070"
  tcp::acceptor acceptor{io};
  Spool* spool = nullptr;
  DataServerOptions options;
  std::thread thread;
  std::atomic<uint64_t> connections{0}, documents{0}, bytes{0}, acks{0}, errors{0};
  std::atomic<uint64_t> open_connections{0}, refused_connections{0}, timeouts{0};
  // Bytes handed to the spool, not yet durable, over all connections. Shared, so that a
  // connection destroyed with the io_context can still give its share back.
  std::shared_ptr<std::atomic<uint64_t>> inflight = std::make_shared<std::atomic<uint64_t>>(0);

  void Accept();
};

namespace {

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, DataServer::Impl* server)
      : socket_(std::move(socket)),
        server_(server),
        stream_(&server->options.token, {server->options.max_document_bytes}),
        inflight_total_(server->inflight),
        read_timer_(server->io),
        write_timer_(server->io) {
    server_->open_connections++;
  }
  // A connection that goes away before its documents were durable gives back their share.
  ~Connection() {
    *inflight_total_ -= inflight_;
    server_->open_connections--;
  }
  void Start() { ReadHeader(); }
  // Refuses a connection over the limit: says why, then closes.
  void Refuse(const std::string& why) { Fail(MakeError(ErrorReply::UNAVAILABLE, why)); }

 private:
  // The next frame must arrive within the hello timeout (before the hello) or the idle timeout.
  void ArmReadTimer() {
    const uint32_t ms = stream_.authenticated() ? server_->options.idle_timeout_ms : server_->options.hello_timeout_ms;
    read_timer_.expires_after(std::chrono::milliseconds(ms));
    read_timer_.async_wait([self = shared_from_this(), ms](boost::system::error_code ec) {
      if (ec) return;  // cancelled: the frame came
      self->server_->timeouts++;
      self->Fail(MakeError(ErrorReply::TIMEOUT, std::string(self->stream_.authenticated() ? "no frame" : "no hello") +
                                                    " for " + std::to_string(ms) + " ms: closing the stream"));
    });
  }

  void ReadHeader() {
    ArmReadTimer();
    asio::async_read(socket_, asio::buffer(header_), [self = shared_from_this()](auto ec, size_t) {
      if (ec) return self->Close();
      if (self->failing_) return;  // the error on its way out closes the connection
      if (auto error = self->stream_.CheckLength(wire::DecodeLength(self->header_))) return self->Fail(*error);
      self->body_.resize(wire::DecodeLength(self->header_));
      asio::async_read(self->socket_, asio::buffer(self->body_), [self](auto ec2, size_t) {
        if (ec2) return self->Close();
        if (self->failing_) return;
        self->read_timer_.cancel();
        self->OnFrame();
      });
    });
  }

  void OnFrame() {
    DataStream::Step step = stream_.OnFrame(body_);
    if (step.error) return Fail(*step.error);
    if (step.hello) {
      Send(wire::EncodeFrame(stream_.hello_reply()));
      return ReadWhenAllowed();
    }
    Document& doc = *step.document;
    const uint64_t size = doc.text().size(), seq = doc.seq();
    inflight_ += size;
    *inflight_total_ += size;
    server_->documents++;
    server_->bytes += size;
    std::vector<Spool::NewDocument> docs;
    docs.push_back({std::move(*doc.mutable_id()), std::move(*doc.mutable_text())});
    std::weak_ptr<Connection> weak = shared_from_this();
    server_->spool->Append(
        stream_.task(), std::move(docs),
        [weak, mailbox = server_->mailbox, io = &server_->io, seq, size](const Status& st, uint64_t dups) {
          std::lock_guard<std::mutex> lock(mailbox->mu);
          if (!mailbox->open) return;
          if (auto self = weak.lock())
            asio::post(*io, [self, st, seq, size, dups] { self->OnDurable(st, seq, size, dups); });
        });
    ReadWhenAllowed();
  }

  // Reads the next frame unless the spool or this connection holds too much not yet trained or
  // not yet durable; then checks again shortly. Waiting here is peerd's doing, so no timer runs.
  void ReadWhenAllowed() {
    if (closed_) return;
    // What is on its way to the spool counts too: it will be backlog in a moment.
    const bool full = server_->spool->stats().backlog_bytes + *inflight_total_ > server_->options.backlog_limit_bytes ||
                      inflight_ > server_->options.inflight_limit_bytes;
    if (!full) return ReadHeader();
    auto timer = std::make_shared<asio::steady_timer>(server_->io, std::chrono::milliseconds(20));
    timer->async_wait([self = shared_from_this(), timer](auto) { self->ReadWhenAllowed(); });
  }

  void OnDurable(const Status& st, uint64_t seq, uint64_t size, uint64_t dups) {
    inflight_ -= size;
    *inflight_total_ -= size;
    if (!st.ok()) return Fail(MakeError(ErrorReply::UNAVAILABLE, st.message() + "; resend after a while"));
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
      self->Send(wire::EncodeFrame(frame), /*then_close=*/false, /*is_ack=*/true);
    });
  }

  void Fail(const ErrorReply& error) {
    if (closed_ || failing_) return;
    failing_ = true;
    server_->errors++;
    read_timer_.cancel();
    ServerFrame frame;
    *frame.mutable_error() = error;
    Send(wire::EncodeFrame(frame), /*then_close=*/true);
  }

  // Acks are cumulative: an ack still waiting behind a blocked write is replaced by a newer one,
  // so a client that does not read costs one queued ack, not one per document.
  void Send(std::string bytes, bool then_close = false, bool is_ack = false) {
    if (closed_) return;
    if (is_ack && outbox_.size() > 1 && outbox_.back().is_ack) {
      outbox_.back().bytes = std::move(bytes);
      return;
    }
    outbox_.push_back({std::move(bytes), then_close, is_ack});
    if (outbox_.size() == 1) WriteNext();
  }

  void WriteNext() {
    // A write the client does not take for the idle timeout ends the connection.
    write_timer_.expires_after(std::chrono::milliseconds(server_->options.idle_timeout_ms));
    write_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec) return;
      self->server_->timeouts++;
      self->Close();
    });
    asio::async_write(socket_, asio::buffer(outbox_.front().bytes), [self = shared_from_this()](auto ec, size_t) {
      self->write_timer_.cancel();
      if (self->outbox_.empty()) return;  // closed meanwhile
      const bool close_after = self->outbox_.front().then_close;
      self->outbox_.pop_front();
      if (ec || close_after) return self->Close();
      if (!self->outbox_.empty()) self->WriteNext();
    });
  }

  void Close() {
    if (closed_) return;
    closed_ = true;
    read_timer_.cancel();
    write_timer_.cancel();
    boost::system::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

  struct Outgoing {
    std::string bytes;
    bool then_close = false, is_ack = false;
  };

  tcp::socket socket_;
  DataServer::Impl* server_;
  DataStream stream_;
  unsigned char header_[wire::kHeaderBytes];
  std::string body_;
  std::shared_ptr<std::atomic<uint64_t>> inflight_total_;
  asio::steady_timer read_timer_, write_timer_;
  uint64_t acked_ = 0, duplicates_ = 0, inflight_ = 0;
  bool ack_queued_ = false, closed_ = false, failing_ = false;
  std::deque<Outgoing> outbox_;
};

}  // namespace

void DataServer::Impl::Accept() {
  acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (ec) return;  // acceptor closed
    connections++;
    auto connection = std::make_shared<Connection>(std::move(socket), this);
    if (open_connections > static_cast<uint64_t>(options.max_connections)) {
      refused_connections++;
      connection->Refuse("peerd serves at most " + std::to_string(options.max_connections) +
                         " data connections at once: retry later");
    } else {
      connection->Start();
    }
    Accept();
  });
}

DataServer::DataServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DataServer::~DataServer() { Stop(); }

Status DataServer::Start(Spool* spool, const DataServerOptions& options, std::unique_ptr<DataServer>* out) {
  auto impl = std::make_unique<Impl>();
  impl->spool = spool;
  impl->options = options;
  if (Status st = Listen(impl->acceptor, options.listen, "the data port", &impl->port, &impl->address); !st.ok())
    return st;
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
const std::string& DataServer::address() const { return impl_->address; }

DataServerStats DataServer::stats() const {
  DataServerStats s;
  s.connections = impl_->connections;
  s.documents = impl_->documents;
  s.bytes = impl_->bytes;
  s.acks = impl_->acks;
  s.errors = impl_->errors;
  s.open_connections = impl_->open_connections;
  s.refused_connections = impl_->refused_connections;
  s.timeouts = impl_->timeouts;
  return s;
}

}  // namespace peerd
