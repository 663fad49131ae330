// The device-neutral entry of kernels/adamw_rows.h: the CUDA kernel (kernels/cuda) for CUDA
// tensors, the CPU kernel otherwise; each checks the shapes it relies on.
#include "kernels/adamw_rows.h"

#include "kernels/cpu/kernels_cpu.h"
#ifdef PEERD_WITH_CUDA_KERNELS
#include "kernels/cuda/kernels_cuda.h"
#endif

namespace peerd::kernels {

void AdamWRows(torch::Tensor& param, torch::Tensor& m, torch::Tensor& v, const torch::Tensor& rows,
               const torch::Tensor& grad, const AdamWStep& step) {
#ifdef PEERD_WITH_CUDA_KERNELS
  if (param.is_cuda()) return cuda::AdamWRows(param, m, v, rows, grad, step);
#endif
  TORCH_CHECK(param.device().is_cpu(), "AdamWRows: this build has no CUDA kernels; param is on ", param.device());
  cpu::AdamWRows(param, m, v, rows, grad, step);
}

}  // namespace peerd::kernels
