#include "core/text_batcher.h"

namespace peerd {

torch::Tensor ByteTokens(std::string_view text) {
  // A byte is its token: a view of the bytes, widened.
  return torch::from_blob(const_cast<char*>(text.data()), {static_cast<int64_t>(text.size())}, torch::kUInt8)
      .to(torch::kInt64);
}

TextBatcher::TextBatcher(const std::string& text, int64_t seq_len, uint64_t seed) : seq_len_(seq_len), rng_(seed) {
  const int64_t n = static_cast<int64_t>(text.size());
  TORCH_CHECK(n >= seq_len + 1, "training text of ", n, " bytes is shorter than one window of ", seq_len + 1);
  tokens_ = ByteTokens(text);
}

torch::Tensor TextBatcher::Next(int64_t batch) {
  std::uniform_int_distribution<int64_t> offset(0, tokens_.size(0) - seq_len_ - 1);
  std::vector<torch::Tensor> rows;
  rows.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t at = offset(rng_);
    rows.push_back(tokens_.slice(0, at, at + seq_len_ + 1));
  }
  return torch::stack(rows);
}

}  // namespace peerd
