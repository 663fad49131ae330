// What peer-bench pool and peer-bench rowcache share: a model whose frozen segments live in a real
// data directory's expert store, and the text of the domains scripts/corpora.sh builds.
#pragma once

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "core/check_ok.h"
#include "core/config.h"
#include "core/trainer.h"
#include "service/expert_pool_store.h"

namespace peerd::bench {

// Everything a measurement needs: the data directory's database and store, and a model with its
// trainer whose frozen rows are either built here or restored from the store.
struct Pool {
  std::shared_ptr<DataDirDb> db;
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<ExpertPoolStore> pool;
  TransformerLM model{nullptr};
  std::unique_ptr<Trainer> trainer;

  // The model's initial weights are drawn from `seed`.
  Pool(const std::string& dir, const Config& c, PoolStoreOptions options, uint64_t seed = 1) {
    CheckOk(DataDirDb::Open(dir, {}, &db));
    store = std::make_unique<ExpertStore>(db);
    pool = std::make_unique<ExpertPoolStore>(store.get(), options);
    torch::manual_seed(seed);
    model = TransformerLM(c.model());
    trainer = std::make_unique<Trainer>(model, c.train());
  }
  size_t peer_layers() const { return model->PeerLayers().size(); }
  // Adds a segment to every PEER layer; its id.
  int64_t Add(int64_t n_keys) {
    int64_t id = -1;
    for (size_t l = 0; l < peer_layers(); ++l) CheckOk(trainer->AddSegment(l, n_keys, &id));
    return id;
  }
  // Freezes segment `id` of every PEER layer into the store, as bf16 rows.
  void Freeze(int64_t id) {
    for (size_t l = 0; l < peer_layers(); ++l)
      CheckOk(trainer->FreezeSegment(l, id, pool->Freezing(ROW_DTYPE_BF16, trainer->step(), 0)));
  }
};

// Up to `bytes` bytes of the file at `path` from `offset` ("" if it cannot be read).
inline std::string ReadSome(const std::string& path, size_t offset, size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string out(bytes, '\0');
  in.read(out.data(), static_cast<std::streamsize>(bytes));
  out.resize(static_cast<size_t>(std::max<std::streamsize>(0, in.gcount())));
  return out;
}

// The folders of `corpora` holding train.txt and heldout.txt (scripts/corpora.sh), sorted.
inline std::vector<std::string> Domains(const std::string& corpora) {
  std::vector<std::string> domains;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(corpora, ec))
    if (std::filesystem::exists(e.path() / "train.txt") && std::filesystem::exists(e.path() / "heldout.txt"))
      domains.push_back(e.path().string());
  std::sort(domains.begin(), domains.end());
  return domains;
}

}  // namespace peerd::bench
