#include "service/expert_pool_store.h"

#include <cstring>

#include "experts_store/bf16.h"

namespace peerd {

namespace {

torch::ScalarType TorchDtype(RowDtype d) { return d == ROW_DTYPE_BF16 ? torch::kBFloat16 : torch::kFloat; }

// Frozen rows served from the store through the shared RowCache.
class StoreRowSource : public ExpertRowSource {
 public:
  StoreRowSource(std::shared_ptr<RowCache> cache, const SegmentManifest& m) : cache_(std::move(cache)), m_(m) {}

  Status Fetch(const int64_t* experts, int64_t n, float* down, float* up) override {
    const size_t D = m_.d_model();
    const bool bf16 = m_.dtype() == ROW_DTYPE_BF16;
    return cache_->Get(m_.layer(), m_.segment(), experts, n, [&](size_t i, std::string_view row) {
      float* d = down + i * D;
      float* u = up + i * D;
      if (!bf16) {
        std::memcpy(d, row.data(), D * 4);
        std::memcpy(u, row.data() + D * 4, D * 4);
        return;
      }
      for (size_t j = 0; j < D; ++j) {
        uint16_t b[2];
        std::memcpy(&b[0], row.data() + 2 * j, 2);
        std::memcpy(&b[1], row.data() + 2 * (D + j), 2);
        d[j] = store::Bf16ToFloat(b[0]);
        u[j] = store::Bf16ToFloat(b[1]);
      }
    });
  }

