// peer-bench: peerd's benchmarks. Each subcommand prints a table, and with --json one JSON
// object per line. Performance figures come from here, never from timed tests.
//   peer-bench layer [--help]     PEER layer forward+backward vs dense FFN vs peer_ref.py
//   peer-bench store [--help]     expert store: freeze, cold open, cached reads, memory per expert
//   peer-bench ingest [--help]    data port throughput, also beside misbehaving clients; training
//                                 inside the service vs bare
//   peer-bench forgetting [--help]  six continual-learning policies on a sequence of domains
//   peer-bench scaling [--help]   data-parallel tokens/s with 1, 2, 4 ranks (peer-train processes)
//   peer-bench generate [--help]  generation tokens/s with and without the key/value cache
#include <cstdio>
#include <cstring>

#include "bench/forgetting_bench.h"
#include "bench/generate_bench.h"
#include "bench/ingest_bench.h"
#include "bench/layer_bench.h"
#include "bench/scaling_bench.h"
#include "bench/store_bench.h"
#include "core/runtime.h"

int main(int argc, char** argv) {
  peerd::ReexecWithTunedEnvironment(argv);
  if (argc >= 2 && std::strcmp(argv[1], "layer") == 0) return peerd::bench::LayerBench(argc - 1, argv + 1);
  if (argc >= 2 && std::strcmp(argv[1], "ingest") == 0) return peerd::bench::IngestBench(argc - 1, argv + 1);
  if (argc >= 2 && std::strcmp(argv[1], "forgetting") == 0) return peerd::bench::ForgettingBench(argc - 1, argv + 1);
  if (argc >= 2 && std::strcmp(argv[1], "store") == 0) return peerd::bench::StoreBench(argc - 1, argv + 1);
  if (argc >= 2 && std::strcmp(argv[1], "scaling") == 0) return peerd::bench::ScalingBench(argc - 1, argv + 1);
  if (argc >= 2 && std::strcmp(argv[1], "generate") == 0) return peerd::bench::GenerateBench(argc - 1, argv + 1);
  if (argc >= 2 && std::strcmp(argv[1], "layer-run") == 0) return peerd::bench::LayerRun(argc - 1, argv + 1);
  std::fprintf(stderr,
               "usage: peer-bench layer|store|ingest|forgetting|scaling|generate [--help]\n"
               "  layer   PEER layer forward+backward tokens/s and peak memory, side by side with a\n"
               "          dense FFN of equal active parameters and an external PyTorch reference\n"
               "          script (peer_ref.py, --ref-script)\n"
               "  store   expert store: freeze MB/s, cold open vs cat, cached reads, bytes per expert\n"
               "  ingest  data port MB/s acked (1 and 8 clients; 8 beside misbehaving ones); service\n"
               "          training vs bare trainer\n"
               "  forgetting  dense, dense+recipe, peer-all, freeze-grow, freeze-grow+recipe, routed on a base\n"
               "          phase and a sequence of text domains: matrix, forgetting, BWT, ACC, plasticity\n"
               "  scaling data-parallel training: tokens/s and collective time per step for 1, 2, 4 ranks\n"
               "          of one thread each, beside one process with as many threads\n"
               "  generate  generation tokens/s with and without the key/value cache at a few prompt\n"
               "          lengths (greedy: both must produce the same text)\n");
  return 2;
}
