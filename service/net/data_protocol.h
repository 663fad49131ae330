// DataStream: the data port's rules for one stream (proto/wire.proto), apart from its socket, so
// that every rule is checked in one place and can be fuzzed without a network (tests/fuzz/).
//
// A stream is: Hello, then Documents with seq 1, 2, 3, ... Each frame is a 4-byte big-endian
// length and a serialized ClientFrame. Anything else is refused with an ErrorReply that says what
// was wrong, and the connection closes. Before the hello is accepted a frame may be at most
// kMaxHelloFrameBytes: an unauthenticated peer cannot make peerd allocate a document's worth of
// memory. Document text is bytes: the model is byte-level, so invalid UTF-8 is accepted as it is.
// No LibTorch, no I/O.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "proto/wire.pb.h"

namespace peerd {

struct DataLimits {
  uint64_t max_document_bytes = 8 << 20;
};

// Room for a document's id, seq and framing around its text.
inline constexpr uint64_t kFrameOverheadBytes = 4096;
inline constexpr uint32_t kMaxHelloFrameBytes = 4096;

class DataStream {
 public:
  // `token` is the data token the hello must carry; it must outlive the stream.
  DataStream(const std::string* token, DataLimits limits) : token_(token), limits_(limits) {}

  // What the stream allows as the next frame's length, given what it has seen.
  uint64_t max_frame_bytes() const {
    return authenticated() ? limits_.max_document_bytes + kFrameOverheadBytes : kMaxHelloFrameBytes;
  }
  // The length prefix of the next frame: an error when no frame of that length can come now.
  std::optional<ErrorReply> CheckLength(uint32_t length) const;

  // What one frame asks of the server.
  struct Step {
    std::optional<ErrorReply> error;   // set: refuse, send it, close
    bool hello = false;                // accepted hello: send the HelloReply (hello_reply())
    std::optional<Document> document;  // accepted document: spool it, ack its seq when durable
  };
  // Decodes and checks the body of one frame (its length already passed CheckLength); the step
  // owns what it returns, so `body` may be reused at once.
  Step OnFrame(const std::string& body);

  ServerFrame hello_reply() const;
  bool authenticated() const { return !task_.empty(); }
  const std::string& task() const { return task_; }
  uint64_t last_seq() const { return last_seq_; }

 private:
  Step OnHello(const Hello& hello);
  Step OnDocument(Document* doc);

  const std::string* token_;
  DataLimits limits_;
  std::string task_;  // empty until the hello is accepted
  uint64_t last_seq_ = 0;
};

ErrorReply MakeError(ErrorReply::Code code, std::string message);

}  // namespace peerd
