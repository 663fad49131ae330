// TextBatcher: random training windows from a text, reproducible from a seed.
#pragma once

#include <torch/torch.h>

#include <random>
#include <string>
#include <string_view>

namespace peerd {

// [n] int64: the tokens of ByteTokenizer::Encode(text) (no end-of-document token), as a tensor.
torch::Tensor ByteTokens(std::string_view text);

class TextBatcher {
 public:
  // `text` must hold at least seq_len + 1 bytes.
  TextBatcher(const std::string& text, int64_t seq_len, uint64_t seed);
  // [batch, seq_len + 1] int64 windows starting at uniform random offsets.
  torch::Tensor Next(int64_t batch);
  int64_t bytes() const { return tokens_.size(0); }

 private:
  torch::Tensor tokens_;  // [n] int64
  int64_t seq_len_;
  std::mt19937_64 rng_;
};

}  // namespace peerd
