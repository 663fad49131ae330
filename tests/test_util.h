// Helpers shared by the tests: small configurations.
#pragma once

#include "core/config.h"

namespace peerd::testing {

// A PEER configuration small enough for exhaustive checks.
inline PeerConfig SmallPeer(uint32_t n_keys = 8, uint32_t heads = 2, uint32_t topk = 4, uint32_t query_dim = 8,
                            QueryNorm norm = QUERY_NORM_LAYER) {
  PeerConfig p;
  p.set_n_keys(n_keys);
  p.set_heads(heads);
  p.set_topk(topk);
  p.set_query_dim(query_dim);
  p.set_query_norm(norm);
  p.set_initial_segments(1);
  return p;
}

// A tiny LM configuration: one PEER block.
inline Config TinyModel() {
  Config c = DefaultConfig();
  ModelConfig* m = c.mutable_model();
  m->set_d_model(32);
  m->set_n_layers(1);
  m->set_n_heads(2);
  m->set_context(16);
  m->clear_peer_blocks();
  m->add_peer_blocks(0);
  const PeerImpl impl = m->peer().impl();  // a valid configuration, as peerd would be given
  *m->mutable_peer() = SmallPeer();
  m->mutable_peer()->set_impl(impl);
  c.mutable_train()->set_batch_size(4);
  c.mutable_train()->set_warmup_steps(0);
  c.mutable_train()->set_lr(1e-2f);
  c.mutable_train()->set_min_lr(1e-3f);
  return c;
}

}  // namespace peerd::testing
