#include "core/segment_adapter.h"

#include <algorithm>
#include <cmath>

#include "core/config.h"
#include "core/tokenizer.h"

namespace peerd {

SegmentAdapterImpl::SegmentAdapterImpl(const ModelConfig& c, int64_t rank, bool trunk_deltas)
    : rank_(rank),
      owns_trunk_deltas_(trunk_deltas),
      scale_(rank == kFullRank ? 1.0 : 1.0 / std::sqrt(static_cast<double>(rank))) {
  TORCH_CHECK(rank >= 0, "an adapter needs a rank of at least 1 (or kFullRank), got ", rank);
  const int64_t D = c.d_model();
  const std::vector<int> peer_blocks = PeerBlocks(c);
  if (trunk_deltas) {
    AddTrunkDelta("tok_emb", {ByteTokenizer::kVocabSize, D});
    AddTrunkDelta("pos_emb", {int64_t{c.context()}, D});
  }
  for (uint32_t i = 0; i < c.n_layers(); ++i) {
    const std::string b = "block" + std::to_string(i);
    if (trunk_deltas)
      for (const char* ln : {".ln1", ".ln2"}) {
        AddTrunkDelta(b + ln + ".weight", {D});
        AddTrunkDelta(b + ln + ".bias", {D});
      }
    AddMap(b + ".qkv", D, 3 * D, trunk_deltas);
    AddMap(b + ".proj", D, D, trunk_deltas);
    if (std::find(peer_blocks.begin(), peer_blocks.end(), static_cast<int>(i)) != peer_blocks.end()) {
      AddMap(b + ".query", D, int64_t{c.peer().heads()} * c.peer().query_dim(), false);
    } else {
      AddMap(b + ".fc", D, c.dense_hidden(), trunk_deltas);
      AddMap(b + ".fc_proj", c.dense_hidden(), D, trunk_deltas);
    }
  }
  if (trunk_deltas) {
    AddTrunkDelta("ln_f.weight", {D});
    AddTrunkDelta("ln_f.bias", {D});
  }
  AddMap("head", D, ByteTokenizer::kVocabSize, false);
}

void SegmentAdapterImpl::AddTrunkDelta(const std::string& name, std::vector<int64_t> shape) {
  std::string key = name;
  std::replace(key.begin(), key.end(), '.', '_');  // parameter names may not hold '.'
  trunk_[name] = register_parameter(key + "_d", torch::zeros(shape));
}

torch::Tensor SegmentAdapterImpl::TrunkDelta(const std::string& name) const {
  auto it = trunk_.find(name);
  return it == trunk_.end() ? torch::Tensor() : it->second;
}

bool SegmentAdapterImpl::IsTrunkDelta(const torch::Tensor& parameter) const {
  for (const auto& [name, delta] : trunk_)
    if (delta.is_same(parameter)) return true;
  return false;
}

void SegmentAdapterImpl::AddMap(const std::string& name, int64_t in, int64_t out, bool with_bias) {
  if (with_bias) AddTrunkDelta(name + ".bias", {out});  // the map's bias delta
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
  torch::Tensor delta = !b.defined()
                            ? torch::matmul(x, a.t())                                  // full: ΔW x
                            : torch::matmul(torch::matmul(x, a.t()), b.t()) * scale_;  // [..., r] -> [..., out]
  torch::Tensor bias = TrunkDelta(name + ".bias");
  return bias.defined() ? delta + bias : delta;
}

void SegmentAdapterImpl::Freeze() {
  frozen_ = true;
  for (auto& p : parameters()) p.set_requires_grad(false);
}

}  // namespace peerd
