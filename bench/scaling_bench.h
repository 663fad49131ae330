// peer-bench scaling: tokens/s of data-parallel training with 1, 2, 4 ranks on this machine
// (bench/SCALING.md).
#pragma once

namespace peerd::bench {

int ScalingBench(int argc, char** argv);

}  // namespace peerd::bench
