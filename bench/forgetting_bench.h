// `peer-bench forgetting`: does freezing and growing beat forgetting? A base phase on broad text
// (--pretrain), then the same sequence of text domains, at equal trained tokens per domain and
// equal active parameters per token, under six policies (docs/DESIGN.md §4):
//   dense               dense-FFN model, everything trains (sequential fine-tuning)
//   dense+recipe        as dense, plus replay of earlier domains and distillation of the replayed
//                       part towards the model as it was before the current domain
//   peer-all            PEER, one pool, nothing ever frozen
//   freeze-grow         PEER, a new segment per domain, the previous one frozen
//   freeze-grow+recipe  as freeze-grow with the same replay and distillation as dense+recipe
//   routed              PEER with routing isolation (docs/DESIGN.md §4b): after the base phase only
//                       the new segment and its adapter train; each text runs the base or one
//                       domain's segment and adapter, chosen by a bigram router. Keeps no old text.
// Prints the matrix and metrics of each policy side by side; --json prints one object per policy;
// --seeds N reports medians over N seeds; --replay-sweep runs the recipe policies at other budgets.
// Everything runs in this process through core/ (no service): the benchmark measures the learning,
// the service's own overhead is `peer-bench ingest`'s.
#pragma once

namespace peerd::bench {

int ForgettingBench(int argc, char** argv);

}  // namespace peerd::bench
