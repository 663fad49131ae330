// CPU implementation of kernels/expert_mixture.h: parallel over tokens for the forward pass and
// for the gradients of x and w; parallel over distinct retrieved rows for the table gradients.
#include "kernels/expert_mixture.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <numeric>

namespace peerd::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline float Gelu(float a) { return 0.5f * a * (1.0f + std::erf(a * kInvSqrt2)); }
inline float GeluGrad(float a) { return 0.5f * (1.0f + std::erf(a * kInvSqrt2)) + a * kInvSqrt2Pi * std::exp(-0.5f * a * a); }

// Row e of a table as floats (the row pointer typed by the table's dtype).
struct RowView {
  const void* base;
  bool bf16;
  int64_t D;
  float At(int64_t e, int64_t d) const {
    return bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(base)[e * D + d])
                : static_cast<const float*>(base)[e * D + d];
  }
};

RowView View(const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16),
              "expert tables must be contiguous fp32 or bf16");
  return {t.data_ptr(), t.scalar_type() == torch::kBFloat16, t.size(1)};
}

float Dot(const RowView& r, int64_t e, const float* x, int64_t D) {
  float s = 0;
  if (!r.bf16) {
    const float* row = static_cast<const float*>(r.base) + e * D;
    for (int64_t d = 0; d < D; ++d) s += row[d] * x[d];
  } else {
    for (int64_t d = 0; d < D; ++d) s += r.At(e, d) * x[d];
  }
  return s;
}

void Axpy(float c, const RowView& r, int64_t e, float* y, int64_t D) {
  if (!r.bf16) {
    const float* row = static_cast<const float*>(r.base) + e * D;
    for (int64_t d = 0; d < D; ++d) y[d] += c * row[d];
  } else {
    for (int64_t d = 0; d < D; ++d) y[d] += c * r.At(e, d);
  }
}

