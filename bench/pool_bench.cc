#include "bench/pool_bench.h"

#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "bench/json_lines.h"
#include "bench/measure.h"
#include "bench/pool_fixture.h"
#include "core/check_ok.h"
#include "core/config.h"
#include "core/runtime.h"
#include "core/text_router.h"
#include "core/trainer.h"
#include "service/expert_pool_store.h"

namespace peerd::bench {

namespace {

using nlohmann::json;

// VmRSS (now) or VmHWM (the peak so far) of this process, in MB.
double RssMb(const char* field = "VmRSS:") {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(std::string(field).size())) / 1024;
  return -1;
}

struct Shape {
  int64_t segments = 64, experts = 0, n_keys = 8, d_model = 64, context = 64, batch = 8, steps = 6, reps = 3;
  int64_t threads = 1;
};

// The batches the timed steps train on: random bytes, or consecutive windows of a text (whose
// bytes repeat as text does, so retrieval reaches some experts far more than others).
class Batches {
 public:
  explicit Batches(std::string text = {}) : text_(std::move(text)) {}
  torch::Tensor Next(const Shape& s) {
    const int64_t length = s.context + 1;
    if (int64_t(text_.size()) < length) return torch::randint(0, 256, {s.batch, length}, torch::kLong);
    torch::Tensor out = torch::empty({s.batch, length}, torch::kLong);
    for (int64_t b = 0; b < s.batch; ++b, at_ += length) {
      if (at_ + length > int64_t(text_.size())) at_ = 0;
      for (int64_t t = 0; t < length; ++t) out[b][t] = static_cast<unsigned char>(text_[at_ + t]);
    }
    return out;
  }

