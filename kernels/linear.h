// y = x · Wᵀ, a bias-free linear map with its gradients: the PEER layer's query projection
// (x [M, D] → [M, h·dk]), 13 of the ~30 GFLOP of a 1M-expert layer step with its backward. On CPUs
// with AVX-512 all three GEMMs (y, ∂x = ∂y · W, ∂W = ∂yᵀ · x) run on kernels/cpu/packed_gemm.h,
// ~2× OpenBLAS's AVX2 kernels a thread; elsewhere (no AVX-512, CUDA, other dtypes) this is
// at::linear. Each output element is one fp32 sum over the inner dimension in ascending order,
// split over threads by rows: the same bits for any thread count.
#pragma once

#include <torch/torch.h>

namespace peerd::kernels {

// x [..., D] fp32, weight [F, D] fp32; returns [..., F], differentiable in both.
torch::Tensor Linear(const torch::Tensor& x, const torch::Tensor& weight);

}  // namespace peerd::kernels
