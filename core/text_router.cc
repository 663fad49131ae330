#include "core/text_router.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace peerd {

namespace {

// Serialized counts: "BGR1", β, the number of routes, then per route its id, total, the 256
// predecessor and 256 single counts, the number of non-zero bigrams and each as (a·256 + b, count).
// Fixed-width little-endian integers.
constexpr char kMagic[] = "BGR1";

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

void BigramRouter::Observe(int64_t route, std::string_view text) {
  Counts& c = routes_[route];
  for (size_t i = 0; i < text.size(); ++i) {
    const auto b = static_cast<unsigned char>(text[i]);
    c.single[b]++;
    c.total++;
    if (i == 0) continue;
    const auto a = static_cast<unsigned char>(text[i - 1]);
    if (c.pair[a * 256 + b] < std::numeric_limits<uint32_t>::max()) c.pair[a * 256 + b]++;
    c.first[a]++;
  }
}

double BigramRouter::LogLikelihood(const Counts& c, std::string_view text) const {
  double sum = 0;
  for (size_t i = 1; i < text.size(); ++i) {
    const auto a = static_cast<unsigned char>(text[i - 1]), b = static_cast<unsigned char>(text[i]);
    const double unigram = (c.single[b] + 1.0) / (c.total + 256.0);
    sum += std::log((c.pair[a * 256 + b] + beta_ * unigram) / (c.first[a] + beta_));
  }
  return sum;
}

std::vector<double> BigramRouter::LogLikelihoods(std::string_view text) const {
  std::vector<double> out;
  for (const auto& [id, c] : routes_) out.push_back(LogLikelihood(c, text));
  return out;
}

int64_t BigramRouter::Choose(std::string_view text) const {
  if (text.size() < 2) return -1;
  int64_t best = -1;
  double best_ll = -std::numeric_limits<double>::infinity();
  for (const auto& [id, c] : routes_) {
    if (c.total == 0) continue;
    const double ll = LogLikelihood(c, text);
    if (ll > best_ll) best = id, best_ll = ll;
  }
  return best;
}

std::vector<int64_t> BigramRouter::routes() const {
  std::vector<int64_t> ids;
  for (const auto& [id, c] : routes_) ids.push_back(id);
  return ids;
}

uint64_t BigramRouter::StatisticsBytes() const {
  return routes_.size() * (256 * 256 * sizeof(uint32_t) + 2 * 256 * sizeof(uint64_t) + sizeof(uint64_t));
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
  return out;
}

Status BigramRouter::Parse(std::string_view bytes) {
  const auto corrupt = [](const std::string& why) {
    return Status::Corruption("the router's statistics are damaged: " + why);
  };
  if (bytes.substr(0, 4) != std::string_view(kMagic, 4))
    return corrupt("they do not start with " + std::string(kMagic));
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
  if (!r.ok) return corrupt("they end early");
  if (!r.in.empty()) return corrupt(std::to_string(r.in.size()) + " bytes follow their end");
  if (!(beta > 0) || !std::isfinite(beta)) return corrupt("β is " + std::to_string(beta));
  beta_ = beta;
  routes_ = std::move(routes);
  return Status::OK();
}

}  // namespace peerd
