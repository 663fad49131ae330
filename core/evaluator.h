// Held-out evaluation in bits per byte: the model's mean next-byte cross-entropy, in bits, over a
// text it never trained on. 8 is what a model that knows nothing (uniform over bytes) scores.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "core/model.h"

namespace peerd {

struct EvalOptions {
  int64_t max_bytes = 0;  // score at most this many bytes from the start of the text (0 = all)
  int64_t batch = 16;     // windows per forward pass
  // Routing isolation (docs/DESIGN.md): when set, each window runs under route(context), where
  // context is the `route_context` bytes of text before the window plus the window's first byte —
  // bytes that are inputs, never predicted, in that window, so a route never sees a byte it is
  // scored on. Unset: the model's own route for every window.
  std::function<Route(std::string_view context)> route;
  int64_t route_context = 0;
  // Routing by the model itself (DEMix's posterior with the model's own likelihoods, a uniform
  // prior): when set, each window runs the route, of those candidates(text) proposes for the text
  // scored, under which the model predicted the windows within the `route_context` bytes before it
  // best — so a window's own bytes may help propose the set, never choose from it. Every window is
  // scored under every candidate to choose, so this costs a pass over the text per candidate and
  // one more. A window with no whole window before it within route_context runs what `route` picks
  // from the bytes before it (candidate or not: it joins TextScore::candidates), or without `route`
  // the first candidate.
  std::function<std::vector<Route>(std::string_view text)> candidates;
  // Called around the pass that scores the text under the chosen routes (what a caller measures of
  // that pass alone, such as the segments it uses, runs between them; not the passes that choose).
  std::function<void()> before_scoring, after_scoring;
};

// The text is cut into consecutive windows of the model's context; every byte after a window's
// first is predicted once. The model is put in eval mode and restored after (its route too).
double BitsPerByte(TransformerLM& model, const std::string& text, const EvalOptions& options = {});

// BitsPerByte, with what it is the mean of: log_probs[i] = ln p(the byte at predicted[i] | the bytes
// before it in its window), for every byte but the text's first, in text order; kept when
// `keep_log_probs`.
struct TextScore {
  double bits_per_byte = 0;
  int64_t predicted_bytes = 0;
  std::vector<float> log_probs;
  std::vector<int64_t> predicted;
  std::vector<Route> candidates;  // with candidates: the routes the windows chose among (and fell back to)
  std::vector<size_t> chosen;     // and the one each window ran (an index into them), in text order
};
TextScore ScoreText(TransformerLM& model, const std::string& text, const EvalOptions& options = {},
                    bool keep_log_probs = false);

}  // namespace peerd
