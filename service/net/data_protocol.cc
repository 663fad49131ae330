#include "service/net/data_protocol.h"

#include "proto/frame.h"
#include "service/net/token.h"

namespace peerd {

ErrorReply MakeError(ErrorReply::Code code, std::string message) {
  ErrorReply e;
  e.set_code(code);
  e.set_message(std::move(message));
  return e;
}

std::optional<ErrorReply> DataStream::CheckLength(uint32_t length) const {
  const uint64_t limit = max_frame_bytes();
  if (length > 0 && length <= limit) return std::nullopt;
  if (!authenticated())
    return MakeError(ErrorReply::BAD_FRAME, "frame of " + std::to_string(length) +
                                                " bytes before the hello: a stream opens with a hello frame of 1 to " +
                                                std::to_string(limit) + " bytes");
  return MakeError(ErrorReply::BAD_FRAME, "frame of " + std::to_string(length) + " bytes: frames must be 1 to " +
                                              std::to_string(limit) + " bytes (documents up to " +
                                              std::to_string(limits_.max_document_bytes) + ")");
}

namespace {

DataStream::Step Refuse(ErrorReply::Code code, std::string message) {
  DataStream::Step step;
  step.error = MakeError(code, std::move(message));
  return step;
}

}  // namespace

DataStream::Step DataStream::OnFrame(const std::string& body) {
  ClientFrame frame;
  if (!frame.ParseFromString(body)) return Refuse(ErrorReply::BAD_FRAME, "frame is not a peerd.ClientFrame");
  if (frame.has_hello()) return OnHello(frame.hello());
  if (frame.has_document()) return OnDocument(frame.mutable_document());
  return Refuse(ErrorReply::BAD_FRAME, "frame carries neither a hello nor a document (newer client?)");
}

DataStream::Step DataStream::OnHello(const Hello& hello) {
  if (authenticated()) return Refuse(ErrorReply::BAD_HELLO, "hello sent twice on one stream");
  if (hello.protocol_version() != wire::kProtocolVersion)
    return Refuse(ErrorReply::BAD_HELLO, "protocol version " + std::to_string(hello.protocol_version()) +
                                             " is not spoken here (peerd speaks " +
                                             std::to_string(wire::kProtocolVersion) + ")");
  if (!ConstantTimeEquals(hello.token(), *token_))
    return Refuse(ErrorReply::UNAUTHENTICATED, "wrong data token: use the one in the data directory's data.token");
  if (!wire::ValidTaskName(hello.task()))
    return Refuse(ErrorReply::BAD_HELLO, "task name must be 1-64 characters of A-Z a-z 0-9 _ . -");
  task_ = hello.task();
  Step step;
  step.hello = true;
  return step;
}

DataStream::Step DataStream::OnDocument(Document* doc) {
  if (!authenticated()) return Refuse(ErrorReply::BAD_HELLO, "a stream must open with a hello");
  if (doc->seq() != last_seq_ + 1)
    return Refuse(ErrorReply::BAD_DOCUMENT, "document seq " + std::to_string(doc->seq()) + " after " +
                                                std::to_string(last_seq_) + ": seq must count up by one from 1");
  if (doc->id().empty())
    return Refuse(ErrorReply::BAD_DOCUMENT, "document seq " + std::to_string(doc->seq()) + " has no id");
  if (doc->id().size() > 1024)
    return Refuse(ErrorReply::BAD_DOCUMENT, "document seq " + std::to_string(doc->seq()) + " has an id of " +
                                                std::to_string(doc->id().size()) + " bytes: ids are at most 1024");
  if (doc->text().empty())
    return Refuse(ErrorReply::BAD_DOCUMENT, "document '" + doc->id() + "' is empty: there is nothing to train on");
  if (doc->text().size() > limits_.max_document_bytes)
    return Refuse(ErrorReply::BAD_DOCUMENT, "document '" + doc->id() + "' is over the limit of " +
                                                std::to_string(limits_.max_document_bytes) + " bytes");
  last_seq_ = doc->seq();
  Step step;
  step.document = std::move(*doc);
  return step;
}

ServerFrame DataStream::hello_reply() const {
  ServerFrame reply;
  reply.mutable_hello()->set_protocol_version(wire::kProtocolVersion);
  reply.mutable_hello()->set_max_document_bytes(limits_.max_document_bytes);
  reply.mutable_hello()->set_max_frame_bytes(limits_.max_document_bytes + kFrameOverheadBytes);
  return reply;
}

}  // namespace peerd