 private:
  std::string text_;
  int64_t at_ = 0;
};

Config PoolConfig(const Shape& s) {
  Config c = DefaultConfig();
  ModelConfig* m = c.mutable_model();
  m->set_d_model(static_cast<uint32_t>(s.d_model));
  m->set_context(static_cast<uint32_t>(s.context));
  m->mutable_peer()->set_n_keys(static_cast<uint32_t>(s.n_keys));
  m->mutable_peer()->set_initial_segments(1);
  c.mutable_train()->set_batch_size(static_cast<uint32_t>(s.batch));
  return c;
}

// Median over `reps` runs of `steps` training steps of the seconds per token, under `route`
// (empty segments: every segment), after one step of warm-up; every measurement trains on the same
// batches (a copy of `batches` from its start).
double SecondsPerToken(Pool& p, const Shape& s, const Route& route, Batches batches) {
  CheckOk(p.model->SetRoute(route));
  p.trainer->RefreshParameters();
  p.trainer->Step(batches.Next(s));
  std::vector<double> per_token;
  for (int64_t r = 0; r < s.reps; ++r) {
    const auto start = Clock::now();
    for (int64_t i = 0; i < s.steps; ++i) p.trainer->Step(batches.Next(s));
    per_token.push_back(Seconds(start) / double(s.steps * s.batch * s.context));
  }
  return Median(per_token);
}

// Empties the kernel's page cache (needs root), so that what the next open reads comes from the disk.
bool DropPageCache() {
  sync();
  std::ofstream drop("/proc/sys/vm/drop_caches");
  drop << "3\n";
  drop.flush();
  return static_cast<bool>(drop);
}

json OrNull(bool measured, double value) { return measured ? json(value) : json(nullptr); }

struct RouterFigures {
  bool measured = false;
  int64_t domains = 0, windows = 0, clusters = 0, largest_cluster = 0;
  double all_us = 0, us = 0;                            // per window, medians: every branch scored; clustered
  double scored = 0;                                    // bigram models the clustered search evaluates a window
  double same = 0;                                      // windows where it picks the branch scoring all picks
  double domain_accuracy_all = 0, domain_accuracy = 0;  // windows sent to a branch of their own domain
  double regret_bits_per_byte = 0;  // mean likelihood its choice gives up against the best, per byte
  double observe_seconds = 0;       // building the statistics, the clustering included
  uint64_t bytes = 0;
};

// The router with a branch per segment on real text: branch r observes 16 KB of the training text
// of domain r mod D (its (r / D)-th chunk, so that many branches share a domain, as a lifetime of
// domains would, and differ within it); 64 windows of each domain's held-out text are routed by
// the router as it is (clustered beyond BigramRouter::kScoreAll branches) and scoring every branch.
// Domains are the folders of `corpora` holding train.txt and heldout.txt (scripts/corpora.sh).
RouterFigures MeasureRouter(const Shape& s, const std::string& corpora) {
  RouterFigures f;
  const std::vector<std::string> domains = Domains(corpora);
  if (domains.size() < 2) {
    std::printf("routing: not measured (no domains under '%s': scripts/corpora.sh builds them)\n", corpora.c_str());
    return f;
  }
  const int64_t D = static_cast<int64_t>(domains.size());
  constexpr size_t kBranchBytes = 16 << 10;
  constexpr int kWindowsPerDomain = 64;
  BigramRouter router;
  std::vector<int64_t> domain_of(s.segments);
  const auto observing = Clock::now();
  for (int64_t r = 0; r < s.segments; ++r) {
    const std::string& d = domains[r % D];
    const size_t chunks = std::max<size_t>(1, std::filesystem::file_size(d + "/train.txt") / kBranchBytes);
    router.Observe(r, ReadSome(d + "/train.txt", (r / D) % chunks * kBranchBytes, kBranchBytes));
    domain_of[r] = r % D;
  }
  f.observe_seconds = Seconds(observing);
  f.bytes = router.StatisticsBytes();
  std::vector<std::pair<std::string, int64_t>> windows;  // (text, domain)
  const size_t length = static_cast<size_t>(s.context) + 1;
  for (int64_t d = 0; d < D; ++d) {
    const std::string held = ReadSome(domains[d] + "/heldout.txt", 0, 1 << 20);
    if (held.size() < length) continue;
    for (int w = 0; w < kWindowsPerDomain; ++w)
      windows.push_back({held.substr((held.size() - length) * w / kWindowsPerDomain, length), d});
  }
  const double n = double(windows.size());
  // Each window routed `reps` times; the median of the mean µs per window.
  auto route_all = [&](std::vector<int64_t>* chosen, double* scored) {
    std::vector<double> per_window;
    for (int64_t rep = 0; rep < s.reps; ++rep) {
      size_t sum = 0;
      const auto start = Clock::now();
      for (size_t w = 0; w < windows.size(); ++w) {
        size_t k = 0;
        (*chosen)[w] = router.Choose(windows[w].first, &k);
        sum += k;
      }
      per_window.push_back(Seconds(start) / n * 1e6);
      *scored = double(sum) / n;
    }
    return Median(per_window);
  };
  std::vector<int64_t> best(windows.size()), chosen(windows.size());
  double all_scored = 0;
  const size_t probes = router.probes();
  router.set_probes(0);
  f.all_us = route_all(&best, &all_scored);
  // The search's two knobs around their defaults, for the record.
  for (const auto& [left, most] : std::vector<std::pair<double, size_t>>{{1e-3, 4}, {1e-6, 4}}) {
    router.set_posterior_left(left), router.set_probes(most);
    double scored = 0;
    const double us = route_all(&chosen, &scored);
    double same = 0, right = 0;
    for (size_t w = 0; w < windows.size(); ++w)
      same += chosen[w] == best[w], right += domain_of[chosen[w]] == windows[w].second;
    std::printf(
        "  clusters left under %.0e of the posterior, at most %zu searched: %.0f µs, %.0f models scored, "
        "to its own domain %.1f%%, the same branch %.1f%%\n",
        left, most, us, scored, 100 * right / n, 100 * same / n);
  }
  router.set_posterior_left(BigramRouter::kPosteriorLeft);
  router.set_probes(probes);
  f.us = route_all(&chosen, &f.scored);
  for (size_t w = 0; w < windows.size(); ++w) {
    const std::vector<double> ll = router.LogLikelihoods(windows[w].first);  // by id: 0 … S−1
    f.same += chosen[w] == best[w];
    f.domain_accuracy_all += domain_of[best[w]] == windows[w].second;
    f.domain_accuracy += domain_of[chosen[w]] == windows[w].second;
    f.regret_bits_per_byte += (ll[best[w]] - ll[chosen[w]]) / std::log(2.0) / double(length - 1);
  }
  for (const auto& k : router.clusters()) f.largest_cluster = std::max<int64_t>(f.largest_cluster, k.size());
  f.measured = true, f.domains = D, f.windows = static_cast<int64_t>(windows.size());
  f.clusters = static_cast<int64_t>(router.clusters().size());
  f.same /= n, f.domain_accuracy_all /= n, f.domain_accuracy /= n, f.regret_bits_per_byte /= n;
  std::printf(
      "routing a %zu-byte window among %lld branches (%lld domains, %lld held-out windows; %lld clusters, the largest "
      "%lld): every branch scored %.0f µs, to its own domain %.1f%%; as routed %.0f µs (%.1fx faster), %.0f models "
      "scored, to its own domain %.1f%%, the same branch %.1f%%, %.4f bits/byte given up; statistics %.1f MB, "
      "built in %.1f s\n",
      length, static_cast<long long>(s.segments), static_cast<long long>(D), static_cast<long long>(f.windows),
      static_cast<long long>(f.clusters), static_cast<long long>(f.largest_cluster), f.all_us,
      100 * f.domain_accuracy_all, f.us, f.all_us / f.us, f.scored, 100 * f.domain_accuracy, 100 * f.same,
      f.regret_bits_per_byte, f.bytes / 1e6, f.observe_seconds);
  return f;
}

std::string Ms(double seconds) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", seconds * 1e3);
  return b;
}

}  // namespace

