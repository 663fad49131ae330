#include "bench/layer_bench.h"

#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "bench/json_lines.h"
#include "core/config.h"
#include "core/model.h"
#include "core/peer_layer.h"
#include "core/runtime.h"

namespace peerd::bench {

namespace {

using nlohmann::json;

struct Shape {
  int64_t dim = 256, heads = 8, topk = 16, tokens = 4096, iters = 3;
  uint32_t threads = 2;
  std::string query_norm = "none";  // peer_ref.py has no query norm
};

void AddShapeFlags(CLI::App& app, Shape& s) {
  app.add_option("--dim", s.dim, "model width D")->capture_default_str();
  app.add_option("--heads", s.heads, "query heads h")->capture_default_str();
  app.add_option("--topk", s.topk, "experts per head k")->capture_default_str();
  app.add_option("--tokens", s.tokens, "tokens per step (a multiple of 256)")->capture_default_str();
  app.add_option("--iters", s.iters, "timed steps after one warm-up step")->capture_default_str();
  app.add_option("--threads", s.threads, "LibTorch threads")->capture_default_str();
  app.add_option("--query-norm", s.query_norm, "none | layer | batch")->capture_default_str();
}

double PeakRssMb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

std::string RunCommand(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

std::string ShapeArgs(const Shape& s) {
  return " --dim " + std::to_string(s.dim) + " --heads " + std::to_string(s.heads) + " --topk " +
         std::to_string(s.topk) + " --tokens " + std::to_string(s.tokens) + " --iters " +
         std::to_string(s.iters) + " --threads " + std::to_string(s.threads) + " --query-norm " + s.query_norm;
}

json ErrorRow(const std::string& impl, int64_t experts, const std::string& why) {
  return {{"impl", impl}, {"experts", experts}, {"error", why}};
}

// One configuration in a child process (its own peak RSS), as a JSON object.
json RunChild(const std::string& impl, int64_t experts, const Shape& s) {
  // popen runs a shell, whose /proc/self/exe is the shell: resolve ours first.
  static const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  std::string out = RunCommand(self + " layer-run --impl " + impl + " --experts " +
                               std::to_string(experts) + ShapeArgs(s) + " 2>&1");
  auto at = out.rfind("\n{");
  std::string line = out.substr(at == std::string::npos ? 0 : at + 1);
  try {
    return json::parse(line);
  } catch (const std::exception&) {
    return ErrorRow(impl, experts, "child failed: " + out.substr(0, 300));
  }
}

// ../shared/bench/peer_ref.py prints "... fwd+bwd tokens/s=N peak_rss_MB=M".
json RunPeerRef(const std::string& script, int64_t experts, const Shape& s) {
  const int64_t n_keys = std::llround(std::sqrt(static_cast<double>(experts)));
  std::string out = RunCommand("/usr/bin/python3 " + script + " " + std::to_string(s.dim) + " " +
                               std::to_string(n_keys) + " " + std::to_string(s.heads) + " " +
                               std::to_string(s.topk) + " " + std::to_string(s.tokens) + " " +
                               std::to_string(s.iters) + " " + std::to_string(s.threads) + " 2>&1");
  std::smatch tps, rss;
  if (!std::regex_search(out, tps, std::regex("tokens/s=([0-9.]+)")) ||
      !std::regex_search(out, rss, std::regex("peak_rss_MB=([0-9.]+)")))
    return ErrorRow("peer_ref.py", experts, "peer_ref.py failed: " + out.substr(0, 300));
  const double params = 2.0 * experts * s.dim + double(s.dim) * s.dim * s.heads + 2.0 * n_keys * s.heads * s.dim / 2;
  return {{"impl", "peer_ref.py"}, {"experts", experts}, {"dim", s.dim}, {"heads", s.heads},
          {"topk", s.topk}, {"tokens", s.tokens}, {"threads", s.threads},
          {"tokens_per_s", std::stod(tps[1])}, {"peak_rss_mb", std::stod(rss[1])},
          {"param_mb", params * 4 / 1e6}};
}

}  // namespace

int LayerRun(int argc, char** argv) {
  CLI::App app{"peer-bench layer-run: one configuration, one JSON line"};
  Shape s;
  std::string impl = "peerd";
  int64_t experts = 65536;
  AddShapeFlags(app, s);
  app.add_option("--impl", impl, "peerd (reference composition) | fused (kernels/) | dense-ffn");
  app.add_option("--experts", experts, "experts in the pool (a square)");
  CLI11_PARSE(app, argc, argv);
  SetComputeThreads(s.threads);
  torch::manual_seed(0);

  std::function<torch::Tensor(const torch::Tensor&)> layer;
  int64_t params = 0;
  if (impl == "peerd" || impl == "fused") {
    const int64_t n_keys = std::llround(std::sqrt(static_cast<double>(experts)));
    if (n_keys * n_keys != experts) {
      std::fprintf(stderr, "--experts must be a square (n_keys²), got %lld\n", static_cast<long long>(experts));
      return 2;
    }
    PeerConfig p;
    p.set_n_keys(n_keys);
    p.set_heads(s.heads);
    p.set_topk(s.topk);
    p.set_query_dim(s.dim);  // as peer_ref.py: two halves of dim/2 per head
    p.set_query_norm(s.query_norm == "batch" ? QUERY_NORM_BATCH
                     : s.query_norm == "layer" ? QUERY_NORM_LAYER : QUERY_NORM_NONE);
    p.set_initial_segments(1);
    p.set_impl(impl == "fused" ? PEER_IMPL_FUSED : PEER_IMPL_REFERENCE);
    PeerLayer peer(s.dim, p);
    for (const auto& t : peer->parameters()) params += t.numel();
    layer = [peer](const torch::Tensor& x) mutable { return peer->forward(x); };
  } else if (impl == "dense-ffn") {
    // Equal active parameters: h·k experts of 2·D weights each = a hidden width of h·k.
    DenseFfn dense(s.dim, s.heads * s.topk);
    for (const auto& t : dense->parameters()) params += t.numel();
    layer = [dense](const torch::Tensor& x) mutable { return dense->forward(x); };
    experts = 0;
  } else {
    std::fprintf(stderr, "--impl must be peerd, fused or dense-ffn, got '%s'\n", impl.c_str());
    return 2;
  }

  torch::Tensor x = torch::randn({s.tokens / 256, 256, s.dim}).requires_grad_(true);
  std::vector<double> step_seconds;
  for (int64_t i = 0; i <= s.iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    torch::Tensor y = layer(x);
    y.square().mean().backward();
    if (i > 0) step_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(step_seconds.begin(), step_seconds.end());
  const double median = step_seconds[step_seconds.size() / 2];
  json row = {{"impl", impl}, {"experts", experts}, {"dim", s.dim},
              {"heads", s.heads}, {"topk", s.topk}, {"tokens", s.tokens}, {"threads", s.threads},
              {"tokens_per_s", s.tokens / median}, {"peak_rss_mb", PeakRssMb()},
              {"param_mb", params * 4 / 1e6}, {"query_norm", s.query_norm}};
  std::printf("%s\n", row.dump().c_str());
  return 0;
}

int LayerBench(int argc, char** argv) {
  CLI::App app{"peer-bench layer: PEER layer forward+backward, side by side with a dense FFN of equal "
               "active parameters and ../shared/bench/peer_ref.py"};
  Shape s;
  std::vector<int64_t> experts = {65536, 1048576};
  std::vector<std::string> impls = {"peerd", "fused", "dense-ffn", "peer_ref.py"};
  std::string ref_script = "../shared/bench/peer_ref.py";
  bool as_json = false;
  std::string json_out = "bench-out/layer.json";
  AddShapeFlags(app, s);
  app.add_option("--experts", experts, "pool sizes (squares), comma-separated")->delimiter(',')->capture_default_str();
  app.add_option("--impl", impls, "peerd (reference), fused, dense-ffn, peer_ref.py (comma-separated)")->delimiter(',')->capture_default_str();
  app.add_option("--ref-script", ref_script, "path to peer_ref.py")->capture_default_str();
  app.add_flag("--json", as_json, "print one JSON object per configuration instead of the table");
  app.add_option("--json-out", json_out, "also write the JSON lines to this file ('' = don't)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  std::vector<json> rows;
  auto wants = [&](const std::string& i) { return std::find(impls.begin(), impls.end(), i) != impls.end(); };
  if (wants("dense-ffn")) rows.push_back(RunChild("dense-ffn", 0, s));
  for (int64_t n : experts) {
    if (wants("peerd")) rows.push_back(RunChild("peerd", n, s));
    if (wants("fused")) rows.push_back(RunChild("fused", n, s));
    if (wants("peer_ref.py")) rows.push_back(RunPeerRef(ref_script, n, s));
  }

  std::map<int64_t, double> ref_tps;
  for (const json& r : rows)
    if (r["impl"] == "peer_ref.py" && r.contains("tokens_per_s")) ref_tps[r["experts"]] = r["tokens_per_s"];
  for (json& r : rows)
    if (ref_tps.count(r["experts"]) && r.contains("tokens_per_s"))
      r["ratio_vs_peer_ref"] = r["tokens_per_s"].get<double>() / ref_tps[r["experts"]];
  WriteJsonLines(json_out, rows);
  if (as_json) {
    PrintJsonLines(rows);
    return 0;
  }
  std::printf("PEER layer forward+backward: D=%lld h=%lld k=%lld, %lld tokens/step, %u threads, "
              "median of %lld steps (peer_ref.py: mean)\n",
              (long long)s.dim, (long long)s.heads, (long long)s.topk, (long long)s.tokens, s.threads,
              (long long)s.iters);
  std::printf("%-12s %10s %11s %12s %13s %14s\n", "impl", "experts", "params MB", "tokens/s",
              "peak RSS MB", "vs peer_ref");
  for (const json& r : rows) {
    if (r.contains("error")) {
      std::printf("%-12s %10lld  error: %s\n", r["impl"].get<std::string>().c_str(),
                  (long long)r["experts"].get<int64_t>(), r["error"].get<std::string>().c_str());
      continue;
    }
    const double tps = r["tokens_per_s"];
    std::string ratio = "-";
    if (r.contains("ratio_vs_peer_ref")) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.2fx", r["ratio_vs_peer_ref"].get<double>());
      ratio = buf;
    }
    std::printf("%-12s %10lld %11.1f %12.0f %13.0f %14s\n", r["impl"].get<std::string>().c_str(),
                (long long)r["experts"].get<int64_t>(), r["param_mb"].get<double>(), tps,
                r["peak_rss_mb"].get<double>(), ratio.c_str());
  }
  return 0;
}

}  // namespace peerd::bench
