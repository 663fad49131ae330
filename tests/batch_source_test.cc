// BatchSource's replay: balanced over earlier tasks however their documents are sized, never the
// task training now, and replayed rows first.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>

#include "service/batch_source.h"

namespace peerd {
namespace {

TEST(BatchSource, ReplayIsBalancedOverEarlierTasksAndSkipsTheCurrentOne) {
  const std::string dir = ::testing::TempDir() + "/peerd_batch_source_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  std::shared_ptr<StoreDb> db;
  ASSERT_TRUE(StoreDb::Open(dir, {}, &db).ok());
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
