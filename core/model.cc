#include "core/model.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "core/check_ok.h"
#include "core/config.h"
#include "core/tokenizer.h"

namespace peerd {

CausalSelfAttentionImpl::CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads, int64_t context)
    : n_heads_(n_heads) {
  qkv = register_module("qkv", torch::nn::Linear(d_model, 3 * d_model));
  proj = register_module("proj", torch::nn::Linear(d_model, d_model));
  mask_ = register_buffer("mask", torch::ones({context, context}, torch::kBool).triu(1));
}

namespace {

// The linear map `linear` of x, plus the adapter's delta of the map named `name` when there is one.
torch::Tensor Adapted(torch::nn::Linear& linear, const torch::Tensor& x, const SegmentAdapterImpl* adapter,
                      const std::string& name) {
  torch::Tensor y = linear(x);
  if (!adapter) return y;
  torch::Tensor delta = adapter->Delta(name, x);
  return delta.defined() ? y + delta : y;
}

// Layer norm `ln` of x, with the adapter's deltas of its weight and bias (`name`.weight, .bias).
torch::Tensor Normed(torch::nn::LayerNorm& ln, const torch::Tensor& x, const SegmentAdapterImpl* adapter,
                     const std::string& name) {
  torch::Tensor dw = adapter ? adapter->TrunkDelta(name + ".weight") : torch::Tensor();
  if (!dw.defined()) return ln(x);
  return torch::layer_norm(x, ln->options.normalized_shape(), ln->weight + dw,
                           ln->bias + adapter->TrunkDelta(name + ".bias"), ln->options.eps());
}

}  // namespace

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x, const SegmentAdapterImpl* adapter,
                                               const std::string& prefix, KvEntry* cache) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), hd = D / n_heads_;
  auto parts = Adapted(qkv, x, adapter, prefix + ".qkv").chunk(3, -1);  // 3 × [B, T, D]
  auto heads = [&](const torch::Tensor& t) { return t.view({B, T, n_heads_, hd}).transpose(1, 2); };
  torch::Tensor q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);  // [B, nh, T, hd]
  int64_t past = 0;  // positions before these T, held by the cache
  if (cache) {
    if (cache->keys.defined()) {
      past = cache->keys.size(2);
      k = torch::cat({cache->keys, k}, 2);  // [B, nh, past + T, hd]
      v = torch::cat({cache->values, v}, 2);
    }
    cache->keys = k;
    cache->values = v;
  }
  torch::Tensor att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
  // Query i is position past + i: it sees keys 0 .. past + i.
  att = att.masked_fill(mask_.slice(0, past, past + T).slice(1, 0, past + T), -INFINITY).softmax(-1);
  torch::Tensor y = torch::matmul(att, v).transpose(1, 2).reshape({B, T, D});  // att [B, nh, T, past + T]
  return Adapted(proj, y, adapter, prefix + ".proj");
}

DenseFfnImpl::DenseFfnImpl(int64_t d_model, int64_t hidden) {
  fc = register_module("fc", torch::nn::Linear(d_model, hidden));
  proj = register_module("proj", torch::nn::Linear(hidden, d_model));
}

torch::Tensor DenseFfnImpl::forward(const torch::Tensor& x, const SegmentAdapterImpl* adapter,
                                    const std::string& prefix) {
  return Adapted(proj, torch::gelu(Adapted(fc, x, adapter, prefix + ".fc")), adapter, prefix + ".fc_proj");
}

BlockImpl::BlockImpl(const ModelConfig& c, bool use_peer, std::string name) : name_(std::move(name)) {
  const int64_t D = c.d_model();
  ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  attn = register_module("attn", CausalSelfAttention(D, c.n_heads(), c.context()));
  ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  if (use_peer)
    peer = register_module("peer", PeerLayer(D, c.peer()));
  else
    dense = register_module("dense", DenseFfn(D, c.dense_hidden()));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const SegmentAdapterImpl* adapter,
                                 const std::vector<bool>* active, KvEntry* cache) {
  torch::Tensor h = x + attn->forward(Normed(ln1, x, adapter, name_ + ".ln1"), adapter, name_, cache);
  torch::Tensor n = Normed(ln2, h, adapter, name_ + ".ln2");
  if (!peer) return h + dense->forward(n, adapter, name_);
  // The adapter's query delta enters through the layer's own query network: W_q x + ΔW_q x.
  return h + peer->forward(n, active,
                           adapter ? [adapter, name = name_ + ".query"](
                                         const torch::Tensor& x) { return adapter->Delta(name, x); }
                                   : std::function<torch::Tensor(const torch::Tensor&)>());
}

