// peer-train: trains the PEER language model on one text corpus and reports held-out bits per
// byte as it goes. The foundation's main job (`make demo`); the service (peerd) grows from it.
//
//   peer-train [--config FILE] [--corpus DIR] [--steps N] [--threads N] [--grow-at STEP]
//              [--world-size W --rank R --rendezvous HOST:PORT] [--dump-params FILE]
//
// DIR holds train.txt and heldout.txt (scripts/corpora.sh writes them). With --grow-at, every
// training segment is frozen at that step and a fresh one added, as the service will do between
// domains; the frozen segments' checksums are verified at the end. With --world-size W, W
// processes (one per --rank) train the same model data parallel (docs/DESIGN.md §6): every rank draws
// the same global batches and trains its share of them; rank 0 prints and evaluates.
// --dump-params writes every parameter and buffer at the end (tests/distributed_test.cc compares
// the ranks' files): "PEERPARAMS1\n", then per tensor a u32 name length, the name, a u8 dtype
// (0 fp32, 1 bf16), a u64 element count and the raw elements, little-endian.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>

#include "core/config.h"
#include "core/evaluator.h"
#include "core/model.h"
#include "core/rank_sync.h"
#include "core/runtime.h"
#include "core/text_batcher.h"
#include "core/text_file.h"
#include "core/trainer.h"

using namespace peerd;

namespace {

int Fail(const Status& st) {
  std::fprintf(stderr, "peer-train: %s\n", st.ToString().c_str());
  return 1;
}

Status DumpParameters(TransformerLM& model, const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << "PEERPARAMS1\n";
  auto write = [&](const std::string& name, const torch::Tensor& t) {
    torch::Tensor c = t.detach().contiguous();
    const uint32_t len = static_cast<uint32_t>(name.size());
    const uint8_t dtype = c.scalar_type() == torch::kBFloat16 ? 1 : 0;
    if (!dtype) c = c.to(torch::kFloat);
    const uint64_t n = static_cast<uint64_t>(c.numel());
    out.write(reinterpret_cast<const char*>(&len), sizeof len).write(name.data(), len);
    out.write(reinterpret_cast<const char*>(&dtype), 1).write(reinterpret_cast<const char*>(&n), sizeof n);
    out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(n * c.element_size()));
  };
  for (const auto& item : model->named_parameters()) write(item.key(), item.value());
  for (const auto& item : model->named_buffers()) write(item.key(), item.value());
  return out.good() ? Status::OK() : Status::IOError("cannot write --dump-params file '" + path + "'");
}

}  // namespace

