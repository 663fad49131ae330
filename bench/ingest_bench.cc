#include "bench/ingest_bench.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <random>
#include <thread>

#include "bench/json_lines.h"
#include "core/config.h"
#include "core/runtime.h"
#include "core/text_batcher.h"
#include "core/trainer.h"
#include "ingest/document_source.h"
#include "ingest/ingest_client.h"
#include "service/data_server.h"
#include "service/spool.h"
#include "service/training_loop.h"

namespace peerd::bench {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

// A file of `mb` megabytes of blank-line separated documents of about `doc_bytes` each.
std::string MakeCorpus(const std::string& path, double mb, size_t doc_bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::ofstream out(path);
  const size_t total = static_cast<size_t>(mb * 1e6);
  std::string doc;
  for (size_t written = 0; written < total; written += doc.size() + 2) {
    doc.clear();
    while (doc.size() < doc_bytes) doc += "word" + std::to_string(rng() % 5000) + (rng() % 12 ? " " : ". ");
    out << doc << "\n\n";
  }
  return path;
}

struct Served {
  std::shared_ptr<StoreDb> db;
  std::unique_ptr<Spool> spool;
  std::unique_ptr<DataServer> server;
};

Status Serve(const std::string& dir, Served* s) {
  fs::remove_all(dir);
  if (Status st = StoreDb::Open(dir, {}, &s->db); !st.ok()) return st;
  if (Status st = Spool::Open(s->db, &s->spool); !st.ok()) return st;
  DataServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = "bench";
  o.backlog_limit_bytes = uint64_t{1} << 40;  // measure the port, not the backpressure
  return DataServer::Start(s->spool.get(), o, &s->server);
}

Status IngestFiles(uint16_t port, const std::vector<std::string>& files, double* seconds) {
  std::vector<std::thread> threads;
  std::vector<Status> results(files.size());
  auto t0 = Clock::now();
  for (size_t i = 0; i < files.size(); ++i)
    threads.emplace_back([&, i] {
      IngestOptions o;
      o.server = "127.0.0.1:" + std::to_string(port);
      o.token = "bench";
      o.task = "bench" + std::to_string(i);
      std::unique_ptr<DocumentSource> src;
      results[i] = DocumentSource::Open({files[i]}, {}, &src);
      IngestProgress p;
      if (results[i].ok()) results[i] = IngestClient(o).Run(*src, &p);
    });
  for (auto& t : threads) t.join();
  *seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (const Status& st : results)
    if (!st.ok()) return st;
  return Status::OK();
}

int Fail(const Status& st) {
  std::fprintf(stderr, "peer-bench ingest: %s\n", st.ToString().c_str());
  return 1;
}

}  // namespace

