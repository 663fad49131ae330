// The CPU implementations of the fused PEER kernels (docs/DESIGN.md §5): the same functions as
// kernels/expert_mixture.h, kernels/product_key_retrieval.h and kernels/adamw_rows.h, for CPU
// tensors. The public functions (kernels/*.cc) check the shapes, pick the device and call these;
// callers use the public functions.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "kernels/adamw_rows.h"
#include "kernels/expert_mixture.h"
#include "kernels/product_key_retrieval.h"

namespace peerd::kernels::cpu {

// kernels/expert_mixture.h.
torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables);

// kernels/product_key_retrieval.h.
RetrievedExperts ProductKeyRetrieval(const torch::Tensor& query, const std::vector<torch::Tensor>& sub_keys, int64_t k);

// kernels/adamw_rows.h; param, m and v contiguous.
void AdamWRows(torch::Tensor& param, torch::Tensor& m, torch::Tensor& v, const torch::Tensor& rows,
               const torch::Tensor& grad, const AdamWStep& step);

}  // namespace peerd::kernels::cpu
