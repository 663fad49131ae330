#include "service/training_loop.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <future>
#include <map>

#include "core/check_ok.h"
#include "core/config.h"
#include "core/evaluator.h"
#include "core/rank_sync.h"
#include "core/unix_time.h"
#include "experts_store/row_dtype.h"
#include "service/export.h"
#include "service/metrics_text.h"
#include "service/net/admin_requests.h"
#include "service/policy.h"
#include "service/rank_commands.h"

#include <spdlog/spdlog.h>

namespace peerd {

using Clock = std::chrono::steady_clock;

namespace {

// The first segment of the first PEER layer: the base's branch id in the router (0 for a dense model).
int64_t FirstSegment(const TransformerLM& model) {
  auto layers = model->PeerLayers();
  return layers.empty() || layers[0]->segments().empty() ? 0 : layers[0]->segments()[0]->id();
}

// The physical memory of this machine: what a new segment is sized against.
uint64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? uint64_t(pages) * uint64_t(page) : UINT64_MAX;
}

}  // namespace

TrainingLoop::TrainingLoop(const LoopOptions& options, std::shared_ptr<DataDirDb> db, Spool* spool)
    : options_(options),
      db_(db),
      spool_(spool),
      checkpointer_(db),
      tasks_(db),
      history_(db),
      ranks_(options.ranks, [this](const Status& why) { OnRanksLost(why); }) {}

Status TrainingLoop::Open(const LoopOptions& options, std::shared_ptr<DataDirDb> db, Spool* spool,
                          std::unique_ptr<TrainingLoop>* out) {
  std::unique_ptr<TrainingLoop> loop(new TrainingLoop(options, std::move(db), spool));
  if (Status st = loop->Restore(); !st.ok()) return st;
  *out = std::move(loop);
  return Status::OK();
}

Status TrainingLoop::Restore() {
  const Config& c = options_.config;
  torch::manual_seed(c.train().seed());
  model_ = TransformerLM(c.model());
  trainer_ = std::make_unique<Trainer>(model_, c.train());
  store_ = std::make_unique<ExpertStore>(db_);
  pool_ = std::make_unique<ExpertPoolStore>(store_.get(), options_.pool);
  if (Status st = pool_->Restore(model_); !st.ok()) return st;
  CheckpointMeta meta;
  bool found = false;
  if (Status st = checkpointer_.Load(*trainer_, &meta, &found); !st.ok()) return st;
  trainer_->RefreshParameters();
  if (Status st = history_.Open(found ? meta.step() : 0); !st.ok()) return st;
  SpoolCursor cursor;
  if (found) {
    cursor = {std::max<uint64_t>(meta.spool_next_index(), 1),
              meta.spool_offset(),
              meta.consumed_bytes(),
              {meta.trained_tokens().begin(), meta.trained_tokens().end()}};
    tokens_trained_ = meta.tokens_trained();
    last_checkpoint_step_ = meta.step();
    if (meta.has_policy()) {
      if (meta.policy().has_freeze_dtype())
        options_.freeze_dtype = ParseRowDtype(meta.policy().freeze_dtype()).value_or(ROW_DTYPE_BF16);
      trainer_->SetConfig(WithPolicy(trainer_->config(), meta.policy()));
    }
  }
  routing_ = RoutedTraining(FirstSegment(model_));
  if (found && meta.has_routing())
    if (Status st = routing_.FromProto(meta.routing(), model_); !st.ok()) return st;
  // A segment frozen after the checkpoint (the store is the truth) takes its adapter with it.
  for (const auto& [id, adapter] : model_->adapters()) {
    bool has_segment = false, all_frozen = true;
    for (const auto& layer : model_->PeerLayers())
      for (const auto& seg : layer->segments())
        if (seg->id() == id) has_segment = true, all_frozen &= seg->frozen();
    if (!adapter->frozen() && has_segment && all_frozen) {
      spdlog::warn("segment {} was frozen after the last checkpoint: its adapter is frozen as that checkpoint had it",
                   id);
      if (Status st = model_->FreezeAdapter(id); !st.ok()) return st;
    }
  }
  trainer_->SetConfig(routing_.Effective(trainer_->config()));
  // The teacher is not checkpointed: after a restart past the first domain (a segment was added)
  // it is the model as restored, which drifted at most one checkpoint interval from the teacher.
  bool grown = false;
  for (const auto& layer : model_->PeerLayers()) grown |= layer->segments().size() > 1;
  if (grown && trainer_->config().distill_weight() > 0 && !routing_.started())
    trainer_->SetTeacher(CopyForTeacher(model_));
  spool_->SetConsumed(cursor.index, cursor.consumed_bytes);
  batches_ = std::make_unique<BatchSource>(spool_, cursor, c.train().seed() + trainer_->step());
  if (ranks_.active()) {
    // The other ranks build the configured model, then take this restored one whole.
    Config shared = options_.config;
    *shared.mutable_train() = trainer_->config();  // the policy as restored, not as the file had it
    if (Status st = CheckDataParallel(shared); !st.ok()) return st;
    trainer_->set_collective(options_.ranks);
    if (Status st = ShareConfig(*options_.ranks, &shared); !st.ok()) return st;
    if (Status st = SyncFromRankZero(*options_.ranks, *trainer_); !st.ok()) return st;
    snapshot_.set_world_size(static_cast<uint32_t>(options_.ranks->world_size()));
    if (Status st = CompareRanks(); !st.ok()) return st;
    if (!snapshot_.ranks_agree()) return Status::Corruption("the ranks disagree right after taking rank 0's model");
  }
  if (!options_.training_journal.empty()) {
    if (Status st = journal_.Open(options_.training_journal); !st.ok()) return st;
    if (Status st = journal_.Started(trainer_->step(), cursor.index, cursor.offset); !st.ok()) return st;
  }
  RefreshSegments();
  snapshot_.set_step(trainer_->step());
  snapshot_.set_learning_rate(trainer_->NextLearningRate());
  return Status::OK();
}

