// DataServer: peerd's data port. Clients (peer-ingest) stream documents over TCP in
// length-prefixed protobuf frames (proto/wire.proto); each document goes to the Spool, and the
// client is acked only once the spool has it on disk.
//
// Flow control: a connection stops reading while the spool's unconsumed backlog is above
// `backlog_limit_bytes` or its own not-yet-durable documents are above `inflight_limit_bytes`,
// so a fast client cannot exhaust memory; TCP then pushes back on the client.
// Misbehaving peers cost bounded memory and time: at most `max_connections` at once (more are
// refused with UNAVAILABLE), a hello within `hello_timeout_ms`, then a frame at least every
// `idle_timeout_ms` (time paused by flow control does not count), and a client that does not read
// its acks is closed after `idle_timeout_ms` of a blocked write; its acks coalesce meanwhile.
// The rules of the stream itself live in DataStream (service/net/data_protocol.h).
// One I/O thread serves every connection. Start/Stop are not thread-safe; stats() is.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "core/status.h"
#include "service/net/spool.h"

namespace peerd {

struct DataServerOptions {
  std::string listen = "127.0.0.1:7070";  // host:port; port 0 picks a free one
  std::string token;                      // the hello must carry it
  uint64_t max_document_bytes = 8 << 20;
  uint64_t backlog_limit_bytes = 256 << 20;
  uint64_t inflight_limit_bytes = 16 << 20;
  int max_connections = 256;
  uint32_t hello_timeout_ms = 10'000;
  uint32_t idle_timeout_ms = 300'000;
};

struct DataServerStats {
  uint64_t connections = 0, documents = 0, bytes = 0, acks = 0, errors = 0;
  uint64_t open_connections = 0, refused_connections = 0, timeouts = 0;
};

class DataServer {
 public:
  // Binds and starts serving. An address that cannot be bound is an error naming it.
  static Status Start(Spool* spool, const DataServerOptions& options, std::unique_ptr<DataServer>* out);
  ~DataServer();  // Stop()
  void Stop();
  uint16_t port() const;
  const std::string& address() const;  // the address and port really bound, e.g. "[::1]:7070"
  DataServerStats stats() const;

  struct Impl;

 private:
  explicit DataServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace peerd
