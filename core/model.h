// TransformerLM: a small decoder-only byte-level language model whose feed-forward layers are
// PEER layers in the configured blocks and dense FFNs elsewhere (a dense-only variant is the
// baseline). nanoGPT's shape: token + position embeddings, pre-norm blocks of causal
// self-attention and FFN, final norm, output head tied to the token embedding.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "proto/config.pb.h"
#include "core/peer_layer.h"

namespace peerd {

// Causal multi-head self-attention, written out (no scaled_dot_product_attention: LibTorch 1.13).
class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  CausalSelfAttentionImpl(int64_t d_model, int64_t n_heads, int64_t context);
  torch::Tensor forward(const torch::Tensor& x);  // [B, T, D] -> [B, T, D]
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
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear fc{nullptr}, proj{nullptr};
};
TORCH_MODULE(DenseFfn);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& config, bool peer);
  torch::Tensor forward(const torch::Tensor& x);  // x + attn(ln1 x), then + ffn(ln2 x)
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  CausalSelfAttention attn{nullptr};
  DenseFfn dense{nullptr};  // exactly one of dense / peer is set
  PeerLayer peer{nullptr};
};
TORCH_MODULE(Block);

// Which part of the model a parameter belongs to; training policies select by these
// (DESIGN.md §1, "Training policy groups").
enum class ParamKind { kEmbedding, kNorm, kAttention, kDenseFfn, kQuery, kExpert };

struct ParamInfo {
  std::string name;
  torch::Tensor tensor;
  ParamKind kind;
  const ExpertSegmentImpl* segment = nullptr;  // set for kExpert
  bool newest_segment = false;                 // kExpert in its layer's last-added segment
  bool decay = false;                          // AdamW weight decay applies (matrices, not norms/keys)
};

class TransformerLMImpl : public torch::nn::Module {
 public:
  explicit TransformerLMImpl(const ModelConfig& config);

  // tokens [B, T] int64 -> logits [B, T, vocab].
  torch::Tensor forward(const torch::Tensor& tokens);
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
  // layer (DESIGN.md: cost follows the active count, as for Mixtral's 12.9B of 46.7B).
  int64_t ActiveParameters() const;

  const ModelConfig& config() const { return config_; }
  torch::nn::Embedding tok_emb{nullptr}, pos_emb{nullptr};
  std::vector<Block> blocks;
  torch::nn::LayerNorm ln_f{nullptr};

 private:
  ModelConfig config_;
};
TORCH_MODULE(TransformerLM);

// A copy of `model` to evaluate with (the distillation teacher): the same pool of segments, every
// training part copied, frozen segments shared (they never change); nothing requires gradients.
TransformerLM CopyForTeacher(const TransformerLM& model);

}  // namespace peerd