Status TrainingLoop::CompareRanks() {
  std::vector<RankInfo> ranks;
  bool agree = true;
  if (Status st = ranks_.Compare(*trainer_, &ranks, &agree); !st.ok()) return st;
  if (!ranks_.active()) return Status::OK();
  std::lock_guard<std::mutex> lock(mu_);
  snapshot_.clear_ranks();
  for (const RankInfo& r : ranks) *snapshot_.add_ranks() = r;
  snapshot_.set_ranks_agree(agree);
  return Status::OK();
}

void TrainingLoop::OnRanksLost(const Status& why) {
  spdlog::error(
      "training stopped: {}. Nothing acked is lost: restart every rank (same --world-size and "
      "--rendezvous) to resume from the checkpoint at step {}",
      why.ToString(), last_checkpoint_step_);
  bool running;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;  // admin operations are refused from now on
    snapshot_.set_state("stopped: a rank was lost");
    running = running_;
  }
  if (running && options_.on_ranks_lost) options_.on_ranks_lost();
}

TrainingLoop::~TrainingLoop() { Stop(false); }

void TrainingLoop::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (running_) return;
  running_ = true;
  stopping_ = false;
  thread_ = std::thread([this] { Run(); });
  if (pool_->unverified() > 0 && !verify_thread_.joinable()) {
    verify_stop_ = false;
    verify_thread_ = std::thread([this] { VerifyPoolInBackground(); });
  }
}

void TrainingLoop::VerifyPoolInBackground() {
  const auto start = Clock::now();
  const size_t total = pool_->unverified();
  size_t verified = 0;
  const Status st = pool_->VerifyRestored([this] { return verify_stop_.load(); }, &verified);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (st.ok()) {
    if (verified == total)
      spdlog::info(
          "verified the rows of {} frozen segments (read through the row cache) against their checksums in "
          "{:.1f} s",
          verified, seconds);
    return;
  }
  const std::string why = st.ToString() +
                          " (found by the check of the frozen rows after opening; restore the data directory from a "
                          "backup — resuming trains on with the damaged segment)";
  spdlog::error("training stops: {}", why);
  std::lock_guard<std::mutex> lock(mu_);
  training_error_ = why;
  paused_ = true;
}

Status TrainingLoop::Stop(bool checkpoint) {
  verify_stop_ = true;
  if (verify_thread_.joinable()) verify_thread_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!running_) return checkpoint ? CheckpointNow() : Status::OK();
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_ = false;
    stopping_ = false;
    // After a lost rank the last batch taken may not have been trained: a checkpoint now would
    // skip it. The last checkpoint stays the one to resume from.
    if (std::string lost = ranks_.lost_reason(); !lost.empty())
      return Status::FailedPrecondition("a rank was lost: " + lost);
  }
  return checkpoint ? CheckpointNow() : Status::OK();
}

Status TrainingLoop::RunOnTrainer(const std::function<Status()>& op) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) return Status::FailedPrecondition("peerd is stopping: try again after it restarts");
  if (!running_) {
    lock.unlock();
    return op();
  }
  // The trainer takes the operation between steps. If it has not taken it by the deadline (a step
  // or an evaluation ahead of it runs long), the caller is told so and the operation is dropped
  // from the queue, never run late behind an answer that said it was not done; once taken, it
  // runs to its end and the caller waits for that.
  enum { kQueued, kTaken, kAbandoned };
  struct Pending {
    std::promise<Status> done;
    std::atomic<int> state{kQueued};
  };
  auto pending = std::make_shared<Pending>();
  std::future<Status> result = pending->done.get_future();
  // An exception (LibTorch throws on a failed allocation) goes back to the caller, who answers it
  // as an internal error; escaping here it would end the trainer thread and with it peerd.
  queue_.push_back([op, pending] {
    int queued = kQueued;
    if (!pending->state.compare_exchange_strong(queued, kTaken)) return;  // the caller gave up
    try {
      pending->done.set_value(op());
    } catch (...) {
      pending->done.set_exception(std::current_exception());
    }
  });
  lock.unlock();
  wake_.notify_all();
  const auto wait = std::chrono::duration<double>(options_.trainer_wait_seconds);
  if (result.wait_for(wait) == std::future_status::timeout) {
    int queued = kQueued;
    if (pending->state.compare_exchange_strong(queued, kAbandoned)) {
      lock.lock();
      return Status::Unavailable("the trainer did not take this request within " +
                                 std::to_string(static_cast<int>(std::ceil(options_.trainer_wait_seconds))) +
                                 " s (it is " + snapshot_.state() + ", step " + std::to_string(snapshot_.step()) +
                                 "); nothing was done: try again");
    }
  }
  return result.get();
}

void TrainingLoop::Run() {
  RunState run;
  run.last_checkpoint = run.last_data = run.window_start = Clock::now();
  for (;;) {
    SpoolCursor before = batches_->cursor();  // where the batch about to be taken starts
    bool stepped = false;                     // the batch taken was trained
    // An exception from here on (LibTorch throws on a failed allocation; a store read can fail in
    // cached residency) must not end this thread, and with it peerd: it stops training instead.
    try {
      if (!ServeQueue()) break;
      if (paused()) {
        WaitAWhile("paused");
        continue;
      }
      LogIngestChanges(&run);
      if (!routing_.CanTrain(model_)) {
        // Waiting here is not a lack of data: once a branch opens, give its text the usual time to
        // make a full batch.
        run.last_data = Clock::now();
        WaitAWhile("waiting for a segment: routed training trains only an open branch; add one (peerctl segments add)");
        continue;
      }
      int64_t replayed = 0;
      before = batches_->cursor();
      torch::Tensor batch = NextBatch(&run, &replayed);
      if (!batch.defined()) continue;
      if (options_.before_step) options_.before_step(trainer_->step());
      StepStats stats;
      const auto step_start = Clock::now();
      if (!TrainStep(batch, replayed, &stats)) break;
      stepped = true;
      JournalFailure(journal_.Trained(trainer_->step(), batches_->last_fresh()));
      RecordStep(batch, replayed, stats, std::chrono::duration<double>(Clock::now() - step_start).count(), &run);
      if (!CheckpointIfDue(&run)) break;
    } catch (const std::exception& e) {
      if (!TurnFailed(e.what(), stepped ? nullptr : &before)) break;
    } catch (...) {
      if (!TurnFailed("an unknown exception", stepped ? nullptr : &before)) break;
    }
  }
  // Operations queued while the loop was ending (a rank lost) still get their answer.
  std::deque<std::function<void()>> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    rest.swap(queue_);
  }
  for (auto& op : rest) op();
}

