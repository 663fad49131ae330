#include "bench/store_bench.h"

#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "bench/json_lines.h"
#include "bench/measure.h"
#include "core/runtime.h"
#include "experts_store/expert_store.h"
#include "experts_store/row_cache.h"
#include "service/expert_pool_store.h"

namespace peerd::bench {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

double ResidentMb() {
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * sysconf(_SC_PAGESIZE) / 1e6;
}

// Asks the kernel to drop the table files from the page cache (no privileges needed), so the
// next read comes from the disk. Returns the bytes of table files.
uint64_t EvictTableFiles(const std::string& dir) {
  uint64_t bytes = 0;
  for (const auto& f : fs::directory_iterator(dir)) {
    if (f.path().extension() != ".sst") continue;
    bytes += f.file_size();
    int fd = open(f.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
  }
  return bytes;
}

int Fail(const Status& st) {
  std::fprintf(stderr, "peer-bench store: %s\n", st.ToString().c_str());
  return 1;
}

}  // namespace

int StoreBench(int argc, char** argv) {
  CLI::App app{"peer-bench store: expert store throughput and memory"};
  int64_t n_keys = 1024, dim = 256, batch_tokens = 4096, rows_per_token = 128, reps = 3;
  std::string dir = "bench-out/store-bench";
  bool as_json = false, keep = false;
  std::string json_out = "bench-out/store.json";
  app.add_option("--n-keys", n_keys, "sub-keys per half of the benchmark segment (experts = n²)")
      ->capture_default_str();
  app.add_option("--dim", dim, "expert width D")->capture_default_str();
  app.add_option("--tokens", batch_tokens, "tokens per cached read batch")->capture_default_str();
  app.add_option("--rows-per-token", rows_per_token, "rows each token reads (h·k)")->capture_default_str();
  app.add_option("--reps", reps, "repetitions of each cached read (median reported)")->capture_default_str();
  app.add_option("--dir", dir, "scratch data directory (emptied first)")->capture_default_str();
  app.add_flag("--json", as_json, "one JSON object per figure instead of the table");
  app.add_flag("--keep", keep, "keep the scratch directory");
  app.add_option("--json-out", json_out, "also write the JSON lines to this file ('' = don't)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  SetComputeThreads(2);

  const int64_t experts = n_keys * n_keys;
  std::vector<json> figures;
  auto figure = [&](const std::string& name, double value, const std::string& unit, json extra = json::object()) {
    extra["figure"] = name;
    extra["value"] = value;
    extra["unit"] = unit;
    figures.push_back(extra);
  };

  fs::remove_all(dir);
  std::unique_ptr<ExpertStore> store;
  if (Status st = ExpertStore::Open(dir, {}, &store); !st.ok()) return Fail(st);

  // Freeze: one segment of n² experts, bf16 rows, one synced WriteBatch.
  SegmentManifest m;
  m.set_layer(0);
  m.set_segment(0);
  m.set_n_keys(n_keys);
  m.set_d_model(dim);
  m.set_heads(8);
  m.set_query_dim(dim);
  m.set_dtype(ROW_DTYPE_BF16);
  std::string sub_keys(size_t(8) * n_keys * dim * 4, '\1');
  const size_t row_bytes = ExpertStore::RowBytes(ROW_DTYPE_BF16, dim);
  std::mt19937_64 rng(1);
  std::string pattern(row_bytes * 64, '\0');
  for (auto& c : pattern) c = static_cast<char>(rng());
  auto t0 = Clock::now();
  Status st = store->FreezeSegment(
      m, sub_keys,
      [&](uint32_t e, std::string* row) {
        row->assign(pattern, (e % 64) * row_bytes, row_bytes);
        std::memcpy(row->data(), &e, 4);  // distinct rows
      },
      &m);
  if (!st.ok()) return Fail(st);
  const double freeze_s = Seconds(t0);
  const double segment_mb = (experts * row_bytes + sub_keys.size()) / 1e6;
  figure("freeze_mb_per_s", segment_mb / freeze_s, "MB/s",
         {{"experts", experts}, {"dim", dim}, {"dtype", "bf16"}, {"mb", segment_mb}});
  if (Status f = store->Flush(); !f.ok()) return Fail(f);
  store.reset();

  // Cold open: reopen, restore the segment resident (scan + checksum), page cache dropped first.
  const uint64_t sst_bytes = EvictTableFiles(dir);
  const double rss_before = ResidentMb();
  t0 = Clock::now();
  if (Status o = ExpertStore::Open(dir, {}, &store); !o.ok()) return Fail(o);
  PeerConfig pc;  // a layer the segment fits, with no segment of its own
  pc.set_n_keys(n_keys);
  pc.set_heads(8);
  pc.set_topk(16);
  pc.set_query_dim(dim);
  pc.set_query_norm(QUERY_NORM_LAYER);
  pc.set_initial_segments(0);
  std::vector<PeerLayer> layers = {PeerLayer(dim, pc)};
  {
    ExpertPoolStore pool(store.get(), {Residency::kResident, 0});
    if (Status r = pool.Restore(layers, dim); !r.ok()) return Fail(r);
  }
  const double open_s = Seconds(t0);
  const double rss_after = ResidentMb();
  figure("cold_open_mb_per_s", sst_bytes / 1e6 / open_s, "MB/s",
         {{"experts", experts}, {"sst_mb", sst_bytes / 1e6}, {"seconds", open_s}});
  EvictTableFiles(dir);
  t0 = Clock::now();
  if (std::system(("cat " + dir + "/*.sst > /dev/null").c_str()) != 0) std::fprintf(stderr, "cat failed\n");
  const double cat_s = Seconds(t0);
  figure("cat_sst_mb_per_s", sst_bytes / 1e6 / cat_s, "MB/s", {{"sst_mb", sst_bytes / 1e6}, {"seconds", cat_s}});
  figure("resident_bytes_per_frozen_expert", (rss_after - rss_before) * 1e6 / experts, "bytes",
         {{"storage_bytes_per_expert", row_bytes}, {"includes", "rows, sub-keys, RocksDB and allocator overhead"}});
  layers.clear();

  // Cached reads: a batch of tokens × rows-per-token row reads of which a share hits a warm set.
  for (double hit : {0.1, 0.5, 0.9}) {
    // Every cold read is a distinct row (a miss); a pool too small for that gets a smaller batch.
    const int64_t hot_n = std::min<int64_t>(65536, experts / 4);
    const int64_t reads =
        std::min<int64_t>(batch_tokens * rows_per_token, static_cast<int64_t>((experts - hot_n) / (1 - hit)));
    std::vector<double> rates;
    double measured_hit = 0;
    for (int64_t rep = 0; rep < reps; ++rep) {
      std::vector<int64_t> perm(experts);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      const int64_t cold_n = static_cast<int64_t>(reads * (1 - hit));
      RowCache cache(store.get(), (hot_n + cold_n + 1024) * (row_bytes + 64));
      std::vector<int64_t> hot(perm.begin(), perm.begin() + hot_n);
      Status w = cache.Get(0, 0, hot.data(), hot.size(), [](size_t, std::string_view) {});
      if (!w.ok()) return Fail(w);
      std::vector<int64_t> batch;
      batch.reserve(reads);
      for (int64_t i = 0; i < cold_n; ++i) batch.push_back(perm[hot_n + i]);  // each cold row once: a miss
      std::uniform_int_distribution<int64_t> pick(0, hot_n - 1);
      while (static_cast<int64_t>(batch.size()) < reads) batch.push_back(hot[pick(rng)]);
      std::shuffle(batch.begin(), batch.end(), rng);
      const RowCache::Stats before = cache.stats();
      std::vector<char> sink(row_bytes);
      t0 = Clock::now();
      Status g = cache.Get(0, 0, batch.data(), batch.size(),
                           [&](size_t, std::string_view row) { std::memcpy(sink.data(), row.data(), row_bytes); });
      if (!g.ok()) return Fail(g);
      rates.push_back(reads / Seconds(t0));
      measured_hit = double(cache.stats().hits - before.hits) / reads;
    }
    char name[64];
    std::snprintf(name, sizeof name, "cached_rows_per_s_hit%.0f", hit * 100);
    figure(name, Median(rates), "rows/s",
           {{"reads", reads}, {"hit_ratio", hit}, {"measured_hit_ratio", measured_hit}, {"reps", reps}});
  }
  store.reset();
  if (!keep) fs::remove_all(dir);

  WriteJsonLines(json_out, figures);
  if (as_json) {
    PrintJsonLines(figures);
    return 0;
  }
  std::printf("expert store: one segment of %lld experts, D=%lld, bf16 rows (%zu bytes each)\n", (long long)experts,
              (long long)dim, row_bytes);
  std::printf("%-36s %14s  %s\n", "figure", "value", "unit");
  for (const auto& f : figures)
    std::printf("%-36s %14.1f  %s\n", f["figure"].get<std::string>().c_str(), f["value"].get<double>(),
                f["unit"].get<std::string>().c_str());
  return 0;
}

}  // namespace peerd::bench
