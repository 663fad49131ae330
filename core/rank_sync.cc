#include "core/rank_sync.h"

#include <xxhash.h>

#include <algorithm>
#include <unordered_set>

#include "proto/ranks.pb.h"

namespace peerd {

Status CheckDataParallel(const Config& config) {
  if (config.model().ffn() == FFN_KIND_PEER && config.model().peer().query_norm() == QUERY_NORM_BATCH)
    return Status::InvalidArgument(
        "model.peer.queryNorm QUERY_NORM_BATCH cannot train on several ranks: each rank's batch-norm "
        "statistics would come from its share of the batch only; use QUERY_NORM_LAYER (the default)");
  if (config.train().routed())
    return Status::InvalidArgument(
        "train.routed runs in one process: the ranks do not share adapters, routes and the "
        "router yet; use --world-size 1");
  return Status::OK();
}

Status ShareConfig(Collective& collective, Config* config) {
  std::string bytes = collective.rank() == 0 ? config->SerializeAsString() : std::string();
  if (Status st = collective.BroadcastBytes(&bytes, "sharing the configuration"); !st.ok()) return st;
  if (collective.rank() != 0 && !config->ParseFromString(bytes))
    return Status::Corruption("the configuration rank 0 sent cannot be parsed");
  return Status::OK();
}

Status SyncFromRankZero(Collective& collective, Trainer& trainer) {
  if (collective.world_size() == 1) return Status::OK();
  TransformerLM& model = trainer.model();
  auto layers = model->PeerLayers();
  const bool root = collective.rank() == 0;

  // 1. The header: configuration, pool shape, step, tensor names.
  RankState state;
  if (root) {
    *state.mutable_config()->mutable_model() = model->config();
    *state.mutable_config()->mutable_train() = trainer.config();
    for (size_t l = 0; l < layers.size(); ++l)
      for (const auto& seg : layers[l]->segments()) {
        if (seg->frozen() && !seg->resident())
          return Status::FailedPrecondition("segment " + std::to_string(seg->id()) +
                                            " is not held in memory: several ranks need --residency resident");
        PoolSegment* s = state.add_segments();
        s->set_layer(static_cast<uint32_t>(l));
        s->set_id(static_cast<uint32_t>(seg->id()));
        s->set_n_keys(static_cast<uint32_t>(seg->n_keys()));
        s->set_frozen(seg->frozen());
        s->set_bf16(seg->frozen() && seg->down.scalar_type() == torch::kBFloat16);
      }
    state.set_step(trainer.step());
  }
  std::string bytes = root ? state.SerializeAsString() : std::string();
  if (Status st = collective.BroadcastBytes(&bytes, "sharing the pool's shape"); !st.ok()) return st;
  if (!root && !state.ParseFromString(bytes))
    return Status::Corruption("the pool description rank 0 sent cannot be parsed");

  // 2. Frozen segments: their rows, once. Others replace their training copy by rank 0's.
  const int64_t D = model->config().d_model();
  for (const PoolSegment& s : state.segments()) {
    if (!s.frozen()) continue;
    if (s.layer() >= layers.size())
      return Status::InvalidArgument("rank 0 has more PEER layers than this rank's model");
    std::vector<torch::Tensor> rows;
    if (root) {
      for (const auto& seg : layers[s.layer()]->segments())
        if (seg->id() == s.id()) rows = {seg->sub_keys.contiguous(), seg->down.contiguous(), seg->up.contiguous()};
    } else {
      const PeerConfig& pc = model->config().peer();
      const int64_t n = s.n_keys();
      const auto row_type = s.bf16() ? torch::kBFloat16 : torch::kFloat;
      rows = {torch::empty({int64_t(pc.heads()), 2, n, int64_t(pc.query_dim()) / 2}),
              torch::empty({n * n, D}, row_type), torch::empty({n * n, D}, row_type)};
    }
    if (Status st = collective.Broadcast(rows, "sending frozen segments"); !st.ok()) return st;
    if (!root)
      if (Status st = layers[s.layer()]->InsertFrozenSegment(ExpertSegment(s.id(), rows[0], rows[1], rows[2]));
          !st.ok())
        return st;
  }

  // 3. Training segments rank 0 has and this rank does not (added since the model was built).
  if (!root) {
    for (const PoolSegment& s : state.segments()) {
      if (s.frozen()) continue;
      bool present = false;
      for (const auto& seg : layers[s.layer()]->segments()) present |= seg->id() == s.id();
      if (!present)
        if (Status st = layers[s.layer()]->AddSegmentWithId(s.id(), s.n_keys()); !st.ok()) return st;
    }
    size_t mine = 0;
    for (const auto& layer : layers) mine += layer->segments().size();
    if (mine != static_cast<size_t>(state.segments_size()))
      return Status::FailedPrecondition(
          "this rank's pool has segments rank 0 does not: start every rank from the same configuration");
    trainer.SetConfig(state.config().train());  // also re-points the optimizer at the new pool
    trainer.set_step(state.step());
  }

  // 4. Every trainable parameter and buffer, checked by name.
  auto tensors = model->NamedTrainingState();
  std::string names;
  for (const auto& [name, t] : tensors) names += name + "\n";
  std::string root_names = names;
  if (Status st = collective.BroadcastBytes(&root_names, "comparing tensor names"); !st.ok()) return st;
  if (root_names != names)
    return Status::FailedPrecondition(
        "this rank's model has other tensors than rank 0's: every rank must run the same build and configuration");
  {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> values;
    for (auto& [name, t] : tensors) values.push_back(t.detach());
    if (Status st = collective.Broadcast(values, "sending parameters"); !st.ok()) return st;
  }

  // 5. The optimizer's state: steps per tensor (-1: none), then the moments of those that have it.
  torch::Tensor steps = torch::full({static_cast<int64_t>(tensors.size())}, int64_t{-1});
  if (root)
    for (size_t i = 0; i < tensors.size(); ++i) {
      AdamW::State s = trainer.optimizer().StateOf(tensors[i].second);
      if (s.m.defined()) steps[i] = s.steps;
    }
  std::vector<torch::Tensor> steps_list{steps};
  if (Status st = collective.Broadcast(steps_list, "sending optimizer steps"); !st.ok()) return st;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = steps[i].item<int64_t>();
    if (n < 0) continue;
    std::vector<torch::Tensor> moments;
    if (root) {
      AdamW::State s = trainer.optimizer().StateOf(tensors[i].second);
      moments = {s.m.contiguous(), s.v.contiguous()};
    } else {
      moments = {torch::empty_like(tensors[i].second), torch::empty_like(tensors[i].second)};
    }
    if (Status st = collective.Broadcast(moments, "sending optimizer state"); !st.ok()) return st;
    if (!root) trainer.mutable_optimizer().SetState(tensors[i].second, {moments[0], moments[1], n});
  }
  return Status::OK();
}

