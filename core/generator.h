// Text generation: the model continues a prompt one byte at a time, greedily or by sampling
// (temperature, top-k, top-p), with a key/value cache so that each new byte runs one position
// through the model instead of the whole window again.
//
// The model's positions are learned and absolute, so a window cannot slide one byte at a time
// while keeping the cache: when the sequence outgrows the context, the window restarts at the
// last half context of bytes (a new prefill) and the cache fills again from there. Without the
// cache the same windows are run whole, so both ways predict the same bytes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "core/model.h"

namespace peerd {

struct GenerateOptions {
  int64_t max_tokens = 128;
  double temperature = 1.0;  // 0: greedy (the most likely byte), deterministic
  int64_t top_k = 0;         // sample among the k most likely tokens only (0: all)
  double top_p = 1.0;        // ... and among the fewest whose probabilities reach top_p
  uint64_t seed = 0;         // the same seed, model and options give the same text
  // Generation ends before any of these would appear; the text returned stops short of it.
  std::vector<std::string> stop;
  bool kv_cache = true;
  // Each piece of text as it becomes final: never half a UTF-8 character, never a byte a stop
  // string may still claim. Returning false ends generation (finish reason "cancelled").
  std::function<bool(std::string_view piece)> on_text;
};

struct Generated {
  std::string text;             // the bytes generated (the stop string and end-of-document excluded)
  std::vector<int64_t> tokens;  // every token generated, as the model produced it (bytes 0-255, 256 = end of document)
  // "length" (max_tokens reached), "stop" (a stop string), "end_of_document" (the model ended
  // the text), "cancelled" (on_text said so)
  std::string finish_reason;
};

// Continues `prompt` (at least one byte) under the model's route; the model is put in eval mode
// and restored after. The caller owns the model for the call (it is not thread-safe).
Generated Generate(TransformerLM& model, std::string_view prompt, const GenerateOptions& options);

// The token to emit given next-token logits [vocab] (float): greedy at temperature 0, else
// sampled with `u` uniform in [0, 1) after temperature, top-k and top-p.
int64_t PickToken(const std::vector<float>& logits, const GenerateOptions& options, double u);

}  // namespace peerd
