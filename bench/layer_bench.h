// `peer-bench layer`: PEER layer forward+backward throughput and peak memory, side by side with
// a dense FFN of equal active parameters and with peer_ref.py, an external script given by path
// (--ref-script: a faithful PyTorch port of a public PEER implementation, not in this
// repository). Each configuration runs in its own process so that its peak RSS is its own.
#pragma once

namespace peerd::bench {

// `peer-bench layer [flags]`: runs every configuration, prints a table (and JSON lines with --json).
int LayerBench(int argc, char** argv);
// `peer-bench layer-run [flags]`: one configuration in this process; prints one JSON line.
int LayerRun(int argc, char** argv);

}  // namespace peerd::bench
