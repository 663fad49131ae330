// CPU implementation of kernels/linear.h.
#include "kernels/linear.h"

#include <ATen/Parallel.h>

#include <vector>

#include "kernels/cpu/packed_gemm.h"

namespace peerd::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows of C each parallel task takes: a multiple of the kernel's row block.
constexpr int64_t kRowsPerTask = 256;

// C [M, N] = A · B, B packed; A[m][k] = a[m · row_stride + k · col_stride]. Rows split over threads.
void MultiplyRows(const cpu::PackedMatrix& b, const float* a, int64_t row_stride, int64_t col_stride, int64_t M,
                  float* c) {
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
    b.Multiply(a + begin * row_stride, row_stride, col_stride, end - begin, c + begin * b.N(), b.N());
  });
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight) {
    const int64_t M = x.size(0), D = x.size(1), F = weight.size(0);
    ctx->save_for_backward({x, weight});
    torch::Tensor y = torch::empty({M, F});
    cpu::PackedMatrix w_t;  // Wᵀ [D, F]
    w_t.Pack(weight.data_ptr<float>(), D, F, 1, D);
    MultiplyRows(w_t, x.data_ptr<float>(), D, 1, M, y.data_ptr<float>());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor x = saved[0], weight = saved[1], gy = grad_outputs[0].contiguous();
    const int64_t M = x.size(0), D = x.size(1), F = weight.size(0);
    torch::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {  // ∂x [M, D] = ∂y [M, F] · W [F, D]
      gx = torch::empty({M, D});
      cpu::PackedMatrix w;
      w.Pack(weight.data_ptr<float>(), F, D, D, 1);
      MultiplyRows(w, gy.data_ptr<float>(), F, 1, M, gx.data_ptr<float>());
    }
    if (ctx->needs_input_grad(1)) {  // ∂W [F, D] = ∂yᵀ [F, M] · x [M, D]
      gw = torch::empty({F, D});
      cpu::PackedMatrix xs;
      xs.Pack(x.data_ptr<float>(), M, D, D, 1);
      MultiplyRows(xs, gy.data_ptr<float>(), 1, F, F, gw.data_ptr<float>());
    }
    return {gx, gw};
  }
};

}  // namespace

torch::Tensor Linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "Linear: x [..., D] and weight [F, D] needed, got ",
              x.sizes(), " and ", weight.sizes());
  if (!cpu::PackedMatrix::Available() || !x.device().is_cpu() || !weight.device().is_cpu() ||
      x.scalar_type() != torch::kFloat || weight.scalar_type() != torch::kFloat)
    return at::linear(x, weight);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  const torch::Tensor flat = x.reshape({-1, x.size(-1)}).contiguous();
  return LinearFunction::apply(flat, weight.contiguous()).view(out_shape);
}

}  // namespace peerd::kernels
