// TransformerLM: a small decoder-only byte-level language model whose feed-forward layers are
// PEER layers in the configured blocks and dense FFNs elsewhere (a dense-only variant is the
// baseline). nanoGPT's shape: token + position embeddings, pre-norm blocks of causal
// self-attention and FFN, final norm, output head tied to the token embedding.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "core/peer_layer.h"
#include "core/segment_adapter.h"
#include "proto/config.pb.h"

namespace peerd {

// What a forward pass runs besides the shared trunk (routing isolation, docs/DESIGN.md): one
// segment's adapter and the segments PEER retrieval may choose from. The default runs every
// segment and no adapter (the global top-k of docs/DESIGN.md §1).
struct Route {
  int64_t adapter = -1;           // id of a SegmentAdapter of the model, or -1 for none
  std::vector<int64_t> segments;  // ids of the segments retrieval may use in every PEER layer; empty: all
};

// One attention layer's keys and values of the positions already run, [B, n_heads, length,
// head_dim] each (undefined before the first): incremental decoding attends to them instead of
// running the whole prefix again.
struct KvEntry {
  torch::Tensor keys, values;
};

// Every block's KvEntry and how many positions they hold (TransformerLMImpl::forward).
struct KvCache {
  std::vector<KvEntry> blocks;
  int64_t length = 0;
};

// Causal multi-head self-attention, written out (no scaled_dot_product_attention: LibTorch 1.13).
class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads, int64_t context);
  // [B, T, D] -> [B, T, D]; `adapter` (may be null) adds its deltas of `prefix`.qkv and .proj.
  // With `cache`, x holds the T positions after the cache's, which attend to the cached ones too,
  // and their keys and values are appended to it.
  torch::Tensor forward(const torch::Tensor& x, const SegmentAdapterImpl* adapter = nullptr,
                        const std::string& prefix = "", KvEntry* cache = nullptr);
  torch::nn::Linear qkv{nullptr}, proj{nullptr};

 private:
  int64_t n_heads_;
  torch::Tensor mask_;  // [T, T] bool, true above the diagonal (future positions)
};
TORCH_MODULE(CausalSelfAttention);

// The dense FFN: Linear(D, H) -> GELU -> Linear(H, D).
class DenseFfnImpl : public torch::nn::Module {
 public:
  DenseFfnImpl(int64_t d_model, int64_t hidden);
  torch::Tensor forward(const torch::Tensor& x, const SegmentAdapterImpl* adapter = nullptr,
                        const std::string& prefix = "");
  torch::nn::Linear fc{nullptr}, proj{nullptr};
};
TORCH_MODULE(DenseFfn);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& config, bool peer, std::string name);
  // x + attn(ln1 x), then + ffn(ln2 x); `adapter` may be null, `active` as PeerLayer's, `cache`
  // as the attention's.
  torch::Tensor forward(const torch::Tensor& x, const SegmentAdapterImpl* adapter = nullptr,
                        const std::vector<bool>* active = nullptr, KvEntry* cache = nullptr);
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  CausalSelfAttention attn{nullptr};
  DenseFfn dense{nullptr};  // exactly one of dense / peer is set
  PeerLayer peer{nullptr};

 private:
  std::string name_;  // "block<i>": the prefix of this block's maps in an adapter
};
TORCH_MODULE(Block);

// Which part of the model a parameter belongs to; training policies select by these
// (docs/DESIGN.md §1, "Training policy groups").
enum class ParamKind { kEmbedding, kNorm, kAttention, kDenseFfn, kQuery, kExpert, kAdapter };

struct ParamInfo {
  std::string name;
  torch::Tensor tensor;
  ParamKind kind;
  const ExpertSegmentImpl* segment = nullptr;  // set for kExpert
  bool newest_segment = false;                 // kExpert in its layer's last-added segment, or
                                               // kAdapter of the last-added adapter
  bool decay = false;                          // AdamW weight decay applies (matrices, not norms/keys)
  bool trunk_delta = false;                    // kAdapter: a full delta of a trunk parameter (an
                                               // embedding, norm or bias), not a map's delta
};

class TransformerLMImpl : public torch::nn::Module {
 public:
  explicit TransformerLMImpl(const ModelConfig& config);

  // tokens [B, T] int64 -> logits [B, T, vocab], under the model's route. With `cache`, the
  // tokens are positions cache->length .. cache->length + T - 1 of a sequence whose earlier
  // positions the cache holds (empty: from the start), and the cache takes theirs; the whole
  // sequence must fit the context.
  torch::Tensor forward(const torch::Tensor& tokens, KvCache* cache = nullptr);
  // Mean next-token cross-entropy in nats of tokens [B, T+1] (inputs [:, :-1], targets [:, 1:]).
  torch::Tensor Loss(const torch::Tensor& tokens);

  // Every parameter of a training (non-frozen) part with its kind; frozen segments never appear.
  std::vector<ParamInfo> ClassifiedParameters() const;
  std::vector<PeerLayer> PeerLayers() const;
  // The model's whole training state by name, in the model's own order: "param/<name>" for every
  // parameter outside frozen segments and "buffer/<name>" for every buffer. What a checkpoint
  // holds and what a rank takes from rank 0 besides frozen rows; frozen segments live in the store.
  std::vector<std::pair<std::string, torch::Tensor>> NamedTrainingState() const;

  int64_t TotalParameters() const;
  // Parameters that act on one token: everything but the expert tables, plus h·k experts per PEER
  // layer (docs/DESIGN.md: cost follows the active count, as for Mixtral's 12.9B of 46.7B).
  int64_t ActiveParameters() const;

  // Routing isolation (docs/DESIGN.md): which adapter and segments every later forward pass runs.
  // InvalidArgument when the route names an adapter or a segment the model does not have.
  Status SetRoute(const Route& route);
  const Route& route() const { return route_; }
  // Appends a training adapter of `rank` (SegmentAdapterImpl::kFullRank for full deltas), with or
  // without `trunk_deltas`, under `id` (the id of the segments it goes with); FailedPrecondition
  // if one has that id.
  Status AddAdapter(int64_t id, int64_t rank, bool trunk_deltas = true);
  // Freezes adapter `id` for ever; NotFound if there is none.
  Status FreezeAdapter(int64_t id);
  // Starts training branch `to` (its adapter and, in every PEER layer, its segment) as a copy of
  // branch `from` — a new domain begins where the most similar old one ended (Branch-Train-Merge's
  // initialisation) instead of at the base. `from` is only read. NotFound for a missing adapter
  // or segment, FailedPrecondition if `to` is frozen, InvalidArgument if their shapes differ or
  // `from`'s rows are not in memory.
  Status CopyBranch(int64_t from, int64_t to);
  const std::map<int64_t, SegmentAdapter>& adapters() const { return adapters_; }

  const ModelConfig& config() const { return config_; }
  torch::nn::Embedding tok_emb{nullptr}, pos_emb{nullptr};
  std::vector<Block> blocks;
  torch::nn::LayerNorm ln_f{nullptr};

 private:
  ModelConfig config_;
  std::map<int64_t, SegmentAdapter> adapters_;  // by id
  int64_t newest_adapter_ = -1;
  Route route_;
};
TORCH_MODULE(TransformerLM);

// A copy of `model` to evaluate with (the distillation teacher): the same pool of segments, every
// training part copied, frozen segments shared (they never change); nothing requires gradients.
TransformerLM CopyForTeacher(const TransformerLM& model);

}  // namespace peerd