int main(int argc, char** argv) {
  peerd::ReexecWithTunedEnvironment(argv);
  CLI::App app{"peer-train: train the PEER byte-level LM on a corpus, report held-out bits/byte"};
  app.set_version_flag("--version", std::string("peer-train ") + PEERD_VERSION);
  std::string config_path, corpus = "data/corpora/kjv";
  uint32_t steps = 0, threads = 0;
  int64_t grow_at = 0;
  CollectiveOptions ranks;
  std::string rendezvous = "127.0.0.1:29500", dump_params;
  uint32_t collective_timeout_s = 120;
  app.add_option("--config", config_path,
                 "JSON configuration (proto/config.proto); omitted fields take embedded defaults");
  app.add_option("--corpus", corpus, "directory with train.txt and heldout.txt")->capture_default_str();
  app.add_option("--steps", steps, "training steps (overrides train.steps)");
  app.add_option("--threads", threads, "LibTorch threads (overrides train.threads; 0 = all cores)");
  app.add_option("--grow-at", grow_at, "at this step freeze the training segments and add fresh ones");
  app.add_option("--world-size", ranks.world_size, "processes training together (one per --rank)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--rank", ranks.rank, "this process's rank in [0, world size)")->capture_default_str();
  app.add_option("--rendezvous", rendezvous, "HOST:PORT where rank 0 serves the c10d rendezvous store")
      ->capture_default_str();
  app.add_option("--collective-timeout-seconds", collective_timeout_s, "a rank silent this long counts as lost")
      ->check(CLI::Range(1u, 86400u))
      ->capture_default_str();
  app.add_option("--dump-params", dump_params, "write every parameter and buffer to this file at the end");
  CLI11_PARSE(app, argc, argv);

  Config config = DefaultConfig();
  if (!config_path.empty()) {
    if (Status st = LoadConfigFile(config_path, &config); !st.ok()) return Fail(st);
  }
  if (steps) config.mutable_train()->set_steps(steps);
  if (threads) config.mutable_train()->set_threads(threads);
  if (Status st = ValidateConfig(config); !st.ok()) return Fail(st);
  if (Status st = ParseRendezvous(rendezvous, &ranks); !st.ok()) return Fail(st);
  ranks.timeout = std::chrono::seconds(collective_timeout_s);
  std::unique_ptr<Collective> collective;
  if (Status st = Collective::Connect(ranks, &collective); !st.ok()) return Fail(st);
  // Every rank trains rank 0's configuration (its command line and file), whatever its own said.
  if (Status st = ShareConfig(*collective, &config); !st.ok()) return Fail(st);
  if (ranks.world_size > 1)
    if (Status st = CheckDataParallel(config); !st.ok()) return Fail(st);
  const bool root = ranks.rank == 0;
  const TrainConfig& tc = config.train();

  std::string train_text, heldout_text;
  if (Status st = ReadTextFile(corpus + "/train.txt", &train_text); !st.ok())
    return Fail(Status::IOError(st.message() + " (run scripts/corpora.sh to extract the corpus)"));
  if (Status st = ReadTextFile(corpus + "/heldout.txt", &heldout_text); !st.ok()) return Fail(st);

  const int used_threads = SetComputeThreads(tc.threads());
  SeedCompute(tc.seed());
  TransformerLM model(config.model());
  Trainer trainer(model, tc);
  trainer.set_collective(collective.get());
  if (Status st = SyncFromRankZero(*collective, trainer); !st.ok()) return Fail(st);
  KeepFreedMemory();  // the model is built; from here on every step re-uses the last step's memory
  TextBatcher batcher(train_text, config.model().context(), tc.seed());
  EvalOptions eval;
  eval.max_bytes = tc.eval_bytes();

  if (!root && !std::freopen("/dev/null", "w", stdout))
    return Fail(Status::IOError("cannot silence stdout"));  // rank 0 speaks for the job
  std::printf("peer-train: corpus %s (%zu train bytes, %zu held-out bytes)\n", corpus.c_str(), train_text.size(),
              heldout_text.size());
  std::printf("peer-train: %lld parameters, %lld active per token; %d threads; BLAS %s; %d rank%s\n",
              static_cast<long long>(model->TotalParameters()), static_cast<long long>(model->ActiveParameters()),
              used_threads, BlasInfo().c_str(), ranks.world_size, ranks.world_size > 1 ? "s" : "");
  std::printf("peer-train: config %s\n", ConfigToJson(config).c_str());
  if (root)
    std::printf("peer-train: held-out bits/byte at start %.3f (uniform bytes: 8)\n",
                BitsPerByte(model, heldout_text, eval));
  std::fflush(stdout);

  const int64_t tokens_per_step = int64_t{tc.batch_size()} * config.model().context();
  auto window_start = std::chrono::steady_clock::now();
  double window_loss = 0, window_collective = collective->seconds_in_collectives();
  double train_seconds = 0;  // in Trainer::Step only: what peer-bench scaling compares
  const double collective_at_start = window_collective;
  const uint64_t collective_bytes_at_start = collective->bytes_in_collectives();
  int window_steps = 0;
  for (int64_t step = 1; step <= tc.steps(); ++step) {
    if (grow_at > 0 && step == grow_at + 1) {
      auto layers = model->PeerLayers();
      for (size_t l = 0; l < layers.size(); ++l) {
        for (const auto& seg : layers[l]->segments()) {
          if (seg->frozen()) continue;
          if (Status st = trainer.FreezeSegment(l, seg->id()); !st.ok()) return Fail(st);
          std::printf("peer-train: step %lld: froze layer %zu segment %lld (checksum %016llx)\n",
                      static_cast<long long>(step - 1), l, static_cast<long long>(seg->id()),
                      static_cast<unsigned long long>(seg->frozen_checksum()));
        }
        int64_t id = 0;
        if (Status st = trainer.AddSegment(l, config.model().peer().n_keys(), &id); !st.ok()) return Fail(st);
        for (const auto& seg : layers[l]->segments())
          if (seg->id() == id)
            if (Status st = SyncSegmentFromRankZero(*collective, *seg); !st.ok()) return Fail(st);
        std::printf("peer-train: step %lld: added layer %zu segment %lld\n", static_cast<long long>(step - 1), l,
                    static_cast<long long>(id));
      }
    }
    StepStats s;
    const torch::Tensor batch = batcher.Next(tc.batch_size());
    const auto step_start = std::chrono::steady_clock::now();
    if (Status st = trainer.Step(batch, 0, &s); !st.ok()) return Fail(st);
    train_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    window_loss += s.loss;
    ++window_steps;
    if (step % tc.log_every() == 0 || step == tc.steps()) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - window_start).count();
      const double in_collectives = collective->seconds_in_collectives() - window_collective;
      std::printf("step %5lld/%u  loss %.4f  train bits/byte %.3f  lr %.2e  grad-norm %.2f  %.0f tokens/s",
                  static_cast<long long>(step), tc.steps(), window_loss / window_steps,
                  window_loss / window_steps / std::log(2.0), s.lr, s.grad_norm, tokens_per_step * window_steps / secs);
      if (ranks.world_size > 1) std::printf("  collectives %.1f ms/step", 1000 * in_collectives / window_steps);
      std::printf("\n");
      window_collective = collective->seconds_in_collectives();
      window_loss = 0;
      window_steps = 0;
      window_start = std::chrono::steady_clock::now();
    }
    if (root && tc.eval_every() && step % tc.eval_every() == 0 && step != tc.steps()) {
      std::printf("step %5lld  held-out bits/byte %.3f\n", static_cast<long long>(step),
                  BitsPerByte(model, heldout_text, eval));
      window_start = std::chrono::steady_clock::now();  // tokens/s counts training only
    }
    std::fflush(stdout);
  }

  std::printf(
      "peer-train: trained %u steps in %.3f s: %.0f tokens/s; collectives %.3f ms/step, %.1f KB/step sent by rank 0\n",
      tc.steps(), train_seconds, tokens_per_step * tc.steps() / train_seconds,
      1000 * (collective->seconds_in_collectives() - collective_at_start) / tc.steps(),
      (collective->bytes_in_collectives() - collective_bytes_at_start) / 1024.0 / tc.steps());
  if (!dump_params.empty())
    if (Status st = DumpParameters(model, dump_params); !st.ok()) return Fail(st);
  if (root)
    std::printf("peer-train: final held-out bits/byte %.3f over %zu bytes\n", BitsPerByte(model, heldout_text),
                heldout_text.size());
  int changed = 0;
  for (const auto& layer : model->PeerLayers())
    for (const auto& seg : layer->segments())
      if (seg->frozen() && seg->Checksum() != seg->frozen_checksum()) ++changed;
  if (grow_at > 0) std::printf("peer-train: frozen segments whose checksum changed after freezing: %d\n", changed);
  return changed == 0 ? 0 : 1;
}
