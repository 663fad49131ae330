#include "service/checkpoint.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <sstream>

#include "core/unix_time.h"

namespace peerd {

namespace {

// Keys of the checkpoints column family:
//   "meta"                                     -> CheckpointMeta
//   "piece" be64(generation) be32(t) be32(p)   -> bytes [p·piece, (p+1)·piece) of tensor t of the
//                                                 generation's CheckpointMeta.tensors
//   "tensors"                                  -> a LibTorch archive of every tensor (generation 0,
//                                                 checkpoints written before pieces)
const char kMetaKey[] = "meta";
const char kArchiveKey[] = "tensors";
const char kPiecePrefix[] = "piece";
const char kPieceEnd[] = "piecf";  // above every piece key

void AppendBigEndian(std::string* out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string GenerationKey(uint64_t generation) {
  std::string key = kPiecePrefix;
  AppendBigEndian(&key, generation, 8);
  return key;
}

std::string PieceKey(uint64_t generation, uint32_t tensor, uint32_t piece) {
  std::string key = GenerationKey(generation);
  AppendBigEndian(&key, tensor, 4);
  AppendBigEndian(&key, piece, 4);
  return key;
}

// The dtypes a model's state holds, by c10's names (stable across LibTorch versions).
std::optional<torch::ScalarType> ParseDtype(const std::string& name) {
  for (torch::ScalarType t : {torch::kFloat, torch::kBFloat16, torch::kHalf, torch::kDouble, torch::kLong, torch::kInt,
                              torch::kShort, torch::kChar, torch::kByte, torch::kBool})
    if (name == c10::toString(t)) return t;
  return std::nullopt;
}

// Every tensor a checkpoint holds, by name: the model's training state and its AdamW moments.
std::vector<std::pair<std::string, torch::Tensor>> TensorsToSave(Trainer& trainer) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [name, tensor] : trainer.model()->NamedTrainingState()) {
    out.emplace_back(name, tensor.detach());
    AdamW::State s = trainer.optimizer().StateOf(tensor);
    if (s.m.defined()) {
      out.emplace_back("adam_m/" + name, s.m);
      out.emplace_back("adam_v/" + name, s.v);
      out.emplace_back("adam_steps/" + name, torch::tensor(s.steps));
    }
  }
  return out;
}

// Reads a checkpoint's tensor by name: *found = false when it has none of that name.
using TensorReader = std::function<Status(const std::string& name, torch::Tensor* out, bool* found)>;

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
  meta.set_unix_ms(UnixMillis());

  // The generation after the last complete checkpoint's. A save cut short left pieces under this
  // same number: they are removed first, so that none of them can pass for this save's.
  uint64_t generation = 1;
  {
    std::string bytes;
    CheckpointMeta last;
    rocksdb::Status s = db_->db()->Get(rocksdb::ReadOptions(), db_->family(Family::kCheckpoints), kMetaKey, &bytes);
    if (!s.ok() && !s.IsNotFound()) return FromRocks(s, "reading the last checkpoint's record");
    if (s.ok() && last.ParseFromString(bytes)) generation = last.generation() + 1;
  }
  const std::string what = "writing a checkpoint in '" + db_->dir() + "'";
  rocksdb::ColumnFamilyHandle* family = db_->family(Family::kCheckpoints);
  rocksdb::WriteBatch batch;
  batch.DeleteRange(family, GenerationKey(generation), GenerationKey(generation + 1));
  meta.set_generation(generation);
  meta.clear_tensors();
  const auto tensors = TensorsToSave(trainer);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const torch::Tensor t = tensors[i].second.to(torch::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    const uint32_t pieces = static_cast<uint32_t>(std::max<uint64_t>(1, (bytes + piece_bytes_ - 1) / piece_bytes_));
    CheckpointMeta::Tensor* entry = meta.add_tensors();
    entry->set_name(tensors[i].first);
    entry->set_dtype(c10::toString(t.scalar_type()));
    for (int64_t d : t.sizes()) entry->add_shape(d);
    entry->set_bytes(bytes);
    entry->set_pieces(pieces);
    const char* data = static_cast<const char*>(t.data_ptr());
    for (uint32_t p = 0; p < pieces; ++p) {
      const uint64_t begin = uint64_t{p} * piece_bytes_, size = std::min<uint64_t>(piece_bytes_, bytes - begin);
      batch.Put(family, PieceKey(generation, static_cast<uint32_t>(i), p), rocksdb::Slice(data + begin, size));
      if (batch.GetDataSize() >= piece_bytes_) {
        if (Status st = db_->SyncedWrite(&batch, what); !st.ok()) return st;
        batch.Clear();
      }
    }
  }
  // The record, and every other generation (and the archive of generation 0) gone: one batch.
  batch.Put(family, kMetaKey, meta.SerializeAsString());
  batch.DeleteRange(family, kPiecePrefix, GenerationKey(generation));
  batch.DeleteRange(family, GenerationKey(generation + 1), kPieceEnd);
  batch.Delete(family, kArchiveKey);
  return db_->SyncedWrite(&batch, what);
}