bool TrainingLoop::ServeQueue() {
  std::deque<std::function<void()>> ops;
  bool stop;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop = stopping_;
    ops.swap(queue_);
  }
  for (auto& op : ops) op();  // even when stopping: their callers are waiting for an answer
  if (!ranks_.lost_reason().empty()) return false;
  if (stop) {
    ranks_.TellStop();
    return false;
  }
  if (ranks_.HeartbeatDue()) {
    RankCommand idle;
    idle.set_kind(RankCommand::IDLE);
    if (!ranks_.Tell(idle).ok()) return false;
  }
  return true;
}

bool TrainingLoop::paused() {
  std::lock_guard<std::mutex> lock(mu_);
  return paused_;
}

void TrainingLoop::WaitAWhile(const std::string& state) {
  std::unique_lock<std::mutex> lock(mu_);
  snapshot_.set_state(state);
  wake_.wait_for(lock, std::chrono::milliseconds(100));
}

void TrainingLoop::LogIngestChanges(RunState* run) {
  // The spool's write errors are not the trainer's, but it is the one thread that is always
  // looking: say so in the log once when acks stop and once when they resume.
  if (std::string e = spool_->stats().write_error; e != run->ingest_error) {
    if (!e.empty())
      spdlog::error("ingest stopped: documents are not being acknowledged: {}", e);
    else
      spdlog::info("ingest resumed: the spool writes again");
    run->ingest_error = e;
  }
}

torch::Tensor TrainingLoop::NextBatch(RunState* run, int64_t* replayed) {
  const int64_t T = options_.config.model().context();
  const bool idle = Clock::now() - run->last_data > std::chrono::duration<double>(options_.partial_batch_after_seconds);
  Status st;
  torch::Tensor batch =
      batches_->Next(options_.config.train().batch_size(), T, trainer_->config().replay_ratio(), idle, &st, replayed);
  if (!st.ok()) spdlog::error("reading the spool: {}", st.ToString());
  if (!batch.defined()) {
    WaitAWhile("waiting for data");
    return batch;
  }
  run->last_data = Clock::now();
  return batch;
}

bool TrainingLoop::TrainStep(torch::Tensor batch, int64_t replayed, StepStats* stats) {
  if (!ranks_.active()) {
    *stats = trainer_->Step(batch, replayed);
    return true;
  }
  RankCommand step;
  step.set_kind(RankCommand::STEP);
  step.set_batch_rows(static_cast<uint32_t>(batch.size(0)));
  step.set_seq_len(static_cast<uint32_t>(batch.size(1) - 1));
  step.set_replayed(static_cast<uint32_t>(replayed));
  const double in_collectives = options_.ranks->seconds_in_collectives();
  Status st = ranks_.Tell(step);
  if (st.ok()) st = ranks_.Check(ShareBatch(*options_.ranks, step, &batch));
  if (st.ok()) st = ranks_.Check(trainer_->Step(batch, replayed, stats));
  if (!st.ok()) return false;
  step_collective_seconds_ += options_.ranks->seconds_in_collectives() - in_collectives;
  ++multi_rank_steps_;
  return true;
}

void TrainingLoop::RecordStep(const torch::Tensor& batch, int64_t replayed, const StepStats& stats, double seconds,
                              RunState* run) {
  routing_.AfterStep(batch.slice(0, replayed));
  const int64_t tokens = batch.size(0) * options_.config.model().context();
  HistoryPoint point;
  point.set_step(trainer_->step());
  point.set_unix_ms(UnixMillis());
  point.set_loss(stats.loss);
  point.set_bits_per_byte(stats.loss / std::log(2.0));
  point.set_learning_rate(stats.lr);
  point.set_grad_norm(stats.grad_norm);
  point.set_tokens_per_second(seconds > 0 ? tokens / seconds : 0);
  history_.Add(point);
  run->window_loss += stats.loss;
  ++run->window_steps;
  run->window_tokens += tokens;
  spool_->SetConsumed(batches_->cursor().index, batches_->cursor().consumed_bytes);
  const double secs = std::chrono::duration<double>(Clock::now() - run->window_start).count();
  std::lock_guard<std::mutex> lock(mu_);  // Snapshot() reads tokens_trained_ under it
  tokens_trained_ += tokens;
  step_seconds_.Observe(seconds);
  snapshot_.set_state("training");
  snapshot_.set_step(trainer_->step());
  snapshot_.set_learning_rate(trainer_->NextLearningRate());
  if (ranks_.active()) snapshot_.set_collective_seconds_per_step(step_collective_seconds_ / multi_rank_steps_);
  snapshot_.set_tokens_trained(tokens_trained_);
  if (run->window_steps >= 10 || secs > 5) {
    snapshot_.set_recent_loss(run->window_loss / run->window_steps);
    snapshot_.set_recent_bits_per_byte(run->window_loss / run->window_steps / std::log(2.0));
    snapshot_.set_tokens_per_second(run->window_tokens / secs);
    run->window_loss = 0;
    run->window_steps = run->window_tokens = 0;
    run->window_start = Clock::now();
  }
}

