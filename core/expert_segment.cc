#include "core/expert_segment.h"

#include <xxhash.h>

#include <cmath>

namespace peerd {

ExpertSegmentImpl::ExpertSegmentImpl(int64_t id, int64_t n_keys, int64_t d_model, int64_t heads,
                                     int64_t query_dim)
    : id_(id), n_keys_(n_keys) {
  const int64_t half = query_dim / 2;
  // Scales keep every score O(1) at initialisation: a normalised query half has unit-variance
  // entries, so sub-keys of std 1/sqrt(dk/2) give unit-variance half scores; u·x for x of
  // unit-variance entries has unit variance with std(u) = 1/sqrt(D); v starts small so a new
  // segment barely moves the output until it has learnt something.
  sub_keys = register_parameter(
      "sub_keys", torch::randn({heads, 2, n_keys, half}) / std::sqrt(static_cast<double>(half)));
  down = register_parameter("down", torch::randn({n_keys * n_keys, d_model}) /
                                        std::sqrt(static_cast<double>(d_model)));
  up = register_parameter("up", torch::randn({n_keys * n_keys, d_model}) * 0.02);
}

void ExpertSegmentImpl::Freeze() {
  if (frozen()) return;
  for (auto& p : parameters()) {
    p.set_requires_grad(false);
    p.mutable_grad() = torch::Tensor();
  }
  state_ = SegmentState::kFrozen;
  frozen_checksum_ = Checksum();
}

uint64_t ExpertSegmentImpl::Checksum() const {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  for (const torch::Tensor& t : {sub_keys, down, up}) {
    torch::Tensor c = t.detach().contiguous().to(torch::kCPU);
    std::vector<int64_t> shape = c.sizes().vec();
    XXH3_64bits_update(state, shape.data(), shape.size() * sizeof(int64_t));
    XXH3_64bits_update(state, c.data_ptr(), c.numel() * c.element_size());
  }
  uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

}  // namespace peerd
