// peerd: the continual-training service. Streams of documents come in on the data port (from
// peer-ingest), are spooled durably and trained on; the admin API (peerctl, curl) adds and freezes
// expert segments, registers held-out tasks and evaluates forgetting. See README.md.
//
//   peerd [--data-dir ./peerd-data] [--config FILE] [--data-listen 127.0.0.1:7070]
//         [--admin-listen 127.0.0.1:7071] [--log-level info] ...
//   peerd --world-size W --rank R --rendezvous HOST:PORT ...   (multi-rank: docs/DESIGN.md §6)
//
// With several ranks, rank 0 is the whole service above and trains its share of every batch;
// ranks 1..W-1 hold no data directory or ports: they take the model from rank 0 and train their
// share (service/rank_worker.h). A lost rank ends every rank with exit status 3.
#include <signal.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <filesystem>
#include <optional>

#include "core/collective.h"
#include "core/config.h"
#include "core/runtime.h"
#include "experts_store/row_dtype.h"
#include "service/admin_server.h"
#include "service/data_dir_config.h"
#include "service/net/data_server.h"
#include "service/net/spool.h"
#include "service/net/token.h"
#include "service/rank_worker.h"
#include "service/training_loop.h"

using namespace peerd;

namespace {

constexpr int kExitRankLost = 3;

bool IsLoopback(const std::string& listen) {
  return listen.rfind("127.", 0) == 0 || listen.rfind("localhost:", 0) == 0 || listen.rfind("[::1]", 0) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  peerd::ReexecWithTunedEnvironment(argv);
  CLI::App app{"peerd: continual training of a PEER language model on streamed text"};
  app.set_version_flag("--version", std::string("peerd ") + PEERD_VERSION);
  std::string data_dir = "peerd-data", config_path, data_listen = "127.0.0.1:7070", admin_listen = "127.0.0.1:7071";
  std::string log_level = "info", residency = "resident", freeze_dtype = "bf16", training_journal, import_dir;
  std::vector<std::string> task_roots;
  uint32_t checkpoint_steps = 200, threads = 0;
  double checkpoint_seconds = 60;
  uint64_t backlog_mb = 256, cache_mb = 256, max_doc_mb = 8, spool_keep_mb = 0, spool_keep_hours = 0;
  uint32_t idle_timeout_s = 300, max_data_connections = 256, admin_timeout_s = 30;
  bool allow_remote = false, verify_pool_at_open = false;
  CollectiveOptions ranks;
  std::string rendezvous = "127.0.0.1:29500";
  uint32_t collective_timeout_s = 120;
  app.add_option("--data-dir", data_dir, "where the store, spool, checkpoints and tokens live")->capture_default_str();
  app.add_option("--config", config_path, "JSON configuration (proto/config.proto); omitted fields: embedded defaults");
  app.add_option("--data-listen", data_listen, "data port (peer-ingest)")->capture_default_str();
  app.add_option("--admin-listen", admin_listen, "admin API (peerctl, HTTP)")->capture_default_str();
  app.add_flag("--allow-remote", allow_remote, "allow listening on addresses other than loopback");
  app.add_option("--log-level", log_level, "trace | debug | info | warn | error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->capture_default_str();
  app.add_option("--checkpoint-every-steps", checkpoint_steps, "checkpoint after this many steps")
      ->capture_default_str();
  app.add_option("--checkpoint-every-seconds", checkpoint_seconds, "…or this many seconds")->capture_default_str();
  app.add_option("--backlog-mb", backlog_mb, "stop reading the data port above this much untrained text")
      ->capture_default_str();
  app.add_option("--max-document-mb", max_doc_mb, "largest document accepted")->capture_default_str();
  app.add_option("--spool-keep-mb", spool_keep_mb,
                 "with keepTrainedText on: keep at most this much trained text for replay, oldest pruned "
                 "first (0 = all)")
      ->capture_default_str();
  app.add_option("--spool-keep-hours", spool_keep_hours,
                 "with keepTrainedText on: prune trained text older than this (0 = never)")
      ->capture_default_str();
  app.add_option("--import", import_dir,
                 "start a new data directory from an export (peerctl export DIR): its model and frozen segments");
  app.add_option("--training-journal", training_journal,
                 "append which spooled text each training step trained to this file (an audit of "
                 "exactly-once training; format in service/training_journal.h)");
  app.add_option("--idle-timeout-seconds", idle_timeout_s, "close a data stream silent this long")
      ->check(CLI::Range(1u, 86400u))
      ->capture_default_str();
  app.add_option(
         "--admin-timeout-seconds", admin_timeout_s,
         "close an admin connection idle this long, or slower than this to send its headers or to take its answer")
      ->check(CLI::Range(1u, 3600u))
      ->capture_default_str();
  app.add_option("--max-data-connections", max_data_connections, "refuse data connections beyond this many")
      ->check(CLI::Range(1u, 65536u))
      ->capture_default_str();
  app.add_option("--residency", residency, "frozen rows: resident | cached")
      ->check(CLI::IsMember({"resident", "cached"}))
      ->capture_default_str();
  app.add_option("--cache-mb", cache_mb, "row cache for --residency cached")->capture_default_str();
  app.add_flag("--verify-pool-at-open", verify_pool_at_open,
               "--residency cached: check every frozen row against its segment's checksum before serving (a read of "
               "the whole pool at every start); by default they are checked beside training after start");
  app.add_option("--freeze-dtype", freeze_dtype, "default dtype of frozen rows: bf16 | fp32")
      ->check(CLI::IsMember({"bf16", "fp32"}))
      ->capture_default_str();
  app.add_option("--task-root", task_roots,
                 "directories POST /v1/tasks may read files from (default: the working directory)");
  app.add_option("--threads", threads, "LibTorch threads (overrides train.threads; 0 = all cores)");
  app.add_option("--world-size", ranks.world_size, "ranks training together (multi-rank: one peerd per rank)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--rank", ranks.rank, "this peerd's rank: 0 owns the data, the ports and the store")
      ->capture_default_str();
  app.add_option("--rendezvous", rendezvous, "HOST:PORT where rank 0 serves the c10d rendezvous store")
      ->capture_default_str();
  app.add_option("--collective-timeout-seconds", collective_timeout_s,
                 "a rank silent this long counts as lost (also bounds an evaluation on rank 0)")
      ->check(CLI::Range(1u, 86400u))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %l %v");
  spdlog::set_level(spdlog::level::from_str(log_level));
  auto fail = [](const std::string& what, const Status& st) {
    spdlog::error("{}: {}", what, st.ToString());
    return 1;
  };
  for (const auto& listen : {data_listen, admin_listen})
    if (!IsLoopback(listen)) {
      if (!allow_remote) {
        spdlog::error("refusing to listen on {}: peerd listens on loopback unless --allow-remote is given", listen);
        return 2;
      }
      spdlog::warn("listening on {}, reachable from other machines: keep the tokens secret", listen);
    }
  if (Status st = ParseRendezvous(rendezvous, &ranks); !st.ok()) return fail("--rendezvous", st);
  ranks.timeout = std::chrono::seconds(collective_timeout_s);
  if (ranks.rank < 0 || ranks.rank >= ranks.world_size)
    return fail("--rank", Status::InvalidArgument("must be in [0, --world-size) = [0, " +
                                                  std::to_string(ranks.world_size) + ")"));
  if (ranks.world_size > 1) {
    if (!IsLoopback(ranks.host + ":")) {
      if (!allow_remote) {
        spdlog::error("refusing rendezvous on {}: multi-rank peerd stays on loopback unless --allow-remote is given",
                      rendezvous);
        return 2;
      }
      spdlog::warn(
          "rendezvous on {}: the ranks' traffic (model state, gradients) is neither authenticated nor encrypted",
          rendezvous);
    }
    if (residency != "resident")
      return fail("--residency",
                  Status::InvalidArgument("several ranks need frozen rows in memory (--residency resident)"));
  }
  // Ranks other than 0: no data directory, no ports — rank 0's model, then its commands.
  if (ranks.world_size > 1 && ranks.rank > 0) {
    const int used = SetComputeThreads(threads);
    spdlog::info("rank {} of {}: joining at {} ({} threads)", ranks.rank, ranks.world_size, rendezvous, used);
    std::unique_ptr<Collective> collective;
    if (Status st = Collective::Connect(ranks, &collective); !st.ok()) return fail("joining the job", st);
    std::unique_ptr<RankWorker> worker;
    if (Status st = RankWorker::Join(collective.get(), &worker); !st.ok()) {
      spdlog::error("rank {}: taking rank 0's model: {}", ranks.rank, st.ToString());
      return kExitRankLost;
    }
    spdlog::info("rank {} of {}: joined at step {}; training rank 0's batches", ranks.rank, ranks.world_size,
                 worker->step());
    std::fflush(stdout);
    if (Status st = worker->Run(); !st.ok()) {
      spdlog::error("rank {}: training stopped: {}. Restart every rank to resume from rank 0's last checkpoint",
                    ranks.rank, st.ToString());
      return kExitRankLost;
    }
    spdlog::info("rank {}: rank 0 stopped at step {}; bye", ranks.rank, worker->step());
    return 0;
  }

  LoopOptions lo;
  std::optional<Config> given;  // --config merged over the defaults
  if (!config_path.empty()) {
    given = DefaultConfig();
    if (Status st = LoadConfigFile(config_path, &*given); !st.ok()) return fail("configuration", st);
  }
  lo.checkpoint_every_steps = checkpoint_steps;
  lo.checkpoint_every_seconds = checkpoint_seconds;
  lo.freeze_dtype = *ParseRowDtype(freeze_dtype);  // CLI11 checked the name
  lo.pool.residency = residency == "cached" ? Residency::kCached : Residency::kResident;
  lo.pool.cache_bytes = cache_mb << 20;
  lo.pool.verify_cached_at_open = verify_pool_at_open;
  lo.retention.max_bytes = spool_keep_mb << 20;
  lo.retention.max_age_seconds = spool_keep_hours * 3600;
  lo.training_journal = training_journal;

  // Signals are taken by this thread with sigwait; every other thread starts with them blocked.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  ExportManifest imported;
  NamedTensors import_tensors;
  if (!import_dir.empty()) {
    std::error_code ec;
    if (std::filesystem::exists(data_dir, ec) && !std::filesystem::is_empty(data_dir, ec))
      return fail("--import", Status::InvalidArgument("data directory '" + data_dir +
                                                      "' is not empty: --import starts a new data directory"));
    if (Status st = ReadExport(import_dir, &imported, &import_tensors); !st.ok()) return fail("--import", st);
  }
  std::shared_ptr<DataDirDb> db;
  if (Status st = DataDirDb::Open(data_dir, {}, &db); !st.ok()) return fail("data directory", st);
  // An import's configuration is the new data directory's record: a --config must describe its model.
  if (!import_dir.empty())
    if (Status st = RecordDataDirConfig(*db, imported.config()); !st.ok()) return fail("configuration", st);
  if (Status st = ResolveDataDirConfig(*db, given, &lo.config); !st.ok()) return fail("configuration", st);
  const Config resolved = lo.config;  // what the data directory records, --threads aside
  if (threads) lo.config.mutable_train()->set_threads(threads);
  const int used_threads = SetComputeThreads(lo.config.train().threads());
  std::string admin_token, data_token;
  if (Status st = LoadOrCreateToken(data_dir + "/admin.token", &admin_token); !st.ok()) return fail("admin token", st);
  if (Status st = LoadOrCreateToken(data_dir + "/data.token", &data_token); !st.ok()) return fail("data token", st);
  std::unique_ptr<Spool> spool;
  if (Status st = Spool::Open(db, &spool); !st.ok()) return fail("spool", st);
  std::unique_ptr<Collective> collective;
  if (ranks.world_size > 1) {
    spdlog::info("rank 0 of {}: waiting for the other ranks at {} (up to {} s)", ranks.world_size, rendezvous,
                 collective_timeout_s);
    if (Status st = Collective::Connect(ranks, &collective); !st.ok()) return fail("starting the job", st);
    lo.ranks = collective.get();
    // This thread's sigwait below ends the job: the ports close, and no checkpoint is written.
    lo.on_ranks_lost = [] { kill(getpid(), SIGTERM); };
  }
  std::unique_ptr<TrainingLoop> loop;
  if (Status st = TrainingLoop::Open(lo, db, spool.get(), &loop); !st.ok()) {
    if (!collective) return fail("restoring the model", st);
    fail("restoring the model and sending it to the other ranks", st);
    return kExitRankLost;
  }
  if (Status st = RecordDataDirConfig(*db, resolved); !st.ok()) return fail("configuration", st);
  if (!import_dir.empty()) {
    if (Status st = loop->Import(imported, import_tensors); !st.ok())
      return fail("--import (remove the data directory before trying again)", st);
    spdlog::info("imported {}: the model of step {} ({} tensors, {} frozen segments, checksums verified)", import_dir,
                 imported.step(), import_tensors.size(), imported.frozen_size());
    import_tensors.clear();
  }
  KeepFreedMemory();  // the model is built; from here on every step re-uses the last step's memory
  StatusReply s0 = loop->Snapshot();
  spdlog::info(
      "data dir {}: step {}, {} spooled documents ({} bytes, {} untrained), {} segments; {} parameters, {} active per "
      "token; {} threads; BLAS {}",
      data_dir, s0.step(), s0.spool_documents(), s0.spool_bytes(), s0.spool_backlog_bytes(), s0.segments_size(),
      s0.total_parameters(), s0.active_parameters(), used_threads, BlasInfo());

  DataServerOptions dopt;
  dopt.listen = data_listen;
  dopt.token = data_token;
  dopt.backlog_limit_bytes = backlog_mb << 20;
  dopt.max_document_bytes = max_doc_mb << 20;
  dopt.idle_timeout_ms = idle_timeout_s * 1000;
  dopt.max_connections = static_cast<int>(max_data_connections);
  std::unique_ptr<DataServer> data;
  if (Status st = DataServer::Start(spool.get(), dopt, &data); !st.ok()) return fail("data port", st);
  AdminServerOptions aopt;
  aopt.listen = admin_listen;
  aopt.token = admin_token;
  aopt.timeout_seconds = admin_timeout_s;
  aopt.task_roots =
      task_roots.empty() ? std::vector<std::string>{std::filesystem::current_path().string()} : task_roots;
  std::unique_ptr<AdminServer> admin;
  if (Status st = AdminServer::Start(loop.get(), data.get(), aopt, &admin); !st.ok()) return fail("admin API", st);
  loop->Start();
  spdlog::info("data port {} (token {}/data.token), admin API {} (token {}/admin.token)", data->address(), data_dir,
               admin->address(), data_dir);
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  if (const std::string lost = loop->lost_rank_reason(); !lost.empty()) {
    spdlog::error(
        "a rank was lost: stopping the admin API and the data port; no checkpoint (the last one, step {}, is where the "
        "job resumes)",
        loop->Snapshot().last_checkpoint_step());
    admin->Stop();
    data->Stop();
    (void)loop->Stop(/*checkpoint=*/false);
    return kExitRankLost;
  }
  spdlog::info("{}: stopping — admin API, data port, then a last checkpoint", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  admin->Stop();
  data->Stop();
  if (Status st = loop->Stop(/*checkpoint=*/true); !st.ok()) return fail("last checkpoint", st);
  spdlog::info("checkpoint written at step {}; bye", loop->Snapshot().step());
  return 0;
}
