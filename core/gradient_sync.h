// SumGradients: the gradient all-reduce of data-parallel training — what PyTorch's DDP does, which
// Debian's LibTorch 1.13 does not ship for C++ (docs/DESIGN.md §6).
//
// Dense gradients are flattened into buckets of about `bucket_bytes` (one all-reduce each rather
// than one per parameter: fewer, larger messages); sparse row gradients (expert tables through the
// fused kernel: only the rows retrieved on each rank) go through Gloo's sparse all-reduce, so the
// wire carries rows, not tables. A rank that has no gradient for a parameter the others have (a
// share of the batch that retrieved none of a segment's rows) takes part with zeros; a parameter
// no rank has a gradient for keeps none, as it would in one process.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "core/collective.h"

namespace peerd {

Status SumGradients(Collective& collective, const std::vector<torch::Tensor>& params,
                    int64_t bucket_bytes = int64_t{16} << 20);

}  // namespace peerd
