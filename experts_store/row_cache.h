// RowCache: a bounded, sharded LRU cache of frozen expert rows in front of an ExpertStore, so a
// pool larger than memory still works — slower, not wrong. It is RocksDB's own LRUCache (midpoint
// insertion: a row hit again moves to the protected half), charged the memory each row takes; misses
// are fetched with one batched MultiGet per call. bench/POOL.md measured it against LRU, frequency
// with hindsight and the optimum on the access skew of a training stream.
//
// Thread-safe: Get may be called concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "experts_store/expert_store.h"

namespace rocksdb {
class Cache;
}

namespace peerd {

class RowCache {
 public:
  RowCache(const ExpertStore* store, size_t capacity_bytes);
  ~RowCache();

  // Calls visit(i, row) for every i in [0, n) with the row of expert experts[i] of
  // (layer, segment), from the cache or, for misses, from the store (then cached).
  Status Get(uint32_t layer, uint32_t segment, const int64_t* experts, size_t n,
             const std::function<void(size_t, std::string_view)>& visit);

  struct Stats {
    uint64_t hits = 0, misses = 0;
    size_t usage_bytes = 0, capacity_bytes = 0;  // each row's bytes, its string and the entry's metadata
  };
  Stats stats() const;
  // Rows held now. Walks every entry: for benchmarks, not for each scrape of the metrics.
  size_t CountRows() const;

 private:
  const ExpertStore* store_;
  std::shared_ptr<rocksdb::Cache> cache_;
  std::atomic<uint64_t> hits_{0}, misses_{0};
};

}  // namespace peerd
