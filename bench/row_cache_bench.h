// peer-bench rowcache: does the row cache's policy suit the access skew training produces?
// (bench/POOL.md). Trains a freeze-grow stream on real text — a segment per domain, frozen into the
// real expert store when its domain ends, retrieval over every segment, 25 % of each batch replayed
// from earlier domains as the service's default recipe does — and records, at every step, the
// distinct frozen rows the step retrieved (what the fused step asks the row cache for). The trace
// is then replayed through the real RowCache and through LRU, frequency with hindsight and
// Belady's optimum at cache sizes given as shares of the frozen rows: hit rates side by side,
// with how the requests spread over rows.
#pragma once

namespace peerd::bench {

int RowCacheBench(int argc, char** argv);

}  // namespace peerd::bench