void TrainingLoop::JournalFailure(const Status& st) {
  // The journal is an audit: training and checkpoints go on without it.
  if (st.ok() || journal_failed_) return;
  spdlog::error("{}: the training journal is incomplete from step {} on (said once)", st.ToString(), trainer_->step());
  journal_failed_ = true;
}

bool TrainingLoop::CheckpointIfDue(RunState* run) {
  // After a failed checkpoint (disk full) the next try waits the full interval, not one step.
  const bool due_by_time =
      Clock::now() - run->last_checkpoint > std::chrono::duration<double>(options_.checkpoint_every_seconds);
  const bool due_by_steps =
      options_.checkpoint_every_steps && trainer_->step() - last_checkpoint_step_ >= options_.checkpoint_every_steps;
  if (!due_by_time && !(due_by_steps && run->checkpoint_ok)) return true;
  Status c = CheckpointNow();
  if (!c.ok())
    spdlog::error("checkpoint failed, training goes on from memory and retries in {} s: {}",
                  options_.checkpoint_every_seconds, c.ToString());
  else if (!run->checkpoint_ok)
    spdlog::info("checkpoint at step {} written again after failures", trainer_->step());
  else
    spdlog::info("checkpoint at step {} ({} tokens trained)", trainer_->step(), tokens_trained_);
  run->checkpoint_ok = c.ok();
  run->last_checkpoint = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    checkpoint_error_ = c.ok() ? "" : c.ToString();
  }
  return CompareRanks().ok();
}

bool TrainingLoop::TurnFailed(const std::string& what, const SpoolCursor* untrained_from) {
  if (ranks_.active()) {  // the ranks cannot agree on what was trained: they stop together
    (void)ranks_.Check(Status::FailedPrecondition("a training step failed: " + what));
    return false;
  }
  StopTrainingAfter(what, untrained_from);
  return true;
}

Status TrainingLoop::CheckpointNow() {
  CheckpointMeta meta;
  meta.set_tokens_trained(tokens_trained_);
  meta.set_spool_next_index(batches_->cursor().index);
  meta.set_spool_offset(batches_->cursor().offset);
  meta.set_consumed_bytes(batches_->cursor().consumed_bytes);
  for (const auto& [task, tokens] : batches_->cursor().tokens_by_task) (*meta.mutable_trained_tokens())[task] = tokens;
  *meta.mutable_policy() = PolicyOf(trainer_->config(), options_.freeze_dtype);
  *meta.mutable_routing() = routing_.ToProto();
  JournalFailure(journal_.Sync());  // what the checkpoint covers is in the journal
  // The history is a record, not state: a failure is logged and the next checkpoint writes it.
  if (Status st = history_.Flush(); !st.ok()) spdlog::error("{} (the next checkpoint tries again)", st.ToString());
  if (Status st = checkpointer_.Save(*trainer_, meta); !st.ok()) return st;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last_checkpoint_step_ = trainer_->step();
    snapshot_.set_last_checkpoint_step(last_checkpoint_step_);
    if (routing_.started()) *snapshot_.mutable_routing() = routing_.Info(model_);
  }
  // Documents before the checkpoint's cursor are trained, and a restart resumes after them: their
  // text is no longer needed unless the policy replays it, and then only what retention keeps.
  uint64_t prune_before = meta.spool_next_index();
  if (trainer_->config().keep_trained_text()) {
    if (Status st = spool_->RetentionHorizon(options_.retention, prune_before, UnixMillis(), &prune_before); !st.ok()) {
      spdlog::error("applying the spool's retention bound (the next checkpoint tries again): {}", st.ToString());
      return Status::OK();
    }
  }
  if (Status st = spool_->Prune(prune_before); !st.ok())
    spdlog::error("pruning trained text from the spool (the next checkpoint tries again): {}", st.ToString());
  return Status::OK();
}

Status TrainingLoop::CheckpointAfterChange(const std::string& what) {
  Status c = CheckpointNow();
  {
    std::lock_guard<std::mutex> lock(mu_);
    checkpoint_error_ = c.ok() ? "" : c.ToString();
  }
  if (c.ok()) return c;
  spdlog::error("the checkpoint after {} failed (the periodic checkpoints retry): {}", what, c.ToString());
  return Status::IOError(what + " is done in memory, but the checkpoint that makes it survive a crash failed (" +
                         c.message() + "): free the disk, then run peerctl checkpoint");
}

Status TrainingLoop::Checkpoint() {
  return RunOnTrainer([this]() -> Status {
    if (Status st = CheckpointNow(); !st.ok()) return st;
    return CompareRanks();
  });
}

