// IngestClient: streams documents to peerd's data port and waits for them to be acknowledged
// (durable in the spool). Keeps a window of unacknowledged bytes in flight; after a lost
// connection it reconnects with backoff and resends everything not yet acked (the server stores a
// (task, id) once, so a resend is never trained twice). A resume file remembers acked ids, so
// running the same command again sends nothing twice. No LibTorch.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "core/status.h"
#include "ingest/document_source.h"

namespace peerd {

struct IngestOptions {
  std::string server = "127.0.0.1:7070";
  std::string token;
  std::string task;
  std::string client_name = "peer-ingest";
  uint64_t window_bytes = 32 << 20;  // unacknowledged bytes in flight
  int max_reconnects = 20;           // in a row without progress, then give up
  int hello_timeout_ms = 10000;      // no answer to the hello this long: not a peerd data port
  std::string resume_path;           // "" = no resume file
};

struct IngestProgress {
  uint64_t sent_documents = 0, sent_bytes = 0, acked_documents = 0, acked_bytes = 0;
  uint64_t duplicates = 0;  // acked documents the server already had
  uint64_t resumed = 0;     // skipped: acked in an earlier run
  uint64_t reconnects = 0;  // streams re-opened after a lost connection
  double seconds = 0;
};

class IngestClient {
 public:
  explicit IngestClient(IngestOptions options) : options_(std::move(options)) {}
  // Sends every document of `source`; OK only when every one was acknowledged. `on_progress`
  // (optional) is called now and then from the sending thread.
  Status Run(DocumentSource& source, IngestProgress* progress,
             const std::function<void(const IngestProgress&)>& on_progress = nullptr);

 private:
  IngestOptions options_;
};

}  // namespace peerd
