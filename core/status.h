// Status: the result of an operation that can fail, carried up to the caller instead of thrown
// (after LevelDB's Status). An error carries a kind and a message written for the person who must
// fix it: what was wrong, and what to do. Cheap to copy; header-only and free of LibTorch, so
// every component (experts_store, ingest, service/net) carries the same errors without depending
// on the rest of core.
//
// The error convention of the whole project:
//  - A failure whose cause lies outside the program — input, configuration, the disk, the
//    network, another rank — is a Status, returned from the function that met it and carried up
//    unchanged (or with context added to its message) to whoever can act on it: an admin request
//    answers it as an HTTP error, a program prints it and exits non-zero, the trainer thread shows
//    it in /v1/status.
//  - An exception (c10::Error, from TORCH_CHECK) is for two cases only: a broken invariant inside
//    the code (a bug: the message says what was expected), and a failure inside code that LibTorch
//    calls back — a module's forward, an autograd function's backward — which has no way to return
//    a Status. A frozen row that cannot be read from the store in cached residency is the one
//    outside cause of the second kind: ExpertSegmentImpl::Rows throws it with the store's Status
//    in the message. LibTorch itself throws too (a failed allocation).
//  - Where a LibTorch call throws for an outside cause (c10d when a peer is gone, torch::load on a
//    damaged archive), the caller catches it right there and returns a Status
//    (core/collective.cc, service/checkpoint.cc).
//  - Other exceptions stop at two boundaries, each of which turns them into a reported error: the
//    trainer thread (TrainingLoop::Run: training stops with training_error, peerd keeps serving)
//    and the admin server's request handler (an operation that throws, on its own thread or on
//    the trainer's, whence RunOnTrainer hands the exception back, is answered 500 with its
//    message). Anywhere else an exception is a bug, and it ends the program.
#pragma once

#include <string>
#include <utility>

namespace peerd {

class Status {
 public:
  enum class Code { kOk, kInvalidArgument, kNotFound, kCorruption, kIOError, kFailedPrecondition, kUnavailable };

  Status() = default;
  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string msg) { return {Code::kInvalidArgument, std::move(msg)}; }
  static Status NotFound(std::string msg) { return {Code::kNotFound, std::move(msg)}; }
  static Status Corruption(std::string msg) { return {Code::kCorruption, std::move(msg)}; }
  static Status IOError(std::string msg) { return {Code::kIOError, std::move(msg)}; }
  static Status FailedPrecondition(std::string msg) { return {Code::kFailedPrecondition, std::move(msg)}; }
  // Busy for now, nothing done: the same request may succeed when tried again.
  static Status Unavailable(std::string msg) { return {Code::kUnavailable, std::move(msg)}; }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  Status(Code code, std::string msg) : code_(code), message_(std::move(msg)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

inline std::string Status::ToString() const {
  switch (code_) {
    case Code::kOk: return "OK";
    case Code::kInvalidArgument: return "invalid argument: " + message_;
    case Code::kNotFound: return "not found: " + message_;
    case Code::kCorruption: return "corruption: " + message_;
    case Code::kIOError: return "I/O error: " + message_;
    case Code::kFailedPrecondition: return "failed precondition: " + message_;
    case Code::kUnavailable: return "unavailable: " + message_;
  }
  return message_;
}

}  // namespace peerd
