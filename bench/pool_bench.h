// peer-bench pool: the cost of a lifetime of frozen segments (bench/POOL.md). Builds a frozen pool
// of S segments through the real expert store (bf16 rows on disk), trains with a training segment
// on top, and measures per-token step time at one frozen segment and at S — with retrieval over
// every segment and under a route of two (the routed policy: the base and the open branch) — the
// time to open the data directory again with rows resident and cached, and training under a row
// cache of each size beside the resident pool: tokens/s, hit rate, store bytes read per token,
// RSS.
#pragma once

namespace peerd::bench {

int PoolBench(int argc, char** argv);

}  // namespace peerd::bench