 private:
  std::shared_ptr<RowCache> cache_;
  SegmentManifest m_;
};

// The manifest of `seg`, frozen as `dtype` in PEER layer `layer`.
SegmentManifest ManifestOf(size_t layer, const ExpertSegmentImpl& seg, RowDtype dtype, uint64_t step,
                           uint64_t tokens_seen) {
  SegmentManifest m;
  m.set_layer(static_cast<uint32_t>(layer));
  m.set_segment(static_cast<uint32_t>(seg.id()));
  m.set_n_keys(static_cast<uint32_t>(seg.n_keys()));
  m.set_d_model(static_cast<uint32_t>(seg.d_model()));
  m.set_heads(static_cast<uint32_t>(seg.sub_keys.size(0)));
  m.set_query_dim(static_cast<uint32_t>(seg.sub_keys.size(3) * 2));
  m.set_dtype(dtype);
  m.set_frozen_at_step(step);
  m.set_tokens_seen(tokens_seen);
  return m;
}

}  // namespace

ExpertPoolStore::ExpertPoolStore(ExpertStore* store, PoolStoreOptions options)
    : store_(store),
      options_(options),
      cache_(std::make_shared<RowCache>(store, options.residency == Residency::kCached ? options.cache_bytes : 0)) {}

FreezeOptions ExpertPoolStore::Freezing(RowDtype dtype, uint64_t step, uint64_t tokens_seen) const {
  FreezeOptions o;
  o.hold_rows_as = TorchDtype(dtype);
  o.persist = [store = store_, dtype, step, tokens_seen](size_t layer, const ExpertSegmentImpl& seg) {
    torch::NoGradGuard no_grad;
    const SegmentManifest m = ManifestOf(layer, seg, dtype, step, tokens_seen);
    torch::Tensor keys = seg.sub_keys.detach().to(torch::kCPU, torch::kFloat).contiguous();
    // The same conversion the in-memory freeze applies, so memory and store hold the same bytes.
    torch::Tensor down = seg.down.detach().to(torch::kCPU, TorchDtype(dtype)).contiguous();
    torch::Tensor up = seg.up.detach().to(torch::kCPU, TorchDtype(dtype)).contiguous();
    const size_t half = down.size(1) * down.element_size();
    const char* d = static_cast<const char*>(down.data_ptr());
    const char* u = static_cast<const char*>(up.data_ptr());
    return store->FreezeSegment(m, std::string_view(static_cast<const char*>(keys.data_ptr()), keys.numel() * 4),
                                [&](uint32_t e, std::string* row) {
                                  row->append(d + e * half, half);
                                  row->append(u + e * half, half);
                                });
  };
  // Cached residency: the rows just written are read from the store from now on, through the
  // row cache, as if the pool had been opened with this segment in it.
  if (options_.residency == Residency::kCached)
    o.leave_rows_to = [cache = cache_, dtype](size_t layer, const ExpertSegmentImpl& seg) {
      return std::make_shared<StoreRowSource>(cache, ManifestOf(layer, seg, dtype, 0, 0));
    };
  return o;
}

Status ExpertPoolStore::Restore(TransformerLM& model) {
  return Restore(model->PeerLayers(), model->config().d_model());
}

Status ExpertPoolStore::Restore(const std::vector<PeerLayer>& layers, int64_t d_model) {
  std::vector<SegmentManifest> manifests;
  if (Status st = store_->Manifests(&manifests); !st.ok()) return st;
  for (const SegmentManifest& m : manifests) {
    const std::string name = SegmentName(m.layer(), m.segment());
    if (m.state() != SEGMENT_STATE_FROZEN) continue;
    if (m.layer() >= layers.size() || m.d_model() != d_model)
      return Status::InvalidArgument(
          "the store in '" + store_->dir() + "' holds " + name + " (d_model " + std::to_string(m.d_model()) +
          ") but the model has " + std::to_string(layers.size()) + " PEER layers of d_model " +
          std::to_string(d_model) + ": use the configuration this data directory was trained with");
    std::string key_bytes;
    if (Status st = store_->ReadSubKeys(m.layer(), m.segment(), &key_bytes); !st.ok())
      return Status::Corruption(name + " is frozen but its sub-keys cannot be read: " + st.message());
    const int64_t h = m.heads(), n = m.n_keys(), half = m.query_dim() / 2, D = m.d_model();
    if (key_bytes.size() != size_t(h * 2 * n * half * 4))
      return Status::Corruption(name + ": sub-keys are " + std::to_string(key_bytes.size()) +
                                " bytes, the manifest says " + std::to_string(h * 2 * n * half * 4));
    torch::Tensor keys = torch::empty({h, 2, n, half});
    std::memcpy(keys.data_ptr(), key_bytes.data(), key_bytes.size());

    ExpertSegment segment{nullptr};
    if (options_.residency == Residency::kResident) {
      torch::Tensor down = torch::empty({n * n, D}, TorchDtype(m.dtype()));
      torch::Tensor up = torch::empty({n * n, D}, TorchDtype(m.dtype()));
      const size_t row_half = D * down.element_size();
      char* d = static_cast<char*>(down.data_ptr());
      char* u = static_cast<char*>(up.data_ptr());
      Status st = store_->ScanSegment(m, [&](uint32_t e, std::string_view row) {
        std::memcpy(d + e * row_half, row.data(), row_half);
        std::memcpy(u + e * row_half, row.data() + row_half, row_half);
      });
      if (!st.ok()) return st;
      segment = ExpertSegment(m.segment(), keys, down, up);
    } else {
      if (options_.verify_cached_at_open) {
        if (Status st = store_->VerifySegment(m); !st.ok()) return st;
      } else {
        std::lock_guard<std::mutex> lock(mu_);
        unverified_.push_back(m);
      }
      segment = ExpertSegment(m.segment(), keys, D, std::make_shared<StoreRowSource>(cache_, m));
    }
    PeerLayer layer = layers[m.layer()];
    if (Status st = layer->InsertFrozenSegment(segment); !st.ok())
      return Status::InvalidArgument("cannot restore " + name + ": " + st.message());
  }
  return Status::OK();
}

Status ExpertPoolStore::VerifyRestored(const std::function<bool()>& stop, size_t* verified) {
  size_t done = 0;
  for (;;) {
    SegmentManifest m;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (unverified_.empty() || (stop && stop())) break;
      m = unverified_.front();
    }
    if (Status st = store_->VerifySegment(m); !st.ok()) {
      if (verified) *verified = done;
      return st;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      unverified_.erase(unverified_.begin());
    }
    ++done;
  }
  if (verified) *verified = done;
  return Status::OK();
}

size_t ExpertPoolStore::unverified() const {
  std::lock_guard<std::mutex> lock(mu_);
  return unverified_.size();
}

}  // namespace peerd