Status TrainingLoop::AddSegments(std::optional<uint32_t> layer, std::optional<uint32_t> n_keys,
                                 std::vector<uint32_t>* ids) {
  return RunOnTrainer([&]() -> Status {
    auto layers = model_->PeerLayers();
    if (layers.empty()) return Status::FailedPrecondition("this model has no PEER layers (model.ffn is dense)");
    if (layer && *layer >= layers.size())
      return Status::NotFound("PEER layer " + std::to_string(*layer) + " does not exist; the model has " +
                              std::to_string(layers.size()) + " (0-based)");
    const bool routed = trainer_->config().routed();
    if (routed && layer)
      return Status::InvalidArgument("with train.routed a segment is a branch in every PEER layer: omit the layer");
    if (routed && routing_.started() && routing_.CanTrain(model_))
      return Status::FailedPrecondition(
          "a routed branch is still training: freeze it first (peerctl segments freeze ID), "
          "then add the next one");
    const uint32_t keys = n_keys.value_or(options_.config.model().peer().n_keys());
    if (Status st = CheckNewSegmentSize(keys, options_.config.model().d_model(), PhysicalMemoryBytes()); !st.ok())
      return st;
    // A new segment starts a new domain: the model as it is now (before the segment) is what
    // distillation on replayed rows holds the model to from here on.
    TransformerLM teacher =
        trainer_->config().distill_weight() > 0 && !routed ? CopyForTeacher(model_) : TransformerLM(nullptr);
    ids->clear();
    RankCommand add;
    add.set_kind(RankCommand::ADD_SEGMENTS);
    for (size_t l = 0; l < layers.size(); ++l) {
      if (layer && l != *layer) continue;
      int64_t id = 0;
      if (Status st = trainer_->AddSegment(l, keys, &id); !st.ok()) return st;
      ids->push_back(static_cast<uint32_t>(id));
      PoolSegment* s = add.add_added();
      s->set_layer(static_cast<uint32_t>(l));
      s->set_id(static_cast<uint32_t>(id));
      s->set_n_keys(keys);
    }
    if (routed) {
      for (uint32_t id : *ids)
        if (id != ids->front())
          return Status::Corruption("the PEER layers gave the new segment different ids (" +
                                    std::to_string(ids->front()) + ", " + std::to_string(id) +
                                    "): a routed branch needs one id");
      if (Status st = routing_.Open(*trainer_, ids->front()); !st.ok()) return st;
    }
    if (ranks_.active()) {
      Status told = ranks_.Tell(add);
      if (told.ok()) told = ranks_.Check(ShareAddedSegments(*options_.ranks, *trainer_, add));
      if (told.ok()) told = CompareRanks();
      if (!told.ok()) return told;
    }
    if (!teacher.is_empty()) trainer_->SetTeacher(teacher);
    RefreshSegments();
    return CheckpointAfterChange("adding segment " + std::to_string(ids->front()));
  });
}

Status TrainingLoop::FreezeSegment(uint32_t id, std::optional<uint32_t> layer, std::optional<RowDtype> dtype,
                                   std::vector<uint32_t>* frozen_layers) {
  return RunOnTrainer([&]() -> Status {
    if (trainer_->config().routed() && layer)
      return Status::InvalidArgument(
          "with train.routed a segment is a branch in every PEER layer and freezes whole: omit the layer");
    auto layers = model_->PeerLayers();
    frozen_layers->clear();
    bool known = false;
    for (size_t l = 0; l < layers.size(); ++l) {
      if (layer && l != *layer) continue;
      for (const auto& seg : layers[l]->segments()) {
        if (seg->id() != id) continue;
        known = true;
        if (seg->frozen()) continue;
        const RowDtype rows = dtype.value_or(options_.freeze_dtype);
        Status st = trainer_->FreezeSegment(l, id, pool_->Freezing(rows, trainer_->step(), tokens_trained_));
        if (!st.ok()) return st;
        frozen_layers->push_back(static_cast<uint32_t>(l));
        // Frozen here and in the store first: the other ranks follow only a freeze that happened.
        RankCommand freeze;
        freeze.set_kind(RankCommand::FREEZE);
        freeze.set_layer(static_cast<uint32_t>(l));
        freeze.set_id(id);
        freeze.set_bf16(rows == ROW_DTYPE_BF16);
        if (Status told = ranks_.Tell(freeze); !told.ok()) return told;
      }
    }
    if (Status st = CompareRanks(); !st.ok()) return st;
    if (!known)
      return Status::NotFound("no segment " + std::to_string(id) +
                              (layer ? " in layer " + std::to_string(*layer) : ""));
    if (frozen_layers->empty())
      return Status::FailedPrecondition("segment " + std::to_string(id) + " is already frozen");
    RefreshSegments();
    return CheckpointAfterChange("freezing segment " + std::to_string(id));
  });
}

Status TrainingLoop::Evaluate(const std::string& label, EvalRow* row) {
  return RunOnTrainer([&]() -> Status {
    std::vector<HeldOutTask> tasks;
    if (Status st = tasks_.Tasks(&tasks); !st.ok()) return st;
    if (tasks.empty()) return Status::FailedPrecondition("no held-out tasks registered: POST /v1/tasks first");
    EvalRow r;
    r.set_step(trainer_->step());
    r.set_label(label);
    r.set_unix_ms(UnixMillis());
    // Text taken for a batch is trained by the time an evaluation runs (both on this thread).
    for (const auto& [task, tokens] : batches_->cursor().tokens_by_task) (*r.mutable_trained_tokens())[task] = tokens;
    EvalOptions eo = EvalOptionsNow(options_.config.train().eval_bytes());
    // Progress for /v1/status, task by task: what each task costs is its (capped) held-out bytes.
    auto scored_bytes = [&](const HeldOutTask& t) {
      return eo.max_bytes > 0 ? std::min<uint64_t>(t.text.size(), eo.max_bytes) : t.text.size();
    };
    EvalProgress progress;
    progress.set_tasks(static_cast<uint32_t>(tasks.size()));
    for (const HeldOutTask& task : tasks) progress.set_bytes(progress.bytes() + scored_bytes(task));
    const auto start = Clock::now();
    auto show = [&](const EvalProgress* p) {
      std::lock_guard<std::mutex> lock(mu_);
      if (p)
        *snapshot_.mutable_evaluation() = *p;
      else
        snapshot_.clear_evaluation();
    };
    const std::shared_ptr<void> clear_at_exit(nullptr, [&](void*) { show(nullptr); });  // also on a throw
    StartUsageRecording(model_);
    CountUsageWhileScoring(model_, &eo);
    for (const HeldOutTask& task : tasks) {
      progress.set_seconds(std::chrono::duration<double>(Clock::now() - start).count());
      show(&progress);
      r.add_tasks(task.name);
      r.add_measures(task.measures);
      r.add_bits_per_byte(BitsPerByte(model_, task.text, eo));
      progress.set_tasks_done(progress.tasks_done() + 1);
      progress.set_bytes_done(progress.bytes_done() + scored_bytes(task));
    }
    usage_ = StopUsageRecording(model_);
    RefreshSegments();
    if (Status st = tasks_.AppendRow(r); !st.ok()) return st;
    *row = r;
    return Status::OK();
  });
}

