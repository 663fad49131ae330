#include "core/segment_adapter.h"

#include <algorithm>
#include <cmath>

#include "core/config.h"
#include "core/tokenizer.h"

namespace peerd {

SegmentAdapterImpl::SegmentAdapterImpl(const ModelConfig& c, int64_t rank)
    : rank_(rank), scale_(rank == kFullRank ? 1.0 : 1.0 / std::sqrt(static_cast<double>(rank))) {
  TORCH_CHECK(rank >= 0, "an adapter needs a rank of at least 1 (or kFullRank), got ", rank);
  const int64_t D = c.d_model();
  const std::vector<int> peer_blocks = PeerBlocks(c);
  for (uint32_t i = 0; i < c.n_layers(); ++i) {
    const std::string b = "block" + std::to_string(i);
    AddMap(b + ".qkv", D, 3 * D);
    AddMap(b + ".proj", D, D);
    if (std::find(peer_blocks.begin(), peer_blocks.end(), static_cast<int>(i)) != peer_blocks.end()) {
      AddMap(b + ".query", D, int64_t{c.peer().heads()} * c.peer().query_dim());
    } else {
      AddMap(b + ".fc", D, c.dense_hidden());
      AddMap(b + ".fc_proj", c.dense_hidden(), D);
    }
  }
  AddMap("head", D, ByteTokenizer::kVocabSize);
}

void SegmentAdapterImpl::AddMap(const std::string& name, int64_t in, int64_t out) {
  std::string key = name;
  std::replace(key.begin(), key.end(), '.', '_');  // parameter names may not hold '.'
  if (rank_ == kFullRank) {
    maps_[name] = {register_parameter(key + "_w", torch::zeros({out, in})), torch::Tensor()};
    return;
  }
  // A ~ N(0, 1/in) keeps A x at unit scale; B = 0 makes a new adapter the identity change.
  torch::Tensor a = register_parameter(key + "_a", torch::randn({rank_, in}) / std::sqrt(static_cast<double>(in)));
  torch::Tensor b = register_parameter(key + "_b", torch::zeros({out, rank_}));
  maps_[name] = {a, b};
}

torch::Tensor SegmentAdapterImpl::Delta(const std::string& name, const torch::Tensor& x) const {
  auto it = maps_.find(name);
  if (it == maps_.end()) return {};
  const auto& [a, b] = it->second;
  if (!b.defined()) return torch::matmul(x, a.t());  // full: ΔW x
  return torch::matmul(torch::matmul(x, a.t()), b.t()) * scale_;  // [..., in] -> [..., r] -> [..., out]
}

void SegmentAdapterImpl::Freeze() {
  frozen_ = true;
  for (auto& p : parameters()) p.set_requires_grad(false);
}

}  // namespace peerd
