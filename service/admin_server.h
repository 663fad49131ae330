// AdminServer: peerd's admin API over HTTP/1.1 (Boost.Beast). Bodies are protobuf's JSON mapping of
// the messages in proto/admin.proto, so the binary and the JSON API cannot drift. Every request
// needs `Authorization: Bearer <token>`; a missing or wrong one is 401 and changes nothing. Errors
// are {"error": {"code": HTTP status, "message": "..."}}. What each route accepts is parsed and
// checked by service/net/admin_requests.h (torch-free, fuzzed); this file only authenticates, reads
// HTTP within its limits and dispatches.
//
// One thread accepts; each connection is served on its own thread (at most `max_connections`).
// Every phase of a connection has a deadline, kept by one watchdog thread that shuts down a socket
// whose phase ran over (a blocking read or write then fails at once): a request's line and headers
// must arrive within `timeout_seconds` of the connection going idle, its body within that plus a
// second per MiB, and the answer must be taken within `timeout_seconds`. The token is checked on
// the headers, before any body is read: an unauthenticated upload costs nothing but its headers.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "service/net/data_server.h"
#include "service/training_loop.h"

namespace peerd {

struct AdminServerOptions {
  std::string listen = "127.0.0.1:7071";
  std::string token;
  std::vector<std::string> task_roots;  // POST /v1/tasks {"path"} must lie under one of these
  size_t max_body_bytes = 64 << 20;
  int max_connections = 256;
  double timeout_seconds = 30;  // idle or slow request headers, an answer not read
};

class AdminServer {
 public:
  static Status Start(TrainingLoop* loop, const DataServer* data, const AdminServerOptions& options,
                      std::unique_ptr<AdminServer>* out);
  ~AdminServer();
  void Stop();
  uint16_t port() const;
  const std::string& address() const;  // the address and port really bound, e.g. "[::1]:7070"

  struct Impl;

 private:
  explicit AdminServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace peerd
