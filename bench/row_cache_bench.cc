#include "bench/row_cache_bench.h"

#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "bench/cache_replay.h"
#include "bench/json_lines.h"
#include "bench/measure.h"
#include "bench/pool_fixture.h"
#include "core/runtime.h"
#include "experts_store/row_cache.h"

namespace peerd::bench {

namespace {

using nlohmann::json;

struct Stream {
  int64_t steps = 1000, n_keys = 128, d_model = 64, context = 64, batch = 8, threads = 1;
  double replay = 0.25;
  std::vector<std::string> domains = {"broad", "kjv", "c-code", "fortunes-de", "man-pages", "python"};
  std::vector<double> cache_pct = {1, 2, 5, 10, 25, 50};
};

// A frozen row's key in the trace: PEER layer, segment id, expert.
uint64_t RowKey(uint64_t layer, uint64_t segment, uint64_t expert) { return layer << 48 | segment << 32 | expert; }

// Windows of context + 1 bytes at random offsets of a domain's text.
class Windows {
 public:
  explicit Windows(std::string text) : text_(std::move(text)) {}
  void Fill(torch::Tensor& out, int64_t row, std::mt19937_64& rng) const {
    const int64_t length = out.size(1);
    std::uniform_int_distribution<int64_t> at(0, static_cast<int64_t>(text_.size()) - length);
    const int64_t from = at(rng);
    for (int64_t t = 0; t < length; ++t) out[row][t] = static_cast<unsigned char>(text_[from + t]);
  }