class ExpertMixtureFunction : public torch::autograd::Function<ExpertMixtureFunction> {
 public:
  // tables: down0, up0, down1, up1, ...
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const torch::Tensor& segment, const torch::Tensor& index, torch::TensorList tables) {
    const int64_t M = x.size(0), D = x.size(1), J = w.size(1);
    std::vector<RowView> downs, ups;
    for (size_t t = 0; t < tables.size(); t += 2) {
      downs.push_back(View(tables[t]));
      ups.push_back(View(tables[t + 1]));
    }
    torch::Tensor y = torch::zeros({M, D});
    torch::Tensor a = torch::empty({M, J});
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    const int64_t* sp = segment.data_ptr<int64_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    float* yp = y.data_ptr<float>();
    float* ap = a.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const float* xm = xp + m * D;
        for (int64_t j = 0; j < J; ++j) {
          const int64_t s = sp[m * J + j], e = ip[m * J + j];
          const float pre = Dot(downs[s], e, xm, D);
          ap[m * J + j] = pre;
          Axpy(wp[m * J + j] * Gelu(pre), ups[s], e, yp + m * D, D);
        }
      }
    });
    ctx->save_for_backward({x, w, segment, index, a});
    ctx->saved_data["tables"] = static_cast<int64_t>(tables.size());
    std::vector<torch::Tensor> kept(tables.begin(), tables.end());
    ctx->saved_data["table_list"] = c10::List<torch::Tensor>(kept);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor x = saved[0], w = saved[1], segment = saved[2], index = saved[3], a = saved[4];
    const auto table_list = ctx->saved_data["table_list"].toTensorList();
    const torch::Tensor gy = grad_outputs[0].contiguous();
    const int64_t M = x.size(0), D = x.size(1), J = w.size(1);
    const size_t n_tables = table_list.size();
    std::vector<RowView> downs, ups;
    std::vector<torch::Tensor> tables;
    for (size_t t = 0; t < n_tables; ++t) tables.push_back(table_list.get(t));
    for (size_t t = 0; t < n_tables; t += 2) {
      downs.push_back(View(tables[t]));
      ups.push_back(View(tables[t + 1]));
    }
    torch::Tensor gx = torch::zeros({M, D}), gw = torch::empty({M, J});
    torch::Tensor ga = torch::empty({M, J}), c = torch::empty({M, J});  // dL/da and w·GELU(a)
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *ap = a.data_ptr<float>(),
                *gyp = gy.data_ptr<float>();
    const int64_t *sp = segment.data_ptr<int64_t>(), *ip = index.data_ptr<int64_t>();
    float *gxp = gx.data_ptr<float>(), *gwp = gw.data_ptr<float>(), *gap = ga.data_ptr<float>(), *cp = c.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t j = 0; j < J; ++j) {
          const int64_t mj = m * J + j, s = sp[mj], e = ip[mj];
          const float sv = Dot(ups[s], e, gyp + m * D, D);  // gy · v
          const float g = Gelu(ap[mj]);
          gwp[mj] = g * sv;
          cp[mj] = wp[mj] * g;
          gap[mj] = wp[mj] * sv * GeluGrad(ap[mj]);
          Axpy(gap[mj], downs[s], e, gxp + m * D, D);
        }
      }
    });

    variable_list grads = {gx, gw, torch::Tensor(), torch::Tensor()};
    // Table gradients: for each segment that trains, the (m, j) pairs that retrieved it, ordered
    // by row then by (m, j), so every row sums its contributions in one fixed order.
    for (size_t s = 0; s < n_tables / 2; ++s) {
      const torch::Tensor &down = tables[2 * s], &up = tables[2 * s + 1];
      if (!ctx->needs_input_grad(4 + 2 * s) && !ctx->needs_input_grad(5 + 2 * s)) {
        grads.push_back(torch::Tensor());
        grads.push_back(torch::Tensor());
        continue;
      }
      std::vector<int64_t> hits;
      for (int64_t mj = 0; mj < M * J; ++mj)
        if (sp[mj] == static_cast<int64_t>(s)) hits.push_back(mj);
      std::stable_sort(hits.begin(), hits.end(), [&](int64_t p, int64_t q) { return ip[p] < ip[q]; });
      std::vector<size_t> starts;
      for (size_t h = 0; h < hits.size(); ++h)
        if (h == 0 || ip[hits[h]] != ip[hits[h - 1]]) starts.push_back(h);
      starts.push_back(hits.size());
      torch::Tensor gd = torch::zeros_like(down, torch::kFloat), gu = torch::zeros_like(up, torch::kFloat);
      float *gdp = gd.data_ptr<float>(), *gup = gu.data_ptr<float>();
      at::parallel_for(0, static_cast<int64_t>(starts.size()) - 1, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t e = ip[hits[starts[r]]];
          float *gdr = gdp + e * D, *gur = gup + e * D;
          for (size_t h = starts[r]; h < starts[r + 1]; ++h) {
            const int64_t mj = hits[h], m = mj / J;
            for (int64_t d = 0; d < D; ++d) {
              gdr[d] += gap[mj] * xp[m * D + d];
              gur[d] += cp[mj] * gyp[m * D + d];
            }
          }
        }
      });
      grads.push_back(gd.to(down.scalar_type()));
      grads.push_back(gu.to(up.scalar_type()));
    }
    return grads;
  }
};

}  // namespace

torch::Tensor ExpertMixture(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& segment,
                            const torch::Tensor& index, const std::vector<ExpertTable>& tables) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be [M, D] fp32");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.scalar_type() == torch::kFloat, "w must be [M, J] fp32");
  TORCH_CHECK(segment.sizes() == w.sizes() && index.sizes() == w.sizes() && segment.scalar_type() == torch::kLong &&
                  index.scalar_type() == torch::kLong,
              "segment and index must be int64 shaped like w");
  std::vector<torch::Tensor> flat;
  for (const ExpertTable& t : tables) {
    TORCH_CHECK(t.down.dim() == 2 && t.down.size(1) == x.size(1) && t.up.sizes() == t.down.sizes(),
                "expert tables must be [N, D] with D = x.size(1)");
    flat.push_back(t.down);
    flat.push_back(t.up);
  }
  return ExpertMixtureFunction::apply(x.contiguous(), w.contiguous(), segment.contiguous(), index.contiguous(),
                                      torch::TensorList(flat));
}

}  // namespace peerd::kernels
