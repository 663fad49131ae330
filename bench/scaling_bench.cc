// peer-bench scaling: the same training job (peer-train, same global batch and steps) as W ranks
// of one thread each, as processes joined by c10d on loopback, beside one process with W threads
// (the same total threads). Reports each configuration's median tokens/s over --repeats runs and
// the time rank 0 spent in collectives (gradient all-reduce, loss sum) per step. peer-train times
// Trainer::Step only, so start-up and the initial model sync are not counted.
#include "bench/scaling_bench.h"

#include <sys/wait.h>
#include <unistd.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "bench/json_lines.h"
#include "bench/measure.h"

namespace peerd::bench {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct Run {
  bool ok = false;
  double tokens_per_second = 0, collective_ms = 0, step_ms = 0, kb_per_step = 0;
  std::string log;
};

// Runs one job: `world` peer-train ranks of `threads` threads each; rank 0's summary.
Run RunJob(const std::string& peer_train, const std::string& args, int world, int threads, int port,
           const std::string& dir) {
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const std::string log = dir + "/rank" + std::to_string(r) + ".log";
    const std::string cmd = "exec " + peer_train + " " + args + " --threads " + std::to_string(threads) +
                            " --world-size " + std::to_string(world) + " --rank " + std::to_string(r) +
                            " --rendezvous 127.0.0.1:" + std::to_string(port) + " > " + log + " 2>&1";
    const pid_t pid = fork();
    if (pid == 0) {
      execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
      _exit(127);
    }
    pids.push_back(pid);
  }
  bool ok = true;
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    ok &= WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  Run run;
  std::ifstream in(dir + "/rank0.log");
  std::stringstream ss;
  ss << in.rdbuf();
  run.log = ss.str();
  std::smatch m;
  const std::regex summary(
      "trained ([0-9]+) steps in ([0-9.]+) s: ([0-9.]+) tokens/s; collectives ([0-9.]+) ms/step, ([0-9.]+) KB/step");
  if (ok && std::regex_search(run.log, m, summary)) {
    run.ok = true;
    run.step_ms = 1000 * std::stod(m[2]) / std::stod(m[1]);
    run.tokens_per_second = std::stod(m[3]);
    run.collective_ms = std::stod(m[4]);
    run.kb_per_step = std::stod(m[5]);
  }
  return run;
}

}  // namespace

int ScalingBench(int argc, char** argv) {
  CLI::App app{"peer-bench scaling: data-parallel tokens/s with 1, 2, 4 ranks (one thread each) vs one process"};
  std::vector<int> worlds{1, 2, 4};
  int steps = 60, repeats = 3, base_port = 29650;
  std::string config_path, corpus = "data/corpora/kjv", json_path = "bench/results/scaling.jsonl";
  bool print_json = false;
  app.add_option("--ranks", worlds, "world sizes to run")->delimiter(',')->capture_default_str();
  app.add_option("--steps", steps, "training steps per job")->capture_default_str();
  app.add_option("--repeats", repeats, "jobs per configuration (medians reported)")->capture_default_str();
  app.add_option("--config", config_path, "peer-train configuration (default: the embedded one)");
  app.add_option("--corpus", corpus, "directory with train.txt and heldout.txt")->capture_default_str();
  app.add_option("--port", base_port, "first rendezvous port on 127.0.0.1")->capture_default_str();
  app.add_option("--json-out", json_path, "JSON lines file")->capture_default_str();
  app.add_flag("--json", print_json, "also print the JSON lines");
  CLI11_PARSE(app, argc, argv);

  const std::string peer_train = (fs::read_symlink("/proc/self/exe").parent_path() / "peer-train").string();
  const std::string dir = fs::temp_directory_path() / ("peer-bench-scaling-" + std::to_string(getpid()));
  fs::create_directories(dir);
  // Evaluation off (rank 0 alone would evaluate while the others wait); no growth.
  const std::string args = (config_path.empty() ? "" : "--config " + config_path + " ") + "--corpus " + corpus +
                           " --steps " + std::to_string(steps);

  std::printf("peer-bench scaling: peer-train %d steps, %d repeats, medians; %u cores\n", steps, repeats,
              std::thread::hardware_concurrency());
  std::printf("%-6s %-8s %-6s %10s %8s %10s %14s %8s %10s\n", "ranks", "threads", "total", "tokens/s", "vs 1x1",
              "ms/step", "collect ms/st", "share", "KB/step");
  std::vector<json> rows;
  double base = 0;
  int port = base_port;
  // (ranks, threads per rank): W ranks of one thread; and one process of W threads beside it.
  std::vector<std::pair<int, int>> configs;
  for (int w : worlds) {
    configs.push_back({w, 1});
    if (w > 1) configs.push_back({1, w});
  }
  for (const auto& [world, threads] : configs) {
    std::vector<double> tps, coll, step;
    double kb = 0;
    for (int r = 0; r < repeats; ++r) {
      Run run = RunJob(peer_train, args, world, threads, port++, dir);
      if (!run.ok) {
        std::fprintf(stderr, "peer-bench scaling: %d ranks x %d threads failed:\n%s\n", world, threads,
                     run.log.c_str());
        return 1;
      }
      tps.push_back(run.tokens_per_second);
      coll.push_back(run.collective_ms);
      step.push_back(run.step_ms);
      kb = run.kb_per_step;
    }
    const double t = Median(tps), c = Median(coll), ms = Median(step);
    if (world == 1 && threads == 1) base = t;
    // Collective time includes waiting for the slowest rank, not only bytes on the wire.
    std::printf("%-6d %-8d %-6d %10.0f %7.2fx %10.2f %14.2f %7.0f%% %10.1f\n", world, threads, world * threads, t,
                base > 0 ? t / base : 0, ms, c, ms > 0 ? 100 * c / ms : 0, kb);
    rows.push_back({{"bench", "scaling"},
                    {"ranks", world},
                    {"threads_per_rank", threads},
                    {"steps", steps},
                    {"repeats", repeats},
                    {"tokens_per_second_median", t},
                    {"tokens_per_second", tps},
                    {"step_ms_median", ms},
                    {"collective_ms_per_step_median", c},
                    {"kb_sent_per_step_rank0", kb},
                    {"speedup_vs_1x1", base > 0 ? t / base : 0}});
    std::fflush(stdout);
  }
  fs::remove_all(dir);
  WriteJsonLines(json_path, rows);
  if (print_json) PrintJsonLines(rows);
  return 0;
}

}  // namespace peerd::bench