Status SyncSegmentFromRankZero(Collective& collective, const ExpertSegmentImpl& segment) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> values{segment.sub_keys.detach(), segment.down.detach(), segment.up.detach()};
  return collective.Broadcast(values, "sending a new segment's initial values");
}

uint64_t ModelDigest(TransformerLM& model) {
  XXH3_state_t* h = XXH3_createState();
  XXH3_64bits_reset(h);
  // A frozen segment enters by the checksum its rank took of its bytes when it froze them, not by
  // its rows: they cannot change after that, and hashing them again cost every comparison ~2 GB
  // read per 1M-expert segment. Its tensors are skipped below.
  std::unordered_set<const c10::TensorImpl*> frozen_tensors;
  auto layers = model->PeerLayers();
  for (size_t l = 0; l < layers.size(); ++l)
    for (const auto& seg : layers[l]->segments()) {
      const int64_t shape[5] = {static_cast<int64_t>(l), seg->id(), seg->n_keys(), seg->frozen(),
                                static_cast<int64_t>(seg->frozen_checksum())};
      XXH3_64bits_update(h, shape, sizeof shape);
      if (!seg->frozen()) continue;
      for (const torch::Tensor& t : {seg->sub_keys, seg->down, seg->up})
        if (t.defined()) frozen_tensors.insert(t.unsafeGetTensorImpl());
    }
  auto add = [&](const torch::Tensor& t) {
    if (frozen_tensors.count(t.unsafeGetTensorImpl())) return;
    torch::Tensor c = t.detach().contiguous();
    XXH3_64bits_update(h, c.data_ptr(), c.numel() * c.element_size());
  };
  for (const auto& item : model->named_parameters()) add(item.value());
  for (const auto& item : model->named_buffers()) add(item.value());
  const uint64_t digest = XXH3_64bits_digest(h);
  XXH3_freeState(h);
  return digest;
}

}  // namespace peerd
