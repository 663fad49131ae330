#include "core/adamw.h"

#include <cmath>

#include "kernels/adamw_rows.h"

namespace peerd {

void AdamW::SetParameters(std::vector<Param> params) {
  std::unordered_map<const void*, State> kept;
  for (const Param& p : params) {
    const void* key = p.tensor.unsafeGetTensorImpl();
    auto it = state_.find(key);
    if (it != state_.end()) kept.emplace(key, std::move(it->second));
  }
  state_ = std::move(kept);
  params_ = std::move(params);
}

void AdamW::ZeroGrad() {
  for (Param& p : params_) p.tensor.mutable_grad() = torch::Tensor();
}

namespace {

// A sparse gradient with one entry per row, rows ascending. The fused kernel's are built so;
// anything else (two backward passes summed, say) is coalesced here, never trusted.
torch::Tensor RowWise(torch::Tensor& g) {
  torch::Tensor rows = g._indices();
  const int64_t n = rows.size(1);
  bool ascending = rows.size(0) == 1;
  if (ascending && n > 1) {
    const torch::Tensor r = rows[0];
    ascending = (r.slice(0, 1, n) > r.slice(0, 0, n - 1)).all().item<bool>();
  }
  if (!ascending) g = g.coalesce();
  return g;
}

}  // namespace

double AdamW::ClipGradNorm(double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> squares;
  for (Param& p : params_) {
    torch::Tensor g = p.tensor.grad();
    if (!g.defined()) continue;
    if (g.is_sparse()) {
      g = RowWise(p.tensor.mutable_grad());
      squares.push_back(g._values().square().sum().to(torch::kDouble));
    } else {
      squares.push_back(g.square().sum().to(torch::kDouble));
    }
  }
  if (squares.empty()) return 0;
  const double norm = std::sqrt(torch::stack(squares).sum().item<double>());
  if (std::isfinite(max_norm) && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (Param& p : params_) {
      torch::Tensor& g = p.tensor.mutable_grad();
      if (!g.defined()) continue;
      if (g.is_sparse())
        g._values().mul_(scale);
      else
        g.mul_(scale);
    }
  }
  return norm;
}

void AdamW::Step(double lr) {
  torch::NoGradGuard no_grad;
  for (Param& p : params_) {
    if (!p.tensor.grad().defined()) continue;
    State& s = state_[p.tensor.unsafeGetTensorImpl()];
    if (!s.m.defined()) {
      s.m = torch::zeros_like(p.tensor);
      s.v = torch::zeros_like(p.tensor);
    }
    ++s.steps;
    const double bc1 = 1 - std::pow(options_.beta1, s.steps);
    const double bc2 = 1 - std::pow(options_.beta2, s.steps);
    const double plr = lr * p.lr_scale;
    if (p.tensor.grad().is_sparse()) {
      const torch::Tensor g = RowWise(p.tensor.mutable_grad());
      kernels::AdamWStep st;
      st.lr = plr;
      st.beta1 = options_.beta1;
      st.beta2 = options_.beta2;
      st.eps = options_.eps;
      st.weight_decay = p.decay ? options_.weight_decay : 0.0;
      st.bias_correction1 = bc1;
      st.bias_correction2 = bc2;
      kernels::AdamWRows(p.tensor, s.m, s.v, g._indices()[0], g._values(), st);
      continue;
    }
    const torch::Tensor& g = p.tensor.grad();
    s.m.mul_(options_.beta1).add_(g, 1 - options_.beta1);
    s.v.mul_(options_.beta2).addcmul_(g, g, 1 - options_.beta2);
    if (p.decay && options_.weight_decay > 0) p.tensor.mul_(1 - plr * options_.weight_decay);
    torch::Tensor denom = (s.v / bc2).sqrt_().add_(options_.eps);
    p.tensor.addcdiv_(s.m, denom, -plr / bc1);
  }
}

}  // namespace peerd

namespace peerd {

AdamW::State AdamW::StateOf(const torch::Tensor& p) const {
  auto it = state_.find(p.unsafeGetTensorImpl());
  return it == state_.end() ? State() : it->second;
}

void AdamW::SetState(const torch::Tensor& p, State state) { state_[p.unsafeGetTensorImpl()] = std::move(state); }

}  // namespace peerd
