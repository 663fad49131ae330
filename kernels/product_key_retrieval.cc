// The device-neutral entry of kernels/product_key_retrieval.h: shapes checked once for every
// device, then the CUDA kernels (kernels/cuda) for CUDA tensors, the CPU kernels otherwise.
#include "kernels/product_key_retrieval.h"

#include "kernels/cpu/kernels_cpu.h"
#ifdef PEERD_WITH_CUDA_KERNELS
#include "kernels/cuda/kernels_cuda.h"
#endif

namespace peerd::kernels {

RetrievedExperts ProductKeyRetrieval(const torch::Tensor& query, const std::vector<torch::Tensor>& sub_keys,
                                     int64_t k) {
  TORCH_CHECK(query.dim() == 3 && query.size(2) % 2 == 0 && query.scalar_type() == torch::kFloat,
              "query must be [h, M, dk] fp32 with dk even");
  TORCH_CHECK(!sub_keys.empty(), "retrieval needs at least one segment");
  for (const torch::Tensor& t : sub_keys)
    TORCH_CHECK(t.dim() == 4 && t.size(0) == query.size(0) && t.size(1) == 2 && t.size(3) * 2 == query.size(2) &&
                    t.size(2) >= k && t.scalar_type() == torch::kFloat,
                "sub-keys must be [h, 2, n, dk/2] fp32 with n >= k");
#ifdef PEERD_WITH_CUDA_KERNELS
  if (query.is_cuda()) return cuda::ProductKeyRetrieval(query, sub_keys, k);
#endif
  TORCH_CHECK(query.device().is_cpu(), "ProductKeyRetrieval: this build has no CUDA kernels; query is on ",
              query.device());
  return cpu::ProductKeyRetrieval(query, sub_keys, k);
}

}  // namespace peerd::kernels
