// Replays a recorded trace of frozen-row requests through cache policies, so that the row cache's
// policy can be judged against the access skew training really produces (bench/POOL.md).
//
// A trace is a sequence of fetches, each the distinct rows of one segment that one training step
// retrieved: the fused PEER step asks the row cache for them in one call per segment, which looks
// every row up first and inserts the misses after (experts_store/row_cache.cc). The policies replay
// it the same way. Every policy fills on demand, so a row's first request is always a miss (the
// trace's compulsory misses).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace peerd::bench {

struct RowTrace {
  std::vector<uint64_t> keys;     // every fetch's distinct rows, one fetch after the other
  std::vector<size_t> fetch_end;  // keys[fetch_end[f-1] .. fetch_end[f]) are fetch f's rows
  void EndFetch() { fetch_end.push_back(keys.size()); }
};

struct ReplayResult {
  uint64_t requests = 0, hits = 0;
  double hit_rate() const { return requests ? double(hits) / double(requests) : 0; }
};

// Least recently used: a hit moves the row to the front, a miss evicts the back.
ReplayResult ReplayLru(const RowTrace& trace, size_t capacity_rows);
// Belady's MIN (the offline optimum for demand filling with bypass): on a miss the row whose next
// request lies farthest ahead is dropped — the new row itself when it comes back last.
ReplayResult ReplayOptimal(const RowTrace& trace, size_t capacity_rows);
// Frequency with hindsight: the capacity_rows rows requested most over the whole trace are kept
// for good from their first request; no other row is cached.
ReplayResult ReplayHottest(const RowTrace& trace, size_t capacity_rows);

// How the trace's requests spread over rows.
struct TraceSkew {
  uint64_t requests = 0, distinct_rows = 0;
  // Share of all requests that went to the `rows` most requested rows.
  double ShareOfHottest(size_t rows) const;
  std::vector<uint64_t> counts_descending;  // requests per distinct row
};
TraceSkew MeasureSkew(const RowTrace& trace);

}  // namespace peerd::bench
