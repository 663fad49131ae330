// `peer-bench ingest`: the data port's durable throughput (MB/s acked) with 1 and 8 concurrent
// clients; the same 8 clients alone and beside misbehaving ones; and the service's training
// tokens/s while ingesting against the bare trainer on the same data.
#pragma once

namespace peerd::bench {

int IngestBench(int argc, char** argv);

}  // namespace peerd::bench
