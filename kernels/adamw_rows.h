// The row-wise AdamW update for expert tables (docs/DESIGN.md §5): a training segment's gradient is
// sparse — only the rows some token retrieved this step — and the update touches exactly those
// rows of the parameter and of both moments. Rows nobody retrieved keep their values and their
// moments (lazy Adam, as torch.optim.SparseAdam): a 1M-expert table costs per step what the
// retrieved rows cost, not what the table costs.
#pragma once

#include <torch/torch.h>

namespace peerd::kernels {

struct AdamWStep {
  double lr = 0;  // this parameter's learning rate
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0;                            // decoupled, applied to the updated rows only
  double bias_correction1 = 1, bias_correction2 = 1;  // 1 − β^t for this parameter's step t
};

// param, m, v: [N, D] fp32 contiguous. rows: [R] int64, strictly increasing, in [0, N).
// grad: [R, D] fp32, grad[r] the gradient of row rows[r]. Updates the rows in place.
void AdamWRows(torch::Tensor& param, torch::Tensor& m, torch::Tensor& v, const torch::Tensor& rows,
               const torch::Tensor& grad, const AdamWStep& step);

}  // namespace peerd::kernels
