#include "service/checkpoint.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <chrono>
#include <sstream>

namespace peerd {

namespace {

const char kMetaKey[] = "meta";
const char kTensorsKey[] = "tensors";

}  // namespace

Status Checkpointer::Save(Trainer& trainer, CheckpointMeta meta) {
  TransformerLM& model = trainer.model();
  meta.clear_training_segments();
  auto layers = model->PeerLayers();
  for (size_t l = 0; l < layers.size(); ++l)
    for (const auto& seg : layers[l]->segments())
      if (!seg->frozen()) {
        auto* t = meta.add_training_segments();
        t->set_layer(static_cast<uint32_t>(l));
        t->set_id(static_cast<uint32_t>(seg->id()));
        t->set_n_keys(static_cast<uint32_t>(seg->n_keys()));
      }
  meta.clear_adapters();
  for (const auto& [id, adapter] : model->adapters()) {
    auto* a = meta.add_adapters();
    a->set_id(static_cast<uint32_t>(id));
    a->set_rank(static_cast<int32_t>(adapter->rank()));
    a->set_frozen(adapter->frozen());
    a->set_trunk_deltas(adapter->trunk_deltas());
  }
  meta.set_step(trainer.step());
  meta.set_schedule_start_step(static_cast<uint64_t>(trainer.schedule_start()));
  meta.set_unix_ms(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());

  torch::serialize::OutputArchive archive;
  for (const auto& [name, tensor] : model->NamedTrainingState()) {
    archive.write(name, tensor.detach());
    AdamW::State s = trainer.optimizer().StateOf(tensor);
    if (s.m.defined()) {
      archive.write("adam_m/" + name, s.m);
      archive.write("adam_v/" + name, s.v);
      archive.write("adam_steps/" + name, torch::tensor(s.steps));
    }
  }
  std::ostringstream bytes;
  archive.save_to(bytes);

  rocksdb::WriteBatch batch;
  batch.Put(db_->family(Family::kCheckpoints), kTensorsKey, bytes.str());
  batch.Put(db_->family(Family::kCheckpoints), kMetaKey, meta.SerializeAsString());
  return db_->SyncedWrite(&batch, "writing a checkpoint in '" + db_->dir() + "'");
}

Status Checkpointer::Load(Trainer& trainer, CheckpointMeta* meta, bool* found) {
  *found = false;
  std::string meta_bytes, tensor_bytes;
  rocksdb::Status s = db_->db()->Get(rocksdb::ReadOptions(), db_->family(Family::kCheckpoints), kMetaKey, &meta_bytes);
  if (s.IsNotFound()) return Status::OK();
  if (!s.ok()) return FromRocks(s, "reading the checkpoint");
  if (!meta->ParseFromString(meta_bytes))
    return Status::Corruption("the checkpoint record in '" + db_->dir() + "' is unreadable");
  s = db_->db()->Get(rocksdb::ReadOptions(), db_->family(Family::kCheckpoints), kTensorsKey, &tensor_bytes);
  if (!s.ok()) return FromRocks(s, "reading the checkpoint's tensors");

  TransformerLM& model = trainer.model();
  auto layers = model->PeerLayers();
  // Training segments of the checkpoint that the store has not frozen since.
  for (const auto& t : meta->training_segments()) {
    if (t.layer() >= layers.size())
      return Status::InvalidArgument("the checkpoint has PEER layer " + std::to_string(t.layer()) +
                                     " but the model has " + std::to_string(layers.size()) +
                                     ": use the configuration this data directory was trained with");
    bool present = false;
    for (const auto& seg : layers[t.layer()]->segments()) present |= seg->id() == t.id();
    if (!present)
      if (Status st = layers[t.layer()]->AddSegmentWithId(t.id(), t.n_keys()); !st.ok()) return st;
  }
  // Adapters: their tensors are all in the archive, frozen ones too (frozen below, once loaded).
  for (const auto& a : meta->adapters())
    if (!model->adapters().count(a.id()))
      if (Status st = model->AddAdapter(a.id(), a.rank(), a.trunk_deltas()); !st.ok()) return st;
  trainer.RefreshParameters();

  std::istringstream in(tensor_bytes);
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(in);
    torch::NoGradGuard no_grad;
    for (const auto& [name, tensor] : model->NamedTrainingState()) {
      torch::Tensor saved;
      if (!archive.try_read(name, saved))
        return Status::Corruption("the checkpoint has no tensor '" + name + "' (written by another configuration?)");
      if (saved.sizes() != tensor.sizes())
        return Status::InvalidArgument("checkpoint tensor '" + name + "' has another shape than the model's");
      tensor.copy_(saved);
      torch::Tensor m, v, steps;
      if (archive.try_read("adam_m/" + name, m) && archive.try_read("adam_v/" + name, v) &&
          archive.try_read("adam_steps/" + name, steps))
        trainer.mutable_optimizer().SetState(tensor, {m, v, steps.item<int64_t>()});
    }
  } catch (const c10::Error& e) {
    return Status::Corruption("the checkpoint in '" + db_->dir() + "' cannot be read: " + e.what_without_backtrace());
  }
  for (const auto& a : meta->adapters())
    if (a.frozen())
      if (Status st = model->FreezeAdapter(a.id()); !st.ok()) return st;
  trainer.RefreshParameters();
  trainer.set_step(static_cast<int64_t>(meta->step()));
  trainer.set_schedule_start(static_cast<int64_t>(meta->schedule_start_step()));
  *found = true;
  return Status::OK();
}

}  // namespace peerd