Status Checkpointer::Load(Trainer& trainer, CheckpointMeta* meta, bool* found) {
  *found = false;
  rocksdb::ColumnFamilyHandle* family = db_->family(Family::kCheckpoints);
  std::string meta_bytes;
  rocksdb::Status s = db_->db()->Get(rocksdb::ReadOptions(), family, kMetaKey, &meta_bytes);
  if (s.IsNotFound()) return Status::OK();
  if (!s.ok()) return FromRocks(s, "reading the checkpoint");
  if (!meta->ParseFromString(meta_bytes))
    return Status::Corruption("the checkpoint record in '" + db_->dir() + "' is unreadable");

  // How this checkpoint's tensors are read: from pieces, or from the one archive of generation 0.
  TensorReader read;
  torch::serialize::InputArchive archive;
  std::map<std::string, int> index;
  if (meta->generation() == 0) {
    std::string tensor_bytes;
    s = db_->db()->Get(rocksdb::ReadOptions(), family, kArchiveKey, &tensor_bytes);
    if (!s.ok()) return FromRocks(s, "reading the checkpoint's tensors");
    try {
      std::istringstream in(tensor_bytes);
      archive.load_from(in);
    } catch (const c10::Error& e) {
      return Status::Corruption("the checkpoint in '" + db_->dir() + "' cannot be read: " + e.what_without_backtrace());
    }
    read = [&](const std::string& name, torch::Tensor* out, bool* has) -> Status {
      try {
        *has = archive.try_read(name, *out);
      } catch (const c10::Error& e) {
        return Status::Corruption("the checkpoint in '" + db_->dir() +
                                  "' cannot be read: " + e.what_without_backtrace());
      }
      return Status::OK();
    };
  } else {
    for (int i = 0; i < meta->tensors_size(); ++i) index[meta->tensors(i).name()] = i;
    read = [&](const std::string& name, torch::Tensor* out, bool* has) -> Status {
      auto it = index.find(name);
      *has = it != index.end();
      if (!*has) return Status::OK();
      const CheckpointMeta::Tensor& entry = meta->tensors(it->second);
      const std::optional<torch::ScalarType> dtype = ParseDtype(entry.dtype());
      if (!dtype)
        return Status::Corruption("checkpoint tensor '" + name + "' has an unknown dtype '" + entry.dtype() + "'");
      *out = torch::empty(std::vector<int64_t>(entry.shape().begin(), entry.shape().end()), *dtype);
      if (static_cast<uint64_t>(out->numel()) * out->element_size() != entry.bytes())
        return Status::Corruption("checkpoint tensor '" + name + "': its shape and size disagree");
      char* data = static_cast<char*>(out->data_ptr());
      uint64_t filled = 0;
      std::string piece;
      for (uint32_t p = 0; p < entry.pieces(); ++p) {
        s = db_->db()->Get(rocksdb::ReadOptions(), family,
                           PieceKey(meta->generation(), static_cast<uint32_t>(it->second), p), &piece);
        if (!s.ok()) return FromRocks(s, "reading piece " + std::to_string(p) + " of checkpoint tensor '" + name + "'");
        if (filled + piece.size() > entry.bytes()) break;
        std::memcpy(data + filled, piece.data(), piece.size());
        filled += piece.size();
      }
      if (filled != entry.bytes())
        return Status::Corruption("checkpoint tensor '" + name + "' holds " + std::to_string(filled) + " bytes, not " +
                                  std::to_string(entry.bytes()));
      return Status::OK();
    };
  }

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
  // Adapters: their tensors are all in the checkpoint, frozen ones too (frozen below, once loaded).
  for (const auto& a : meta->adapters())
    if (!model->adapters().count(a.id()))
      if (Status st = model->AddAdapter(a.id(), a.rank(), a.trunk_deltas()); !st.ok()) return st;
  trainer.RefreshParameters();

  torch::NoGradGuard no_grad;
  for (const auto& [name, tensor] : model->NamedTrainingState()) {
    torch::Tensor saved;
    bool has = false;
    if (Status st = read(name, &saved, &has); !st.ok()) return st;
    if (!has)
      return Status::Corruption("the checkpoint has no tensor '" + name + "' (written by another configuration?)");
    if (saved.sizes() != tensor.sizes())
      return Status::InvalidArgument("checkpoint tensor '" + name + "' has another shape than the model's");
    tensor.copy_(saved);
    torch::Tensor m, v, steps;
    bool has_m = false, has_v = false, has_steps = false;
    if (Status st = read("adam_m/" + name, &m, &has_m); !st.ok()) return st;
    if (Status st = read("adam_v/" + name, &v, &has_v); !st.ok()) return st;
    if (Status st = read("adam_steps/" + name, &steps, &has_steps); !st.ok()) return st;
    if (has_m && has_v && has_steps) trainer.mutable_optimizer().SetState(tensor, {m, v, steps.item<int64_t>()});
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
