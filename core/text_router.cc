#include "core/text_router.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

namespace peerd {

namespace {

// Serialized counts: "BGR2", β, the number of routes, then per route its id, total, the 256
// predecessor and 256 single counts, the number of non-zero bigrams and each as (a·256 + b, count);
// then the number of clusters, the clustered routes at the last fresh clustering, and per route
// (in the same order) its cluster, or 2^32 − 1 for none.
// Fixed-width little-endian integers. "BGR1" is the same without the clusters (read, then
// clustered afresh in id order).
constexpr char kMagic[] = "BGR2";
constexpr char kMagicV1[] = "BGR1";
constexpr uint32_t kNoCluster = 0xffffffff;

template <typename T>
void Put(std::string* out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i)
    out->push_back(static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xff));
}

struct Reader {
  std::string_view in;
  bool ok = true;
  template <typename T>
  T Get() {
    if (in.size() < sizeof(T)) {
      ok = false;
      return T{};
    }
    uint64_t v = 0;
    for (size_t i = 0; i < sizeof(T); ++i) v |= uint64_t{static_cast<unsigned char>(in[i])} << (8 * i);
    in.remove_prefix(sizeof(T));
    return static_cast<T>(v);
  }
};

}  // namespace

void BigramRouter::Counts::Add(std::string_view text) {
  for (size_t i = 0; i < text.size(); ++i) {
    const auto b = static_cast<unsigned char>(text[i]);
    single[b]++;
    total++;
    if (i == 0) continue;
    const auto a = static_cast<unsigned char>(text[i - 1]);
    if (pair[a * 256 + b] < std::numeric_limits<uint32_t>::max()) pair[a * 256 + b]++;
    first[a]++;
  }
}

void BigramRouter::Counts::Add(const Counts& other) {
  for (size_t i = 0; i < pair.size(); ++i)
    pair[i] = static_cast<uint32_t>(std::min<uint64_t>(uint64_t{pair[i]} + other.pair[i], UINT32_MAX));
  for (size_t i = 0; i < 256; ++i) first[i] += other.first[i], single[i] += other.single[i];
  total += other.total;
}

void BigramRouter::Observe(int64_t route, std::string_view text) {
  Counts& c = routes_[route];
  const bool had_counts = c.total > 0;
  c.Add(text);
  if (auto in = cluster_of_.find(route); in != cluster_of_.end()) {
    clusters_[in->second].sum.Add(text);
    return;
  }
  if (c.total >= kAssignBytes) {
    unclustered_.erase(std::remove(unclustered_.begin(), unclustered_.end(), route), unclustered_.end());
    Assign(route, c);
  } else if (!had_counts && c.total > 0) {
    unclustered_.insert(std::upper_bound(unclustered_.begin(), unclustered_.end(), route), route);
  }
}

std::vector<float> BigramRouter::LogTable(const Counts& m) const {
  std::vector<float> table(256 * 256);
  for (int a = 0; a < 256; ++a)
    for (int b = 0; b < 256; ++b) table[a * 256 + b] = static_cast<float>(LogP(m, a, b));
  return table;
}

namespace {

// A route's non-zero bigram counts, (a·256 + b, count), and their sum.
struct SparseCounts {
  std::vector<std::pair<uint16_t, uint32_t>> pairs;
  double total = 0;
};

SparseCounts SparseOf(const std::vector<uint32_t>& pair) {
  SparseCounts s;
  for (uint32_t i = 0; i < pair.size(); ++i)
    if (pair[i]) s.pairs.push_back({static_cast<uint16_t>(i), pair[i]}), s.total += pair[i];
  return s;
}

// Σ c(a, b) · log p(b | a) / Σ c(a, b) under the model whose LogTable is `table`.
double Explains(const std::vector<float>& table, const SparseCounts& c) {
  double sum = 0;
  for (const auto& [at, n] : c.pairs) sum += n * double(table[at]);
  return c.total > 0 ? sum / c.total : 0;
}

}  // namespace

