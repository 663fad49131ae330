#include "core/adamw.h"

#include <cmath>

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

void AdamW::Step(double lr) {
  torch::NoGradGuard no_grad;
  for (Param& p : params_) {
    const torch::Tensor& g = p.tensor.grad();
    if (!g.defined()) continue;
    State& s = state_[p.tensor.unsafeGetTensorImpl()];
    if (!s.m.defined()) {
      s.m = torch::zeros_like(p.tensor);
      s.v = torch::zeros_like(p.tensor);
    }
    ++s.steps;
    s.m.mul_(options_.beta1).add_(g, 1 - options_.beta1);
    s.v.mul_(options_.beta2).addcmul_(g, g, 1 - options_.beta2);
    const double bc1 = 1 - std::pow(options_.beta1, s.steps);
    const double bc2 = 1 - std::pow(options_.beta2, s.steps);
    const double plr = lr * p.lr_scale;
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
