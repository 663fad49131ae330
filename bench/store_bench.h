// `peer-bench store`: the expert store's figures — freeze throughput, cold open of a large bf16
// segment against plain reads of its table files, cached row reads at several hit ratios, and the
// memory a resident frozen expert costs.
#pragma once

namespace peerd::bench {

int StoreBench(int argc, char** argv);

}  // namespace peerd::bench
