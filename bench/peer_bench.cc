// peer-bench: peerd's benchmarks. Each subcommand prints a table, and with --json one JSON
// object per line. Performance figures come from here, never from timed tests.
//   peer-bench layer [--help]     PEER layer forward+backward vs dense FFN vs peer_ref.py
//   peer-bench store [--help]     expert store: freeze, cold open, cached reads, memory per expert
//   peer-bench ingest [--help]    data port throughput, also beside misbehaving clients; training
//                                 inside the service vs bare
//   peer-bench forgetting [--help]  six continual-learning policies on a sequence of domains
//   peer-bench scaling [--help]   data-parallel tokens/s with 1, 2, 4 ranks (peer-train processes)
//   peer-bench generate [--help]  generation tokens/s with and without the key/value cache
//   peer-bench pool [--help]      a large frozen pool: training cost per segment count, open time, row cache
//   peer-bench rowcache [--help]  the row cache's hit rate on a freeze-grow stream's access skew
//   peer-bench --version
#include <cstdio>
#include <cstring>

#include "bench/forgetting_bench.h"
#include "bench/generate_bench.h"
#include "bench/ingest_bench.h"
#include "bench/layer_bench.h"
#include "bench/pool_bench.h"
#include "bench/row_cache_bench.h"
#include "bench/scaling_bench.h"
#include "bench/store_bench.h"
#include "core/runtime.h"

#include <CLI/CLI.hpp>

#include <string>
#include <tuple>
#include <vector>

int main(int argc, char** argv) {
  peerd::ReexecWithTunedEnvironment(argv);
  using Bench = int (*)(int, char**);
  // Each bench parses its own flags (peer-bench BENCH --help): the top level only picks it.
  const std::vector<std::tuple<const char*, Bench, const char*>> benches = {
      {"layer", peerd::bench::LayerBench,
       "PEER layer forward+backward tokens/s and peak memory, beside a dense FFN of equal active parameters and an "
       "external PyTorch reference (peer_ref.py, --ref-script)"},
      {"store", peerd::bench::StoreBench,
       "expert store: freeze MB/s, cold open vs cat, cached reads, bytes per expert"},
      {"ingest", peerd::bench::IngestBench,
       "data port MB/s acked (1 and 8 clients; 8 beside misbehaving ones); service training vs bare trainer"},
      {"forgetting", peerd::bench::ForgettingBench,
       "dense, dense+recipe, peer-all, freeze-grow, freeze-grow+recipe, routed on a base phase and a sequence of text "
       "domains: matrix, forgetting, BWT, ACC, plasticity"},
      {"scaling", peerd::bench::ScalingBench,
       "data-parallel training: tokens/s and collective time per step for 1, 2, 4 ranks of one thread, beside one "
       "process with as many threads"},
      {"generate", peerd::bench::GenerateBench,
       "generation tokens/s with and without the key/value cache at a few prompt lengths (greedy: the same text)"},
      {"pool", peerd::bench::PoolBench,
       "a lifetime of frozen segments: training cost at 1 and S segments (all, routed), open time, resident vs a "
       "row cache (hit rate, store bytes per token, RSS)"},
      {"rowcache", peerd::bench::RowCacheBench,
       "the row cache on real access skew: a freeze-grow stream's frozen-row requests replayed through the RowCache, "
       "LRU, frequency with hindsight and the optimum at several cache sizes"},
      {"layer-run", peerd::bench::LayerRun, "one layer configuration, one JSON line (what `layer` runs per process)"},
  };
  CLI::App app{"peer-bench: benchmarks that print a table and write JSON (see bench/*.md)"};
  app.set_version_flag("--version", std::string("peer-bench ") + PEERD_VERSION);
  app.require_subcommand(1);
  for (const auto& [name, bench, what] : benches)
    app.add_subcommand(name, what)->prefix_command()->set_help_flag();  // its --help is the bench's
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  const CLI::App* chosen = app.get_subcommands()[0];
  // argv for the bench: "peer-bench NAME" (its usage line), then everything after it as given.
  std::vector<std::string> rest = chosen->remaining();
  const std::string name = chosen->get_name();
  std::string program = "peer-bench " + name;
  std::vector<char*> args = {program.data()};
  for (std::string& a : rest) args.push_back(a.data());
  args.push_back(nullptr);
  for (const auto& [bench_name, bench, what] : benches)
    if (name == bench_name) return bench(static_cast<int>(args.size() - 1), args.data());
  return 2;
}