int IngestBench(int argc, char** argv) {
  CLI::App app{"peer-bench ingest: data port throughput, and training inside the service vs the bare trainer"};
  double mb = 32;
  size_t doc_bytes = 4096;
  int steps = 60, reps = 3;
  std::string dir = "bench-out/ingest-bench", json_out = "bench-out/ingest.json";
  app.add_option("--mb", mb, "megabytes each ingest run sends in total")->capture_default_str();
  app.add_option("--doc-bytes", doc_bytes, "document size")->capture_default_str();
  app.add_option("--steps", steps, "training steps timed for each side of the comparison")->capture_default_str();
  app.add_option("--reps", reps, "repetitions of the training comparison (medians reported)")->capture_default_str();
  app.add_option("--dir", dir, "scratch directory (emptied)")->capture_default_str();
  app.add_option("--json-out", json_out, "JSON lines go here too")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  fs::create_directories(dir);
  std::vector<json> figures;

  // 1. Durable ingest throughput: 1 client, then 8 clients sharing the same total.
  for (int clients : {1, 8}) {
    std::vector<std::string> files;
    for (int c = 0; c < clients; ++c)
      files.push_back(MakeCorpus(dir + "/corpus" + std::to_string(c) + ".txt", mb / clients, doc_bytes, c));
    Served s;
    if (Status st = Serve(dir + "/db" + std::to_string(clients), &s); !st.ok()) return Fail(st);
    double secs = 0;
    if (Status st = IngestFiles(s.server->port(), files, &secs); !st.ok()) return Fail(st);
    SpoolStats ss = s.spool->stats();
    figures.push_back({{"figure", "ingest_acked_mb_per_s"}, {"clients", clients}, {"value", ss.bytes / 1e6 / secs},
                       {"unit", "MB/s"}, {"documents", ss.documents}, {"synced_commits", ss.commits},
                       {"documents_per_commit", double(ss.documents) / std::max<uint64_t>(1, ss.commits)}});
  }

  // 2. Training tokens/s: the bare trainer on a text vs the service's loop on the same text while
  //    a client keeps streaming more.
  SetComputeThreads(0);
  Config c = DefaultConfig();
  const std::string text_path = MakeCorpus(dir + "/train.txt", 4, doc_bytes, 99);
  std::ifstream in(text_path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const int64_t T = c.model().context(), B = c.train().batch_size();
  auto bare = [&] {
    torch::manual_seed(1);
    TransformerLM model(c.model());
    Trainer trainer(model, c.train());
    TextBatcher batches(text, T, 1);
    trainer.Step(batches.Next(B));  // warm-up
    auto t0 = Clock::now();
    for (int i = 0; i < steps; ++i) trainer.Step(batches.Next(B));
    return steps * B * T / std::chrono::duration<double>(Clock::now() - t0).count();
  };
  const std::string more = MakeCorpus(dir + "/more.txt", mb, doc_bytes, 7);
  auto service = [&](int rep, double* tps) -> Status {
    Served s;
    if (Status st = Serve(dir + "/db-train" + std::to_string(rep), &s); !st.ok()) return st;
    double secs = 0;
    if (Status st = IngestFiles(s.server->port(), {text_path}, &secs); !st.ok()) return st;
    LoopOptions lo;
    lo.config = c;
    lo.checkpoint_every_steps = 0;
    lo.checkpoint_every_seconds = 1e9;
    std::unique_ptr<TrainingLoop> loop;
    if (Status st = TrainingLoop::Open(lo, s.db, s.spool.get(), &loop); !st.ok()) return st;
    loop->Start();
    while (loop->Snapshot().step() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(10));  // warm-up
    const uint64_t step0 = loop->Snapshot().step();
    std::thread ingest([&] { double ignored; (void)IngestFiles(s.server->port(), {more}, &ignored); });
    auto t0 = Clock::now();
    while (loop->Snapshot().step() < step0 + steps) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    *tps = (loop->Snapshot().step() - step0) * B * T / std::chrono::duration<double>(Clock::now() - t0).count();
    ingest.join();
    return loop->Stop(false);
  };
  // Interleaved repetitions, medians: this machine is noisy.
  std::vector<double> bare_runs, service_runs;
  for (int rep = 0; rep < reps; ++rep) {
    double b = 0, v = 0;
    std::thread([&] { b = bare(); }).join();  // on its own thread, as the service trains
    if (Status st = service(rep, &v); !st.ok()) return Fail(st);
    bare_runs.push_back(b);
    service_runs.push_back(v);
  }
  std::sort(bare_runs.begin(), bare_runs.end());
  std::sort(service_runs.begin(), service_runs.end());
  const double bare_tps = bare_runs[reps / 2], service_tps = service_runs[reps / 2];
  figures.push_back({{"figure", "train_tokens_per_s_bare"}, {"value", bare_tps}, {"unit", "tokens/s"}, {"steps", steps}, {"runs", bare_runs}});
  figures.push_back({{"figure", "train_tokens_per_s_in_service_while_ingesting"}, {"value", service_tps},
                     {"unit", "tokens/s"}, {"steps", steps}, {"runs", service_runs}});
  figures.push_back({{"figure", "service_overhead"}, {"value", 1 - service_tps / bare_tps}, {"unit", "fraction"}});

  WriteJsonLines(json_out, figures);
  std::printf("%-48s %14s  %s\n", "figure", "value", "unit / detail");
  for (const auto& f : figures) {
    std::string detail = f["unit"].get<std::string>();
    if (f.contains("clients")) detail += ", " + std::to_string(f["clients"].get<int>()) + " client(s), " +
                                         std::to_string(f["documents_per_commit"].get<double>()).substr(0, 5) + " docs per fsync";
    std::printf("%-48s %14.3f  %s\n", f["figure"].get<std::string>().c_str(), f["value"].get<double>(), detail.c_str());
  }
  fs::remove_all(dir);
  return 0;
}

}  // namespace peerd::bench
