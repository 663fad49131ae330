#include "core/peer_layer.h"

#include <algorithm>
#include <string>

#include "core/check_ok.h"
#include "kernels/expert_mixture.h"
#include "kernels/linear.h"
#include "kernels/product_key_retrieval.h"

namespace peerd {

PeerLayerImpl::PeerLayerImpl(int64_t d_model, const PeerConfig& config) : d_model_(d_model), config_(config) {
  const int64_t features = config.heads() * config.query_dim();
  query_proj =
      register_module("query_proj", torch::nn::Linear(torch::nn::LinearOptions(d_model, features).bias(false)));
  if (config.query_norm() != QUERY_NORM_NONE) {
    norm_weight = register_parameter("norm_weight", torch::ones({features}));
    norm_bias = register_parameter("norm_bias", torch::zeros({features}));
  }
  if (config.query_norm() == QUERY_NORM_BATCH) {
    running_mean = register_buffer("running_mean", torch::zeros({features}));
    running_var = register_buffer("running_var", torch::ones({features}));
  }
  for (uint32_t i = 0; i < config.initial_segments(); ++i) {
    CheckOk(AddSegment(config.n_keys()));
  }
}

Status PeerLayerImpl::AddSegment(int64_t n_keys, int64_t* id) {
  const int64_t new_id = next_segment_id_;
  if (Status st = AddSegmentWithId(new_id, n_keys); !st.ok()) return st;
  if (id) *id = new_id;
  return Status::OK();
}

void PeerLayerImpl::StartUsageRecording() {
  usage_.clear();
  recording_usage_ = true;
}

Status PeerLayerImpl::AddSegmentWithId(int64_t id, int64_t n_keys) {
  if (n_keys < static_cast<int64_t>(config_.topk()) || n_keys > 65536)
    return Status::InvalidArgument("a segment needs between top-k (" + std::to_string(config_.topk()) +
                                   ") and 65536 sub-keys per half, got n_keys = " + std::to_string(n_keys));
  auto at = segments_.begin();
  while (at != segments_.end() && (*at)->id() < id) ++at;
  if (at != segments_.end() && (*at)->id() == id)
    return Status::FailedPrecondition("segment " + std::to_string(id) + " exists already");
  segments_.insert(at, register_module("segment" + std::to_string(id),
                                       ExpertSegment(id, n_keys, d_model_, config_.heads(), config_.query_dim())));
  next_segment_id_ = std::max(next_segment_id_, id + 1);
  return Status::OK();
}

Status PeerLayerImpl::FreezeSegment(int64_t id, torch::ScalarType hold_rows_as, std::shared_ptr<ExpertRowSource> rows) {
  for (auto& s : segments_) {
    if (s->id() != id) continue;
    if (s->frozen()) return Status::FailedPrecondition("segment " + std::to_string(id) + " is already frozen");
    s->Freeze(hold_rows_as, std::move(rows));
    return Status::OK();
  }
  return Status::NotFound("no segment with id " + std::to_string(id));
}

Status PeerLayerImpl::InsertFrozenSegment(ExpertSegment segment) {
  const std::string name = "segment" + std::to_string(segment->id());
  const auto& keys = segment->sub_keys;
  if (!segment->frozen() || keys.dim() != 4 || keys.size(0) != config_.heads() || keys.size(1) != 2 ||
      keys.size(3) * 2 != config_.query_dim() || segment->d_model() != d_model_ || segment->n_keys() < config_.topk())
    return Status::InvalidArgument(name + " does not fit this layer (heads " + std::to_string(config_.heads()) +
                                   ", query_dim " + std::to_string(config_.query_dim()) + ", d_model " +
                                   std::to_string(d_model_) + ", top-k " + std::to_string(config_.topk()) + ")");
  auto at = segments_.begin();
  while (at != segments_.end() && (*at)->id() < segment->id()) ++at;
  if (at != segments_.end() && (*at)->id() == segment->id()) {
    if ((*at)->frozen()) return Status::FailedPrecondition(name + " is already frozen in this layer");
    *at = replace_module(name, segment);
  } else {
    segments_.insert(at, register_module(name, segment));
  }
  next_segment_id_ = std::max(next_segment_id_, segment->id() + 1);
  return Status::OK();
}

int64_t PeerLayerImpl::num_experts() const {
  int64_t n = 0;
  for (const auto& s : segments_) n += s->num_experts();
  return n;
}

torch::Tensor PeerLayerImpl::Query(const torch::Tensor& x, const torch::Tensor& delta) {
  const int64_t h = config_.heads(), dk = config_.query_dim();
  // [M, h·dk]; with the fused kernels on the CPU's own GEMM kernel (kernels/linear.h), the same map.
  torch::Tensor q = UsesFusedKernel(x) ? kernels::Linear(x, query_proj->weight) : query_proj(x);
  if (delta.defined()) q = q + delta;
  switch (config_.query_norm()) {
    case QUERY_NORM_BATCH:
      // Frozen statistics normalise with the running estimates, as at evaluation.
      q = torch::batch_norm(q, norm_weight, norm_bias, running_mean, running_var,
                            /*training=*/is_training() && !norm_stats_frozen_, /*momentum=*/0.1,
                            /*eps=*/1e-5, /*cudnn_enabled=*/false);
      break;
    case QUERY_NORM_LAYER: q = torch::layer_norm(q, {h * dk}, norm_weight, norm_bias); break;
    default: break;
  }
  return q.view({-1, h, dk}).transpose(0, 1);  // [h, M, dk]
}

Retrieval PeerLayerImpl::Retrieve(const torch::Tensor& query, const std::vector<bool>* active) const {
  const int64_t k = config_.topk();
  std::vector<int64_t> positions;  // of the active segments
  for (size_t pos = 0; pos < segments_.size(); ++pos)
    if (!active || (pos < active->size() && (*active)[pos])) positions.push_back(static_cast<int64_t>(pos));
  TORCH_CHECK(!positions.empty(), "PEER retrieval needs at least one active segment");
  Retrieval r;
  if (UsesFusedKernel(query)) {
    std::vector<torch::Tensor> keys;
    for (int64_t pos : positions) keys.push_back(segments_[pos]->sub_keys);
    kernels::RetrievedExperts e = kernels::ProductKeyRetrieval(query, keys, k);  // [M, h, k]
    torch::Tensor segment = e.segment;
    if (positions.size() != segments_.size())  // positions in `keys` -> positions in segments()
      segment = torch::tensor(positions).to(segment.device()).index_select(0, segment.flatten()).view_as(segment);
    r = {e.scores, segment, e.index};
  } else {
    r = RetrieveReference(query, positions);
  }
  if (recording_usage_) {
    torch::NoGradGuard no_grad;
    usage_.resize(segments_.size());
    for (size_t pos = 0; pos < segments_.size(); ++pos) {
      const int64_t n = segments_[pos]->num_experts();
      if (!usage_[pos].defined() || usage_[pos].numel() != n) usage_[pos] = torch::zeros({n}, torch::kLong);
      torch::Tensor mine = r.index.masked_select(r.segment == static_cast<int64_t>(pos));
      if (mine.numel()) usage_[pos] += torch::bincount(mine.to(torch::kCPU), {}, n);
    }
  }
  return r;
}

Retrieval PeerLayerImpl::RetrieveReference(const torch::Tensor& query, const std::vector<int64_t>& positions) const {
  const int64_t k = config_.topk();
  std::vector<torch::Tensor> scores, segment, index;
  for (int64_t pos : positions) {
    TopK t = ProductKeyTopK(query, segments_[pos]->sub_keys, k);  // [h, M, k]
    scores.push_back(t.scores);
    index.push_back(t.index);
    segment.push_back(torch::full_like(t.index, pos));
  }
  Retrieval r;
  if (scores.size() == 1) {
    r = {scores[0], segment[0], index[0]};
  } else {
    // Top-k over the union of every segment's k candidates.
    auto [best, pick] = torch::cat(scores, -1).topk(k, -1);  // [h, M, k]
    r = {best, torch::cat(segment, -1).gather(-1, pick), torch::cat(index, -1).gather(-1, pick)};
  }
  // Token-major, so a token's h·k experts are contiguous for the gather.
  return {r.scores.transpose(0, 1), r.segment.transpose(0, 1).contiguous(), r.index.transpose(0, 1).contiguous()};
}

std::pair<torch::Tensor, torch::Tensor> PeerLayerImpl::Gather(const Retrieval& r, torch::ScalarType dtype) const {
  torch::Tensor seg = r.segment.reshape(-1), idx = r.index.reshape(-1);  // [M·h·k]
  if (segments_.size() == 1) return segments_[0]->Rows(idx, dtype);
  // Gather each segment's rows, then put them back in retrieval order.
  std::vector<torch::Tensor> downs, ups, positions;
  for (size_t pos = 0; pos < segments_.size(); ++pos) {
    torch::Tensor at = (seg == static_cast<int64_t>(pos)).nonzero().squeeze(1);
    if (at.numel() == 0) continue;
    auto [d, u] = segments_[pos]->Rows(idx.index_select(0, at), dtype);
    downs.push_back(d);
    ups.push_back(u);
    positions.push_back(at);
  }
  if (downs.size() == 1) return {downs[0], ups[0]};
  torch::Tensor order = torch::cat(positions);
  torch::Tensor inverse = torch::empty_like(order);
  inverse.index_put_({order}, torch::arange(order.numel(), order.options()));
  return {torch::cat(downs).index_select(0, inverse), torch::cat(ups).index_select(0, inverse)};
}

bool PeerLayerImpl::UsesFusedKernel(const torch::Tensor& x) const {
  // Unset means the default: fused. The reference runs only when asked for, or where no kernel is built.
  return config_.impl() != PEER_IMPL_REFERENCE &&
         kernels::FusedKernelsSupport(x, d_model_, config_.topk(), config_.heads() * config_.topk());
}

torch::Tensor PeerLayerImpl::MixFused(const torch::Tensor& x, const torch::Tensor& w, const Retrieval& r) const {
  const int64_t M = x.size(0), hk = w.size(1);
  torch::Tensor segment = r.segment.reshape({M, hk}), index = r.index.reshape({M, hk});
  // The segments this step's retrieval reached: one behind the cache that it did not reach costs
  // nothing (under a route of two, a pool of a thousand cached segments is two fetches, not a
  // thousand passes over the step's retrieval).
  std::vector<char> reached(segments_.size(), 0);
  {
    torch::Tensor present = std::get<0>(at::_unique(segment.flatten())).to(torch::kCPU);
    for (int64_t i = 0; i < present.numel(); ++i) reached[present.data_ptr<int64_t>()[i]] = 1;
  }
  std::vector<kernels::ExpertTable> tables;
  for (size_t pos = 0; pos < segments_.size(); ++pos) {
    const ExpertSegment& s = segments_[pos];
    if (s->resident()) {
      tables.push_back({s->down, s->up});
      continue;
    }
    if (!reached[pos]) {
      torch::Tensor none = torch::empty({0, d_model_}, x.options());
      tables.push_back({none, none});
      continue;
    }
    // Rows behind a cache: fetch each distinct retrieved row once into a small table and point
    // the retrieval at it.
    torch::NoGradGuard no_grad;
    torch::Tensor mine = segment == static_cast<int64_t>(pos);
    torch::Tensor ids = index.masked_select(mine);
    auto [distinct, inverse, counts] = at::_unique2(ids, /*sorted=*/true, /*return_inverse=*/true);
    if (index.data_ptr() == r.index.data_ptr()) index = index.clone();  // r.index stays as retrieved
    index.masked_scatter_(mine, inverse);
    auto [down, up] = s->Rows(distinct, x.scalar_type());
    tables.push_back({down.contiguous(), up.contiguous()});
  }
  return kernels::ExpertMixture(x, w, segment, index, tables);
}

torch::Tensor PeerLayerImpl::forward(const torch::Tensor& x, const std::vector<bool>* active,
                                     const std::function<torch::Tensor(const torch::Tensor&)>& query_delta) {
  const int64_t D = d_model_, hk = config_.heads() * config_.topk();
  torch::Tensor xs = x.reshape({-1, D});  // [M, D]
  const int64_t M = xs.size(0);
  Retrieval r = Retrieve(Query(xs, query_delta ? query_delta(xs) : torch::Tensor()), active);  // [M, h, k]
  torch::Tensor w = torch::softmax(r.scores, -1).reshape({M, 1, hk});  // router weights per head
  if (UsesFusedKernel(xs)) return MixFused(xs, w.view({M, hk}), r).view(x.sizes());
  auto [down, up] = Gather(r, xs.scalar_type());
  torch::Tensor u = down.view({M, hk, D});                            // [M, h·k, D]
  torch::Tensor v = up.view({M, hk, D});                              // [M, h·k, D]
  torch::Tensor a = torch::bmm(u, xs.unsqueeze(2)).view({M, 1, hk});  // u_e · x
  torch::Tensor y = torch::bmm(torch::gelu(a) * w, v);                // [M, 1, D]: Σ_heads Σ_k w·GELU·v
  return y.view(x.sizes());
}

}  // namespace peerd
