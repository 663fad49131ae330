#include "core/model.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "core/config.h"
#include "core/tokenizer.h"

namespace peerd {

CausalSelfAttentionImpl::CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads, int64_t context)
    : n_heads_(n_heads) {
  qkv = register_module("qkv", torch::nn::Linear(d_model, 3 * d_model));
  proj = register_module("proj", torch::nn::Linear(d_model, d_model));
  mask_ = register_buffer("mask", torch::ones({context, context}, torch::kBool).triu(1));
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), hd = D / n_heads_;
  auto parts = qkv(x).chunk(3, -1);  // 3 × [B, T, D]
  auto heads = [&](const torch::Tensor& t) { return t.view({B, T, n_heads_, hd}).transpose(1, 2); };
  torch::Tensor q = heads(parts[0]), k = heads(parts[1]), v = heads(parts[2]);  // [B, nh, T, hd]
  torch::Tensor att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
  att = att.masked_fill(mask_.slice(0, 0, T).slice(1, 0, T), -INFINITY).softmax(-1);  // [B, nh, T, T]
  torch::Tensor y = torch::matmul(att, v).transpose(1, 2).reshape({B, T, D});
  return proj(y);
}

DenseFfnImpl::DenseFfnImpl(int64_t d_model, int64_t hidden) {
  fc = register_module("fc", torch::nn::Linear(d_model, hidden));
  proj = register_module("proj", torch::nn::Linear(hidden, d_model));
}

torch::Tensor DenseFfnImpl::forward(const torch::Tensor& x) { return proj(torch::gelu(fc(x))); }

BlockImpl::BlockImpl(const ModelConfig& c, bool use_peer) {
  const int64_t D = c.d_model();
  ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  attn = register_module("attn", CausalSelfAttention(D, c.n_heads(), c.context()));
  ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  if (use_peer) peer = register_module("peer", PeerLayer(D, c.peer()));
  else dense = register_module("dense", DenseFfn(D, c.dense_hidden()));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = x + attn(ln1(x));
  torch::Tensor n = ln2(h);
  return h + (peer ? peer(n) : dense(n));
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
    blocks.push_back(register_module("block" + std::to_string(i), Block(config, use_peer)));
  }
  ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
}

torch::Tensor TransformerLMImpl::forward(const torch::Tensor& tokens) {
  const int64_t T = tokens.size(1);
  TORCH_CHECK(T <= static_cast<int64_t>(config_.context()), "sequence of ", T,
              " tokens is longer than the model's context of ", config_.context());
  torch::Tensor x = tok_emb(tokens) + pos_emb(torch::arange(T, tokens.options()));  // [B, T, D]
  for (auto& b : blocks) x = b(x);
  return torch::matmul(ln_f(x), tok_emb->weight.t());  // [B, T, vocab], head tied to tok_emb
}

torch::Tensor TransformerLMImpl::Loss(const torch::Tensor& tokens) {
  const int64_t T = tokens.size(1) - 1;
  torch::Tensor logits = forward(tokens.slice(1, 0, T));
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                              tokens.slice(1, 1, T + 1).reshape(-1));
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
      out.push_back({prefix + "." + item.key(), item.value(), kind, nullptr, false,
                     item.value().dim() >= 2});
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
  return n;
}

TransformerLM CopyForTeacher(const TransformerLM& model) {
  ModelConfig config = model->config();
  config.mutable_peer()->set_initial_segments(0);  // the segments follow the model's
  TransformerLM copy(config);
  auto from = model->PeerLayers(), to = copy->PeerLayers();
  for (size_t l = 0; l < from.size(); ++l) {
    for (const auto& s : from[l]->segments()) {
      Status st = s->frozen() ? to[l]->InsertFrozenSegment(s) : to[l]->AddSegmentWithId(s->id(), s->n_keys());
      TORCH_CHECK(st.ok(), st.ToString());
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
  copy->eval();
  return copy;
}

}  // namespace peerd