void BigramRouter::Assign(int64_t route, const Counts& c) {
  cluster_of_[route] = clusters_.size();  // a placeholder until clustered
  if (clusters_.empty() || cluster_of_.size() >= 2 * reclustered_at_) return Recluster();
  const SparseCounts sparse = SparseOf(c.pair);
  // Logarithms of the route's bigrams alone under each cluster: a whole LogTable per cluster would
  // cost 65,536 of them each.
  size_t best = 0;
  double best_ll = -std::numeric_limits<double>::infinity();
  for (size_t k = 0; k < clusters_.size(); ++k) {
    const Counts& m = clusters_[k].sum;
    double ll = 0;
    for (const auto& [at, n] : sparse.pairs) ll += n * LogP(m, at / 256, at % 256);
    if (ll > best_ll) best = k, best_ll = ll;
  }
  clusters_[best].sum.Add(c);
  auto& m = clusters_[best].members;
  m.insert(std::upper_bound(m.begin(), m.end(), route), route);
  cluster_of_[route] = best;
}

void BigramRouter::Recluster() {
  std::vector<int64_t> ids;
  std::vector<SparseCounts> sparse;
  for (const auto& [id, c] : routes_) {
    if (!cluster_of_.count(id)) continue;
    ids.push_back(id);
    sparse.push_back(SparseOf(c.pair));
  }
  const size_t n = ids.size(), K = static_cast<size_t>(std::ceil(std::sqrt(static_cast<double>(n))));
  // Seeds, farthest first: the smallest id, then each time the route its nearest seed explains worst.
  std::vector<std::vector<float>> tables;
  std::vector<double> nearest(n, -std::numeric_limits<double>::infinity());
  for (size_t seed = 0; tables.size() < K;) {
    tables.push_back(LogTable(routes_.at(ids[seed])));
    for (size_t i = 0; i < n; ++i) nearest[i] = std::max(nearest[i], Explains(tables.back(), sparse[i]));
    seed = std::min_element(nearest.begin(), nearest.end()) - nearest.begin();
  }
  // Lloyd's iterations: each route to the model that explains it best, each model the sum of its routes.
  std::vector<size_t> of(n);
  std::vector<Counts> sums;
  for (int iteration = 0; iteration < 4; ++iteration) {
    for (size_t i = 0; i < n; ++i) {
      double best = -std::numeric_limits<double>::infinity();
      for (size_t k = 0; k < tables.size(); ++k)
        if (const double ll = Explains(tables[k], sparse[i]); ll > best) of[i] = k, best = ll;
    }
    sums.assign(tables.size(), Counts{});
    for (size_t i = 0; i < n; ++i) sums[of[i]].Add(routes_.at(ids[i]));
    for (size_t k = 0; k < tables.size(); ++k)
      if (sums[k].total > 0) tables[k] = LogTable(sums[k]);
  }
  // The clusters that kept routes, in order of their first member.
  std::vector<size_t> renumber(tables.size(), SIZE_MAX);
  clusters_.clear();
  for (size_t i = 0; i < n; ++i) {
    size_t& k = renumber[of[i]];
    if (k == SIZE_MAX) k = clusters_.size(), clusters_.push_back(Cluster{std::move(sums[of[i]]), {}});
    clusters_[k].members.push_back(ids[i]);  // ids ascend
    cluster_of_[ids[i]] = k;
  }
  reclustered_at_ = n;
}

double BigramRouter::LogLikelihood(const Counts& c, std::string_view text) const {
  double sum = 0;
  for (size_t i = 1; i < text.size(); ++i)
    sum += LogP(c, static_cast<unsigned char>(text[i - 1]), static_cast<unsigned char>(text[i]));
  return sum;
}

std::vector<double> BigramRouter::LogLikelihoods(std::string_view text) const {
  std::vector<double> out;
  for (const auto& [id, c] : routes_) out.push_back(LogLikelihood(c, text));
  return out;
}

