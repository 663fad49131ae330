// BatchSource's replay: balanced over earlier tasks however their documents are sized, never the
// task training now, and replayed rows first. The spool's pruning of trained text, and replay
// after it.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/metadata.h>
#include <torch/torch.h>

#include <filesystem>

#include "core/tokenizer.h"
#include "core/unix_time.h"
#include "service/batch_source.h"

namespace peerd {
namespace {

// A Spool over a real DataDirDb in a fresh temporary directory, removed at the end.
class SpoolDir {
 public:
  explicit SpoolDir(const std::string& name)
      : dir_(::testing::TempDir() + "/peerd_" + name + "_" + std::to_string(getpid())) {
    std::filesystem::remove_all(dir_);
  }
  ~SpoolDir() {
    Close();
    std::filesystem::remove_all(dir_);
  }
  Status Open() {
    if (Status st = DataDirDb::Open(dir_, {}, &db); !st.ok()) return st;
    return Spool::Open(db, &spool);
  }
  void Close() {
    spool.reset();
    db.reset();
  }
  // `docs` documents "<task><i>" of `task`, document i's text from text(i).
  Status Add(const std::string& task, int docs, const std::function<std::string(int)>& text,
             uint64_t* duplicates = nullptr) {
    std::vector<Spool::NewDocument> d;
    for (int i = 0; i < docs; ++i) d.push_back({task + std::to_string(i), text(i)});
    return spool->AppendAndWait(task, std::move(d), duplicates);
  }

  std::shared_ptr<DataDirDb> db;
  std::unique_ptr<Spool> spool;

