#include "core/evaluator.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>

#include "core/check_ok.h"
#include "core/text_batcher.h"

namespace peerd {

namespace {

using Windows = std::vector<std::pair<int64_t, int64_t>>;  // [start, end] byte ranges, end inclusive

// Runs the windows `members` (in order) through `run` in batches of up to `batch_size` rows: tokens
// [b, L+1] and the window of each row. A window shorter than the first (the text's tail) runs
// alone.
void ForEachBatch(const torch::Tensor& bytes, const Windows& windows, const std::vector<size_t>& members,
                  int64_t batch_size,
                  const std::function<void(const torch::Tensor&, const std::vector<size_t>&)>& run) {
  std::vector<torch::Tensor> batch;
  std::vector<size_t> rows;  // the window of each row
  auto flush = [&] {
    if (batch.empty()) return;
    run(torch::stack(batch), rows);
    batch.clear();
    rows.clear();
  };
  const int64_t full = windows.empty() ? 0 : windows.front().second - windows.front().first;
  for (size_t w : members) {
    const auto [first, last] = windows[w];
    if (last - first != full) flush();
    batch.push_back(bytes.slice(0, first, last + 1));
    rows.push_back(w);
    if (static_cast<int64_t>(batch.size()) == batch_size || last - first != full) flush();
  }
  flush();
}

// −Σ ln p of the bytes each window predicts, under the model's current route: [windows].
std::vector<double> WindowNats(TransformerLM& model, const torch::Tensor& bytes, const Windows& windows,
                               int64_t batch_size) {
  std::vector<double> nats(windows.size());
  std::vector<size_t> all(windows.size());
  std::iota(all.begin(), all.end(), size_t{0});
  ForEachBatch(bytes, windows, all, batch_size, [&](const torch::Tensor& tokens, const std::vector<size_t>& rows) {
    const int64_t L = tokens.size(1) - 1;
    torch::Tensor logits = model->forward(tokens.slice(1, 0, L));  // [b, L, V]
    torch::Tensor lp = torch::log_softmax(logits.to(torch::kFloat), -1)
                           .gather(-1, tokens.slice(1, 1, L + 1).unsqueeze(-1))
                           .squeeze(-1)
                           .to(torch::kDouble)
                           .sum(1)
                           .contiguous();  // [b]
    for (size_t r = 0; r < rows.size(); ++r) nats[rows[r]] = -lp[r].item<double>();
  });
  return nats;
}

// Routing by candidates: the candidate each window runs, the one under which the model predicted
// the windows before it (within route_context) best. Every window is scored under every candidate.
// A window with nothing before it runs the route options.route picks, added to `candidates` when
// it is not one.
std::vector<size_t> ChooseByCandidates(TransformerLM& model, std::string_view text, const torch::Tensor& bytes,
                                       const Windows& windows, std::vector<Route>& candidates,
                                       const EvalOptions& options) {
  std::vector<std::vector<double>> nats;  // [candidate][window]
  for (const Route& r : candidates) {
    CheckOk(model->SetRoute(r));
    nats.push_back(WindowNats(model, bytes, windows, options.batch));
  }
  std::vector<size_t> chosen(windows.size(), 0);
  size_t from = 0;  // the first window inside the current window's route context
  for (size_t w = 0; w < windows.size(); ++w) {
    while (from < w && windows[from].first < windows[w].first - options.route_context) ++from;
    if (from < w) {
      double best = INFINITY;
      for (size_t c = 0; c < nats.size(); ++c) {
        double sum = 0;
        for (size_t v = from; v < w; ++v) sum += nats[c][v];
        if (sum < best) best = sum, chosen[w] = c;
      }
    } else if (options.route) {  // nothing scored before it yet: the text's own router decides
      const int64_t start = std::max<int64_t>(0, windows[w].first - options.route_context);
      const Route r = options.route(text.substr(start, windows[w].first + 1 - start));
      size_t c = 0;
      while (c < candidates.size() && !(candidates[c].adapter == r.adapter && candidates[c].segments == r.segments))
        ++c;
      if (c == candidates.size()) candidates.push_back(r);
      chosen[w] = c;
    }
  }
  return chosen;
}

}  // namespace

double BitsPerByte(TransformerLM& model, const std::string& text, const EvalOptions& options) {
  return ScoreText(model, text, options).bits_per_byte;
}

TextScore ScoreText(TransformerLM& model, const std::string& text, const EvalOptions& options, bool keep_log_probs) {
  const int64_t context = model->config().context();
  int64_t n = static_cast<int64_t>(text.size());
  if (options.max_bytes > 0) n = std::min(n, options.max_bytes);
  TORCH_CHECK(n >= 2, "held-out text needs at least 2 bytes, got ", n);
  torch::Tensor bytes = ByteTokens(std::string_view(text).substr(0, n));

  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard no_grad;
  double nats = 0;
  int64_t predicted = 0;
  std::vector<std::pair<int64_t, float>> scored;  // (offset of the byte predicted, ln p), keep_log_probs
  // Windows overlap by one byte: the last byte of one is the first input of the next. With a
  // router, windows are grouped by route and each group runs under its own.
  Windows windows;
  int64_t start = 0;
  for (; start + context + 1 <= n; start += context) windows.push_back({start, start + context});
  if (n - start >= 2) windows.push_back({start, n - 1});  // the shorter tail window
  const Route model_route = model->route();
  TextScore score;
  if (options.candidates) score.candidates = options.candidates(std::string_view(text).substr(0, n));
  if (!score.candidates.empty())
    score.chosen = ChooseByCandidates(model, text, bytes, windows, score.candidates, options);
  if (options.before_scoring) options.before_scoring();
  std::map<std::pair<int64_t, std::vector<int64_t>>, std::vector<size_t>> groups;  // route -> windows
  for (size_t w = 0; w < windows.size(); ++w) {
    Route r = model_route;
    if (!score.chosen.empty()) {
      r = score.candidates[score.chosen[w]];
    } else if (options.route) {
      const int64_t from = std::max<int64_t>(0, windows[w].first - options.route_context);
      r = options.route(std::string_view(text).substr(from, windows[w].first + 1 - from));
    }
    groups[{r.adapter, r.segments}].push_back(w);
  }
  for (const auto& [key, members] : groups) {
    CheckOk(model->SetRoute({key.first, key.second}));
    ForEachBatch(
        bytes, windows, members, options.batch, [&](const torch::Tensor& tokens, const std::vector<size_t>& rows) {
          const int64_t L = tokens.size(1) - 1;  // tokens [b, L+1]
          if (!keep_log_probs) {
            torch::Tensor loss = model->Loss(tokens);  // mean over b·L predictions
            nats += loss.item<double>() * tokens.size(0) * L;
          } else {
            torch::Tensor logits = model->forward(tokens.slice(1, 0, L));  // [b, L, V]
            torch::Tensor lp = torch::log_softmax(logits, -1).gather(-1, tokens.slice(1, 1, L + 1).unsqueeze(-1));
            lp = lp.squeeze(-1).to(torch::kFloat).contiguous();  // [b, L]
            nats -= lp.sum().item<double>();
            const float* p = lp.data_ptr<float>();
            for (int64_t b = 0; b < tokens.size(0); ++b)
              for (int64_t t = 0; t < L; ++t) scored.emplace_back(windows[rows[b]].first + 1 + t, p[b * L + t]);
          }
          predicted += tokens.size(0) * L;
        });
  }
  if (options.after_scoring) options.after_scoring();
  CheckOk(model->SetRoute(model_route));
  model->train(was_training);
  score.bits_per_byte = nats / predicted / std::log(2.0);
  score.predicted_bytes = predicted;
  // Windows ran grouped by route: put the bytes back in text order.
  std::sort(scored.begin(), scored.end());
  for (const auto& [offset, lp] : scored) {
    score.predicted.push_back(offset);
    score.log_probs.push_back(lp);
  }
  return score;
}

}  // namespace peerd
