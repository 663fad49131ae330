#include "service/rank_commands.h"

#include "core/rank_sync.h"

namespace peerd {

Status ShareCommand(Collective& collective, RankCommand* command) {
  std::string bytes = collective.rank() == 0 ? command->SerializeAsString() : std::string();
  if (Status st = collective.BroadcastBytes(&bytes, "sending rank 0's next command"); !st.ok()) return st;
  if (collective.rank() != 0 && !command->ParseFromString(bytes))
    return Status::Corruption("a command from rank 0 cannot be parsed: every rank must run the same peerd build");
  return Status::OK();
}

Status ShareBatch(Collective& collective, const RankCommand& step, torch::Tensor* batch) {
  if (collective.rank() != 0)
    *batch = torch::empty({int64_t(step.batch_rows()), int64_t(step.seq_len()) + 1}, torch::kLong);
  std::vector<torch::Tensor> tensors{batch->contiguous()};
  if (Status st = collective.Broadcast(tensors, "sending the batch"); !st.ok()) return st;
  *batch = tensors[0];
  return Status::OK();
}

Status ShareAddedSegments(Collective& collective, Trainer& trainer, const RankCommand& add) {
  auto layers = trainer.model()->PeerLayers();
  for (const PoolSegment& s : add.added()) {
    if (s.layer() >= layers.size()) return Status::InvalidArgument("rank 0 added a segment to a layer this rank lacks");
    for (const auto& seg : layers[s.layer()]->segments())
      if (seg->id() == s.id())
        if (Status st = SyncSegmentFromRankZero(collective, *seg); !st.ok()) return st;
  }
  return Status::OK();
}

Status GatherDigests(Collective& collective, Trainer& trainer, std::vector<RankInfo>* ranks) {
  const uint64_t digest = ModelDigest(trainer.model());
  torch::Tensor mine = torch::tensor({trainer.step(), static_cast<int64_t>(digest)});
  std::vector<torch::Tensor> all;
  if (Status st = collective.AllGather(mine, &all, "comparing the ranks' models"); !st.ok()) return st;
  ranks->clear();
  for (size_t r = 0; r < all.size(); ++r) {
    RankInfo info;
    info.set_rank(static_cast<uint32_t>(r));
    info.set_step(static_cast<uint64_t>(all[r][0].item<int64_t>()));
    info.set_model_digest(static_cast<uint64_t>(all[r][1].item<int64_t>()));
    ranks->push_back(info);
  }
  return Status::OK();
}

}  // namespace peerd
