// Checkpoints (service/checkpoint.*) of any size: tensors in pieces of a bounded size, written so
// that a save cut short leaves the last checkpoint whole, and checkpoints written as one archive
// (before pieces) still load. The piece size is scaled down, so a tiny model spans many pieces
// as a large one spans many 64 MiB values.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <sstream>

#include "core/trainer.h"
#include "service/checkpoint.h"
#include "tests/test_util.h"

namespace peerd {
namespace {

constexpr size_t kPieceBytes = 1000;

struct Fixture {
  explicit Fixture(const std::string& name)
      : dir(::testing::TempDir() + "/peerd_checkpoint_" + name + "_" + std::to_string(getpid())) {
    std::filesystem::remove_all(dir);
    EXPECT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
  }
  ~Fixture() {
    db.reset();
    std::filesystem::remove_all(dir);
  }
  // Every key of the checkpoints column family with its value's size.
  std::vector<std::pair<std::string, size_t>> Values() const {
    std::vector<std::pair<std::string, size_t>> out;
    std::unique_ptr<rocksdb::Iterator> it(
        db->db()->NewIterator(rocksdb::ReadOptions(), db->family(Family::kCheckpoints)));
    for (it->SeekToFirst(); it->Valid(); it->Next()) out.emplace_back(it->key().ToString(), it->value().size());
    return out;
  }
  std::string dir;
  std::shared_ptr<DataDirDb> db;
};

// A trained tiny model: its parameters and AdamW moments differ from a fresh one's.
std::unique_ptr<Trainer> TrainedTrainer(TransformerLM* model, int steps) {
  torch::manual_seed(3);
  Config c = testing::TinyModel();
  *model = TransformerLM(c.model());
  auto trainer = std::make_unique<Trainer>(*model, c.train());
  for (int i = 0; i < steps; ++i) trainer->Step(torch::randint(0, 256, {4, 17}, torch::kLong));
  return trainer;
}

std::unique_ptr<Trainer> FreshTrainer(TransformerLM* model) {
  torch::manual_seed(99);
  Config c = testing::TinyModel();
  *model = TransformerLM(c.model());
  return std::make_unique<Trainer>(*model, c.train());
}

// Loads the data directory's checkpoint into a fresh trainer (another seed than TrainedTrainer's)
// and expects it restored; its record in *meta.
std::unique_ptr<Trainer> Restored(const Fixture& f, TransformerLM* model, CheckpointMeta* meta,
                                  size_t piece_bytes = kPieceBytes) {
  auto trainer = FreshTrainer(model);
  bool found = false;
  Status st = Checkpointer(f.db, piece_bytes).Load(*trainer, meta, &found);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(found);
  return trainer;
}

// Every tensor and AdamW moment of `b` equals `a`'s, bit for bit.
void ExpectSameState(Trainer& a, Trainer& b) {
  auto sa = a.model()->NamedTrainingState(), sb = b.model()->NamedTrainingState();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_TRUE(torch::equal(sa[i].second, sb[i].second)) << sa[i].first;
    AdamW::State ma = a.optimizer().StateOf(sa[i].second), mb = b.optimizer().StateOf(sb[i].second);
    ASSERT_EQ(ma.m.defined(), mb.m.defined()) << sa[i].first;
    if (ma.m.defined()) {
      EXPECT_TRUE(torch::equal(ma.m, mb.m)) << sa[i].first;
      EXPECT_TRUE(torch::equal(ma.v, mb.v)) << sa[i].first;
      EXPECT_EQ(ma.steps, mb.steps) << sa[i].first;
    }
  }
  EXPECT_EQ(a.step(), b.step());
}

TEST(Checkpoint, TensorsLargerThanAPieceAreStoredInBoundedPiecesAndRestoredBitForBit) {
  Fixture f("pieces");
  TransformerLM model{nullptr};
  auto trainer = TrainedTrainer(&model, 3);
  Checkpointer checkpointer(f.db, kPieceBytes);
  ASSERT_TRUE(checkpointer.Save(*trainer, CheckpointMeta()).ok());

  size_t pieces = 0, largest = 0;
  for (const auto& [key, size] : f.Values()) {
    if (key == "meta") continue;
    ++pieces;
    largest = std::max(largest, size);
  }
  EXPECT_LE(largest, kPieceBytes) << "no value over the piece size";
  EXPECT_GT(pieces, model->NamedTrainingState().size() * 3) << "the embedding alone spans dozens of pieces";

  TransformerLM restored_model{nullptr};
  CheckpointMeta meta;
  auto restored = Restored(f, &restored_model, &meta);
  ExpectSameState(*trainer, *restored);
}

TEST(Checkpoint, ASaveCutShortLeavesTheLastCheckpointWholeAndItsPiecesAreRemovedByTheNext) {
  Fixture f("cut");
  TransformerLM model{nullptr};
  auto trainer = TrainedTrainer(&model, 2);
  Checkpointer checkpointer(f.db, kPieceBytes);
  ASSERT_TRUE(checkpointer.Save(*trainer, CheckpointMeta()).ok());
  const size_t keys_after_one_save = f.Values().size();

  // What a save killed after writing some pieces of the next generation leaves: pieces under
  // generation 2 (garbage here, as a half-written tensor would be) and the record still naming 1.
  {
    rocksdb::WriteBatch batch;
    for (uint32_t t = 0; t < 3; ++t) {
      std::string key = "piece";
      for (int i = 7; i >= 0; --i) key.push_back(static_cast<char>(i == 0 ? 2 : 0));  // be64(2)
      for (uint32_t v : {t, 0u})
        for (int i = 3; i >= 0; --i) key.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
      batch.Put(f.db->family(Family::kCheckpoints), key, std::string(kPieceBytes, '\x7f'));
    }
    ASSERT_TRUE(f.db->SyncedWrite(&batch, "test").ok());
  }
  TransformerLM restored_model{nullptr};
  CheckpointMeta meta;
  auto restored = Restored(f, &restored_model, &meta);
  EXPECT_EQ(meta.generation(), 1u);
  ExpectSameState(*trainer, *restored);

  // The next save takes generation 2 over and removes generation 1: one checkpoint's keys again.
  trainer->Step(torch::randint(0, 256, {4, 17}, torch::kLong));
  ASSERT_TRUE(checkpointer.Save(*trainer, CheckpointMeta()).ok());
  EXPECT_EQ(f.Values().size(), keys_after_one_save);
  TransformerLM again_model{nullptr};
  auto again = Restored(f, &again_model, &meta);
  EXPECT_EQ(meta.generation(), 2u);
  ExpectSameState(*trainer, *again);
}

TEST(Checkpoint, ACheckpointWrittenAsOneArchiveStillLoadsAndTheNextSaveReplacesIt) {
  Fixture f("archive");
  TransformerLM model{nullptr};
  auto trainer = TrainedTrainer(&model, 2);
  // The layout before pieces: the record without a generation, every tensor in one archive.
  {
    torch::serialize::OutputArchive archive;
    for (const auto& [name, tensor] : model->NamedTrainingState()) {
      archive.write(name, tensor.detach());
      AdamW::State s = trainer->optimizer().StateOf(tensor);
      if (s.m.defined()) {
        archive.write("adam_m/" + name, s.m);
        archive.write("adam_v/" + name, s.v);
        archive.write("adam_steps/" + name, torch::tensor(s.steps));
      }
    }
    std::ostringstream bytes;
    archive.save_to(bytes);
    CheckpointMeta meta;
    meta.set_step(static_cast<uint64_t>(trainer->step()));
    rocksdb::WriteBatch batch;
    batch.Put(f.db->family(Family::kCheckpoints), "tensors", bytes.str());
    batch.Put(f.db->family(Family::kCheckpoints), "meta", meta.SerializeAsString());
    ASSERT_TRUE(f.db->SyncedWrite(&batch, "test").ok());
  }
  TransformerLM restored_model{nullptr};
  CheckpointMeta meta;
  auto restored = Restored(f, &restored_model, &meta, Checkpointer::kDefaultPieceBytes);
  ExpectSameState(*trainer, *restored);

  ASSERT_TRUE(Checkpointer(f.db).Save(*restored, CheckpointMeta()).ok());
  for (const auto& [key, size] : f.Values()) EXPECT_NE(key, "tensors") << "the archive goes with its generation";
}

}  // namespace
}  // namespace peerd
