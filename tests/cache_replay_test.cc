// The row-cache replay of peer-bench rowcache (bench/cache_replay.h) against answers worked out by
// hand: the textbook page-reference string for LRU and Belady's MIN, a fetch's lookups before its
// inserts, frequency with hindsight, and the skew figures.
#include <gtest/gtest.h>

#include <initializer_list>

#include "bench/cache_replay.h"

namespace peerd::bench {
namespace {

RowTrace Fetches(std::initializer_list<std::initializer_list<uint64_t>> fetches) {
  RowTrace t;
  for (const auto& fetch : fetches) {
    t.keys.insert(t.keys.end(), fetch.begin(), fetch.end());
    t.EndFetch();
  }
  return t;
}

TEST(CacheReplay, LruAndOptimalMissAsTheTextbookSaysOnItsReferenceString) {
  // Silberschatz's reference string with 3 frames: LRU 12 faults, OPT 9, of 20 references. A cache
  // need not keep the row it serves, so MIN also passes a row by (page 4 at the 8th request, never
  // asked for again, leaves 0, 2 and 3 cached): 8 misses.
  RowTrace t;
  for (uint64_t page : {7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1})
    t.keys.push_back(page), t.EndFetch();
  EXPECT_EQ(ReplayLru(t, 3).requests, 20u);
  EXPECT_EQ(ReplayLru(t, 3).hits, 20u - 12u);
  EXPECT_EQ(ReplayOptimal(t, 3).hits, 20u - 8u);
  // No cache, no hits; a cache holding every page misses only the 6 distinct pages' first requests.
  EXPECT_EQ(ReplayLru(t, 0).hits, 0u);
  EXPECT_EQ(ReplayOptimal(t, 0).hits, 0u);
  EXPECT_EQ(ReplayLru(t, 100).hits, 20u - 6u);
  EXPECT_EQ(ReplayOptimal(t, 100).hits, 20u - 6u);
}

TEST(CacheReplay, AFetchLooksUpEveryRowBeforeInsertingItsMisses) {
  // One slot. Fetch 2 finds 1 (a hit), then inserts 2 over it; fetch 3 misses 1.
  const RowTrace t = Fetches({{1}, {1, 2}, {1}});
  const ReplayResult lru = ReplayLru(t, 1);
  EXPECT_EQ(lru.requests, 4u);
  EXPECT_EQ(lru.hits, 1u);
  // MIN keeps 1 (requested again) rather than 2 (never): hits in fetches 2 and 3.
  EXPECT_EQ(ReplayOptimal(t, 1).hits, 2u);
}

TEST(CacheReplay, HottestKeepsTheMostRequestedRowsFromTheirFirstRequest) {
  const RowTrace t = Fetches({{1, 2}, {1, 3}, {1, 2}});  // 1: 3 requests, 2: 2, 3: 1
  EXPECT_EQ(ReplayHottest(t, 0).hits, 0u);
  EXPECT_EQ(ReplayHottest(t, 1).hits, 2u);
  EXPECT_EQ(ReplayHottest(t, 2).hits, 3u);
  EXPECT_EQ(ReplayHottest(t, 9).hits, 3u);
  EXPECT_EQ(ReplayHottest(t, 1).requests, 6u);
  const TraceSkew s = MeasureSkew(t);
  EXPECT_EQ(s.requests, 6u);
  EXPECT_EQ(s.distinct_rows, 3u);
  EXPECT_DOUBLE_EQ(s.ShareOfHottest(1), 0.5);
  EXPECT_DOUBLE_EQ(s.ShareOfHottest(2), 5.0 / 6.0);
  EXPECT_DOUBLE_EQ(s.ShareOfHottest(10), 1.0);
}

}  // namespace
}  // namespace peerd::bench
