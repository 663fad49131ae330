#include "core/text_router.h"

#include <cmath>
#include <limits>

namespace peerd {

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

}  // namespace peerd
