#include "core/evaluator.h"

#include <algorithm>
#include <cmath>

namespace peerd {

double BitsPerByte(TransformerLM& model, const std::string& text, const EvalOptions& options) {
  const int64_t context = model->config().context();
  int64_t n = static_cast<int64_t>(text.size());
  if (options.max_bytes > 0) n = std::min(n, options.max_bytes);
  TORCH_CHECK(n >= 2, "held-out text needs at least 2 bytes, got ", n);
  torch::Tensor bytes =
      torch::from_blob(const_cast<char*>(text.data()), {n}, torch::kUInt8).to(torch::kInt64);

  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard no_grad;
  double nats = 0;
  int64_t predicted = 0;
  // Windows overlap by one byte: the last byte of one is the first input of the next.
  std::vector<torch::Tensor> batch;
  auto flush = [&] {
    if (batch.empty()) return;
    torch::Tensor tokens = torch::stack(batch);  // [b, L+1]
    torch::Tensor loss = model->Loss(tokens);    // mean over b·L predictions
    const int64_t count = tokens.size(0) * (tokens.size(1) - 1);
    nats += loss.item<double>() * count;
    predicted += count;
    batch.clear();
  };
  int64_t start = 0;
  for (; start + context + 1 <= n; start += context) {
    batch.push_back(bytes.slice(0, start, start + context + 1));
    if (static_cast<int64_t>(batch.size()) == options.batch) flush();
  }
  flush();
  if (n - start >= 2) {  // the shorter tail window, alone
    batch.push_back(bytes.slice(0, start, n));
    flush();
  }
  model->train(was_training);
  return nats / predicted / std::log(2.0);
}

}  // namespace peerd
