#include "core/collective.h"

#include <charconv>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef PEERD_WITH_C10D_GLOO
// LibTorch guards its Gloo process group behind the macro its own build defines.
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

namespace peerd {

struct Collective::Group {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;  // Gloo's; without Gloo's headers, none (one rank only)
};

namespace {

// What c10d says, without LibTorch's backtrace.
std::string What(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

// Gloo (as LibTorch 1.13 builds it) copies neither bf16 nor bool, nor int16: they travel as their
// raw bytes through views of a type it does copy (fp16, uint8). A broadcast never does arithmetic.
torch::Tensor Wire(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kBFloat16) return t.view(torch::kHalf);
  if (t.scalar_type() == torch::kBool) return t.view(torch::kByte);
  return t;
}

}  // namespace

Status ParseRendezvous(const std::string& text, CollectiveOptions* options) {
  const size_t colon = text.rfind(':');
  unsigned port = 0;
  if (colon == std::string::npos || colon == 0 ||
      std::from_chars(text.data() + colon + 1, text.data() + text.size(), port).ec != std::errc() || port == 0 ||
      port > 65535)
    return Status::InvalidArgument("--rendezvous must be HOST:PORT (rank 0's address and a free port), got '" + text +
                                   "'");
  options->host = text.substr(0, colon);
  options->port = static_cast<uint16_t>(port);
  return Status::OK();
}

Collective::Collective(const CollectiveOptions& options, std::unique_ptr<Group> group)
    : options_(options), group_(std::move(group)) {}

Collective::~Collective() = default;

Status Collective::Connect(const CollectiveOptions& options, std::unique_ptr<Collective>* out) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size)
    return Status::InvalidArgument("--rank must be in [0, --world-size) = [0, " + std::to_string(options.world_size) +
                                   "), got " + std::to_string(options.rank));
  auto group = std::make_unique<Group>();
#ifndef PEERD_WITH_C10D_GLOO
  if (options.world_size > 1)
    return Status::FailedPrecondition(
        "this peerd was built without multi-rank training (no Gloo headers at build "
        "time: apt-get install libgloo-dev, then rebuild)");
  out->reset(new Collective(options, std::move(group)));
  return Status::OK();
#else
  const std::string where = options.host + ":" + std::to_string(options.port);
  try {
    c10d::TCPStoreOptions so;
    so.port = options.port;
    so.isServer = options.rank == 0;
    so.numWorkers = options.world_size;
    so.waitWorkers = true;
    so.timeout = options.timeout;
    group->store = c10::make_intrusive<c10d::TCPStore>(options.host, so);
    auto po = c10d::ProcessGroupGloo::Options::create(options.timeout);
    po->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(options.host));
    group->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, options.rank, options.world_size, po);
  } catch (const std::exception& e) {
    return Status::IOError(
        "rank " + std::to_string(options.rank) + " of " + std::to_string(options.world_size) +
        " could not join the job at " + where + " within " + std::to_string(options.timeout.count() / 1000) +
        " s (start every rank with the same --world-size and --rendezvous; rank 0 serves it): " + What(e));
  }
  out->reset(new Collective(options, std::move(group)));
  return Status::OK();
#endif
}

template <typename F>
Status Collective::Run(const char* what, F&& f) {
  const auto start = std::chrono::steady_clock::now();
  Status st;
  try {
    f();
  } catch (const std::exception& e) {
    // Almost always a rank that died or hung; a rank running another build or configuration ends
    // up here too, with Gloo's words for it.
    st = Status::IOError("rank " + std::to_string(rank()) + ": " + what + " failed — another rank of the " +
                         std::to_string(world_size()) +
                         " has gone or stopped answering (or runs another build): " + What(e));
  }
  seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return st;
}

Status Collective::Broadcast(std::vector<torch::Tensor>& tensors, const char* what) {
  if (world_size() == 1 || tensors.empty()) return Status::OK();
  return Run(what, [&] {
    // Gloo broadcasts one tensor list per call; contiguous views of the caller's storage.
    for (auto& t : tensors) {
      TORCH_CHECK(t.is_contiguous(), "broadcast of a non-contiguous tensor");
      if (rank() == 0) bytes_ += t.nbytes();
      std::vector<torch::Tensor> one{Wire(t)};
      group_->pg->broadcast(one)->wait();
    }
  });
}

Status Collective::BroadcastBytes(std::string* bytes, const char* what) {
  if (world_size() == 1) return Status::OK();
  std::vector<torch::Tensor> size{torch::tensor({static_cast<int64_t>(bytes->size())})};
  if (Status st = Broadcast(size, what); !st.ok()) return st;
  bytes->resize(static_cast<size_t>(size[0].item<int64_t>()));
  if (bytes->empty()) return Status::OK();
  std::vector<torch::Tensor> data{
      torch::from_blob(bytes->data(), {static_cast<int64_t>(bytes->size())}, torch::kUInt8)};
  return Broadcast(data, what);
}

Status Collective::AllReduceSum(std::vector<torch::Tensor>& tensors, const char* what) {
  if (world_size() == 1 || tensors.empty()) return Status::OK();
  return Run(what, [&] {
    for (auto& t : tensors) {
      bytes_ += t.nbytes();
      std::vector<torch::Tensor> one{t};
      group_->pg->allreduce(one)->wait();
    }
  });
}

Status Collective::AllReduceSparse(torch::Tensor* t, const char* what) {
  if (world_size() == 1) {
    *t = t->coalesce();
    return Status::OK();
  }
  return Run(what, [&] {
    bytes_ += t->_indices().nbytes() + t->_values().nbytes();
    std::vector<torch::Tensor> one{*t};
    auto work = group_->pg->allreduce(one);
    work->wait();
    *t = work->result().at(0).coalesce();
  });
}

Status Collective::AllGather(const torch::Tensor& mine, std::vector<torch::Tensor>* all, const char* what) {
  all->clear();
  if (world_size() == 1) {
    all->push_back(mine.clone());
    return Status::OK();
  }
  return Run(what, [&] {
    std::vector<std::vector<torch::Tensor>> outputs(1);
    for (int r = 0; r < world_size(); ++r) outputs[0].push_back(torch::empty_like(mine));
    std::vector<torch::Tensor> input{mine.contiguous()};
    group_->pg->allgather(outputs, input)->wait();
    *all = outputs[0];
  });
}

}  // namespace peerd
