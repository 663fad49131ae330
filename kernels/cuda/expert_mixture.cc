// The LibTorch side of the CUDA expert mixture: an autograd Function whose forward and backward
// call the kernels of kernels/cuda/expert_mixture.cu. Grouping a segment's retrieved slots by row
// (for the compacted table gradients) uses LibTorch's stable sort and unique on the device.
#include "kernels/cuda/glue.h"
#include "kernels/cuda/kernels_cuda.h"
#include "kernels/cuda/launch.h"

namespace peerd::kernels::cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// tables: down0, up0, down1, up1, … → one TableRows per segment, on the device.
torch::Tensor TableArray(const std::vector<torch::Tensor>& tables, const torch::Device& device) {
  std::vector<TableRows> rows;
  for (size_t t = 0; t < tables.size(); t += 2) {
    for (size_t u = t; u < t + 2; ++u) {
      const torch::Tensor& table = tables[u];
      CheckOn(table, device, "expert tables");
      TORCH_CHECK(
          table.is_contiguous() && (table.scalar_type() == torch::kFloat || table.scalar_type() == torch::kBFloat16),
          "expert tables must be contiguous fp32 or bf16");
    }
    rows.push_back({tables[t].data_ptr(), tables[t + 1].data_ptr(), tables[t].scalar_type() == torch::kBFloat16,
                    tables[t + 1].scalar_type() == torch::kBFloat16});
  }
  return ToDevice(rows, device);
}

// The slots (flat m·J + j) that retrieved rows of segment s, grouped by row.
struct RowGroups {
  torch::Tensor rows;    // [R] the distinct rows, ascending
  torch::Tensor slots;   // [P] by row, then ascending within a row (the sort is stable)
  torch::Tensor starts;  // [R + 1] row r's slots are slots[starts[r] .. starts[r+1])
};

RowGroups GroupByRow(const torch::Tensor& segment, const torch::Tensor& index, int64_t s) {
  torch::Tensor slots = (segment.flatten() == s).nonzero().flatten();  // ascending
  const torch::Tensor hit_rows = index.flatten().index_select(0, slots);
  const auto sorted = torch::sort(hit_rows, /*stable=*/c10::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  slots = slots.index_select(0, std::get<1>(sorted));
  const auto runs = torch::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/false, /*return_counts=*/true);
  const torch::Tensor& counts = std::get<2>(runs);
  return {std::get<0>(runs), slots, torch::cat({torch::zeros({1}, counts.options()), counts.cumsum(0)})};
}

