#include "bench/generate_bench.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "bench/json_lines.h"
#include "bench/measure.h"
#include "core/config.h"
#include "core/generator.h"
#include "core/runtime.h"

namespace peerd::bench {

namespace {

using nlohmann::json;

}  // namespace

int GenerateBench(int argc, char** argv) {
  CLI::App app{"peer-bench generate: tokens/s of generation with and without the key/value cache"};
  std::vector<int64_t> prompts = {16, 64, 120};
  int64_t tokens = 128, reps = 3, threads = 1;
  std::string config_path, json_out = "bench-out/generate.json";
  bool as_json = false;
  app.add_option("--prompt-bytes", prompts, "prompt lengths to measure")->capture_default_str();
  app.add_option("--tokens", tokens, "tokens generated per run")->capture_default_str();
  app.add_option("--reps", reps, "runs of each case (median and spread reported)")->capture_default_str();
  app.add_option("--threads", threads, "compute threads")->capture_default_str();
  app.add_option("--config", config_path, "model configuration (default: the embedded one)");
  app.add_option("--json-out", json_out, "where to write the rows ('' = nowhere)")->capture_default_str();
  app.add_flag("--json", as_json, "print the rows as JSON lines too");
  CLI11_PARSE(app, argc, argv);

  Config config = DefaultConfig();
  if (!config_path.empty())
    if (Status st = LoadConfigFile(config_path, &config); !st.ok()) {
      std::fprintf(stderr, "peer-bench generate: %s\n", st.ToString().c_str());
      return 2;
    }
  SetComputeThreads(static_cast<int>(threads));
  torch::manual_seed(1);
  TransformerLM model(config.model());  // untrained: speed does not depend on what was learnt
  const int64_t context = config.model().context();

  std::printf("generation, %lld tokens greedy, model d=%u layers=%u context=%lld, %lld thread(s); median of %lld\n",
              static_cast<long long>(tokens), config.model().d_model(), config.model().n_layers(),
              static_cast<long long>(context), static_cast<long long>(threads), static_cast<long long>(reps));
  std::printf("%12s %16s %16s %8s %10s\n", "prompt bytes", "cache tok/s", "no cache tok/s", "ratio", "same text");
  std::vector<json> rows;
  for (int64_t prompt_bytes : prompts) {
    std::string prompt(static_cast<size_t>(prompt_bytes), 'a');
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<char>('a' + (i * 7) % 26);
    GenerateOptions o;
    o.temperature = 0;
    o.max_tokens = tokens;
    std::vector<double> rate[2];  // [0] cache, [1] no cache
    std::vector<int64_t> produced[2];
    for (int64_t r = 0; r < reps; ++r)
      for (int with = 0; with < 2; ++with) {  // interleaved, so drift in the machine hits both
        o.kv_cache = with == 0;
        const auto start = Clock::now();
        const Generated g = Generate(model, prompt, o);
        const double s = Seconds(start);
        rate[with].push_back(static_cast<double>(g.tokens.size()) / s);
        produced[with] = g.tokens;
      }
    const double cached = Median(rate[0]), whole = Median(rate[1]);
    const bool same = produced[0] == produced[1];
    std::printf(
        "%12lld %9.0f ±%5.0f %9.0f ±%5.0f %7.2fx %10s\n", static_cast<long long>(prompt_bytes), cached,
        (*std::max_element(rate[0].begin(), rate[0].end()) - *std::min_element(rate[0].begin(), rate[0].end())) / 2,
        whole,
        (*std::max_element(rate[1].begin(), rate[1].end()) - *std::min_element(rate[1].begin(), rate[1].end())) / 2,
        cached / whole, same ? "yes" : "NO");
    rows.push_back({{"bench", "generate"},
                    {"prompt_bytes", prompt_bytes},
                    {"tokens", tokens},
                    {"context", context},
                    {"threads", threads},
                    {"cache_tokens_per_s", rate[0]},
                    {"no_cache_tokens_per_s", rate[1]},
                    {"cache_median", cached},
                    {"no_cache_median", whole},
                    {"ratio", cached / whole},
                    {"same_tokens", same}});
  }
  WriteJsonLines(json_out, rows);
  if (as_json) PrintJsonLines(rows);
  return 0;
}

}  // namespace peerd::bench
