#include "core/tokenizer.h"

namespace peerd {

std::vector<int64_t> ByteTokenizer::Encode(std::string_view text, bool end_of_document) {
  std::vector<int64_t> tokens;
  tokens.reserve(text.size() + 1);
  for (unsigned char c : text) tokens.push_back(c);
  if (end_of_document) tokens.push_back(kEndOfDocument);
  return tokens;
}

std::string ByteTokenizer::Decode(const std::vector<int64_t>& tokens) {
  std::string text;
  text.reserve(tokens.size());
  for (int64_t t : tokens) {
    if (t >= 0 && t < 256) text.push_back(static_cast<char>(t));
    else if (t == kEndOfDocument) text.push_back('\n');
  }
  return text;
}

}  // namespace peerd
