#include "service/rank_worker.h"

#include <spdlog/spdlog.h>

#include "core/rank_sync.h"
#include "core/trainer.h"
#include "service/rank_commands.h"

namespace peerd {

RankWorker::RankWorker(Collective* collective) : collective_(collective) {}
RankWorker::~RankWorker() = default;

int64_t RankWorker::step() const { return trainer_->step(); }

Status RankWorker::Join(Collective* collective, std::unique_ptr<RankWorker>* out) {
  std::unique_ptr<RankWorker> w(new RankWorker(collective));
  Config config;
  if (Status st = ShareConfig(*collective, &config); !st.ok()) return st;
  if (Status st = CheckDataParallel(config); !st.ok()) return st;
  torch::manual_seed(config.train().seed());
  TransformerLM model(config.model());
  w->trainer_ = std::make_unique<Trainer>(model, config.train());
  w->trainer_->set_collective(collective);
  if (Status st = SyncFromRankZero(*collective, *w->trainer_); !st.ok()) return st;
  // As on rank 0 after a restart: past the first domain, the teacher is the model as restored.
  bool grown = false;
  for (const auto& layer : model->PeerLayers()) grown |= layer->segments().size() > 1;
  if (grown && w->trainer_->config().distill_weight() > 0) w->trainer_->SetTeacher(CopyForTeacher(model));
  *out = std::move(w);
  return Status::OK();
}

Status RankWorker::Run() {
  Trainer& trainer = *trainer_;
  for (;;) {
    RankCommand cmd;
    if (Status st = ShareCommand(*collective_, &cmd); !st.ok()) return st;
    switch (cmd.kind()) {
      case RankCommand::IDLE: break;
      case RankCommand::STEP: {
        torch::Tensor batch;
        if (Status st = ShareBatch(*collective_, cmd, &batch); !st.ok()) return st;
        StepStats stats;
        if (Status st = trainer.Step(batch, cmd.replayed(), &stats); !st.ok()) return st;
        break;
      }
      case RankCommand::ADD_SEGMENTS: {
        // The same order as rank 0 (TrainingLoop::AddSegments): teacher first, then the segments.
        TransformerLM teacher =
            trainer.config().distill_weight() > 0 ? CopyForTeacher(trainer.model()) : TransformerLM(nullptr);
        auto layers = trainer.model()->PeerLayers();
        for (const PoolSegment& s : cmd.added()) {
          if (s.layer() >= layers.size())
            return Status::InvalidArgument("rank 0 added a segment to a layer this rank lacks");
          if (Status st = layers[s.layer()]->AddSegmentWithId(s.id(), s.n_keys()); !st.ok()) return st;
        }
        trainer.RefreshParameters();
        if (Status st = ShareAddedSegments(*collective_, trainer, cmd); !st.ok()) return st;
        if (!teacher.is_empty()) trainer.SetTeacher(teacher);
        spdlog::info("rank {}: added {} segment(s)", collective_->rank(), cmd.added_size());
        break;
      }
      case RankCommand::FREEZE: {
        FreezeOptions o;
        o.hold_rows_as = cmd.bf16() ? torch::kBFloat16 : torch::kFloat;
        if (Status st = trainer.FreezeSegment(cmd.layer(), cmd.id(), o); !st.ok()) return st;
        spdlog::info("rank {}: froze layer {} segment {}", collective_->rank(), cmd.layer(), cmd.id());
        break;
      }
      case RankCommand::SET_TRAIN_CONFIG: trainer.SetConfig(cmd.train()); break;
      case RankCommand::DIGEST: {
        std::vector<RankInfo> ranks;
        if (Status st = GatherDigests(*collective_, trainer, &ranks); !st.ok()) return st;
        break;
      }
      case RankCommand::STOP: return Status::OK();
      default:
        return Status::InvalidArgument("unknown command " + std::to_string(cmd.kind()) +
                                       " from rank 0: every rank must run the same peerd build");
    }
  }
}

}  // namespace peerd