 private:
  std::string dir_;
};

bool IsPrunedNotFound(const Status& st) {
  return st.code() == Status::Code::kNotFound && st.message().find("pruned") != std::string::npos;
}

TEST(BatchSource, ReplayIsBalancedOverEarlierTasksAndSkipsTheCurrentOne) {
  const std::string dir = ::testing::TempDir() + "/peerd_batch_source_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  std::shared_ptr<DataDirDb> db;
  ASSERT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
  std::unique_ptr<Spool> spool;
  ASSERT_TRUE(Spool::Open(db, &spool).ok());
  // Task "many": 400 documents of 40 bytes; task "few": 4 of 4,000; task "now": what trains next.
  auto add = [&](const std::string& task, int docs, size_t bytes, char c) {
    std::vector<Spool::NewDocument> d;
    for (int i = 0; i < docs; ++i) d.push_back({task + std::to_string(i), std::string(bytes, c)});
    ASSERT_TRUE(spool->AppendAndWait(task, std::move(d)).ok());
  };
  add("many", 400, 40, 'm');
  add("few", 4, 4000, 'f');
  add("now", 50, 2000, 'n');

  const int64_t T = 16;
  BatchSource source(spool.get(), {}, 7);
  Status st;
  int64_t replayed = -1;
  // Train through "many" and "few" (their bytes, plus one end-of-document token per document).
  int64_t trained = 0;
  while (trained < 400 * 41 + 4 * 4001) {
    torch::Tensor b = source.Next(8, T, 0.0, true, &st, &replayed);
    ASSERT_TRUE(st.ok() && b.defined());
    trained += b.size(0) * (T + 1);
  }
  // Skip to the first byte of "now" so the cursor sits on its first document.
  while (source.cursor().index <= 404) {
    torch::Tensor b = source.Next(1, 0, 0.0, true, &st, &replayed);
    ASSERT_TRUE(st.ok() && b.defined());
  }
  std::map<char, int> counts;
  for (int step = 0; step < 50; ++step) {
    torch::Tensor b = source.Next(8, T, 0.5, false, &st, &replayed);
    ASSERT_TRUE(st.ok() && b.defined());
    ASSERT_EQ(replayed, 4);
    for (int64_t r = 0; r < b.size(0); ++r) {
      const char c = static_cast<char>(b[r][T / 2].item<int64_t>());
      if (r < replayed) {
        EXPECT_NE(c, 'n') << "replayed the task training now";
        ++counts[c];
      } else {
        EXPECT_EQ(c, 'n') << "fresh rows come after the replayed ones";
      }
    }
  }
  // 200 replayed rows: uniform over documents would give "few" about 1 in 100; balanced, half.
  EXPECT_GT(counts['f'], 60) << counts['f'] << " of 200";
  EXPECT_GT(counts['m'], 60) << counts['m'] << " of 200";
  spool.reset();
  db.reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace peerd

namespace peerd {
namespace {

TEST(Spool, PruneRemovesTrainedTextKeepsDedupAndSurvivesReopen) {
  SpoolDir d("spool_prune");
  ASSERT_TRUE(d.Open().ok());
  // Documents 1..6 of 10, 20, ..., 60 bytes.
  ASSERT_TRUE(d.Add("a", 6, [](int i) { return std::string(10 * (i + 1), static_cast<char>('a' + i)); }).ok());
  ASSERT_TRUE(d.spool->Prune(4).ok());
  auto expect_pruned_before_4 = [&](const char* when) {
    SCOPED_TRACE(when);
    SpoolEntry e;
    for (uint64_t i = 1; i < 4; ++i) {
      Status st = d.spool->Get(i, &e);
      EXPECT_TRUE(IsPrunedNotFound(st)) << i << ": " << st.ToString();
    }
    ASSERT_TRUE(d.spool->Get(4, &e).ok());
    EXPECT_EQ(e.text, std::string(40, 'd'));
    std::vector<SpoolEntry> docs;
    EXPECT_TRUE(IsPrunedNotFound(d.spool->Read(1, 10, &docs))) << "a read from before the prune skips nothing silently";
    ASSERT_TRUE(d.spool->Read(4, 10, &docs).ok());
    ASSERT_EQ(docs.size(), 3u);
    EXPECT_EQ(docs[0].index, 4u);
    const SpoolStats s = d.spool->stats();
    EXPECT_EQ(d.spool->pruned_before(), 4u);
    EXPECT_EQ(s.bytes, 210u) << "all time";
    EXPECT_EQ(s.kept_bytes, 40u + 50u + 60u);
    EXPECT_EQ(s.documents, 6u);
    std::map<std::string, std::vector<uint64_t>> by_task;
    ASSERT_TRUE(d.spool->TaskIndex(7, &by_task).ok());
    EXPECT_EQ(by_task["a"], (std::vector<uint64_t>{4, 5, 6})) << "replay must not be offered pruned documents";
    // The ids outlive the text: a resent document is still a duplicate, not trained again.
    uint64_t dups = 0;
    ASSERT_TRUE(d.Add(
                     "a", 2, [](int) { return std::string("resent"); }, &dups)
                    .ok());
    EXPECT_EQ(dups, 2u);
    EXPECT_EQ(d.spool->last_index(), 6u);
  };
  expect_pruned_before_4("after the prune");
  ASSERT_TRUE(d.spool->Prune(2).ok()) << "before an earlier prune: nothing to do";
  EXPECT_EQ(d.spool->pruned_before(), 4u);
  d.Close();
  ASSERT_TRUE(d.Open().ok());
  expect_pruned_before_4("after reopening");
}

TEST(Spool, PruneClampsToTheLastDocumentAndCountsEveryPrunedByte) {
  SpoolDir d("spool_prune_clamp");
  ASSERT_TRUE(d.Open().ok());
  ASSERT_TRUE(d.Add("a", 3, [](int i) { return std::string(100 + i, 'x'); }).ok());
  ASSERT_TRUE(d.spool->Prune(2).ok());
  ASSERT_TRUE(d.spool->Prune(1000).ok());
  SpoolStats s = d.spool->stats();
  EXPECT_EQ(d.spool->pruned_before(), 4u) << "last index + 1";
  EXPECT_EQ(s.kept_bytes, 0u) << "bytes of both prunes";
  // New documents after the clamp are kept and read.
  ASSERT_TRUE(d.Add("b", 1, [](int) { return std::string("kept"); }).ok());
  SpoolEntry e;
  ASSERT_TRUE(d.spool->Get(4, &e).ok());
  EXPECT_EQ(e.text, "kept");
  EXPECT_EQ(d.spool->stats().kept_bytes, 4u);
  d.Close();
  ASSERT_TRUE(d.Open().ok());
  s = d.spool->stats();
  EXPECT_EQ(d.spool->pruned_before(), 4u);
  EXPECT_EQ(s.kept_bytes, 4u);
}

TEST(Spool, RetentionPrunesTheOldestTextDownToItsBoundsAndNeverPastTheLimit) {
  SpoolDir d("spool_retention");
  ASSERT_TRUE(d.Open().ok());
  ASSERT_TRUE(d.Add("a", 10, [](int) { return std::string(100, 'x'); }).ok());  // indices 1..10
  const uint64_t now_ms = UnixMillis();
  uint64_t before = 0;
  // Unbounded: nothing is due.
  ASSERT_TRUE(d.spool->RetentionHorizon({}, 11, now_ms, &before).ok());
  EXPECT_EQ(before, 1u);
  // 1,000 bytes kept, 350 allowed: documents 1..7 go (300 bytes stay).
  ASSERT_TRUE(d.spool->RetentionHorizon({.max_bytes = 350}, 11, now_ms, &before).ok());
  EXPECT_EQ(before, 8u);
  // Never past the limit (the first document no checkpoint covers), whatever the bound.
  ASSERT_TRUE(d.spool->RetentionHorizon({.max_bytes = 1}, 5, now_ms, &before).ok());
  EXPECT_EQ(before, 5u);
  // By age: every document is older than an hour two hours from now, none of them now.
  ASSERT_TRUE(d.spool->RetentionHorizon({.max_age_seconds = 3600}, 11, now_ms, &before).ok());
  EXPECT_EQ(before, 1u);
  ASSERT_TRUE(d.spool->RetentionHorizon({.max_age_seconds = 3600}, 11, now_ms + 7'200'000, &before).ok());
  EXPECT_EQ(before, 11u);
  // After pruning to the horizon, the kept text is within the bound and the horizon stays put.
  ASSERT_TRUE(d.spool->RetentionHorizon({.max_bytes = 350}, 11, now_ms, &before).ok());
  ASSERT_TRUE(d.spool->Prune(before).ok());
  EXPECT_EQ(d.spool->stats().kept_bytes, 300u);
  ASSERT_TRUE(d.spool->RetentionHorizon({.max_bytes = 350}, 11, now_ms, &before).ok());
  EXPECT_EQ(before, 8u);
}

TEST(Spool, OpenRejectsAMalformedOrImpossiblePruneRecord) {
  SpoolDir d("spool_prune_corrupt");
  ASSERT_TRUE(d.Open().ok());
  ASSERT_TRUE(d.Add("a", 2, [](int) { return std::string("text"); }).ok());
  rocksdb::ColumnFamilyHandle* cf = d.db->family(Family::kSpool);
  d.spool.reset();
  auto be64 = [](uint64_t v) {
    std::string s;
    for (int i = 7; i >= 0; --i) s.push_back(static_cast<char>(v >> (8 * i)));
    return s;
  };
  for (const std::string& record : {std::string("short"), be64(9) + be64(0), be64(2) + be64(1000)}) {
    ASSERT_TRUE(d.db->db()->Put(rocksdb::WriteOptions(), cf, "p", record).ok());
    std::unique_ptr<Spool> spool;
    Status st = Spool::Open(d.db, &spool);
    EXPECT_EQ(st.code(), Status::Code::kCorruption) << st.ToString();
    EXPECT_NE(st.message().find("prune record"), std::string::npos) << st.message();
  }
}

TEST(Spool, PruneCompactsTheTextOutOfTheSpoolFiles) {
  SpoolDir d("spool_prune_compact");
  ASSERT_TRUE(d.Open().ok());
  ASSERT_TRUE(d.Add("a", 50, [](int i) { return "secret " + std::to_string(i) + std::string(200, 's'); }).ok());
  rocksdb::ColumnFamilyHandle* cf = d.db->family(Family::kSpool);
  // In an SST file, as trained text usually is by the time it is pruned.
  ASSERT_TRUE(d.db->db()->Flush(rocksdb::FlushOptions(), cf).ok());
  ASSERT_TRUE(d.spool->Prune(41).ok());
  // A tombstone alone would leave documents 1..40 in the file flushed above: every file of the
  // family must now begin at document 41 or later.
  std::string first_kept = "d";
  for (int i = 7; i >= 0; --i) first_kept.push_back(static_cast<char>(41ull >> (8 * i)));
  rocksdb::ColumnFamilyMetaData meta;
  d.db->db()->GetColumnFamilyMetaData(cf, &meta);
  size_t files = 0;
  for (const rocksdb::LevelMetaData& level : meta.levels)
    for (const rocksdb::SstFileMetaData& f : level.files) {
      ++files;
      EXPECT_GE(f.smallestkey, first_kept) << f.name << " at level " << level.level;
    }
  EXPECT_GT(files, 0u);
  SpoolEntry e;
  EXPECT_TRUE(d.spool->Get(41, &e).ok());
}

TEST(BatchSource, ReplayAfterPruneDrawsOnlyKeptDocuments) {
  SpoolDir d("batch_source_prune");
  ASSERT_TRUE(d.Open().ok());
  // Task "old": documents 1..20, document i all of byte 'A' + i - 1; task "new": what trains next.
  ASSERT_TRUE(d.Add("old", 20, [](int i) { return std::string(100, static_cast<char>('A' + i)); }).ok());
  ASSERT_TRUE(d.Add("new", 50, [](int) { return std::string(2000, 'n'); }).ok());
  const int64_t T = 16;
  // Restarted from a checkpoint after "old": its documents are trained, the cursor on "new".
  BatchSource source(d.spool.get(), {21, 0, 20 * 100, {}}, 7);
  Status st;
  int64_t replayed = -1;
  torch::Tensor b = source.Next(8, T, 0.5, false, &st, &replayed);
  ASSERT_TRUE(st.ok() && b.defined()) << st.ToString();
  ASSERT_EQ(replayed, 4) << "old's documents indexed for replay";

  // Prune half of "old" after the replay indexed it: its other half still replays.
  ASSERT_TRUE(d.spool->Prune(11).ok());
  for (int step = 0; step < 20; ++step) {
    b = source.Next(8, T, 0.5, false, &st, &replayed);
    ASSERT_TRUE(st.ok() && b.defined()) << st.ToString();
    ASSERT_EQ(replayed, 4);
    for (int64_t r = 0; r < replayed; ++r)
      for (int64_t t = 0; t <= T; ++t) {
        const int64_t token = b[r][t].item<int64_t>();
        if (token != ByteTokenizer::kEndOfDocument) {
          EXPECT_GE(token, 'A' + 10) << "replayed a pruned document";
        }
      }
  }

  // All of "old" pruned: nothing left to replay, so a full batch of fresh rows.
  ASSERT_TRUE(d.spool->Prune(21).ok());
  for (int step = 0; step < 5; ++step) {
    b = source.Next(8, T, 0.5, false, &st, &replayed);
    ASSERT_TRUE(st.ok() && b.defined()) << st.ToString();
    EXPECT_EQ(replayed, 0);
    ASSERT_EQ(b.size(0), 8);
    for (int64_t r = 0; r < 8; ++r)
      for (int64_t t = 0; t <= T; ++t) {
        const int64_t token = b[r][t].item<int64_t>();
        if (token != ByteTokenizer::kEndOfDocument) {
          EXPECT_EQ(token, 'n') << "row " << r;
        }
      }
  }
  // A source that indexes only now (a restart) is offered none of them either.
  BatchSource restarted(d.spool.get(), source.cursor(), 7);
  b = restarted.Next(8, T, 0.5, false, &st, &replayed);
  ASSERT_TRUE(st.ok() && b.defined()) << st.ToString();
  EXPECT_EQ(replayed, 0);
  EXPECT_EQ(b.size(0), 8);
}

}  // namespace
}  // namespace peerd
