#include "bench/cache_replay.h"

#include <algorithm>
#include <list>
#include <numeric>
#include <queue>
#include <unordered_map>
#include <unordered_set>

namespace peerd::bench {

namespace {

// Calls fetch(begin, end) for each fetch's rows [begin, end) of trace.keys.
template <typename F>
void ForEachFetch(const RowTrace& trace, F fetch) {
  size_t begin = 0;
  for (size_t end : trace.fetch_end) fetch(begin, end), begin = end;
}

}  // namespace

ReplayResult ReplayLru(const RowTrace& trace, size_t capacity_rows) {
  ReplayResult r;
  std::list<uint64_t> order;  // front: most recently used
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> where;
  std::vector<uint64_t> missed;
  ForEachFetch(trace, [&](size_t begin, size_t end) {
    missed.clear();
    for (size_t i = begin; i < end; ++i) {
      const uint64_t key = trace.keys[i];
      if (auto it = where.find(key); it != where.end()) {
        order.splice(order.begin(), order, it->second);
        ++r.hits;
      } else {
        missed.push_back(key);
      }
    }
    r.requests += end - begin;
    for (uint64_t key : missed) {
      if (capacity_rows == 0) break;
      if (where.size() == capacity_rows) where.erase(order.back()), order.pop_back();
      order.push_front(key);
      where[key] = order.begin();
    }
  });
  return r;
}

ReplayResult ReplayOptimal(const RowTrace& trace, size_t capacity_rows) {
  const size_t n = trace.keys.size();
  // next[i]: the position of the next request of keys[i] (n: never again).
  std::vector<size_t> next(n);
  {
    std::unordered_map<uint64_t, size_t> later;
    for (size_t i = n; i-- > 0;) {
      auto [it, fresh] = later.try_emplace(trace.keys[i], n);
      next[i] = it->second;
      it->second = i;
    }
  }
  // The cache maps each row to its next request; a max-heap of (next request, row) finds the one
  // to drop, its stale entries (rows since requested again, or dropped) skipped when they surface.
  ReplayResult r;
  std::unordered_map<uint64_t, size_t> cached;
  std::priority_queue<std::pair<size_t, uint64_t>> farthest;
  auto pop_stale = [&] {
    while (!farthest.empty()) {
      auto it = cached.find(farthest.top().second);
      if (it != cached.end() && it->second == farthest.top().first) return;
      farthest.pop();
    }
  };
  ForEachFetch(trace, [&](size_t begin, size_t end) {
    // A fetch's rows are distinct, so its hits and misses do not depend on the order within it.
    for (size_t i = begin; i < end; ++i) {
      const uint64_t key = trace.keys[i];
      ++r.requests;
      if (auto it = cached.find(key); it != cached.end()) {
        ++r.hits;
        it->second = next[i];
        farthest.push({next[i], key});
        continue;
      }
      if (capacity_rows == 0 || next[i] == n) continue;  // never requested again: not worth a slot
      if (cached.size() == capacity_rows) {
        pop_stale();
        if (farthest.top().first <= next[i]) continue;  // every cached row comes back sooner
        cached.erase(farthest.top().second);
        farthest.pop();
      }
      cached[key] = next[i];
      farthest.push({next[i], key});
    }
  });
  return r;
}

ReplayResult ReplayHottest(const RowTrace& trace, size_t capacity_rows) {
  std::unordered_map<uint64_t, uint64_t> count;
  for (uint64_t key : trace.keys) ++count[key];
  std::vector<std::pair<uint64_t, uint64_t>> by_count(count.begin(), count.end());  // (row, requests)
  const size_t kept = std::min(capacity_rows, by_count.size());
  std::partial_sort(
      by_count.begin(), by_count.begin() + static_cast<std::ptrdiff_t>(kept), by_count.end(),
      [](const auto& a, const auto& b) { return a.second > b.second || (a.second == b.second && a.first < b.first); });
  ReplayResult r;
  r.requests = trace.keys.size();
  for (size_t i = 0; i < kept; ++i) r.hits += by_count[i].second - 1;  // all but its first request
  return r;
}

double TraceSkew::ShareOfHottest(size_t rows) const {
  if (requests == 0) return 0;
  const size_t n = std::min(rows, counts_descending.size());
  return double(std::accumulate(counts_descending.begin(), counts_descending.begin() + static_cast<std::ptrdiff_t>(n),
                                uint64_t{0})) /
         double(requests);
}

TraceSkew MeasureSkew(const RowTrace& trace) {
  std::unordered_map<uint64_t, uint64_t> count;
  for (uint64_t key : trace.keys) ++count[key];
  TraceSkew s;
  s.requests = trace.keys.size();
  s.distinct_rows = count.size();
  for (const auto& [key, c] : count) s.counts_descending.push_back(c);
  std::sort(s.counts_descending.rbegin(), s.counts_descending.rend());
  return s;
}

}  // namespace peerd::bench