Status TrainingLoop::History(uint64_t since, size_t limit, HistoryReply* reply) {
  reply->Clear();
  std::vector<HistoryPoint> points;
  bool more = false;
  if (Status st = history_.Read(since, limit, &points, &more); !st.ok()) return st;
  for (HistoryPoint& p : points) *reply->add_steps() = std::move(p);
  std::vector<EvalRow> rows;
  if (Status st = tasks_.Rows(&rows); !st.ok()) return st;
  for (EvalRow& r : rows)
    if (r.step() > since) *reply->add_evals() = std::move(r);
  reply->set_more(more);
  reply->set_next_since(points.empty() ? since : points.back().step() + points.back().steps() - 1);
  return Status::OK();
}

EvalOptions TrainingLoop::EvalOptionsNow(int64_t max_bytes) const {
  EvalOptions eo;
  eo.max_bytes = max_bytes;
  return routing_.Options(eo, trainer_->config().route_context(), trainer_->config().route_candidates());
}

Status TrainingLoop::Score(const std::string& text, bool log_probs, ScoreReply* reply) {
  return RunOnTrainer([&]() -> Status {
    if (text.size() < 2) return Status::InvalidArgument("a text to score needs at least 2 bytes");
    EvalOptions eo = EvalOptionsNow(0);
    StartUsageRecording(model_);
    CountUsageWhileScoring(model_, &eo);
    const TextScore score = ScoreText(model_, text, eo, log_probs);
    const UsageBySegment usage = StopUsageRecording(model_);
    reply->Clear();
    reply->set_bits_per_byte(score.bits_per_byte);
    reply->set_bytes(text.size());
    reply->set_predicted_bytes(static_cast<uint64_t>(score.predicted_bytes));
    for (size_t i = 0; i < score.log_probs.size(); ++i) {
      reply->add_log_probs(score.log_probs[i]);
      reply->add_offsets(static_cast<uint64_t>(score.predicted[i]));
    }
    AddSegmentShares(usage, reply);
    return Status::OK();
  });
}

Status TrainingLoop::Generate(const std::string& prompt, const GenerateOptions& options, Generated* out,
                              uint64_t* step) {
  if (generations_.fetch_add(1) >= kMaxGenerations) {
    --generations_;
    return Status::Unavailable(std::to_string(kMaxGenerations) +
                               " generations are running already: try again when one ends");
  }
  struct Release {
    std::atomic<int>& running;
    ~Release() { --running; }
  } release{generations_};
  if (prompt.empty()) return Status::InvalidArgument("a prompt needs at least one byte");
  TransformerLM copy{nullptr};
  Status st = RunOnTrainer([&]() -> Status {
    *step = static_cast<uint64_t>(trainer_->step());
    const TrainConfig& tc = trainer_->config();
    const Route route = routing_.RouteForPrompt(model_, prompt, tc.route_context(), tc.route_candidates());
    bool resident = true;
    for (const auto& layer : model_->PeerLayers())
      for (const auto& s : layer->segments()) resident &= s->resident();
    if (resident) {
      copy = CopyForTeacher(model_);
      return copy->SetRoute(route);
    }
    struct RestoreRoute {
      TransformerLM& model;
      Route route;
      ~RestoreRoute() { CheckOk(model->SetRoute(route)); }
    } restore{model_, model_->route()};
    if (Status set = model_->SetRoute(route); !set.ok()) return set;
    *out = peerd::Generate(model_, prompt, options);
    return Status::OK();
  });
  if (!st.ok() || copy.is_empty()) return st;
  *out = peerd::Generate(copy, prompt, options);
  return Status::OK();
}

Status TrainingLoop::Export(const std::function<bool(const char* data, size_t size)>& write) {
  TransformerLM copy{nullptr};
  ExportManifest manifest;
  NamedTensors tensors;
  Status st = RunOnTrainer([&]() -> Status {
    for (const auto& layer : model_->PeerLayers())
      for (const auto& s : layer->segments())
        if (!s->resident())
          return Status::InvalidArgument("segment " + std::to_string(s->id()) +
                                         "'s rows are not held in memory (cached residency): export needs every "
                                         "row resident; restart peerd with --residency resident to export");
    copy = CopyForTeacher(model_);
    manifest.set_format("peerd-export-1");
    *manifest.mutable_config() = options_.config;
    *manifest.mutable_config()->mutable_train() = trainer_->config();
    manifest.set_step(static_cast<uint64_t>(trainer_->step()));
    std::vector<SegmentManifest> frozen;
    if (Status m = store_->Manifests(&frozen); !m.ok()) return m;
    for (const SegmentManifest& m : frozen) *manifest.add_frozen() = m;
    if (Status st = ExportedTensors(*copy, &tensors); !st.ok()) return st;
    if (routing_.started()) {
      *manifest.mutable_routing() = routing_.Info(model_);
      const std::string router = routing_.branches().router.Serialize();
      tensors.emplace_back(kRouterTensor, torch::from_blob(const_cast<char*>(router.data()),
                                                           {static_cast<int64_t>(router.size())}, torch::kByte)
                                              .clone());
    }
    return Status::OK();
  });
  if (!st.ok()) return st;
  return WriteSafetensors(tensors, manifest, write);
}