 private:
  std::string text_;
};

// Appends, as one fetch per frozen segment reached, the distinct rows each PEER layer retrieved
// since StartUsageRecording (what the fused step asks the row cache for, one call per segment).
void RecordStep(Pool& p, RowTrace* trace) {
  for (size_t l = 0; l < p.peer_layers(); ++l) {
    const PeerLayer layer = p.model->PeerLayers()[l];
    for (size_t pos = 0; pos < layer->segments().size(); ++pos) {
      if (!layer->segments()[pos]->frozen()) continue;
      torch::Tensor used = layer->UsageCounts(pos);
      if (!used.defined()) continue;
      torch::Tensor experts = used.nonzero().flatten().contiguous();
      if (experts.numel() == 0) continue;
      const int64_t* e = experts.data_ptr<int64_t>();
      const uint64_t id = static_cast<uint64_t>(layer->segments()[pos]->id());
      for (int64_t i = 0; i < experts.numel(); ++i) trace->keys.push_back(RowKey(l, id, static_cast<uint64_t>(e[i])));
      trace->EndFetch();
    }
  }
}

// The trace replayed through a RowCache of `capacity_bytes` in front of the store, one Get per
// fetch; its hit rate, and the rows it held at the end.
ReplayResult ReplayRowCache(const RowTrace& trace, const ExpertStore* store, size_t capacity_bytes, size_t* rows_held) {
  RowCache cache(store, capacity_bytes);
  std::vector<int64_t> experts;
  size_t begin = 0;
  for (size_t end : trace.fetch_end) {
    const uint64_t segment = trace.keys[begin] >> 32;
    experts.clear();
    for (size_t i = begin; i < end; ++i) experts.push_back(static_cast<int64_t>(trace.keys[i] & 0xffffffffu));
    CheckOk(cache.Get(static_cast<uint32_t>(segment >> 16), static_cast<uint32_t>(segment & 0xffff), experts.data(),
                      experts.size(), [](size_t, std::string_view) {}));
    begin = end;
  }
  const RowCache::Stats s = cache.stats();
  *rows_held = cache.CountRows();
  return {s.hits + s.misses, s.hits};
}

// One seed: trains the stream, replays its trace through every policy at every cache size, prints
// the seed's table and appends its rows (one per cache size, then the seed's summary).
void RunSeed(const Stream& s, Config c, const std::vector<std::string>& domains, uint64_t seed,
             std::vector<json>* rows) {
  c.mutable_train()->set_seed(seed);
  const int64_t n_domains = static_cast<int64_t>(domains.size());
  // 1. The stream: domain d trains segment d (retrieval over it and every frozen one), then
  // freezes it into the store; the frozen rows each step retrieves are the trace.
  const std::string dir = "/tmp/peer-bench-rowcache-" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  Pool p(dir, c, {}, seed);
  std::vector<Windows> text;
  for (int64_t d = 0; d < n_domains; ++d) text.emplace_back(ReadSome(domains[d] + "/train.txt", 0, size_t{8} << 20));
  std::mt19937_64 rng(seed);
  RowTrace trace;
  int64_t traced_steps = 0;  // steps with a frozen segment to reach
  const int64_t replayed_rows = std::llround(s.replay * double(s.batch));
  const auto start = Clock::now();
  int64_t open = p.model->PeerLayers()[0]->segments()[0]->id();
  for (int64_t d = 0; d < n_domains; ++d) {
    double loss = 0;
    for (int64_t i = 0; i < s.steps; ++i) {
      torch::Tensor tokens = torch::empty({s.batch, s.context + 1}, torch::kLong);
      const int64_t replayed = d > 0 ? replayed_rows : 0;
      for (int64_t b = 0; b < s.batch; ++b)
        text[b < replayed ? std::uniform_int_distribution<int64_t>(0, d - 1)(rng) : d].Fill(tokens, b, rng);
      for (PeerLayer layer : p.model->PeerLayers()) layer->StartUsageRecording();
      loss = p.trainer->Step(tokens, replayed).loss;
      for (PeerLayer layer : p.model->PeerLayers()) layer->StopUsageRecording();
      if (d > 0) RecordStep(p, &trace), ++traced_steps;
    }
    std::fprintf(stderr, "  %s: %lld steps, last loss %.3f bits/byte, %zu row requests so far (%.0f s)\n",
                 std::filesystem::path(domains[d]).filename().c_str(), static_cast<long long>(s.steps),
                 loss / std::log(2.0), trace.keys.size(), Seconds(start));
    if (d + 1 < n_domains) {
      p.Freeze(open);
      open = p.Add(s.n_keys);
    }
  }
  const double train_seconds = Seconds(start);

  // 2. How the requests spread, and each policy's hit rate at each cache size.
  const uint64_t pool_rows = uint64_t(n_domains - 1) * uint64_t(s.n_keys * s.n_keys) * p.peer_layers();
  const TraceSkew skew = MeasureSkew(trace);
  std::vector<std::string> row;
  CheckOk(p.store->ReadRows(0, static_cast<uint32_t>(p.model->PeerLayers()[0]->segments()[0]->id()), {0}, &row));
  const size_t row_bytes = row[0].size();
  auto pct = [&](double share) { return 100 * share; };
  std::printf(
      "seed %llu: %lld domains × %lld steps (batch %lld × %lld tokens, %.0f%% replayed), d_model %lld, segments of "
      "%lld experts; %.0f s of training\n",
      static_cast<unsigned long long>(seed), static_cast<long long>(n_domains), static_cast<long long>(s.steps),
      static_cast<long long>(s.batch), static_cast<long long>(s.context), 100 * s.replay,
      static_cast<long long>(s.d_model), static_cast<long long>(s.n_keys * s.n_keys), train_seconds);
  std::printf(
      "frozen rows at the end: %llu (%.1f MB); requests over %zu steps: %llu (%.0f a step), %llu distinct rows "
      "(%.1f%% of the pool: the compulsory misses are %.1f%% of requests)\n",
      static_cast<unsigned long long>(pool_rows), double(pool_rows * row_bytes) / 1e6, traced_steps,
      static_cast<unsigned long long>(skew.requests), double(skew.requests) / double(traced_steps),
      static_cast<unsigned long long>(skew.distinct_rows), pct(double(skew.distinct_rows) / double(pool_rows)),
      pct(double(skew.distinct_rows) / double(skew.requests)));
  std::printf(
      "share of requests to the most requested 1%% / 5%% / 10%% / 25%% of the frozen rows: %.1f%% / %.1f%% / %.1f%% / "
      "%.1f%%\n",
      pct(skew.ShareOfHottest(pool_rows / 100)), pct(skew.ShareOfHottest(pool_rows / 20)),
      pct(skew.ShareOfHottest(pool_rows / 10)), pct(skew.ShareOfHottest(pool_rows / 4)));
  std::printf("\n%-8s %8s %8s %10s %10s %10s %8s %8s %8s %8s\n", "cache", "rows", "MB", "RowCache", "rows held",
              "LRU, held", "LRU", "hottest", "optimal", "ceiling");
  const double ceiling = 1 - double(skew.distinct_rows) / double(skew.requests);
  for (double share : s.cache_pct) {
    const size_t capacity = static_cast<size_t>(double(pool_rows) * share / 100);
    size_t held = 0;
    const ReplayResult real = ReplayRowCache(trace, p.store.get(), capacity * row_bytes, &held);
    const ReplayResult lru = ReplayLru(trace, capacity), lru_held = ReplayLru(trace, held),
                       hottest = ReplayHottest(trace, capacity), optimal = ReplayOptimal(trace, capacity);
    std::printf("%7.1f%% %8zu %8.2f %9.1f%% %10zu %9.1f%% %7.1f%% %7.1f%% %7.1f%% %7.1f%%\n", share, capacity,
                double(capacity * row_bytes) / 1e6, pct(real.hit_rate()), held, pct(lru_held.hit_rate()),
                pct(lru.hit_rate()), pct(hottest.hit_rate()), pct(optimal.hit_rate()), pct(ceiling));
    rows->push_back({{"bench", "rowcache"},
                     {"cache_pct", share},
                     {"cache_rows", capacity},
                     {"cache_mb", double(capacity * row_bytes) / 1e6},
                     {"row_cache_rows_held", held},
                     {"hit_rate_row_cache", real.hit_rate()},
                     {"hit_rate_lru_rows_held", lru_held.hit_rate()},
                     {"hit_rate_lru", lru.hit_rate()},
                     {"hit_rate_hottest", hottest.hit_rate()},
                     {"hit_rate_optimal", optimal.hit_rate()},
                     {"seed", seed}});
  }
  std::filesystem::remove_all(dir);
  rows->push_back({{"bench", "rowcache"},
                   {"domains", s.domains},
                   {"steps_per_domain", s.steps},
                   {"experts_per_segment", s.n_keys * s.n_keys},
                   {"d_model", s.d_model},
                   {"replay", s.replay},
                   {"seed", seed},
                   {"frozen_rows", pool_rows},
                   {"row_bytes", row_bytes},
                   {"requests", skew.requests},
                   {"requests_per_step", double(skew.requests) / double(traced_steps)},
                   {"distinct_rows", skew.distinct_rows},
                   {"hit_rate_ceiling", ceiling},
                   {"share_of_hottest_1pct", skew.ShareOfHottest(pool_rows / 100)},
                   {"share_of_hottest_10pct", skew.ShareOfHottest(pool_rows / 10)},
                   {"train_seconds", train_seconds}});
}

}  // namespace

int RowCacheBench(int argc, char** argv) {
  CLI::App app{"peer-bench rowcache: the row cache's hit rate on the access skew of a freeze-grow stream of real text"};
  Stream s;
  std::vector<uint64_t> seeds = {1};
  std::string corpora = "data/corpora", json_out = "bench-out/rowcache.json";
  bool as_json = false;
  app.add_option("--domains", s.domains, "the stream's domains under --corpora, in order; a segment each")
      ->capture_default_str()
      ->delimiter(',');
  app.add_option("--steps", s.steps, "training steps per domain")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--n-keys", s.n_keys, "sub-keys per half of each segment (n² experts)")->capture_default_str();
  app.add_option("--d-model", s.d_model, "model width")->capture_default_str();
  app.add_option("--context", s.context, "tokens per sequence")->capture_default_str();
  app.add_option("--batch", s.batch, "sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--replay", s.replay, "share of each batch replayed from earlier domains")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--cache-pct", s.cache_pct, "cache sizes, in percent of the frozen rows at the end of the stream")
      ->capture_default_str()
      ->delimiter(',');
  app.add_option("--corpora", corpora, "where scripts/corpora.sh put the domains")->capture_default_str();
  app.add_option("--seeds", seeds, "model and batch seeds: a stream each, then the medians")
      ->capture_default_str()
      ->delimiter(',');
  app.add_option("--threads", s.threads, "compute threads")->capture_default_str();
  app.add_option("--json-out", json_out, "where to write the rows ('' = nowhere)")->capture_default_str();
  app.add_flag("--json", as_json,
               "print the rows as JSON lines (per seed: a row per cache size, then a summary; then the medians)");
  CLI11_PARSE(app, argc, argv);

  for (double share : s.cache_pct)
    if (!(share > 0 && share <= 100)) {
      std::fprintf(stderr, "peer-bench rowcache: --cache-pct takes percentages in (0, 100], got %g\n", share);
      return 2;
    }
  if (s.domains.size() < 2 || s.domains.size() > 64) {
    std::fprintf(stderr, "peer-bench rowcache: --domains needs 2 to 64 domains, got %zu\n", s.domains.size());
    return 2;
  }
  std::vector<std::string> domains;
  for (const std::string& d : s.domains) {
    domains.push_back(corpora + "/" + d);
    if (!std::filesystem::exists(domains.back() + "/train.txt")) {
      std::fprintf(stderr,
                   "peer-bench rowcache: no %s/train.txt: scripts/corpora.sh %s builds it (its domains: "
                   "docs/CORPORA.md)\n",
                   domains.back().c_str(), d.c_str());
      return 2;
    }
    std::error_code ec;
    if (std::filesystem::file_size(domains.back() + "/train.txt", ec) <= uint64_t(s.context + 1)) {
      std::fprintf(stderr, "peer-bench rowcache: %s/train.txt is shorter than one window (%lld bytes)\n",
                   domains.back().c_str(), static_cast<long long>(s.context + 1));
      return 2;
    }
  }
  Config c = DefaultConfig();
  ModelConfig* m = c.mutable_model();
  m->set_d_model(static_cast<uint32_t>(s.d_model));
  m->set_context(static_cast<uint32_t>(s.context));
  m->mutable_peer()->set_n_keys(static_cast<uint32_t>(s.n_keys));
  c.mutable_train()->set_batch_size(static_cast<uint32_t>(s.batch));
  c.mutable_train()->set_steps(static_cast<uint32_t>(int64_t(s.domains.size()) * s.steps));
  c.mutable_train()->set_distill_weight(0);
  if (Status st = ValidateConfig(c); !st.ok()) {
    std::fprintf(stderr, "peer-bench rowcache: %s\n", st.ToString().c_str());
    return 2;
  }
  SetComputeThreads(static_cast<int>(s.threads));

  std::vector<json> rows;
  for (uint64_t seed : seeds) RunSeed(s, c, domains, seed, &rows);
  // Medians [min–max] over the seeds of each policy's hit rate at each cache size.
  if (seeds.size() > 1) {
    std::printf("\nmedians [min–max] of %zu seeds\n%-8s %20s %20s %20s %20s\n", seeds.size(), "cache", "RowCache",
                "LRU", "hottest", "optimal");
    for (double share : s.cache_pct) {
      std::printf("%7.1f%%", share);
      json median = {{"bench", "rowcache"}, {"cache_pct", share}, {"seeds", seeds.size()}};
      for (const char* policy : {"hit_rate_row_cache", "hit_rate_lru", "hit_rate_hottest", "hit_rate_optimal"}) {
        std::vector<double> v;
        for (const json& r : rows)
          if (r.contains(policy) && r["cache_pct"] == share) v.push_back(r[policy].get<double>());
        std::printf(" %7.1f%% [%4.1f–%4.1f]", 100 * Median(v), 100 * *std::min_element(v.begin(), v.end()),
                    100 * *std::max_element(v.begin(), v.end()));
        median[std::string("median_") + policy] = Median(v);
      }
      std::printf("\n");
      rows.push_back(median);
    }
  }
  WriteJsonLines(json_out, rows);
  if (as_json) PrintJsonLines(rows);
  return 0;
}

}  // namespace peerd::bench
