#include "core/routed_branches.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/check_ok.h"

namespace peerd {

Route RoutedBranches::RouteOf(int64_t branch) const {
  Route r;
  r.segments = base_segments.empty() ? std::vector<int64_t>{base} : base_segments;
  if (branch < 0 || branch == base) return r;
  r.adapter = branch;
  r.segments.push_back(branch);
  return r;
}

int64_t RoutedBranches::Choose(std::string_view text) const {
  const int64_t b = router.Choose(text);
  return b < 0 ? base : b;
}

EvalOptions RoutedBranches::Options(EvalOptions o, int64_t context) const {
  o.route = [this](std::string_view text) { return RouteOf(Choose(text)); };
  o.route_context = context;
  return o;
}

std::vector<int64_t> RoutedBranches::Candidates(std::string_view text, size_t k) const {
  std::vector<int64_t> out = router.Ranked(text, k);
  const std::vector<int64_t> all = router.routes();  // ascending
  if (k == 0 || all.empty() || std::find(out.begin(), out.end(), all.back()) != out.end()) return out;
  if (out.size() == k) out.pop_back();
  out.push_back(all.back());
  return out;
}

EvalOptions RoutedBranches::ModelOptions(EvalOptions o, int64_t context, size_t k) const {
  o = Options(std::move(o), context);
  if (k == 0) return o;
  o.candidates = [this, k](std::string_view text) {
    std::vector<Route> routes;
    for (int64_t b : Candidates(text, k)) routes.push_back(RouteOf(b));
    return routes;
  };
  return o;
}

int64_t BestBranchFor(TransformerLM& model, const RoutedBranches& branches, const std::string& text,
                      const std::vector<int64_t>& among) {
  const Route was = model->route();
  int64_t best = -1;
  double best_bpb = INFINITY;
  for (int64_t b : among) {
    CheckOk(model->SetRoute(branches.RouteOf(b)));
    const double bpb = BitsPerByte(model, text);
    if (bpb < best_bpb) best = b, best_bpb = bpb;
  }
  CheckOk(model->SetRoute(was));
  return best;
}

std::string BatchBytes(const torch::Tensor& tokens) {
  torch::Tensor t = tokens.to(torch::kUInt8).contiguous();
  std::string out(t.numel(), '\0');
  std::memcpy(out.data(), t.data_ptr(), out.size());
  return out;
}

}  // namespace peerd
