// The LibTorch side of the CUDA row-wise AdamW: checks, the step's constants rounded to float as
// the CPU kernel rounds them, and one launch.
#include "kernels/cuda/glue.h"
#include "kernels/cuda/kernels_cuda.h"
#include "kernels/cuda/launch.h"

namespace peerd::kernels::cuda {

void AdamWRows(torch::Tensor& param, torch::Tensor& m, torch::Tensor& v, const torch::Tensor& rows,
               const torch::Tensor& grad, const AdamWStep& step) {
  TORCH_CHECK(param.is_cuda() && param.dim() == 2 && param.scalar_type() == torch::kFloat && param.is_contiguous() &&
                  m.sizes() == param.sizes() && v.sizes() == param.sizes() && m.scalar_type() == torch::kFloat &&
                  v.scalar_type() == torch::kFloat && m.is_contiguous() && v.is_contiguous(),
              "AdamWRows: param, m and v must be contiguous fp32 [N, D] on a CUDA device");
  const torch::Tensor r = rows.contiguous(), g = grad.contiguous();
  TORCH_CHECK(r.dim() == 1 && r.scalar_type() == torch::kLong && g.dim() == 2 && g.size(0) == r.size(0) &&
                  g.size(1) == param.size(1) && g.scalar_type() == torch::kFloat,
              "AdamWRows: rows must be [R] int64 and grad [R, D] fp32");
  CheckOn(m, param.device(), "m");
  CheckOn(v, param.device(), "v");
  CheckOn(r, param.device(), "rows");
  CheckOn(g, param.device(), "grad");
  const c10::DeviceGuard guard(param.device());
  CheckDefaultStream(param.device());
  AdamWConstants c;
  c.beta1 = step.beta1;
  c.beta2 = step.beta2;
  c.eps = step.eps;
  c.step = step.lr / step.bias_correction1;
  c.inv_bc2 = 1.0 / step.bias_correction2;
  c.decay = 1.0 - step.lr * step.weight_decay;
  CheckLaunch(AdamWRowsUpdate(param.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), r.data_ptr<int64_t>(),
                              g.data_ptr<float>(), r.size(0), param.size(1), c),
              "AdamWRows");
}

}  // namespace peerd::kernels::cuda
