#include "core/generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/tokenizer.h"
#include "core/utf8.h"

namespace peerd {

int64_t PickToken(const std::vector<float>& logits, const GenerateOptions& options, double u) {
  const size_t V = logits.size();
  if (options.temperature <= 0) return std::max_element(logits.begin(), logits.end()) - logits.begin();
  // Tokens from the most likely down (ties by id), so that top-k and top-p take a prefix.
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  size_t keep = options.top_k > 0 ? std::min<size_t>(options.top_k, V) : V;
  std::vector<double> p(keep);  // softmax(logits / temperature) over the kept tokens, unnormalised
  double total = 0;
  for (size_t i = 0; i < keep; ++i)
    total += p[i] = std::exp((logits[order[i]] - logits[order[0]]) / options.temperature);
  if (options.top_p < 1) {  // the fewest leading tokens whose probability reaches top_p
    double mass = 0;
    size_t n = 0;
    while (n < keep && mass < options.top_p * total) mass += p[n++];
    keep = std::max<size_t>(n, 1);
    total = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  }
  double target = u * total;
  for (size_t i = 0; i < keep; ++i)
    if ((target -= p[i]) < 0) return order[i];
  return order[keep - 1];
}

Generated Generate(TransformerLM& model, std::string_view prompt, const GenerateOptions& options) {
  TORCH_CHECK(!prompt.empty(), "a prompt needs at least one byte");
  const int64_t context = model->config().context();
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard no_grad;

  std::vector<int64_t> sequence = ByteTokenizer::Encode(prompt, /*end_of_document=*/false);
  std::mt19937_64 rng(options.seed);
  std::uniform_real_distribution<double> uniform(0, 1);
  size_t longest_stop = 0;
  for (const std::string& s : options.stop) longest_stop = std::max(longest_stop, s.size());

  Generated out;
  size_t passed_on = 0;  // bytes of out.text given to on_text
  KvCache cache;
  int64_t start = 0;  // the window the model sees: sequence[start:], at most `context` tokens
  for (int64_t t = 0; t < options.max_tokens && out.finish_reason.empty(); ++t) {
    const int64_t n = static_cast<int64_t>(sequence.size());
    if (n - start > context) {  // outgrown: restart the window at the last half context
      start = n - std::max<int64_t>(1, context / 2);
      cache = KvCache();
    }
    torch::Tensor logits;  // [1, T, vocab]
    if (options.kv_cache) {
      const auto from = sequence.begin() + start + cache.length;
      logits = model->forward(torch::tensor(std::vector<int64_t>(from, sequence.end())).unsqueeze(0), &cache);
    } else {
      logits =
          model->forward(torch::tensor(std::vector<int64_t>(sequence.begin() + start, sequence.end())).unsqueeze(0));
    }
    torch::Tensor last = logits[0][logits.size(1) - 1].to(torch::kFloat).contiguous();  // [vocab]
    const int64_t token = PickToken(std::vector<float>(last.data_ptr<float>(), last.data_ptr<float>() + last.numel()),
                                    options, uniform(rng));
    out.tokens.push_back(token);
    if (token == ByteTokenizer::kEndOfDocument) {
      out.finish_reason = "end_of_document";
      break;
    }
    sequence.push_back(token);
    out.text.push_back(static_cast<char>(token));
    for (const std::string& s : options.stop)
      if (!s.empty() && out.text.size() >= s.size() && out.text.compare(out.text.size() - s.size(), s.size(), s) == 0) {
        out.text.resize(out.text.size() - s.size());
        out.finish_reason = "stop";
        break;
      }
    if (!options.on_text || !out.finish_reason.empty()) continue;
    // Hold back what a stop string may still claim and the start of an unfinished character.
    const size_t held = longest_stop > 0 ? longest_stop - 1 : 0;
    if (out.text.size() <= passed_on + held) continue;
    const std::string_view open = std::string_view(out.text).substr(passed_on, out.text.size() - held - passed_on);
    const size_t ready = Utf8SafePrefix(open);
    if (ready == 0) continue;
    if (!options.on_text(open.substr(0, ready))) out.finish_reason = "cancelled";
    passed_on += ready;
  }
  if (out.finish_reason.empty()) out.finish_reason = "length";
  if (options.on_text && out.finish_reason != "cancelled" && passed_on < out.text.size())
    options.on_text(std::string_view(out.text).substr(passed_on));
  if (was_training) model->train();
  return out;
}

}  // namespace peerd
