#include "bench/ingest_bench.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "bench/json_lines.h"
#include "bench/misbehaving_clients.h"
#include "core/config.h"
#include "core/runtime.h"
#include "core/text_batcher.h"
#include "core/trainer.h"
#include "ingest/document_source.h"
#include "ingest/ingest_client.h"
#include "service/net/data_server.h"
#include "service/net/spool.h"
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
  std::shared_ptr<DataDirDb> db;
  std::unique_ptr<Spool> spool;
  std::unique_ptr<DataServer> server;
};

Status Serve(const std::string& dir, Served* s, uint32_t idle_timeout_ms = DataServerOptions{}.idle_timeout_ms) {
  fs::remove_all(dir);
  if (Status st = DataDirDb::Open(dir, {}, &s->db); !st.ok()) return st;
  if (Status st = Spool::Open(s->db, &s->spool); !st.ok()) return st;
  DataServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = "bench";
  o.backlog_limit_bytes = uint64_t{1} << 40;  // measure the port, not the backpressure
  o.idle_timeout_ms = idle_timeout_ms;
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
  double rude_mb = 256;
  app.add_option("--mb-beside", rude_mb, "megabytes the 8 clients send in each run alone / beside misbehaving ones")
      ->capture_default_str();
  app.add_option("--doc-bytes", doc_bytes, "document size")->capture_default_str();
  app.add_option("--steps", steps, "training steps timed for each side of the comparison")->capture_default_str();
  app.add_option("--reps", reps, "repetitions of the training comparison (medians reported)")->capture_default_str();
  MisbehavingCounts rude;
  app.add_option("--silent", rude.silent, "misbehaving clients that say hello, then nothing")->capture_default_str();
  app.add_option("--half-frame", rude.half_frame, "... that send half a length prefix, then nothing")
      ->capture_default_str();
  app.add_option("--non-readers", rude.non_reader, "... that send 1 MB of documents and never read an ack")
      ->capture_default_str();
  app.add_option("--garbage-loops", rude.garbage, "... that send garbage, read the error, reconnect")
      ->capture_default_str();
  app.add_option("--cut-loops", rude.cut_mid_frame, "... that cut their connection mid-frame, reconnect")
      ->capture_default_str();
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
    figures.push_back({{"figure", "ingest_acked_mb_per_s"},
                       {"clients", clients},
                       {"value", ss.bytes / 1e6 / secs},
                       {"unit", "MB/s"},
                       {"documents", ss.documents},
                       {"synced_commits", ss.commits},
                       {"documents_per_commit", double(ss.documents) / std::max<uint64_t>(1, ss.commits)}});
  }

  // 2. The same 8 clients alone, then beside misbehaving ones (bench/misbehaving_clients.h), in
  //    interleaved repetitions on fresh stores: what misbehaving clients cost the well-behaved.
  //    (Everything shares this machine's cores: the misbehaving clients' own CPU time counts too.)
  {
    std::vector<std::string> files;
    for (int c = 0; c < 8; ++c)
      files.push_back(MakeCorpus(dir + "/beside" + std::to_string(c) + ".txt", rude_mb / 8, doc_bytes, 100 + c));
    std::vector<double> alone, beside;
    uint64_t rude_connections = 0, rude_bytes = 0, timeouts = 0, errors = 0;
    for (int rep = 0; rep < reps; ++rep)
      for (int side = 0; side < 2; ++side) {
        const bool with_rude = (side + rep) % 2 == 1;  // which goes first alternates
        Served s;
        // A 1 s idle timeout, so that the silent clients are closed during the run, as a
        // deployment with a short timeout would close them.
        const std::string db = dir + "/db-beside" + std::to_string(rep) + (with_rude ? "b" : "a");
        if (Status st = Serve(db, &s, 1000); !st.ok()) return Fail(st);
        std::unique_ptr<MisbehavingClients> clients;
        if (with_rude) {
          clients = std::make_unique<MisbehavingClients>(s.server->port(), "bench", rude);
          std::this_thread::sleep_for(std::chrono::milliseconds(300));  // connected and misbehaving first
        }
        double secs = 0;
        if (Status st = IngestFiles(s.server->port(), files, &secs); !st.ok()) return Fail(st);
        // Throughput of the well-behaved alone: their documents are the corpus files' bytes.
        uint64_t bytes = 0;
        for (const auto& f : files) bytes += fs::file_size(f);
        (with_rude ? beside : alone).push_back(bytes / 1e6 / secs);
        if (clients) {
          clients->Stop();
          rude_connections += clients->connections();
          rude_bytes += clients->bytes_sent();
          DataServerStats ds = s.server->stats();
          timeouts += ds.timeouts;
          errors += ds.errors;
        }
        s = Served{};  // closed before its files go
        fs::remove_all(db);
      }
    std::sort(alone.begin(), alone.end());
    std::sort(beside.begin(), beside.end());
    const double a = alone[reps / 2], b = beside[reps / 2];
    figures.push_back({{"figure", "ingest_mb_per_s_8_clients_alone"}, {"value", a}, {"unit", "MB/s"}, {"runs", alone}});
    figures.push_back({{"figure", "ingest_mb_per_s_8_clients_beside_misbehaving"},
                       {"value", b},
                       {"unit", "MB/s"},
                       {"runs", beside},
                       {"misbehaving",
                        {{"silent", rude.silent},
                         {"half_frame", rude.half_frame},
                         {"non_reader", rude.non_reader},
                         {"garbage_loops", rude.garbage},
                         {"cut_mid_frame_loops", rude.cut_mid_frame},
                         {"connections_per_run", rude_connections / reps},
                         {"bytes_sent_per_run", rude_bytes / reps},
                         {"closed_by_timeout_per_run", timeouts / reps},
                         {"errors_per_run", errors / reps}}}});
    figures.push_back({{"figure", "ingest_throughput_kept_beside_misbehaving"}, {"value", b / a}, {"unit", "ratio"}});
  }

  // 3. Training tokens/s: the bare trainer on a text vs the service's loop on the same text while
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
    std::thread ingest([&] {
      double ignored;
      (void)IngestFiles(s.server->port(), {more}, &ignored);
    });
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
  figures.push_back({{"figure", "train_tokens_per_s_bare"},
                     {"value", bare_tps},
                     {"unit", "tokens/s"},
                     {"steps", steps},
                     {"runs", bare_runs}});
  figures.push_back({{"figure", "train_tokens_per_s_in_service_while_ingesting"},
                     {"value", service_tps},
                     {"unit", "tokens/s"},
                     {"steps", steps},
                     {"runs", service_runs}});
  figures.push_back({{"figure", "service_overhead"}, {"value", 1 - service_tps / bare_tps}, {"unit", "fraction"}});

  WriteJsonLines(json_out, figures);
  std::printf("%-48s %14s  %s\n", "figure", "value", "unit / detail");
  for (const auto& f : figures) {
    std::string detail = f["unit"].get<std::string>();
    if (f.contains("misbehaving")) {
      const auto& m = f["misbehaving"];
      detail += ", beside " + std::to_string(m["silent"].get<int>() + m["half_frame"].get<int>()) + " silent + " +
                std::to_string(m["non_reader"].get<int>()) + " non-readers + " +
                std::to_string(m["garbage_loops"].get<int>() + m["cut_mid_frame_loops"].get<int>()) +
                " reconnect loops (" + std::to_string(m["connections_per_run"].get<uint64_t>()) + " connections a run)";
    }
    if (f.contains("clients"))
      detail += ", " + std::to_string(f["clients"].get<int>()) + " client(s), " +
                std::to_string(f["documents_per_commit"].get<double>()).substr(0, 5) + " docs per fsync";
    std::printf("%-48s %14.3f  %s\n", f["figure"].get<std::string>().c_str(), f["value"].get<double>(), detail.c_str());
  }
  fs::remove_all(dir);
  return 0;
}

}  // namespace peerd::bench