Status TrainingLoop::Import(const ExportManifest& manifest, const NamedTensors& tensors) {
  return RunOnTrainer([&]() -> Status {
    if (trainer_->step() != 0 || spool_->last_index() != 0)
      return Status::FailedPrecondition("--import starts a new data directory: this one has trained or holds text");
    // A routed model's adapters, by the ids their tensors carry ("adapter<id>.…"), before the copy.
    std::map<int64_t, bool> adapters;  // id -> with trunk deltas
    const torch::Tensor* router = nullptr;
    for (const auto& [name, t] : tensors) {
      if (name == kRouterTensor) router = &t;
      if (name.rfind("adapter", 0) != 0 || name.find('.') == std::string::npos) continue;
      const int64_t id = std::stoll(name.substr(7, name.find('.') - 7));
      adapters[id] |= name.substr(name.find('.') + 1) == "tok_emb_d";
    }
    if (manifest.has_routing() != (router != nullptr))
      return Status::InvalidArgument("the export's manifest and tensors disagree about routing (" +
                                     std::string(kRouterTensor) + ")");
    for (const auto& [id, trunk_deltas] : adapters)
      if (!model_->adapters().count(id))
        if (Status st = model_->AddAdapter(id, trainer_->config().adapter_rank(), trunk_deltas); !st.ok()) return st;
    // Block i's PEER layer: the segments the export has, by layer, added here in id order.
    std::map<std::string, size_t> layer_of_block;  // "block<i>" -> PEER layer
    for (size_t i = 0, l = 0; i < model_->blocks.size(); ++i)
      if (model_->blocks[i]->peer) layer_of_block["block" + std::to_string(i)] = l++;
    std::map<std::pair<size_t, int64_t>, int64_t> wanted;  // (layer, segment id) -> n_keys
    for (const auto& [name, t] : tensors) {
      constexpr std::string_view kSegment = ".peer.segment";  // block<i>.peer.segment<id>.sub_keys
      const size_t peer = name.find(kSegment), keys = name.rfind(".sub_keys");
      if (peer == std::string::npos || keys == std::string::npos || t.dim() != 4) continue;
      const size_t id_at = peer + kSegment.size();
      const auto layer = layer_of_block.find(name.substr(0, peer));
      if (layer == layer_of_block.end())
        return Status::InvalidArgument("the export's " + name + " is in no PEER layer here");
      wanted[{layer->second, std::stoll(name.substr(id_at, keys - id_at))}] = t.size(2);
    }
    auto layers = model_->PeerLayers();
    for (const auto& [at, n_keys] : wanted) {
      bool present = false;
      for (const auto& seg : layers[at.first]->segments()) present |= seg->id() == at.second;
      if (present) continue;
      int64_t id = -1;
      if (Status st = trainer_->AddSegment(at.first, n_keys, &id); !st.ok()) return st;
      if (id != at.second)
        return Status::InvalidArgument("the export's segment ids of PEER layer " + std::to_string(at.first) +
                                       " are not 0, 1, 2, …: segment " + std::to_string(at.second) + " cannot be made");
    }
    // Every tensor into its place, converted to the model's dtype (bf16 rows to fp32: exact).
    std::map<std::string, torch::Tensor> mine;
    for (const auto& p : model_->named_parameters()) mine[p.key()] = p.value();
    for (const auto& b : model_->named_buffers()) mine[b.key()] = b.value();
    torch::NoGradGuard no_grad;
    for (const auto& [name, t] : tensors) {
      if (&t == router) continue;
      auto it = mine.find(name);
      if (it == mine.end()) return Status::InvalidArgument("the export has " + name + ", which this model lacks");
      if (it->second.sizes() != t.sizes())
        return Status::InvalidArgument(name + " is " + c10::str(t.sizes()) + " in the export and " +
                                       c10::str(it->second.sizes()) + " here: another model");
      it->second.copy_(t);
      mine.erase(it);
    }
    for (const auto& [name, t] : mine)
      if (!DefinedByTheArchitecture(name))
        return Status::InvalidArgument("the export lacks " + name + ": another model");
    trainer_->RefreshParameters();
    // Frozen again from the same rows: the store's checksum must be the export's.
    for (const SegmentManifest& m : manifest.frozen()) {
      Status st = trainer_->FreezeSegment(m.layer(), m.segment(), pool_->Freezing(m.dtype(), 0, 0));
      if (!st.ok()) return st;
    }
    std::vector<SegmentManifest> stored;
    if (Status st = store_->Manifests(&stored); !st.ok()) return st;
    for (const SegmentManifest& m : manifest.frozen()) {
      bool same = false;
      for (const SegmentManifest& s : stored)
        same |= s.layer() == m.layer() && s.segment() == m.segment() && s.checksum() == m.checksum();
      if (!same)
        return Status::Corruption(
            "segment " + std::to_string(m.segment()) + " of PEER layer " + std::to_string(m.layer()) +
            ": its rows, frozen here, do not match the export's checksum (the file was changed?)");
    }
    if (router) {  // the branches and their router, as a checkpoint would restore them
      const RoutingInfo& info = manifest.routing();
      CheckpointMeta::Routing routing;
      routing.set_base(info.branches_size() ? info.branches(0) : 0);
      *routing.mutable_base_segments() = info.base_segments();
      routing.set_branch(info.training_branch());
      routing.set_router(std::string(static_cast<const char*>(router->data_ptr()), router->numel()));
      if (Status st = routing_.FromProto(routing, model_); !st.ok()) return st;
      trainer_->SetConfig(routing_.Effective(trainer_->config()));
      trainer_->RefreshParameters();
    }
    RefreshSegments();
    return CheckpointNow();
  });
}

Status TrainingLoop::DeleteTask(const std::string& name) {
  return RunOnTrainer([&]() -> Status { return tasks_.DeleteTask(name); });
}