TransformerLMImpl::TransformerLMImpl(const ModelConfig& config) : config_(config) {
  const int64_t D = config.d_model();
  tok_emb = register_module("tok_emb", torch::nn::Embedding(ByteTokenizer::kVocabSize, D));
  pos_emb = register_module("pos_emb", torch::nn::Embedding(config.context(), D));
  {
    torch::NoGradGuard no_grad;
    tok_emb->weight.normal_(0, 0.02);
    pos_emb->weight.normal_(0, 0.02);
  }
  std::vector<int> peer_blocks = PeerBlocks(config);
  for (uint32_t i = 0; i < config.n_layers(); ++i) {
    bool use_peer = std::find(peer_blocks.begin(), peer_blocks.end(), static_cast<int>(i)) != peer_blocks.end();
    const std::string name = "block" + std::to_string(i);
    blocks.push_back(register_module(name, Block(config, use_peer, name)));
  }
  ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
}

torch::Tensor TransformerLMImpl::forward(const torch::Tensor& tokens, KvCache* cache) {
  const int64_t T = tokens.size(1), past = cache ? cache->length : 0;
  TORCH_CHECK(past + T <= static_cast<int64_t>(config_.context()), "sequence of ", past + T,
              " tokens is longer than the model's context of ", config_.context());
  if (cache) cache->blocks.resize(blocks.size());
  const SegmentAdapterImpl* adapter = route_.adapter >= 0 ? adapters_.at(route_.adapter).get() : nullptr;
  torch::Tensor positions = torch::arange(past, past + T, tokens.options());
  torch::Tensor x = tok_emb(tokens) + pos_emb(positions);  // [B, T, D]
  torch::Tensor d_tok = adapter ? adapter->TrunkDelta("tok_emb") : torch::Tensor();
  torch::Tensor d_pos = adapter ? adapter->TrunkDelta("pos_emb") : torch::Tensor();
  if (d_tok.defined()) x = x + torch::embedding(d_tok, tokens);
  if (d_pos.defined()) x = x + torch::embedding(d_pos, positions);
  std::vector<bool> active;
  for (size_t i = 0; i < blocks.size(); ++i) {
    Block& b = blocks[i];
    if (b->peer && !route_.segments.empty()) {
      active.clear();
      for (const auto& s : b->peer->segments())
        active.push_back(std::find(route_.segments.begin(), route_.segments.end(), s->id()) != route_.segments.end());
    }
    x = b->forward(x, adapter, b->peer && !route_.segments.empty() ? &active : nullptr,
                   cache ? &cache->blocks[i] : nullptr);
  }
  if (cache) cache->length += T;
  torch::Tensor h = Normed(ln_f, x, adapter, "ln_f");
  // [B, T, vocab], head tied to tok_emb (and to the adapter's delta of it)
  torch::Tensor logits = torch::matmul(h, (d_tok.defined() ? tok_emb->weight + d_tok : tok_emb->weight).t());
  if (adapter) logits = logits + adapter->Delta("head", h);
  return logits;
}

Status TransformerLMImpl::SetRoute(const Route& route) {
  if (route.adapter >= 0 && !adapters_.count(route.adapter))
    return Status::InvalidArgument("route names adapter " + std::to_string(route.adapter) + ", which the model lacks");
  for (int64_t id : route.segments) {
    bool found = false;
    for (const auto& layer : PeerLayers())
      for (const auto& s : layer->segments()) found = found || s->id() == id;
    if (!found) return Status::InvalidArgument("route names segment " + std::to_string(id) + ", which the model lacks");
  }
  route_ = route;
  return Status::OK();
}

Status TransformerLMImpl::AddAdapter(int64_t id, int64_t rank, bool trunk_deltas) {
  if (adapters_.count(id)) return Status::FailedPrecondition("the model already has adapter " + std::to_string(id));
  if (rank < 0)
    return Status::InvalidArgument("an adapter's rank must be at least 1 (or 0 for full deltas), got " +
                                   std::to_string(rank));
  adapters_.emplace(id, register_module("adapter" + std::to_string(id), SegmentAdapter(config_, rank, trunk_deltas)));
  newest_adapter_ = std::max(newest_adapter_, id);
  return Status::OK();
}

