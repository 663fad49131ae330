// The device-neutral entry of kernels/expert_mixture.h: shapes checked once for every device,
// then the CUDA kernels (kernels/cuda) for CUDA tensors, the CPU kernels (kernels/cpu) otherwise.
#include "kernels/expert_mixture.h"

#include "kernels/cpu/kernels_cpu.h"
#ifdef PEERD_WITH_CUDA_KERNELS
#include "kernels/cuda/kernels_cuda.h"
#endif

namespace peerd::kernels {

bool FusedKernelsSupport(const torch::Tensor& x, int64_t D, int64_t k, int64_t J) {
  if (x.scalar_type() != torch::kFloat) return false;
#ifdef PEERD_WITH_CUDA_KERNELS
  if (x.is_cuda()) return cuda::Fits(D, k, J);
#else
  (void)D, (void)k, (void)J;
#endif
  return x.device().is_cpu();
}

torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be [M, D] fp32");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.scalar_type() == torch::kFloat, "w must be [M, J] fp32");
  TORCH_CHECK(segment.sizes() == w.sizes() && index.sizes() == w.sizes() && segment.scalar_type() == torch::kLong &&
                  index.scalar_type() == torch::kLong,
              "segment and index must be int64 shaped like w");
  for (const ExpertTable& t : tables)
    TORCH_CHECK(t.down.dim() == 2 && t.down.size(1) == x.size(1) && t.up.sizes() == t.down.sizes(),
                "expert tables must be [N, D] with D = x.size(1)");
#ifdef PEERD_WITH_CUDA_KERNELS
  if (x.is_cuda()) return cuda::ExpertMixture(x, w, segment, index, tables);
#endif
  TORCH_CHECK(x.device().is_cpu(), "ExpertMixture: this build has no CUDA kernels; x is on ", x.device());
  return cpu::ExpertMixture(x, w, segment, index, tables);
}

}  // namespace peerd::kernels
