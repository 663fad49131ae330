// TrainingLoop: peerd's trainer thread and the operations the admin API asks of it.
//
// The thread takes batches from the spool (BatchSource), trains, and checkpoints every N steps or
// seconds; admin operations (add or freeze segments, evaluate, checkpoint, change the policy) are
// queued to it and run between steps, so the model has one owner and needs no locks. Status reads
// a snapshot under a mutex. Open() restores: frozen segments from the expert store, the rest from
// the last checkpoint.
//
// With several ranks (LoopOptions::ranks, docs/DESIGN.md §6) this is rank 0: it syncs the others to its
// restored model, announces every step and every change to the pool or the policy to them
// (service/rank_commands.h) and compares the ranks' model digests after each checkpoint and each
// change (service/rank_coordinator.h). A lost rank stops training for good (lost_rank_reason() says
// why, LoopOptions::on_ranks_lost is called): the program exits without a checkpoint, and
// restarting every rank resumes from the last one.
//
// The concerns around the loop live beside it: the policy's mapping onto the training
// configuration (service/policy.h), the pool as the API shows it (service/segment_report.h),
// Prometheus text (service/metrics_text.h).
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "core/collective.h"
#include "core/generator.h"
#include "core/model.h"
#include "core/trainer.h"
#include "proto/admin.pb.h"
#include "proto/ranks.pb.h"
#include "service/batch_source.h"
#include "service/checkpoint.h"
#include "service/expert_pool_store.h"
#include "service/export.h"
#include "service/metrics_text.h"
#include "service/net/spool.h"
#include "service/rank_coordinator.h"
#include "service/routed_training.h"
#include "service/segment_report.h"
#include "service/task_store.h"
#include "service/training_history.h"

namespace peerd {

struct LoopOptions {
  Config config;
  uint32_t checkpoint_every_steps = 200;
  double checkpoint_every_seconds = 60;
  double partial_batch_after_seconds = 2;  // train a smaller batch when no more data comes
  // How long an admin operation waits for the trainer thread to take it (it does between steps)
  // before it is answered Unavailable, not done.
  double trainer_wait_seconds = 120;
  RowDtype freeze_dtype = ROW_DTYPE_BF16;
  PoolStoreOptions pool;
  SpoolRetention retention;      // what trained text the spool keeps when the policy keeps trained text
  std::string training_journal;  // a file to append which spooled text each step trained to (empty: none)
  Collective* ranks = nullptr;   // the other ranks of a multi-rank job (not owned); null: one process
  // Called once, on the trainer thread, after a rank was lost while the loop runs: the program
  // shuts its ports and exits without a checkpoint (peerd raises SIGTERM to itself).
  std::function<void()> on_ranks_lost;
  // Fault injection for tests: called on the trainer thread before each training step with the
  // step about to run; whatever it throws is handled as a failed step.
  std::function<void(int64_t step)> before_step;
};

class TrainingLoop {
 public:
  static Status Open(const LoopOptions& options, std::shared_ptr<DataDirDb> db, Spool* spool,
                     std::unique_ptr<TrainingLoop>* out);
  ~TrainingLoop();  // Stop(false)

  void Start();
  // Stops the thread; with `checkpoint`, writes one last checkpoint first.
  Status Stop(bool checkpoint);

  // Admin operations (run on the trainer thread when it runs, else here).
  Status AddSegments(std::optional<uint32_t> layer, std::optional<uint32_t> n_keys, std::vector<uint32_t>* ids);
  Status FreezeSegment(uint32_t id, std::optional<uint32_t> layer, std::optional<RowDtype> dtype,
                       std::vector<uint32_t>* layers);
  Status Evaluate(const std::string& label, EvalRow* row);
  // Scores a text as an evaluation would, and says which segments answered; changes nothing (no
  // row, no task, the usage /v1/segments shows stays the last evaluation's).
  Status Score(const std::string& text, bool log_probs, ScoreReply* reply);
  // Continues a prompt (core/generator.h) on a copy of the model taken between two steps, so that
  // training goes on meanwhile (frozen segments are shared, not copied); `*step` is the step of
  // that copy. Under routing, the prompt's last bytes pick the branch, as for an evaluation. With
  // frozen rows read through the row cache, which is not thread-safe, the whole generation runs
  // on the trainer thread instead and pauses training for its length. Unavailable while
  // kMaxGenerations run already.
  static constexpr int kMaxGenerations = 2;
  Status Generate(const std::string& prompt, const GenerateOptions& options, Generated* out, uint64_t* step);
  // The model as a safetensors stream (service/export.h) through `write`, from a copy taken between
  // two steps: training goes on while it is written. InvalidArgument with rows not resident.
  Status Export(const std::function<bool(const char* data, size_t size)>& write);
  // Starts this new data directory's model from an export (ReadExport): every parameter, and each
  // segment the export had frozen frozen again here from the same rows, checked against the
  // export's checksum; a routed model's adapters, branches and router come with it; then a
  // checkpoint. The step, the learning-rate schedule and the optimizer's moments start afresh.
  // Call before Start. FailedPrecondition once anything was trained; InvalidArgument for an
  // export of another model.
  Status Import(const ExportManifest& manifest, const NamedTensors& tensors);
  // TaskStore::DeleteTask, between evaluations.
  Status DeleteTask(const std::string& name);
  Status Checkpoint();
  Status SetPolicy(const Policy& policy);
  Policy GetPolicy();
  // Pauses or resumes training; resuming after a training error (Snapshot's training_error)
  // clears it and retries.
  void SetPaused(bool paused);

