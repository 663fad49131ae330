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
//
// A lifetime of domains brings thousands of routes, and scoring each for every window grows with
// them. So routes are grouped: once a route has observed kAssignBytes it is clustered. Each time
// the clustered routes have doubled they are clustered afresh into ⌈√n⌉ clusters by k-means
// over bigram models (seeds farthest first: each next seed the route its nearest seed explains
// worst; a route goes to the cluster whose model — the sum of its members' counts — makes its
// counts most likely); in between, a new route joins the cluster that explains it best. Fresh
// clustering costs about 4·n·⌈√n⌉ passes over a route's non-zero bigrams (~1 s at 1,024 routes
// here), once per doubling. With more than kScoreAll routes, Choose scores the clusters' models
// first and then the members of the best clusters (and routes not in a cluster yet, such as a
// branch still training): best first, until the clusters left hold less than 10⁻⁹ of the clusters'
// posterior (their models' likelihoods under a uniform prior, DEMix's domain posterior one level
// up) or 8 clusters are searched — at most (8 + 1)·√R routes scored instead of R, √R + R/√R when
// one cluster stands out. (The summed models are sure of themselves over 65 bytes: at 10⁻³ and 4
// clusters the search gave up 2.6 points of windows sent to their own domain at 1,024 branches of
// 13 domains; at these defaults 0.5.) Up to kScoreAll routes every route is scored. What the
// clusters lose against scoring all is measured by `peer-bench pool` (bench/POOL.md). Cluster
// membership is part of the serialized statistics, so a restart routes as before. No LibTorch.
#pragma once

#include <cmath>
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

  // Up to this many routes Choose scores every one.
  static constexpr size_t kScoreAll = 64;
  // Text a route observes before it joins a cluster (its statistics mean something by then).
  static constexpr uint64_t kAssignBytes = 8 << 10;
  // Posterior of the clusters Choose leaves unsearched, at most (by default).
  static constexpr double kPosteriorLeft = 1e-9;
  void set_posterior_left(double share) { posterior_left_ = share; }
  // Clusters whose members Choose scores at most (with more than kScoreAll routes); 0 scores every
  // route.
  void set_probes(size_t clusters) { probes_ = clusters; }
  size_t probes() const { return probes_; }

  // Counts the bytes of `text` as trained under `route` (any id; a new id starts empty).
  void Observe(int64_t route, std::string_view text);
  // The route most likely to have produced `text` (ties: the smallest id) among those scored (see
  // above), or -1 when no route has counts or `text` holds no bigram. *scored, when given, is set
  // to the number of bigram models evaluated, clusters' included.
  int64_t Choose(std::string_view text, size_t* scored = nullptr) const;
  // The `k` most likely routes for `text` among those Choose scores, best first (ties: the
  // smallest id); fewer when fewer are scored. Choose is its first.
  std::vector<int64_t> Ranked(std::string_view text, size_t k, size_t* scored = nullptr) const;
  // Σ_t log p_r(x_t | x_{t−1}) of `text` under each route, in the order of routes().
  std::vector<double> LogLikelihoods(std::string_view text) const;
  std::vector<int64_t> routes() const;
  // Bytes the statistics take in memory (what routing keeps instead of text), clusters' included.
  uint64_t StatisticsBytes() const;
  // Clusters, and the members of each (ascending ids).
  std::vector<std::vector<int64_t>> clusters() const;

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
    void Add(std::string_view text);
    void Add(const Counts& other);
  };
  struct Cluster {
    Counts sum;                    // of its members' counts
    std::vector<int64_t> members;  // ascending
  };
  // log p(b | a) under the counts `c` (the formula above).
  double LogP(const Counts& c, int a, int b) const {
    const double unigram = (c.single[b] + 1.0) / (c.total + 256.0);
    return std::log((c.pair[a * 256 + b] + beta_ * unigram) / (c.first[a] + beta_));
  }
  double LogLikelihood(const Counts& c, std::string_view text) const;
  // log p_model(b | a) at a·256 + b.
  std::vector<float> LogTable(const Counts& model) const;
  // Puts `route` (counts `c`, kAssignBytes or more) into a cluster: the one that explains it best,
  // or all afresh (Recluster) when the clustered routes have doubled since the last time.
  void Assign(int64_t route, const Counts& c);
  // k-means of every route with kAssignBytes or more into ⌈√n⌉ clusters (see above).
  void Recluster();

  double beta_;
  size_t probes_ = 8;
  double posterior_left_ = kPosteriorLeft;
  std::map<int64_t, Counts> routes_;
  std::vector<Cluster> clusters_;
  std::map<int64_t, size_t> cluster_of_;  // routes in a cluster
  std::vector<int64_t> unclustered_;      // routes with counts but not yet in a cluster, ascending
  size_t reclustered_at_ = 0;             // clustered routes at the last Recluster
};

}  // namespace peerd