Status TransformerLMImpl::FreezeAdapter(int64_t id) {
  auto it = adapters_.find(id);
  if (it == adapters_.end()) return Status::NotFound("no adapter " + std::to_string(id));
  it->second->Freeze();
  return Status::OK();
}

torch::Tensor TransformerLMImpl::Loss(const torch::Tensor& tokens) {
  const int64_t T = tokens.size(1) - 1;
  torch::Tensor logits = forward(tokens.slice(1, 0, T));
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                              tokens.slice(1, 1, T + 1).reshape(-1));
}

Status TransformerLMImpl::CopyBranch(int64_t from, int64_t to) {
  auto src = adapters_.find(from), dst = adapters_.find(to);
  if (src == adapters_.end() || dst == adapters_.end())
    return Status::NotFound("no adapter " + std::to_string(src == adapters_.end() ? from : to));
  if (dst->second->frozen()) return Status::FailedPrecondition("adapter " + std::to_string(to) + " is frozen");
  if (src->second->rank() != dst->second->rank() || src->second->trunk_deltas() != dst->second->trunk_deltas())
    return Status::InvalidArgument("adapters " + std::to_string(from) + " and " + std::to_string(to) +
                                   " have different shapes (rank, or trunk deltas)");
  // Check every layer before changing anything.
  std::vector<std::pair<const ExpertSegmentImpl*, ExpertSegmentImpl*>> pairs;
  for (const auto& layer : PeerLayers()) {
    const ExpertSegmentImpl* a = nullptr;
    ExpertSegmentImpl* b = nullptr;
    for (const auto& s : layer->segments()) {
      if (s->id() == from) a = s.get();
      if (s->id() == to) b = s.ptr().get();
    }
    if (!a || !b) return Status::NotFound("no segment " + std::to_string(!a ? from : to) + " in a PEER layer");
    if (b->frozen()) return Status::FailedPrecondition("segment " + std::to_string(to) + " is frozen");
    if (a->n_keys() != b->n_keys() || !a->resident())
      return Status::InvalidArgument("segment " + std::to_string(from) + " cannot seed segment " + std::to_string(to) +
                                     " (other size, or rows not in memory)");
    pairs.push_back({a, b});
  }
  torch::NoGradGuard no_grad;
  auto from_params = src->second->named_parameters(), to_params = dst->second->named_parameters();
  for (auto& p : to_params) p.value().copy_(from_params[p.key()]);
  for (auto& [a, b] : pairs) {
    b->sub_keys.copy_(a->sub_keys);
    b->down.copy_(a->down);
    b->up.copy_(a->up);
  }
  return Status::OK();
}

std::vector<PeerLayer> TransformerLMImpl::PeerLayers() const {
  std::vector<PeerLayer> layers;
  for (const auto& b : blocks)
    if (b->peer) layers.push_back(b->peer);
  return layers;
}

std::vector<std::pair<std::string, torch::Tensor>> TransformerLMImpl::NamedTrainingState() const {
  std::unordered_set<const void*> frozen;
  for (const auto& layer : PeerLayers())
    for (const auto& seg : layer->segments())
      if (seg->frozen())
        for (const auto& p : seg->parameters()) frozen.insert(p.unsafeGetTensorImpl());
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : named_parameters())
    if (!frozen.count(item.value().unsafeGetTensorImpl())) out.emplace_back("param/" + item.key(), item.value());
  for (const auto& item : named_buffers()) out.emplace_back("buffer/" + item.key(), item.value());
  return out;
}