class MixtureFunction : public torch::autograd::Function<MixtureFunction> {
 public:
  // tables: down0, up0, down1, up1, …
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const torch::Tensor& segment, const torch::Tensor& index, torch::TensorList tables) {
    const int64_t M = x.size(0), D = x.size(1), J = w.size(1);
    const c10::DeviceGuard guard(x.device());
    const std::vector<torch::Tensor> kept(tables.begin(), tables.end());
    const torch::Tensor table_array = TableArray(kept, x.device());
    torch::Tensor y = torch::empty({M, D}, x.options()), a = torch::empty({M, J}, x.options());
    CheckLaunch(
        MixtureForward(x.data_ptr<float>(), w.data_ptr<float>(), segment.data_ptr<int64_t>(), index.data_ptr<int64_t>(),
                       DataOf<TableRows>(table_array), M, D, J, y.data_ptr<float>(), a.data_ptr<float>()),
        "ExpertMixture forward");
    ctx->save_for_backward({x, w, segment, index, a});
    ctx->saved_data["table_list"] = c10::List<torch::Tensor>(kept);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor x = saved[0], w = saved[1], segment = saved[2], index = saved[3], a = saved[4];
    const auto table_list = ctx->saved_data["table_list"].toTensorList();
    std::vector<torch::Tensor> tables;
    for (size_t t = 0; t < table_list.size(); ++t) tables.push_back(table_list.get(t));
    const int64_t M = x.size(0), D = x.size(1), J = w.size(1);
    const c10::DeviceGuard guard(x.device());
    CheckDefaultStream(x.device());
    const torch::Tensor gy = grad_outputs[0].defined() ? grad_outputs[0].contiguous() : torch::zeros_like(x);
    const torch::Tensor table_array = TableArray(tables, x.device());
    torch::Tensor gx = torch::empty({M, D}, x.options()), gw = torch::empty({M, J}, x.options());
    torch::Tensor ga = torch::empty({M, J}, x.options()), c = torch::empty({M, J}, x.options());  // dL/da, w·GELU(a)
    CheckLaunch(
        MixtureBackwardTokens(w.data_ptr<float>(), segment.data_ptr<int64_t>(), index.data_ptr<int64_t>(),
                              DataOf<TableRows>(table_array), a.data_ptr<float>(), gy.data_ptr<float>(), M, D, J,
                              gx.data_ptr<float>(), gw.data_ptr<float>(), ga.data_ptr<float>(), c.data_ptr<float>()),
        "ExpertMixture backward");

    variable_list grads = {gx, gw, torch::Tensor(), torch::Tensor()};
    for (size_t s = 0; s < tables.size() / 2; ++s) {
      const torch::Tensor &down = tables[2 * s], &up = tables[2 * s + 1];
      if (!ctx->needs_input_grad(4 + 2 * s) && !ctx->needs_input_grad(5 + 2 * s)) {
        grads.push_back(torch::Tensor());
        grads.push_back(torch::Tensor());
        continue;
      }
      const RowGroups g = GroupByRow(segment, index, static_cast<int64_t>(s));
      const int64_t R = g.rows.size(0), N = down.size(0);
      torch::Tensor gd = torch::empty({R, D}, x.options()), gu = torch::empty({R, D}, x.options());
      CheckLaunch(MixtureRowGrads(x.data_ptr<float>(), gy.data_ptr<float>(), ga.data_ptr<float>(), c.data_ptr<float>(),
                                  g.slots.data_ptr<int64_t>(), g.starts.data_ptr<int64_t>(), R, D, J,
                                  gd.data_ptr<float>(), gu.data_ptr<float>()),
                  "ExpertMixture row gradients");
      // Sparse COO [N, D]: one entry per distinct row, indices ascending — coalesced by construction.
      // Each gradient gets its own indices: autograd keeps a sparse gradient without copying it only
      // when nothing else holds its indices and values (as the CPU kernel does).
      const torch::Tensor ids = g.rows.view({1, R});
      grads.push_back(at::_sparse_coo_tensor_unsafe(ids, gd.to(down.scalar_type()), {N, D})._coalesced_(true));
      grads.push_back(at::_sparse_coo_tensor_unsafe(ids.clone(), gu.to(up.scalar_type()), {N, D})._coalesced_(true));
    }
    return grads;
  }
};

}  // namespace

bool Fits(int64_t D, int64_t k, int64_t J) { return k >= 1 && k <= kMaxTopK && MixtureSharedBytes(D, J) <= 48 * 1024; }

torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables) {
  // Shapes were checked by kernels::ExpertMixture, which dispatches here; only the device's own checks.
  TORCH_CHECK(x.is_cuda(), "x must be on a CUDA device");
  CheckOn(w, x.device(), "w");
  CheckOn(segment, x.device(), "segment");
  CheckOn(index, x.device(), "index");
  TORCH_CHECK(MixtureSharedBytes(x.size(1), w.size(1)) <= 48 * 1024, "ExpertMixture on CUDA: D = ", x.size(1),
              " with J = ", w.size(1), " needs more shared memory than a block gets");
  CheckDefaultStream(x.device());
  std::vector<torch::Tensor> flat;
  for (const ExpertTable& t : tables) {
    flat.push_back(t.down);
    flat.push_back(t.up);
  }
  return MixtureFunction::apply(x.contiguous(), w.contiguous(), segment.contiguous(), index.contiguous(),
                                torch::TensorList(flat));
}

}  // namespace peerd::kernels::cuda
