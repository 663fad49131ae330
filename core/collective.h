// Collective: this process's place among the ranks of a multi-rank job (docs/DESIGN.md §6), joined
// through PyTorch's own distributed engine — a c10d TCPStore for the rendezvous (rank 0 serves
// it) and ProcessGroupGloo for the collectives on CPU tensors.
//
// Every call is collective: all ranks make the same calls in the same order, each blocking until
// every rank has taken part. A rank that dies (or stops answering for `timeout`) makes the calls
// of the others fail with an IOError naming the operation, instead of hanging: the job stops, and
// resumes from its last checkpoint when all ranks are started again. No c10d header here: they
// need USE_C10D_GLOO and Gloo's headers, which only collective.cc sees.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace peerd {

struct CollectiveOptions {
  int world_size = 1;
  int rank = 0;
  std::string host = "127.0.0.1";  // rank 0's address: it serves the rendezvous store there
  uint16_t port = 29500;
  std::chrono::milliseconds timeout{120000};  // for joining and for every collective
};

// Parses "HOST:PORT" into options.host and options.port.
Status ParseRendezvous(const std::string& text, CollectiveOptions* options);

class Collective {
 public:
  // Joins the job: blocks until all world_size ranks have joined or the timeout passes.
  static Status Connect(const CollectiveOptions& options, std::unique_ptr<Collective>* out);
  ~Collective();

  int rank() const { return options_.rank; }
  int world_size() const { return options_.world_size; }

  // Every rank's tensors take rank 0's values, in place (same shapes and dtypes on every rank;
  // bf16 and bool travel as their raw bytes).
  Status Broadcast(std::vector<torch::Tensor>& tensors, const char* what);
  // Every rank's *bytes becomes rank 0's.
  Status BroadcastBytes(std::string* bytes, const char* what);
  // Sums dense tensors over the ranks, in place; every rank ends with the same bits.
  Status AllReduceSum(std::vector<torch::Tensor>& tensors, const char* what);
  // Sums a sparse COO tensor over the ranks (Gloo's sparse all-reduce: every rank gathers every
  // rank's rows and adds them in rank order); *t becomes the coalesced sum.
  Status AllReduceSparse(torch::Tensor* t, const char* what);
  // all[r] = rank r's `mine` (same shape and dtype on every rank).
  Status AllGather(const torch::Tensor& mine, std::vector<torch::Tensor>* all, const char* what);

  // Seconds this process has spent inside collectives (waiting for the others included).
  double seconds_in_collectives() const { return seconds_; }
  // Bytes this process has put into collectives (its own payload: what a ring all-reduce sends
  // about twice of, and what every other rank receives of a sparse all-reduce or a broadcast).
  uint64_t bytes_in_collectives() const { return bytes_; }

 private:
  struct Group;
  Collective(const CollectiveOptions& options, std::unique_ptr<Group> group);
  template <typename F>
  Status Run(const char* what, F&& f);

  CollectiveOptions options_;
  std::unique_ptr<Group> group_;
  double seconds_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace peerd
