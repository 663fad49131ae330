// AdamW (Loshchilov & Hutter 2019) over an explicit, changeable set of parameters.
//
// Written out rather than torch::optim::AdamW because the set of parameters changes while
// training: a frozen segment must leave the optimizer entirely (Adam's momentum keeps moving rows
// whose gradient is zero, so zero gradients are not enough), and a new segment joins with fresh
// state. SetParameters keeps the state of parameters that stay and drops the rest. Each parameter
// counts its own steps, so bias correction is right for one that joined late.
//
// A parameter whose gradient is sparse (an expert table through the fused kernel: only the rows
// retrieved this step) is updated row-wise (kernels/adamw_rows.h): rows without a gradient keep
// their values and moments, so a step costs what the retrieved rows cost.
#pragma once

#include <torch/torch.h>

#include <unordered_map>
#include <vector>

namespace peerd {

class AdamW {
 public:
  struct Options {
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
  };
  struct Param {
    torch::Tensor tensor;
    bool decay = false;     // decoupled weight decay applies
    double lr_scale = 1.0;  // this parameter's learning rate is lr · lr_scale (policy groups)
  };

  struct State {
    torch::Tensor m, v;  // first and second moment, shaped like the parameter (undefined: none yet)
    int64_t steps = 0;
  };

  explicit AdamW(Options options) : options_(options) {}

  void SetParameters(std::vector<Param> params);
  const std::vector<Param>& parameters() const { return params_; }
  // Scales every gradient (dense and sparse alike) so that their joint L2 norm is at most
  // `max_norm` (infinity: no scaling); returns the norm before scaling.
  double ClipGradNorm(double max_norm);
  // One update of every parameter that has a gradient, at learning rate `lr`.
  void Step(double lr);
  void ZeroGrad();

  // The state of parameter `p` (a default State if it has none) — for checkpoints.
  State StateOf(const torch::Tensor& p) const;
  // Restores the state of `p`, which must be one of parameters().
  void SetState(const torch::Tensor& p, State state);
  void set_options(Options options) { options_ = options; }

 private:
  Options options_;
  std::vector<Param> params_;
  std::unordered_map<const void*, State> state_;  // keyed by the parameter's TensorImpl
};

}  // namespace peerd