Status TrainingLoop::SetPolicy(const Policy& policy) {
  // Numbers a float cannot hold must not reach the conversions below.
  if (Status st = CheckPolicyNumbers(policy); !st.ok()) return st;
  return RunOnTrainer([&]() -> Status {
    Config c = options_.config;
    *c.mutable_train() = WithPolicy(trainer_->config(), policy);
    if (Status st = ValidateConfig(c); !st.ok()) return st;
    if (routing_.started() && !c.train().routed())
      return Status::FailedPrecondition(
          "routing started at an earlier segment: the old branches were trained against the frozen trunk, so shared "
          "weights cannot train again; routed stays on (start a new data directory for another policy)");
    const bool only_new_segment = policy.train_groups_size() == 1 && policy.train_groups(0) == "new-segment";
    if (routing_.started() && policy.train_groups_size() && !only_new_segment)
      return Status::FailedPrecondition(
          "with routing started only the open branch trains (group new-segment): "
          "trainGroups cannot change");
    if (c.train().routed() && ranks_.active())
      return Status::InvalidArgument("train.routed runs in one process: restart peerd with --world-size 1");
    *c.mutable_train() = routing_.Effective(c.train());
    trainer_->SetConfig(c.train());
    RankCommand set;
    set.set_kind(RankCommand::SET_TRAIN_CONFIG);
    *set.mutable_train() = c.train();
    Status told = ranks_.Tell(set);
    if (told.ok()) told = CompareRanks();
    if (!told.ok()) return told;
    if (policy.has_freeze_dtype()) options_.freeze_dtype = *ParseRowDtype(policy.freeze_dtype());  // checked above
    {
      std::lock_guard<std::mutex> lock(mu_);
      snapshot_.set_learning_rate(trainer_->NextLearningRate());
    }
    return CheckpointAfterChange("the policy change");
  });
}

Policy TrainingLoop::GetPolicy() {
  Policy p;
  (void)RunOnTrainer([&]() -> Status {
    p = PolicyOf(trainer_->config(), options_.freeze_dtype);
    return Status::OK();
  });
  return p;
}

void TrainingLoop::SetPaused(bool paused) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    paused_ = paused;
    if (!paused) training_error_.clear();
  }
  wake_.notify_all();
}

void TrainingLoop::StopTrainingAfter(const std::string& what, const SpoolCursor* untrained_from) {
  spdlog::error(
      "training stopped at step {}: {}. peerd keeps serving; fix the cause, then resume "
      "(peerctl resume, POST /v1/train/resume){}",
      trainer_->step(), what, untrained_from ? ": the batch that failed is trained then" : "");
  // The failed batch's documents were taken from the spool but not trained: start again before them.
  if (untrained_from)
    batches_ = std::make_unique<BatchSource>(spool_, *untrained_from,
                                             options_.config.train().seed() + static_cast<uint64_t>(trainer_->step()));
  std::lock_guard<std::mutex> lock(mu_);
  paused_ = true;
  training_error_ = "step " + std::to_string(trainer_->step()) + ": " + what;
}

void TrainingLoop::RefreshSegments() {
  std::vector<SegmentManifest> manifests;
  (void)store_->Manifests(&manifests);
  SegmentsReply segments = DescribeSegments(model_, manifests, usage_);
  // Parameter counts change only with the pool; taken here, on the thread that owns the model.
  const uint64_t total = model_->TotalParameters(), active = model_->ActiveParameters();
  std::lock_guard<std::mutex> lock(mu_);
  snapshot_.set_total_parameters(total);
  snapshot_.set_active_parameters(active);
  if (routing_.started()) *snapshot_.mutable_routing() = routing_.Info(model_);
  segments_snapshot_ = std::move(segments);
}

SegmentsReply TrainingLoop::Segments() {
  std::lock_guard<std::mutex> lock(mu_);
  return segments_snapshot_;
}

StatusReply TrainingLoop::Snapshot() {
  StatusReply r;
  {
    std::lock_guard<std::mutex> lock(mu_);
    r = snapshot_;
    r.set_paused(paused_);
    if (paused_)
      r.set_state(training_error_.empty()
                      ? "paused"
                      : "stopped by an error: " + training_error_ + " (POST /v1/train/resume retries)");
    r.set_training_error(training_error_);
    if (r.state().empty()) r.set_state(running_ ? "starting" : "stopped");
    r.set_tokens_trained(tokens_trained_);
    r.set_last_checkpoint_step(last_checkpoint_step_);
    r.set_checkpoint_error(checkpoint_error_);
    *r.mutable_segments() = segments_snapshot_.segments();
  }
  SpoolStats s = spool_->stats();
  r.set_spool_documents(s.documents);
  r.set_spool_bytes(s.bytes);
  r.set_spool_backlog_bytes(s.backlog_bytes);
  r.set_spool_backlog_documents(s.backlog_documents);
  r.set_context(static_cast<uint32_t>(options_.config.model().context()));
  r.set_spool_kept_bytes(s.kept_bytes);
  r.set_ingest_error(s.write_error);
  r.set_data_dir(db_->dir());
  return r;
}

void TrainingLoop::Metrics(PrometheusText* out) {
  TrainingMetrics m;
  m.status = Snapshot();
  m.cache = pool_->cache_stats();
  {
    std::lock_guard<std::mutex> lock(mu_);
    m.step_seconds = step_seconds_;
  }
  {
    // The forgetting report is recomputed only when the evaluation rows change, not per scrape.
    std::lock_guard<std::mutex> lock(report_mu_);
    if (const uint64_t version = tasks_.rows_version(); version != report_version_) {
      std::vector<EvalRow> rows;
      if (Status st = tasks_.Rows(&rows); st.ok()) {
        report_ = ComputeForgetting(rows);
        report_version_ = version;
      } else {
        spdlog::warn("metrics with the evaluation rows last read: {}", st.ToString());
      }
    }
    m.report = report_;
  }
  WriteTrainingMetrics(m, out);
}

}  // namespace peerd