  StatusReply Snapshot();
  SegmentsReply Segments();
  TaskStore& tasks() { return tasks_; }
  // The training history (service/training_history.h) after step `since`, at most `limit` points,
  // with the evaluation rows after it.
  Status History(uint64_t since, size_t limit, HistoryReply* reply);
  // The training side of GET /metrics.
  void Metrics(PrometheusText* out);
  // Why training stopped after losing a rank ("" while the ranks are all there).
  std::string lost_rank_reason() { return ranks_.lost_reason(); }

 private:
  // The trainer thread's bookkeeping between turns of Run().
  struct RunState {
    std::chrono::steady_clock::time_point last_checkpoint, last_data, window_start;
    double window_loss = 0;  // the window of steps /v1/status averages over
    int64_t window_steps = 0, window_tokens = 0;
    bool checkpoint_ok = true;  // the last checkpoint succeeded
    std::string ingest_error;   // the spool's write error as last logged
  };

  TrainingLoop(const LoopOptions& options, std::shared_ptr<DataDirDb> db, Spool* spool);
  Status Restore();

  // The trainer thread: one turn a step, or a wait of at most 100 ms.
  void Run();
  // Runs the admin operations queued since the last turn; false when the loop ends (stopping, or
  // a rank was lost). Sends the heartbeat the other ranks wait for while nothing trains.
  bool ServeQueue();
  bool paused();
  // Shows `state` and waits 100 ms or until woken (a queued operation, a stop).
  void WaitAWhile(const std::string& state);
  // Logs once when the spool stops acknowledging documents and once when it resumes.
  void LogIngestChanges(RunState* run);
  // The next batch, or an undefined tensor after waiting for data. `replayed`: its first rows
  // that are replayed text.
  torch::Tensor NextBatch(RunState* run, int64_t* replayed);
  // One optimizer step on `batch` (with the other ranks when there are several); false when a
  // rank was lost.
  bool TrainStep(torch::Tensor batch, int64_t replayed, StepStats* stats);
  // What follows a trained batch: routing statistics, the spool's consumed mark, the snapshot.
  // `seconds`: the step's time (its tokens/s in the history).
  void RecordStep(const torch::Tensor& batch, int64_t replayed, const StepStats& stats, double seconds, RunState* run);
  // Writes the periodic checkpoint when due; false when a rank was lost.
  void JournalFailure(const Status& st);  // logs the first failed journal write or sync
  bool CheckpointIfDue(RunState* run);
  // An exception escaped a turn: with several ranks they are lost (false: the loop ends);
  // alone, training stops with it (StopTrainingAfter).
  bool TurnFailed(const std::string& what, const SpoolCursor* untrained_from);
  // Log it, pause training with it as the training error, and when the batch was not trained
  // (`untrained_from` set), take the next batch from there again so that no document is skipped.
  void StopTrainingAfter(const std::string& what, const SpoolCursor* untrained_from);

  Status RunOnTrainer(const std::function<Status()>& op);
  // Writes a checkpoint, then prunes the trained text it covers from the spool: all of it when the
  // policy keeps no trained text, else what options_.retention does not keep.
  Status CheckpointNow();
  // A checkpoint right after an acknowledged change to the pool, so that a restart finds the model
  // state that goes with it (a frozen branch's adapter, an added segment's id); a failure is logged
  // and shown as checkpoint_error, the periodic checkpoints retry, and the caller is told (the
  // change itself stays made).
  Status CheckpointAfterChange(const std::string& what);
  // Trainer thread only: refreshes the pool's part of the snapshots after a change to the pool.
  void RefreshSegments();
  // Compares the ranks' models into the snapshot (no-op for one process).
  Status CompareRanks();
  // RankCoordinator's on_lost: stop for good, refuse admin operations from now on.
  void OnRanksLost(const Status& why);
  // The verify thread: checks the checksums of the frozen segments the pool store opened without
  // reading their rows (cached residency); a bad one stops training with the error naming it.
  void VerifyPoolInBackground();

  LoopOptions options_;
  std::shared_ptr<DataDirDb> db_;
  Spool* spool_;
  std::unique_ptr<ExpertStore> store_;
  std::unique_ptr<ExpertPoolStore> pool_;
  Checkpointer checkpointer_;
  TaskStore tasks_;
  TrainingHistory history_;
  TransformerLM model_{nullptr};
  std::unique_ptr<Trainer> trainer_;
  std::unique_ptr<BatchSource> batches_;
  TrainingJournal journal_;
  std::atomic<int> generations_{0};  // Generate calls running
  bool journal_failed_ = false;      // a write failed and was logged
  RoutedTraining routing_;
  RankCoordinator ranks_;

  std::mutex mu_;  // guards the queue, flags and the snapshot below
  std::condition_variable wake_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false, paused_ = false, running_ = false;
  std::thread thread_;
  std::thread verify_thread_;
  std::atomic<bool> verify_stop_{false};
  StatusReply snapshot_;
  SegmentsReply segments_snapshot_;
  uint64_t tokens_trained_ = 0, last_checkpoint_step_ = 0;  // written on the trainer thread under mu_
  StepTimeHistogram step_seconds_;                          // likewise
  std::string checkpoint_error_;                            // guarded by mu_
  std::string training_error_;                              // guarded by mu_
  // Time in the collectives of training steps (command, batch, gradients, loss) since start.
  double step_collective_seconds_ = 0;
  int64_t multi_rank_steps_ = 0;
  UsageBySegment usage_;  // over the last evaluation
  std::mutex report_mu_;  // guards the forgetting report /metrics shows, and the rows' version it is of
  ForgettingReport report_;
  uint64_t report_version_ = UINT64_MAX;
  // How an evaluation runs now: its byte budget and, once routing started, each window's route.
  EvalOptions EvalOptionsNow(int64_t max_bytes) const;
};

}  // namespace peerd
