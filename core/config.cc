#include "core/config.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

namespace peerd {

namespace {

// Parameter groups a TrainConfig may name (docs/DESIGN.md §1, "Training policy groups").
const char* const kTrainGroups[] = {"all",         "non-expert", "expert",     "attention", "dense-ffn",
                                    "new-segment", "query",      "norm-stats", "adapter"};

Status Invalid(const std::string& field, const std::string& what) {
  return Status::InvalidArgument("config field '" + field + "' " + what);
}

}  // namespace

Config DefaultConfig() {
  Config c;
  ModelConfig* m = c.mutable_model();
  m->set_d_model(128);
  m->set_n_layers(2);
  m->set_n_heads(4);
  m->set_context(128);
  m->set_ffn(FFN_KIND_PEER);
  m->set_dense_hidden(512);
  PeerConfig* p = m->mutable_peer();
  p->set_n_keys(32);  // 1,024 experts per segment
  p->set_heads(4);
  p->set_topk(8);
  p->set_query_dim(64);
  p->set_query_norm(QUERY_NORM_LAYER);
  p->set_initial_segments(1);
  p->set_impl(PEER_IMPL_FUSED);

  TrainConfig* t = c.mutable_train();
  t->set_batch_size(16);
  t->set_steps(600);
  t->set_lr(2e-3f);
  t->set_min_lr(2e-4f);
  t->set_warmup_steps(50);
  t->set_schedule(LR_SCHEDULE_COSINE);
  t->set_weight_decay(0.1f);
  t->set_beta1(0.9f);
  t->set_beta2(0.95f);
  t->set_eps(1e-8f);
  t->set_grad_clip(1.0f);
  t->set_seed(1);
  t->set_threads(0);
  t->set_log_every(25);
  t->set_eval_every(100);
  t->set_eval_bytes(65536);
  t->add_train_groups("all");
  t->set_expert_lr_scale(1.0f);
  t->set_backbone_lr_scale(1.0f);
  // The continual-learning recipe is on by default: bench/FORGETTING.md measured it cutting mean
  // forgetting to ~5% of plain sequential training on the six domains.
  t->set_replay_ratio(0.25f);
  t->set_distill_weight(1.0f);
  // Routing isolation is off by default (it needs a base phase first); when on, these are the
  // settings bench/FORGETTING.md measured best.
  t->set_routed(false);
  t->set_adapter_rank(32);
  t->set_adapter_lr_scale(10.0f);
  // 512 bytes before a window route look-alike domains better than 128: ACC 2.529 -> 2.501 over
  // twelve domains (bench/LONG.md), 3.403 -> 3.398 over six (bench/FORGETTING.md), 3 seeds each.
  t->set_route_context(512);
  t->set_route_candidates(4);
  t->set_keep_trained_text(true);
  t->set_trunk_delta_lr_scale(3.0f);
  return c;
}

std::vector<int> PeerBlocks(const ModelConfig& model) {
  if (model.ffn() != FFN_KIND_PEER) return {};
  if (model.peer_blocks_size() == 0) return {static_cast<int>(model.n_layers() / 2)};
  return {model.peer_blocks().begin(), model.peer_blocks().end()};
}

Status ValidateConfig(const Config& c) {
  const ModelConfig& m = c.model();
  if (m.d_model() < 2 || m.d_model() > 65536)
    return Invalid("model.dModel", "must be in [2, 65536], got " + std::to_string(m.d_model()));
  if (m.n_layers() == 0) return Invalid("model.nLayers", "must be at least 1");
  if (m.n_heads() == 0 || m.d_model() % m.n_heads() != 0)
    return Invalid("model.nHeads", "must be a positive divisor of model.dModel (" + std::to_string(m.d_model()) +
                                       "), got " + std::to_string(m.n_heads()));
  if (m.context() == 0) return Invalid("model.context", "must be at least 1");
  if (m.ffn() != FFN_KIND_PEER && m.ffn() != FFN_KIND_DENSE)
    return Invalid("model.ffn", "must be FFN_KIND_PEER or FFN_KIND_DENSE");
  if (m.dense_hidden() == 0) return Invalid("model.denseHidden", "must be at least 1");
  for (uint32_t b : m.peer_blocks())
    if (b >= m.n_layers())
      return Invalid("model.peerBlocks", "names block " + std::to_string(b) + " but the model has " +
                                             std::to_string(m.n_layers()) + " blocks (0-based)");

  const PeerConfig& p = m.peer();
  if (p.n_keys() == 0)
    return Invalid("model.peer.nKeys", "must be at least 1 (a segment holds nKeys² experts; zero experts is no layer)");
  if (p.n_keys() > 65536)
    return Invalid("model.peer.nKeys", "must be at most 65536, got " + std::to_string(p.n_keys()));
  if (p.heads() == 0) return Invalid("model.peer.heads", "must be at least 1");
  if (p.topk() == 0) return Invalid("model.peer.topk", "must be at least 1");
  if (p.topk() > p.n_keys())
    return Invalid("model.peer.topk",
                   "(" + std::to_string(p.topk()) + ") is larger than the sub-keys per half (model.peer.nKeys = " +
                       std::to_string(p.n_keys()) + "): product-key retrieval takes the top-k of each half");
  if (p.query_dim() == 0 || p.query_dim() % 2 != 0)
    return Invalid("model.peer.queryDim", "must be even and positive (the query splits into two halves), got " +
                                              std::to_string(p.query_dim()));
  if (p.query_norm() == QUERY_NORM_UNSPECIFIED)
    return Invalid("model.peer.queryNorm", "must be QUERY_NORM_BATCH, QUERY_NORM_LAYER or QUERY_NORM_NONE");
  if (p.impl() != PEER_IMPL_REFERENCE && p.impl() != PEER_IMPL_FUSED)
    return Invalid("model.peer.impl", "must be PEER_IMPL_REFERENCE or PEER_IMPL_FUSED");
  if (p.initial_segments() == 0 && m.ffn() == FFN_KIND_PEER)
    return Invalid("model.peer.initialSegments", "must be at least 1 for a PEER model");

  const TrainConfig& t = c.train();
  auto finite_positive = [](float v) { return std::isfinite(v) && v > 0; };
  if (t.batch_size() == 0) return Invalid("train.batchSize", "must be at least 1");
  if (!finite_positive(t.lr())) return Invalid("train.lr", "must be a positive number, got " + std::to_string(t.lr()));
  if (!std::isfinite(t.min_lr()) || t.min_lr() < 0 || t.min_lr() > t.lr())
    return Invalid("train.minLr", "must be in [0, train.lr], got " + std::to_string(t.min_lr()));
  if (t.schedule() == LR_SCHEDULE_UNSPECIFIED)
    return Invalid("train.schedule", "must be LR_SCHEDULE_COSINE or LR_SCHEDULE_CONSTANT");
  if (!std::isfinite(t.weight_decay()) || t.weight_decay() < 0)
    return Invalid("train.weightDecay", "must be zero or positive");
  if (!(t.beta1() >= 0 && t.beta1() < 1)) return Invalid("train.beta1", "must be in [0, 1)");
  if (!(t.beta2() >= 0 && t.beta2() < 1)) return Invalid("train.beta2", "must be in [0, 1)");
  if (!finite_positive(t.eps())) return Invalid("train.eps", "must be positive");
  if (!std::isfinite(t.grad_clip()) || t.grad_clip() < 0)
    return Invalid("train.gradClip", "must be zero (off) or positive");
  if (t.log_every() == 0) return Invalid("train.logEvery", "must be at least 1");
  if (!std::isfinite(t.expert_lr_scale()) || t.expert_lr_scale() < 0 || t.expert_lr_scale() > 1000)
    return Invalid("train.expertLrScale", "must be in [0, 1000], got " + std::to_string(t.expert_lr_scale()));
  if (!std::isfinite(t.backbone_lr_scale()) || t.backbone_lr_scale() < 0 || t.backbone_lr_scale() > 1000)
    return Invalid("train.backboneLrScale", "must be in [0, 1000], got " + std::to_string(t.backbone_lr_scale()));
  if (!(t.replay_ratio() >= 0 && t.replay_ratio() < 1))
    return Invalid("train.replayRatio", "must be in [0, 1), got " + std::to_string(t.replay_ratio()));
  if (!std::isfinite(t.distill_weight()) || t.distill_weight() < 0 || t.distill_weight() > 1000)
    return Invalid("train.distillWeight",
                   "must be in [0, 1000] (0 = no distillation), got " + std::to_string(t.distill_weight()));
  if (t.adapter_rank() < 0)
    return Invalid("train.adapterRank",
                   "must be 0 (full-rank deltas) or positive, got " + std::to_string(t.adapter_rank()));
  if (!std::isfinite(t.adapter_lr_scale()) || t.adapter_lr_scale() < 0 || t.adapter_lr_scale() > 1000)
    return Invalid("train.adapterLrScale", "must be in [0, 1000], got " + std::to_string(t.adapter_lr_scale()));
  if (!std::isfinite(t.trunk_delta_lr_scale()) || t.trunk_delta_lr_scale() < 0 || t.trunk_delta_lr_scale() > 1000)
    return Invalid("train.trunkDeltaLrScale", "must be in [0, 1000], got " + std::to_string(t.trunk_delta_lr_scale()));
  if (t.route_context() == 0 || t.route_context() > (1u << 20))
    return Invalid("train.routeContext", "must be in [1, 1048576] bytes, got " + std::to_string(t.route_context()));
  // One candidate would leave the model nothing to choose, at a pass more than the router's choice.
  if (t.route_candidates() == 1 || t.route_candidates() > 64)
    return Invalid("train.routeCandidates",
                   "must be 0 (the bigram router alone) or in [2, 64] (the model chooses), got " +
                       std::to_string(t.route_candidates()));
  if (t.adapter_rank() > static_cast<int32_t>(m.d_model()))
    return Invalid("train.adapterRank", "must be at most model.dModel (" + std::to_string(m.d_model()) +
                                            "; 0 gives full-rank deltas), got " + std::to_string(t.adapter_rank()));
  if (t.routed() && m.ffn() != FFN_KIND_PEER)
    return Invalid(
        "train.routed",
        "needs a PEER model (model.ffn FFN_KIND_PEER): a routed branch is a segment of experts and its adapter");
  if (t.routed() && t.replay_ratio() > 0)
    return Invalid("train.routed",
                   "trains each branch on its own domain's text only (old text would teach it other domains): "
                   "set train.replayRatio to 0 (got " +
                       std::to_string(t.replay_ratio()) + ")");
  if (!t.keep_trained_text() && t.replay_ratio() > 0)
    return Invalid("train.keepTrainedText",
                   "is false, so no trained text is kept to replay: set train.replayRatio to 0 (got " +
                       std::to_string(t.replay_ratio()) + ")");
  if (t.train_groups_size() == 0) return Invalid("train.trainGroups", "must name at least one group");
  for (const std::string& g : t.train_groups()) {
    if (std::find(std::begin(kTrainGroups), std::end(kTrainGroups), g) == std::end(kTrainGroups)) {
      std::string known;
      for (const char* k : kTrainGroups) known += std::string(known.empty() ? "" : ", ") + k;
      return Invalid("train.trainGroups", "names unknown group '" + g + "' (known: " + known + ")");
    }
  }
  return Status::OK();
}

Status ParseConfigJson(const std::string& json, Config* out) {
  Config given;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;  // a misspelt field is an error, not a silent default
  auto st = google::protobuf::util::JsonStringToMessage(json, &given, options);
  if (!st.ok())
    return Status::InvalidArgument("config is not valid JSON for peerd.Config: " + std::string(st.message()));
  Config merged = DefaultConfig();
  // Repeated fields append on merge; a list given in the file replaces the default list.
  if (given.model().peer_blocks_size() > 0) merged.mutable_model()->clear_peer_blocks();
  if (given.train().train_groups_size() > 0) merged.mutable_train()->clear_train_groups();
  merged.MergeFrom(given);
  Status valid = ValidateConfig(merged);
  if (!valid.ok()) return valid;
  *out = std::move(merged);
  return Status::OK();
}

Status LoadConfigFile(const std::string& path, Config* out) {
  std::ifstream in(path);
  if (!in) return Status::IOError("cannot read config file '" + path + "': check the path and its permissions");
  std::stringstream ss;
  ss << in.rdbuf();
  Status st = ParseConfigJson(ss.str(), out);
  if (!st.ok()) return Status::InvalidArgument(path + ": " + st.message());
  return st;
}

std::string ConfigToJson(const Config& config) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = false;
  (void)google::protobuf::util::MessageToJsonString(config, &json, options);
  return json;
}

}  // namespace peerd