std::vector<ParamInfo> TransformerLMImpl::ClassifiedParameters() const {
  std::vector<ParamInfo> out;
  auto add = [&](const std::string& prefix, const torch::nn::Module& m, ParamKind kind) {
    for (const auto& item : m.named_parameters())
      out.push_back({prefix + "." + item.key(), item.value(), kind, nullptr, false, item.value().dim() >= 2});
  };
  add("tok_emb", *tok_emb, ParamKind::kEmbedding);
  add("pos_emb", *pos_emb, ParamKind::kEmbedding);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Block& b = blocks[i];
    const std::string p = "block" + std::to_string(i);
    add(p + ".ln1", *b->ln1, ParamKind::kNorm);
    add(p + ".attn", *b->attn, ParamKind::kAttention);
    add(p + ".ln2", *b->ln2, ParamKind::kNorm);
    if (b->dense) add(p + ".dense", *b->dense, ParamKind::kDenseFfn);
    if (!b->peer) continue;
    add(p + ".peer.query_proj", *b->peer->query_proj, ParamKind::kQuery);
    if (b->peer->norm_weight.defined()) {
      out.push_back({p + ".peer.norm_weight", b->peer->norm_weight, ParamKind::kQuery});
      out.push_back({p + ".peer.norm_bias", b->peer->norm_bias, ParamKind::kQuery});
    }
    const auto& segs = b->peer->segments();
    for (size_t s = 0; s < segs.size(); ++s) {
      if (segs[s]->frozen()) continue;
      const std::string sp = p + ".peer.segment" + std::to_string(segs[s]->id());
      const bool newest = s + 1 == segs.size();
      out.push_back({sp + ".sub_keys", segs[s]->sub_keys, ParamKind::kExpert, segs[s].get(), newest, false});
      out.push_back({sp + ".down", segs[s]->down, ParamKind::kExpert, segs[s].get(), newest, true});
      out.push_back({sp + ".up", segs[s]->up, ParamKind::kExpert, segs[s].get(), newest, true});
    }
  }
  add("ln_f", *ln_f, ParamKind::kNorm);
  for (const auto& [id, adapter] : adapters_) {
    if (adapter->frozen()) continue;
    for (const auto& item : adapter->named_parameters())
      out.push_back({"adapter" + std::to_string(id) + "." + item.key(), item.value(), ParamKind::kAdapter, nullptr,
                     id == newest_adapter_, item.value().dim() >= 2, adapter->IsTrunkDelta(item.value())});
  }
  return out;
}

int64_t TransformerLMImpl::TotalParameters() const {
  // Counted from the shapes, not the tensors: a segment whose rows stay in the store has none.
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  for (const auto& layer : PeerLayers())
    for (const auto& s : layer->segments())
      if (!s->resident()) n += 2 * s->num_experts() * s->d_model();
  return n;
}

int64_t TransformerLMImpl::ActiveParameters() const {
  int64_t n = TotalParameters();
  for (const auto& layer : PeerLayers()) {
    const PeerConfig& c = layer->config();
    for (const auto& s : layer->segments()) n -= 2 * s->num_experts() * s->d_model();
    n += int64_t{c.heads()} * c.topk() * 2 * config_.d_model();
  }
  // One adapter runs per token (the route's): all but the largest are inactive.
  int64_t largest = 0;
  for (const auto& [id, adapter] : adapters_) {
    int64_t size = 0;
    for (const auto& p : adapter->parameters()) size += p.numel();
    n -= size;
    largest = std::max(largest, size);
  }
  return n + largest;
}

TransformerLM CopyForTeacher(const TransformerLM& model) {
  ModelConfig config = model->config();
  config.mutable_peer()->set_initial_segments(0);  // the segments follow the model's
  TransformerLM copy(config);
  for (const auto& [id, adapter] : model->adapters())
    CheckOk(copy->AddAdapter(id, adapter->rank(), adapter->trunk_deltas()));
  auto from = model->PeerLayers(), to = copy->PeerLayers();
  for (size_t l = 0; l < from.size(); ++l) {
    for (const auto& s : from[l]->segments()) {
      Status st = s->frozen() ? to[l]->InsertFrozenSegment(s) : to[l]->AddSegmentWithId(s->id(), s->n_keys());
      CheckOk(st);
    }
  }
  torch::NoGradGuard no_grad;
  auto src = model->named_parameters(), src_buffers = model->named_buffers();
  for (auto& p : copy->named_parameters()) {
    const torch::Tensor& s = src[p.key()];
    if (!p.value().is_same(s)) p.value().copy_(s);  // shared frozen segments are the same tensor
    p.value().set_requires_grad(false);
  }
  for (auto& b : copy->named_buffers())
    if (!b.value().is_same(src_buffers[b.key()])) b.value().copy_(src_buffers[b.key()]);
  for (const auto& [id, adapter] : model->adapters())
    if (adapter->frozen()) CheckOk(copy->FreezeAdapter(id));
  CheckOk(copy->SetRoute(model->route()));
  copy->eval();
  return copy;
}

}  // namespace peerd
