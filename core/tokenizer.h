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

  // One token per byte; `end_of_document` appends kEndOfDocument. (core/text_batcher.h has the
  // same tokens as a tensor.)
  static std::vector<int64_t> Encode(std::string_view text, bool end_of_document = false);
};

}  // namespace peerd
