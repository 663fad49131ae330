// ExpertPoolStore: the bridge between a model's expert pool (core/) and the expert store
// (experts_store/). Freezing writes a segment to the store before it is frozen in memory; opening
// a data directory rebuilds the frozen segments of every PEER layer from the store's manifests,
// verifying each checksum and refusing a corrupted segment by name.
//
// Two residency modes for frozen rows: kResident loads them all at restore (in the store's dtype:
// bf16 rows cost 2 bytes a value in memory too); kCached leaves them in the store and serves the
// rows retrieval selects through a bounded RowCache — for pools larger than memory; a segment
// frozen while the pool is cached leaves memory as soon as it is stored. Opening a
// cached pool reads manifests and sub-keys, not rows: its checksums are checked afterwards
// (VerifyRestored), so that restarting does not take longer as the pool grows.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "core/model.h"
#include "core/trainer.h"
#include "experts_store/expert_store.h"
#include "experts_store/row_cache.h"

namespace peerd {

enum class Residency { kResident, kCached };

struct PoolStoreOptions {
  Residency residency = Residency::kResident;
  size_t cache_bytes = size_t{256} << 20;  // kCached: bound on cached row bytes
  // kCached: check every segment's checksum over all of its rows in Restore, before any is
  // served — a read of the whole pool, so opening takes as long as that read. Off, Restore reads
  // manifests and sub-keys only and VerifyRestored checks the rows afterwards (the training loop
  // runs it beside training); meanwhile every row read is still checked by RocksDB's block
  // checksums. kResident verifies as it loads (it reads every row anyway).
  bool verify_cached_at_open = false;
};

class ExpertPoolStore {
 public:
  // `store` must outlive this object and every segment it restores.
  ExpertPoolStore(ExpertStore* store, PoolStoreOptions options);

  // For Trainer::FreezeSegment: persists the segment to the store as `dtype` (one synced
  // WriteBatch); then, resident, holds its rows in that dtype in memory, or, cached, drops them
  // from memory and reads them from the store through the row cache.
  FreezeOptions Freezing(RowDtype dtype, uint64_t step, uint64_t tokens_seen) const;

  // Puts every frozen segment of the store into `model`'s PEER layers (by layer and id),
  // replacing training segments of the same id. The caller then refreshes its optimizer.
  Status Restore(TransformerLM& model);
  // The same for a list of PEER layers of width d_model (layer i of the store goes to layers[i]).
  Status Restore(const std::vector<PeerLayer>& layers, int64_t d_model);

  // Checks the checksum of each segment Restore left unverified (cached residency), one segment at
  // a time, until all are done or `stop` returns true; Corruption naming the first bad one. Each
  // one verified is done for good: a later call goes on with the rest. Thread-safe against the
  // rows being read meanwhile.
  Status VerifyRestored(const std::function<bool()>& stop, size_t* verified = nullptr);
  size_t unverified() const;

  RowCache::Stats cache_stats() const { return cache_->stats(); }
  const PoolStoreOptions& options() const { return options_; }

 private:
  ExpertStore* store_;
  PoolStoreOptions options_;
  std::shared_ptr<RowCache> cache_;
  mutable std::mutex mu_;
  std::vector<SegmentManifest> unverified_;  // guarded by mu_
};

}  // namespace peerd
