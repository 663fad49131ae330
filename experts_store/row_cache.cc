#include "experts_store/row_cache.h"

#include <rocksdb/cache.h>

#include <string>
#include <unordered_map>
#include <vector>

#include "experts_store/format.h"

namespace peerd {

namespace {
void DeleteRow(const rocksdb::Slice&, void* value) { delete static_cast<std::string*>(value); }
}  // namespace

RowCache::RowCache(const ExpertStore* store, size_t capacity_bytes)
    : store_(store), cache_(rocksdb::NewLRUCache(capacity_bytes)) {}

RowCache::~RowCache() = default;

Status RowCache::Get(uint32_t layer, uint32_t segment, const int64_t* experts, size_t n,
                     const std::function<void(size_t, std::string_view)>& visit) {
  // Hits are served at once; misses are grouped by expert (a token batch often asks for the same
  // expert many times) and fetched in one MultiGet.
  std::unordered_map<uint32_t, std::vector<size_t>> missing;
  std::vector<uint32_t> to_read;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t e = static_cast<uint32_t>(experts[i]);
    const std::string key = store::ExpertKey(layer, segment, e);
    if (rocksdb::Cache::Handle* h = cache_->Lookup(key)) {
      visit(i, *static_cast<const std::string*>(cache_->Value(h)));
      cache_->Release(h);
      hits_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    auto& positions = missing[e];
    if (positions.empty()) to_read.push_back(e);
    positions.push_back(i);
  }
  if (to_read.empty()) return Status::OK();
  misses_.fetch_add(to_read.size(), std::memory_order_relaxed);
  std::vector<std::string> rows;
  if (Status st = store_->ReadRows(layer, segment, to_read, &rows); !st.ok()) return st;
  for (size_t j = 0; j < to_read.size(); ++j) {
    for (size_t i : missing[to_read[j]]) visit(i, rows[j]);
    auto* value = new std::string(std::move(rows[j]));
    // Charged what the row takes in memory; the cache adds its own entry's metadata (~90 bytes).
    const size_t charge = sizeof(std::string) + value->capacity();
    // Insert fails only with strict capacity limits (not used); the cache owns the row either way.
    (void)cache_->Insert(store::ExpertKey(layer, segment, to_read[j]), value, charge, &DeleteRow);
  }
  return Status::OK();
}

RowCache::Stats RowCache::stats() const {
  Stats s;
  s.hits = hits_.load();
  s.misses = misses_.load();
  s.usage_bytes = cache_->GetUsage();
  s.capacity_bytes = cache_->GetCapacity();
  return s;
}

size_t RowCache::CountRows() const {
  // LRUCache does not count its entries (GetOccupancyCount answers 0 in RocksDB 7.8).
  size_t n = 0;
  cache_->ApplyToAllEntries([&n](const rocksdb::Slice&, void*, size_t, rocksdb::Cache::DeleterFn) { ++n; }, {});
  return n;
}

}  // namespace peerd
