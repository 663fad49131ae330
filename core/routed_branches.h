// RoutedBranches: the bookkeeping of routing isolation (docs/DESIGN.md §4b), shared by peerd's
// training loop and the forgetting benchmark. After the base phase nothing shared trains again;
// each domain is a *branch* — one new segment per PEER layer and a SegmentAdapter, all under one
// id — and each window of a text runs exactly one branch, chosen from the text before it by a
// BigramRouter (Options) or by the model among a few branches the router proposes (ModelOptions):
//
//   base route:        no adapter, the base segments (those that existed when routing began)
//   route of branch b: adapter b,  the base segments and segment b
//
// The router keeps byte-bigram counts of what was trained under each branch (the base counts as
// the branch `base`, the id of its first segment); statistics, never text.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "core/evaluator.h"
#include "core/text_router.h"

namespace peerd {

struct RoutedBranches {
  int64_t base = 0;                    // the base's branch id in the router
  std::vector<int64_t> base_segments;  // what the base route runs ({base} when empty)
  BigramRouter router;

  // The route of branch `branch` (-1 or `base`: the base route).
  Route RouteOf(int64_t branch) const;
  // The branch the router picks for `text`; the base when it knows nothing better.
  int64_t Choose(std::string_view text) const;
  // `o` with each window routed by the `context` bytes before it (core/evaluator.h).
  EvalOptions Options(EvalOptions o, int64_t context) const;

  // The branches, at most `k`, a text's windows choose among when the model routes them: the
  // router's k most likely for the whole text, best first, with the newest branch (the largest id)
  // in the last place when it is not among them. Branches chain — each starts as a copy of the one
  // before — so the newest carries the whole stream's training and serves text that resembles no
  // branch best (bench/LONG.md, "Which branch serves a task best"); the bigram router would never
  // propose it for such text. Bounded by k however many branches there are; every branch the
  // router scores (all up to BigramRouter::kScoreAll) when k is at least their number.
  std::vector<int64_t> Candidates(std::string_view text, size_t k) const;
  // `o` with each window routed by the model (EvalOptions::candidates) among the routes of
  // Candidates(text, k), a window with nothing before it by the router as in Options; Options
  // when k == 0.
  EvalOptions ModelOptions(EvalOptions o, int64_t context, size_t k) const;
};

// The branch, of `among`, under which the model predicts `text` (at least 2 bytes) best; -1 when
// `among` is empty. The model's route is restored after.
int64_t BestBranchFor(TransformerLM& model, const RoutedBranches& branches, const std::string& text,
                      const std::vector<int64_t>& among);

// The bytes of a batch of windows [B, T+1] of byte tokens, as text for the router's counts.
std::string BatchBytes(const torch::Tensor& tokens);

}  // namespace peerd