int64_t BigramRouter::Choose(std::string_view text, size_t* scored) const {
  const std::vector<int64_t> best = Ranked(text, 1, scored);
  return best.empty() ? -1 : best.front();
}

std::vector<int64_t> BigramRouter::Ranked(std::string_view text, size_t k, size_t* scored) const {
  if (scored) *scored = 0;
  std::vector<std::pair<double, int64_t>> lls;  // (−log-likelihood, route): ascending is best first
  if (text.size() < 2 || k == 0) return {};
  auto consider = [&](int64_t id, const Counts& c) {
    if (c.total == 0) return;
    lls.push_back({-LogLikelihood(c, text), id});
    if (scored) ++*scored;
  };
  if (routes_.size() <= kScoreAll || probes_ == 0 || clusters_.empty()) {
    for (const auto& [id, c] : routes_) consider(id, c);
  } else {
    // The clusters whose models explain the text best, then their members and the unclustered.
    std::vector<std::pair<double, size_t>> ranked;  // (−log-likelihood, cluster)
    for (size_t c = 0; c < clusters_.size(); ++c) ranked.push_back({-LogLikelihood(clusters_[c].sum, text), c});
    if (scored) *scored += clusters_.size();
    std::sort(ranked.begin(), ranked.end());
    // The clusters' posterior under a uniform prior, p_c ∝ exp(log-likelihood_c): probed best first
    // until what is left holds less than posterior_left_ of it (or `probes_` are probed).
    double mass = 0;
    for (const auto& [neg_ll, c] : ranked) mass += std::exp(ranked[0].first - neg_ll);
    std::vector<int64_t> searched = unclustered_;
    double probed = 0;
    for (size_t i = 0; i < std::min(probes_, ranked.size()) && (i == 0 || 1 - probed / mass >= posterior_left_); ++i) {
      probed += std::exp(ranked[0].first - ranked[i].first);
      const std::vector<int64_t>& m = clusters_[ranked[i].second].members;
      searched.insert(searched.end(), m.begin(), m.end());
    }
    for (int64_t id : searched) consider(id, routes_.at(id));
  }
  k = std::min(k, lls.size());
  std::partial_sort(lls.begin(), lls.begin() + k, lls.end());
  std::vector<int64_t> best;
  for (size_t i = 0; i < k; ++i) best.push_back(lls[i].second);
  return best;
}

std::vector<std::vector<int64_t>> BigramRouter::clusters() const {
  std::vector<std::vector<int64_t>> out;
  for (const Cluster& k : clusters_) out.push_back(k.members);
  return out;
}

std::vector<int64_t> BigramRouter::routes() const {
  std::vector<int64_t> ids;
  for (const auto& [id, c] : routes_) ids.push_back(id);
  return ids;
}

uint64_t BigramRouter::StatisticsBytes() const {
  return (routes_.size() + clusters_.size()) *
         (256 * 256 * sizeof(uint32_t) + 2 * 256 * sizeof(uint64_t) + sizeof(uint64_t));
}

std::string BigramRouter::Serialize() const {
  std::string out(kMagic, 4);
  uint64_t beta_bits;
  static_assert(sizeof(beta_bits) == sizeof(beta_));
  std::memcpy(&beta_bits, &beta_, sizeof(beta_));
  Put<uint64_t>(&out, beta_bits);
  Put<uint64_t>(&out, routes_.size());
  for (const auto& [id, c] : routes_) {
    Put<int64_t>(&out, id);
    Put<uint64_t>(&out, c.total);
    for (uint64_t v : c.first) Put<uint64_t>(&out, v);
    for (uint64_t v : c.single) Put<uint64_t>(&out, v);
    uint32_t nonzero = 0;
    for (uint32_t v : c.pair) nonzero += v != 0;
    Put<uint32_t>(&out, nonzero);
    for (uint32_t i = 0; i < c.pair.size(); ++i)
      if (c.pair[i]) Put<uint16_t>(&out, static_cast<uint16_t>(i)), Put<uint32_t>(&out, c.pair[i]);
  }
  Put<uint32_t>(&out, static_cast<uint32_t>(clusters_.size()));
  Put<uint32_t>(&out, static_cast<uint32_t>(reclustered_at_));
  for (const auto& [id, c] : routes_) {
    const auto in = cluster_of_.find(id);
    Put<uint32_t>(&out, in == cluster_of_.end() ? kNoCluster : static_cast<uint32_t>(in->second));
  }
  return out;
}