int PoolBench(int argc, char** argv) {
  CLI::App app{"peer-bench pool: training cost, open time and the row cache of a large frozen pool"};
  Shape s;
  std::vector<int64_t> cache_mb = {4, 64};
  std::string dir, json_out = "bench-out/pool.json", corpora = "data/corpora", tokens = "random";
  bool as_json = false, keep = false, skip_resident = false, reuse = false, cold = false;
  app.add_option("--segments", s.segments, "frozen segments in the pool")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  app.add_option("--experts", s.experts, "frozen experts in all (default: segments × n-keys²); sets --n-keys");
  app.add_option("--n-keys", s.n_keys, "sub-keys per half of each segment")->capture_default_str();
  app.add_option("--d-model", s.d_model, "model width (rows are 2 × d-model bf16 values)")->capture_default_str();
  app.add_option("--context", s.context, "tokens per sequence")->capture_default_str();
  app.add_option("--batch", s.batch, "sequences per step")->capture_default_str();
  app.add_option("--steps", s.steps, "steps per timed run")->capture_default_str();
  app.add_option("--reps", s.reps, "timed runs (median reported)")->capture_default_str();
  app.add_option("--cache-mb", cache_mb, "row cache sizes to train under (cached residency)")
      ->capture_default_str()
      ->delimiter(',');
  app.add_option("--tokens", tokens,
                 "what the timed steps train on: random bytes, or windows of the text of --corpora's first domain")
      ->capture_default_str()
      ->check(CLI::IsMember({"random", "text"}));
  app.add_option("--corpora", corpora, "domains whose text the router's branches observe (scripts/corpora.sh)")
      ->capture_default_str();
  app.add_option("--threads", s.threads, "compute threads")->capture_default_str();
  app.add_option("--dir", dir, "data directory to build the pool in (default: a fresh one under /tmp, removed)");
  app.add_flag("--keep", keep, "keep the data directory");
  app.add_flag("--reuse", reuse, "open the pool an earlier --keep run left in --dir instead of building one");
  app.add_flag("--skip-resident", skip_resident,
               "cached residency only, for pools larger than memory: built under the first --cache-mb (each "
               "segment's rows leave memory once stored), never opened resident");
  app.add_flag("--cold", cold, "drop the page cache before each open (root): rows come from the disk");
  app.add_option("--json-out", json_out, "where to write the rows ('' = nowhere)")->capture_default_str();
  app.add_flag("--json", as_json, "print the rows as JSON lines; the last line is the summary object");
  CLI11_PARSE(app, argc, argv);
  if (s.experts > 0) {
    s.n_keys = std::llround(std::sqrt(double(s.experts) / double(s.segments)));
    if (s.n_keys * s.n_keys * s.segments != s.experts) {
      std::fprintf(stderr, "peer-bench pool: --experts must be segments × n², got %lld for %lld segments\n",
                   static_cast<long long>(s.experts), static_cast<long long>(s.segments));
      return 2;
    }
  }
  const Config c = PoolConfig(s);
  if (Status st = ValidateConfig(c); !st.ok()) {
    std::fprintf(stderr, "peer-bench pool: %s\n", st.ToString().c_str());
    return 2;
  }
  if (reuse && !std::filesystem::exists(dir + "/CURRENT")) {
    std::fprintf(stderr,
                 "peer-bench pool: --reuse needs --dir naming a pool an earlier --keep run built ('%s' holds none)\n",
                 dir.c_str());
    return 2;
  }
  if (skip_resident && cache_mb.empty()) {
    std::fprintf(stderr, "peer-bench pool: --skip-resident needs at least one --cache-mb size\n");
    return 2;
  }
  if (cold && !DropPageCache()) {
    std::fprintf(stderr,
                 "peer-bench pool: --cold cannot write /proc/sys/vm/drop_caches: run it as root, or without --cold\n");
    return 2;
  }
  SetComputeThreads(static_cast<int>(s.threads));
  Batches batches;
  if (tokens == "text") {
    const std::vector<std::string> domains = Domains(corpora);
    if (domains.empty()) {
      std::fprintf(stderr,
                   "peer-bench pool: --tokens text needs a domain under '%s' (scripts/corpora.sh builds them)\n",
                   corpora.c_str());
      return 2;
    }
    batches = Batches(ReadSome(domains[0] + "/train.txt", 0, size_t{8} << 20));
    std::printf("training on the text of %s\n", domains[0].c_str());
  }
  if (dir.empty()) dir = "/tmp/peer-bench-pool-" + std::to_string(getpid());
  if (!reuse) std::filesystem::remove_all(dir);
  const int64_t experts = s.segments * s.n_keys * s.n_keys;
  const double row_bytes = 2.0 * s.d_model * 2;  // a down and an up row of bf16
  std::printf(
      "pool: %lld frozen segments of %lld experts (%lld in all, %.1f MB of bf16 rows per PEER layer), "
      "d_model %lld, context %lld, batch %lld, %lld thread(s); %lld steps × median of %lld\n",
      static_cast<long long>(s.segments), static_cast<long long>(s.n_keys * s.n_keys), static_cast<long long>(experts),
      experts * row_bytes / 1e6, static_cast<long long>(s.d_model), static_cast<long long>(s.context),
      static_cast<long long>(s.batch), static_cast<long long>(s.threads), static_cast<long long>(s.steps),
      static_cast<long long>(s.reps));
  std::vector<json> rows;

  // 1. One frozen segment and a training one: the baseline.
  double one = 0;
  {
    Pool p(dir + "-one", c, {});
    p.Freeze(p.model->PeerLayers()[0]->segments()[0]->id());
    p.Add(s.n_keys);
    one = SecondsPerToken(p, s, {}, batches);
  }
  std::filesystem::remove_all(dir + "-one");

  // 2. The pool: S frozen segments written to the store, then a training segment on top; per-token
  // cost with every row resident (unless --skip-resident: then the rows leave memory as written).
  double all = 0, routed = 0, build_seconds = 0, build_peak_rss = 0;
  const bool timed_build = !reuse && !skip_resident;
  if (!reuse) {
    PoolStoreOptions o;
    if (skip_resident) o.residency = Residency::kCached, o.cache_bytes = size_t(cache_mb[0]) << 20;
    Pool p(dir, c, o);
    const auto start = Clock::now();
    int64_t first = p.model->PeerLayers()[0]->segments()[0]->id();
    p.Freeze(first);
    for (int64_t i = 1; i < s.segments; ++i) {
      p.Freeze(p.Add(s.n_keys));
      if ((i + 1) % 256 == 0)
        std::fprintf(stderr, "  built %lld of %lld segments (%.0f s)\n", static_cast<long long>(i + 1),
                     static_cast<long long>(s.segments), Seconds(start));
    }
    build_seconds = Seconds(start);
    build_peak_rss = RssMb("VmHWM:");
    if (timed_build) {
      const int64_t top = p.Add(s.n_keys);
      all = SecondsPerToken(p, s, {}, batches);
      routed = SecondsPerToken(p, s, Route{-1, {first, top}}, batches);
    }
  }
  std::printf("%-44s %14s %10s\n", "training step", "ms / 1k tokens", "vs one");
  std::printf("%-44s %14s %9.2fx\n", "one frozen segment", Ms(one * 1000).c_str(), 1.0);
  if (timed_build) {
    std::printf("%-44s %14s %9.2fx\n", ("retrieval over all " + std::to_string(s.segments) + " segments").c_str(),
                Ms(all * 1000).c_str(), all / one);
    std::printf("%-44s %14s %9.2fx\n", "routed: the base and the training segment", Ms(routed * 1000).c_str(),
                routed / one);
  } else {
    std::printf("(all segments and routed with resident rows: not measured, %s)\n",
                reuse ? "--reuse" : "--skip-resident");
  }
  if (!reuse) std::printf("(building the pool: %.1f s, peak RSS %.0f MB)\n", build_seconds, build_peak_rss);

  // The router of the routed policy with a branch per segment (evaluation and generation route
  // each window by the bytes before it): its cost per window, memory, and what its shortlist loses.
  const RouterFigures router = MeasureRouter(s, corpora);

  // 3. Opening the data directory again, rows resident and cached, and training beside each.
  // Opens the data directory again: its time, and the rows it read (cached: none; the rows are
  // checked against their checksums afterwards, as peerd does beside training).
  auto open = [&](PoolStoreOptions o, double* seconds, uint64_t* rows_read) {
    if (cold) DropPageCache();
    const auto start = Clock::now();
    auto p = std::make_unique<Pool>(dir, c, o);
    CheckOk(p->pool->Restore(p->model));
    p->trainer->RefreshParameters();
    *seconds = Seconds(start);
    *rows_read = p->store->rows_read();
    return p;
  };
  // The routed policy's route on a reopened pool: its first segment and the training one on top.
  auto routed_route = [](Pool& p, int64_t top) {
    return Route{-1, {p.model->PeerLayers()[0]->segments()[0]->id(), top}};
  };
  double open_resident = 0, resident_rate = 0, resident_routed = 0, resident_rss = 0;
  uint64_t resident_rows_read = 0;
  std::printf("\n%-20s %8s %12s %12s %11s %9s %16s %8s %15s %11s\n", "frozen rows", "open s", "rows read", "tokens/s",
              "vs resident", "hit rate", "store B / token", "RSS MB", "routed tokens/s", "vs resident");
  if (!skip_resident) {
    auto p = open({}, &open_resident, &resident_rows_read);
    const int64_t top = p->Add(s.n_keys);
    resident_rate = 1 / SecondsPerToken(*p, s, {}, batches);
    resident_routed = 1 / SecondsPerToken(*p, s, routed_route(*p, top), batches);
    resident_rss = RssMb();
    std::printf("%-20s %8.2f %12llu %12.0f %11s %9s %16s %8.0f %15.0f %11s\n", "resident", open_resident,
                static_cast<unsigned long long>(resident_rows_read), resident_rate, "1.00x", "-", "-", resident_rss,
                resident_routed, "1.00x");
    rows.push_back({{"bench", "pool"},
                    {"case", "resident"},
                    {"open_seconds", open_resident},
                    {"open_rows_read", resident_rows_read},
                    {"tokens_per_s", resident_rate},
                    {"routed_tokens_per_s", resident_routed},
                    {"rss_mb", resident_rss}});
  }
  double open_cached = 0, first_cached_rate = 0;
  for (int64_t mb : cache_mb) {
    PoolStoreOptions o;
    o.residency = Residency::kCached;
    o.cache_bytes = size_t(mb) << 20;
    double open_seconds = 0;
    uint64_t rows_read = 0;
    auto p = open(o, &open_seconds, &rows_read);
    const int64_t top = p->Add(s.n_keys);
    const RowCache::Stats before = p->pool->cache_stats();
    const double rate = 1 / SecondsPerToken(*p, s, {}, batches);
    const RowCache::Stats after = p->pool->cache_stats();
    const double routed_rate = 1 / SecondsPerToken(*p, s, routed_route(*p, top), batches);
    const double hits = double(after.hits - before.hits), misses = double(after.misses - before.misses);
    const double tokens = double((s.reps * s.steps + 1) * s.batch * s.context);
    const double hit_rate = hits + misses > 0 ? hits / (hits + misses) : 0, per_token = misses * row_bytes / tokens;
    const double rss = RssMb();
    auto vs_resident = [&](double rate_here, double rate_resident) {
      char b[32] = "-";
      if (!skip_resident) std::snprintf(b, sizeof b, "%.2fx", rate_here / rate_resident);
      return std::string(b);
    };
    std::printf("%-20s %8.2f %12llu %12.0f %11s %8.1f%% %16.0f %8.0f %15.0f %11s\n",
                ("cached, " + std::to_string(mb) + " MB").c_str(), open_seconds,
                static_cast<unsigned long long>(rows_read), rate, vs_resident(rate, resident_rate).c_str(),
                100 * hit_rate, per_token, rss, routed_rate, vs_resident(routed_rate, resident_routed).c_str());
    rows.push_back({{"bench", "pool"},
                    {"case", "cached"},
                    {"cache_mb", mb},
                    {"open_seconds", open_seconds},
                    {"open_rows_read", rows_read},
                    {"tokens_per_s", rate},
                    {"cached_over_resident", OrNull(!skip_resident, rate / resident_rate)},
                    {"routed_tokens_per_s", routed_rate},
                    {"routed_cached_over_resident", OrNull(!skip_resident, routed_rate / resident_routed)},
                    {"hit_rate", hit_rate},
                    {"store_bytes_per_token", per_token},
                    {"rss_mb", rss}});
    if (first_cached_rate == 0) first_cached_rate = rate, open_cached = open_seconds;
  }
  if (!keep && !reuse) std::filesystem::remove_all(dir);
  const json summary = {
      {"bench", "pool"},
      {"segments", s.segments},
      {"experts", experts},
      {"n_keys", s.n_keys},
      {"d_model", s.d_model},
      {"seconds_per_token_one", one},
      {"seconds_per_token_all", OrNull(timed_build, all)},
      {"seconds_per_token_routed", OrNull(timed_build, routed)},
      {"segment_cost_ratio", OrNull(timed_build, all / one)},
      {"segment_cost_ratio_routed", OrNull(timed_build, routed / one)},
      {"tokens_per_s_resident", OrNull(!skip_resident, resident_rate)},
      {"tokens_per_s_cached", OrNull(!cache_mb.empty(), first_cached_rate)},
      {"cached_over_resident", OrNull(!skip_resident && !cache_mb.empty(), first_cached_rate / resident_rate)},
      {"peak_rss_mb", RssMb("VmHWM:")},
      {"open_seconds", OrNull(!cache_mb.empty(), open_cached)},
      {"open_seconds_resident", OrNull(!skip_resident, open_resident)},
      {"cold", cold},
      {"tokens", tokens},
      {"build_seconds", OrNull(!reuse, build_seconds)},
      {"build_peak_rss_mb", OrNull(!reuse, build_peak_rss)},
      {"route_window_microseconds", OrNull(router.measured, router.us)},
      {"route_window_microseconds_all_scored", OrNull(router.measured, router.all_us)},
      {"route_models_scored", OrNull(router.measured, router.scored)},
      {"route_same_as_all_scored", OrNull(router.measured, router.same)},
      {"route_domain_accuracy", OrNull(router.measured, router.domain_accuracy)},
      {"route_domain_accuracy_all_scored", OrNull(router.measured, router.domain_accuracy_all)},
      {"route_regret_bits_per_byte", OrNull(router.measured, router.regret_bits_per_byte)},
      {"route_clusters", OrNull(router.measured, double(router.clusters))},
      {"router_build_seconds", OrNull(router.measured, router.observe_seconds)},
      {"router_bytes", router.bytes}};
  rows.push_back(summary);
  WriteJsonLines(json_out, rows);
  if (as_json) PrintJsonLines(rows);
  return 0;
}

}  // namespace peerd::bench
