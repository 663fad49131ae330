// BigramRouter: sends a text to the segment whose training text it most resembles, from
// statistics alone (docs/DESIGN.md, "Routing isolation"). Each route keeps the byte-bigram counts
// of the bytes trained under it — 256×256 counts, never the text — and a text goes to the route
// under whose smoothed bigram model it is most likely:
//
//   p_r(b | a) = (c_r(a, b) + β · p_r(b)) / (c_r(a) + β),   p_r(b) = (c_r(b) + 1) / (n_r + 256)
//
// the maximum of Σ log p_r(x_t | x_{t−1}) over routes (a uniform prior). It is the domain
// posterior of DEMix (Gururangan et al. 2022) with a bigram model in place of the experts' own
// likelihoods: a table lookup per byte and route, so routing costs nothing next to a forward pass.
// No LibTorch.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace peerd {

class BigramRouter {
 public:
  explicit BigramRouter(double beta = 16) : beta_(beta) {}

  // Counts the bytes of `text` as trained under `route` (any id; a new id starts empty).
  void Observe(int64_t route, std::string_view text);
  // The route most likely to have produced `text` (ties: the smallest id), or -1 when no route
  // has counts or `text` holds no bigram.
  int64_t Choose(std::string_view text) const;
  // Σ_t log p_r(x_t | x_{t−1}) of `text` under each route, in the order of routes().
  std::vector<double> LogLikelihoods(std::string_view text) const;
  std::vector<int64_t> routes() const;
  // Bytes the statistics take in memory (what routing keeps instead of text).
  uint64_t StatisticsBytes() const;

  // The counts as bytes (only the non-zero bigrams: a few KB a route, not the 256 KB in memory)
  // and back. Parse replaces *this; Corruption when `bytes` is not what Serialize wrote.
  std::string Serialize() const;
  Status Parse(std::string_view bytes);

 private:
  struct Counts {
    std::vector<uint32_t> pair = std::vector<uint32_t>(256 * 256);  // c(a, b) at a·256 + b
    std::vector<uint64_t> first = std::vector<uint64_t>(256);       // c(a) as a predecessor
    std::vector<uint64_t> single = std::vector<uint64_t>(256);      // c(b)
    uint64_t total = 0;
  };
  double LogLikelihood(const Counts& c, std::string_view text) const;

  double beta_;
  std::map<int64_t, Counts> routes_;
};

}  // namespace peerd