Status BigramRouter::Parse(std::string_view bytes) {
  const auto corrupt = [](const std::string& why) {
    return Status::Corruption("the router's statistics are damaged: " + why);
  };
  const bool v1 = bytes.substr(0, 4) == std::string_view(kMagicV1, 4);
  if (!v1 && bytes.substr(0, 4) != std::string_view(kMagic, 4))
    return corrupt("they do not start with " + std::string(kMagic) + " or " + kMagicV1);
  Reader r{bytes.substr(4)};
  const uint64_t beta_bits = r.Get<uint64_t>();
  double beta;
  std::memcpy(&beta, &beta_bits, sizeof(beta));
  std::map<int64_t, Counts> routes;
  for (uint64_t n = r.Get<uint64_t>(), i = 0; r.ok && i < n; ++i) {
    Counts& c = routes[r.Get<int64_t>()];
    c.total = r.Get<uint64_t>();
    for (uint64_t& v : c.first) v = r.Get<uint64_t>();
    for (uint64_t& v : c.single) v = r.Get<uint64_t>();
    for (uint32_t k = r.Get<uint32_t>(), j = 0; r.ok && j < k; ++j) {
      const uint16_t at = r.Get<uint16_t>();
      c.pair[at] = r.Get<uint32_t>();
    }
  }
  std::vector<uint32_t> cluster_of;  // per route in id order (BGR2)
  uint32_t clusters = 0, reclustered_at = 0;
  if (!v1 && r.ok) {
    clusters = r.Get<uint32_t>();
    reclustered_at = r.Get<uint32_t>();
    for (size_t i = 0; r.ok && i < routes.size(); ++i) cluster_of.push_back(r.Get<uint32_t>());
  }
  if (!r.ok) return corrupt("they end early");
  if (!r.in.empty()) return corrupt(std::to_string(r.in.size()) + " bytes follow their end");
  if (!(beta > 0) || !std::isfinite(beta)) return corrupt("β is " + std::to_string(beta));
  std::vector<size_t> members(clusters);
  for (uint32_t k : cluster_of) {
    if (k == kNoCluster) continue;
    if (k >= clusters) return corrupt("a route is in cluster " + std::to_string(k) + " of " + std::to_string(clusters));
    members[k]++;
  }
  for (uint32_t k = 0; k < clusters; ++k)
    if (members[k] == 0) return corrupt("cluster " + std::to_string(k) + " has no routes");

  beta_ = beta;
  routes_ = std::move(routes);
  clusters_.assign(clusters, Cluster{});
  cluster_of_.clear();
  unclustered_.clear();
  reclustered_at_ = reclustered_at;
  size_t i = 0;
  for (const auto& [id, c] : routes_) {
    const uint32_t k = v1 ? kNoCluster : cluster_of[i++];
    if (k != kNoCluster) {
      clusters_[k].sum.Add(c);
      clusters_[k].members.push_back(id);  // ids ascend
      cluster_of_[id] = k;
    } else if (v1 && c.total >= kAssignBytes) {
      cluster_of_[id] = 0;  // statistics written before clusters existed: clustered below
    } else if (c.total > 0) {
      unclustered_.push_back(id);
    }
  }
  if (v1 && !cluster_of_.empty()) Recluster();
  return Status::OK();
}

}  // namespace peerd
