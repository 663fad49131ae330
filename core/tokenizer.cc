#include "core/tokenizer.h"

namespace peerd {

std::vector<int64_t> ByteTokenizer::Encode(std::string_view text, bool end_of_document) {
  std::vector<int64_t> tokens;
  tokens.reserve(text.size() + 1);
  for (unsigned char c : text) tokens.push_back(c);
  if (end_of_document) tokens.push_back(kEndOfDocument);
  return tokens;
}

}  // namespace peerd
