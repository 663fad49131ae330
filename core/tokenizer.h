// ByteTokenizer: text as UTF-8 bytes, one token per byte, plus an end-of-document token.
// It never meets an unknown symbol, whatever language or code streams in, and a loss per token
// converts directly to bits per byte. No LibTorch; stateless and thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace peerd {

class ByteTokenizer {
 public:
  static constexpr int kEndOfDocument = 256;
  static constexpr int kVocabSize = 257;

  // One token per byte; `end_of_document` appends kEndOfDocument.
  static std::vector<int64_t> Encode(std::string_view text, bool end_of_document = false);
  // Bytes back to text; kEndOfDocument becomes '\n', anything else out of range is dropped.
  static std::string Decode(const std::vector<int64_t>& tokens);
};

}  // namespace peerd
