// The CUDA implementations of the fused PEER kernels (docs/DESIGN.md §5): the same functions, with the
// same signatures and contracts, as kernels/expert_mixture.h, kernels/product_key_retrieval.h
// and kernels/adamw_rows.h, for tensors on a CUDA device. The public functions call these when
// the build has them (PEERD_WITH_CUDA_KERNELS) and their inputs are CUDA tensors; callers use
// the public functions.
//
// Every tensor of a call must be on one CUDA device. The kernels run on that device's default
// stream, and refuse to run when LibTorch's current stream is another one. Differences from the
// CPU kernels, all within float rounding: some sums run in another order (fixed, so every output
// and gradient is the same bits on every run).
#pragma once

#include <torch/torch.h>

#include <vector>

#include "kernels/adamw_rows.h"
#include "kernels/expert_mixture.h"
#include "kernels/product_key_retrieval.h"

namespace peerd::kernels::cuda {

// Whether a layer of model width D, top-k k and J = h·k experts a token is within these kernels'
// limits: k ≤ 32 (the retrieval's per-lane lists) and 4·D + 16·J bytes of shared memory ≤ 48 KiB.
// (Sub-keys per half ≤ 65536 is a limit of the configuration already.)
bool Fits(int64_t D, int64_t k, int64_t J);

// kernels/expert_mixture.h. Tables (fp32 or bf16) are read in place; D and J are bounded by the
// 48 KiB of shared memory a token's block uses (4·D + 16·J bytes: D ≤ 10240 with J = 512).
torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables);

// kernels/product_key_retrieval.h, for k ≤ 32.
RetrievedExperts ProductKeyRetrieval(const torch::Tensor& query, const std::vector<torch::Tensor>& sub_keys, int64_t k);

// kernels/adamw_rows.h.
void AdamWRows(torch::Tensor& param, torch::Tensor& m, torch::Tensor& v, const torch::Tensor& rows,
               const torch::Tensor& grad, const AdamWStep& step);

}  // namespace peerd::kernels::cuda
