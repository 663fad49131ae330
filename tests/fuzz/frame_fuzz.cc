// libFuzzer target for the data port's decoder (service/net/data_protocol.h): any byte stream, cut
// into frames by its length prefixes as peerd's connection does, must give accepted frames that
// obey the stream's rules or an ErrorReply that ends the stream — never a crash, a leak or
// undefined behaviour (built with -fsanitize=fuzzer,address,undefined; tests/fuzz/CMakeLists.txt).
// The seeds (tests/fuzz/corpus/frame/) open with a hello carrying kToken, so documents get fuzzed.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "proto/frame.h"
#include "service/net/data_protocol.h"

namespace {

const std::string kToken = "fuzz-token";

void Check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  peerd::DataLimits limits;
  limits.max_document_bytes = 1 << 16;
  peerd::DataStream stream(&kToken, limits);
  size_t at = 0;
  std::string body;
  while (size - at >= peerd::wire::kHeaderBytes) {
    const uint32_t length = peerd::wire::DecodeLength(data + at);
    at += peerd::wire::kHeaderBytes;
    if (auto error = stream.CheckLength(length)) {
      Check(error->code() == peerd::ErrorReply::BAD_FRAME && !error->message().empty());
      return 0;
    }
    Check(length >= 1 && length <= stream.max_frame_bytes());
    if (size - at < length) return 0;  // the peer hung up mid-frame
    body.assign(reinterpret_cast<const char*>(data + at), length);
    at += length;
    const uint64_t seq_before = stream.last_seq();
    peerd::DataStream::Step step = stream.OnFrame(body);
    if (step.error) {
      Check(step.error->code() != peerd::ErrorReply::CODE_UNSPECIFIED && !step.error->message().empty());
      return 0;
    }
    if (step.hello) {
      Check(stream.authenticated() && peerd::wire::ValidTaskName(stream.task()));
      Check(stream.hello_reply().hello().max_document_bytes() == limits.max_document_bytes);
    } else {
      Check(step.document.has_value() && stream.authenticated());
      const peerd::Document& d = *step.document;
      Check(d.seq() == seq_before + 1 && stream.last_seq() == d.seq());
      Check(!d.id().empty() && !d.text().empty() && d.text().size() <= limits.max_document_bytes);
    }
  }
  return 0;
}
