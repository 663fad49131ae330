#include "core/expert_segment.h"

#include <xxhash.h>

#include <cmath>

namespace peerd {

ExpertSegmentImpl::ExpertSegmentImpl(int64_t id, int64_t n_keys, int64_t d_model, int64_t heads, int64_t query_dim)
    : id_(id), n_keys_(n_keys), d_model_(d_model) {
  const int64_t half = query_dim / 2;
  // Scales keep every score O(1) at initialisation: a normalised query half has unit-variance
  // entries, so sub-keys of std 1/sqrt(dk/2) give unit-variance half scores; u·x for x of
  // unit-variance entries has unit variance with std(u) = 1/sqrt(D); v starts small so a new
  // segment barely moves the output until it has learnt something. Scaled in place: a 1M-expert
  // table is 1 GB, and `randn(...) * c` held two of them at once — the peak of a process that
  // builds a segment (peer-bench layer measured it as the layer's peak RSS).
  sub_keys =
      register_parameter("sub_keys", torch::randn({heads, 2, n_keys, half}).div_(std::sqrt(static_cast<double>(half))));
  down = register_parameter("down",
                            torch::randn({n_keys * n_keys, d_model}).div_(std::sqrt(static_cast<double>(d_model))));
  up = register_parameter("up", torch::randn({n_keys * n_keys, d_model}).mul_(0.02));
}

ExpertSegmentImpl::ExpertSegmentImpl(int64_t id, torch::Tensor keys, torch::Tensor down_rows, torch::Tensor up_rows)
    : id_(id), n_keys_(keys.size(2)), d_model_(down_rows.size(1)) {
  TORCH_CHECK(down_rows.size(0) == n_keys_ * n_keys_ && up_rows.sizes() == down_rows.sizes(), "segment ", id,
              ": rows do not match ", n_keys_, "² experts");
  sub_keys = register_parameter("sub_keys", std::move(keys), /*requires_grad=*/false);
  down = register_parameter("down", std::move(down_rows), false);
  up = register_parameter("up", std::move(up_rows), false);
  MarkFrozen();
}

ExpertSegmentImpl::ExpertSegmentImpl(int64_t id, torch::Tensor keys, int64_t d_model,
                                     std::shared_ptr<ExpertRowSource> rows)
    : id_(id), n_keys_(keys.size(2)), d_model_(d_model), source_(std::move(rows)) {
  sub_keys = register_parameter("sub_keys", std::move(keys), false);
  MarkFrozen();
}

void ExpertSegmentImpl::Freeze(torch::ScalarType hold_rows_as, std::shared_ptr<ExpertRowSource> rows) {
  if (frozen()) return;
  for (auto& p : parameters()) {
    p.set_requires_grad(false);
    p.mutable_grad() = torch::Tensor();
  }
  if (rows) {
    // As if restored from the store with cached residency: no row tensors, not even registered.
    parameters_.erase("down");
    parameters_.erase("up");
    down = up = torch::Tensor();
    source_ = std::move(rows);
  } else if (resident() && down.scalar_type() != hold_rows_as) {
    torch::NoGradGuard no_grad;
    down = parameters_["down"] = down.to(hold_rows_as);  // re-point the registered parameter too
    up = parameters_["up"] = up.to(hold_rows_as);
  }
  MarkFrozen();
}

void ExpertSegmentImpl::MarkFrozen() {
  state_ = SegmentState::kFrozen;
  frozen_checksum_ = Checksum();
}

uint64_t ExpertSegmentImpl::Checksum() const {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  for (const torch::Tensor& t : {sub_keys, down, up}) {
    if (!t.defined()) continue;
    torch::Tensor c = t.detach().contiguous().to(torch::kCPU);
    std::vector<int64_t> shape = c.sizes().vec();
    XXH3_64bits_update(state, shape.data(), shape.size() * sizeof(int64_t));
    XXH3_64bits_update(state, c.data_ptr(), c.numel() * c.element_size());
  }
  uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

std::pair<torch::Tensor, torch::Tensor> ExpertSegmentImpl::Rows(const torch::Tensor& experts,
                                                                torch::ScalarType dtype) const {
  if (resident()) return {down.index_select(0, experts).to(dtype), up.index_select(0, experts).to(dtype)};
  torch::Tensor ids = experts.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t n = ids.numel();
  torch::Tensor d = torch::empty({n, d_model_}), u = torch::empty({n, d_model_});
  Status st = source_->Fetch(ids.data_ptr<int64_t>(), n, d.data_ptr<float>(), u.data_ptr<float>());
  TORCH_CHECK(st.ok(), "segment ", id_, ": cannot fetch expert rows: ", st.ToString());
  return {d.to(experts.device(), dtype), u.to(experts.device(), dtype)};
}

}  // namespace peerd
