// The expert half of a PEER layer, fused: for every token m and each of the J = h·k experts it
// retrieved, e = (segment[m, j], index[m, j]),
//
//   a[m, j] = u_e · x[m]                    (u_e = down row e of its segment's table)
//   y[m]    = Σ_j w[m, j] · GELU(a[m, j]) · v_e     (v_e = up row e)
//
// without materialising the gathered [M, J, D] row tensors the reference composition
// (PeerLayerImpl::forward) builds. Differentiable in x, w and every table that requires a
// gradient (training segments); frozen tables (fp32 or bf16, read as stored) get none. A table's
// gradient is a sparse COO tensor [N, D] holding only the retrieved rows (indices strictly
// increasing, one entry per row), so a 1M-row table never gets a dense gradient; AdamW updates
// just those rows (kernels/adamw_rows.h). Every sum runs in a fixed order for a given thread
// count, so results do not depend on how threads are scheduled. docs/DESIGN.md §5.
#pragma once

#include <torch/torch.h>

#include <vector>

namespace peerd::kernels {

// One segment's expert rows, resident: down and up [N, D], fp32 or bf16, contiguous.
struct ExpertTable {
  torch::Tensor down, up;
};

// Whether this build has the fused kernels for a layer of model width D, top-k k and J = h·k
// retrieved experts a token, with tensors like `x`: fp32 on the CPU (any sizes), or fp32 on a CUDA
// device when built with kernels/cuda (PEERD_WITH_CUDA_KERNELS) and the sizes are within that
// build's limits (kernels/cuda/kernels_cuda.h, Fits). Otherwise the layer runs the reference
// composition, rather than failing in the kernel.
bool FusedKernelsSupport(const torch::Tensor& x, int64_t D, int64_t k, int64_t J);

// x [M, D] fp32, w [M, J] fp32, segment and index [M, J] int64 (segment: position in `tables`).
// Returns y [M, D] fp32.
torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables);

}  // namespace peerd::kernels
