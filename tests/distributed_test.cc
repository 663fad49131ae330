// Multi-rank training (docs/DESIGN.md §6), through the real programs: peer-train processes
// joined by c10d on loopback train the same model as one process given the same global batches;
// a rank that dies stops the others with a clear error; a multi-rank peerd keeps every rank's pool
// identical through admin add and freeze, and resumes from its checkpoint after losing a rank. No
// LibTorch here: the ranks' parameters are compared from the files `peer-train --dump-params`
// writes, peerd's ranks through the digests /v1/status reports.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <thread>

#include "tests/peerd_process.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using peerd::testing::RendezvousPort;
using peerd::testing::Slurp;

using peerd::testing::json;
using peerd::testing::PeerdProcess;
using peerd::testing::U;

// A peer-train (or, given `binary`, another program's) process, its output appended to `log`.
class Rank {
 public:
  Rank(const std::string& args, const std::string& log, const std::string& binary = PEER_TRAIN_BIN) : log_(log) {
    pid_ = fork();
    if (pid_ == 0) {
      const std::string cmd = "exec " + binary + " " + args + " >> " + log + " 2>&1";
      execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
      _exit(127);
    }
  }
  ~Rank() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  // The exit code, or -1 after `limit` (the process is then killed by the destructor) or a signal.
  int Wait(std::chrono::seconds limit = 300s) { return peerd::testing::WaitForExit(&pid_, limit); }
  void Kill() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  std::string log() const { return Slurp(log_); }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

struct Tensor {
  bool bf16 = false;
  std::string bytes;
  std::vector<double> values;  // as doubles (bf16 widened)
};

// Reads a --dump-params file (format in programs/peer_train.cc).
std::map<std::string, Tensor> ReadDump(const std::string& path) {
  std::map<std::string, Tensor> out;
  std::ifstream in(path, std::ios::binary);
  std::string magic;
  std::getline(in, magic);
  EXPECT_EQ(magic, "PEERPARAMS1") << path;
  for (;;) {
    uint32_t len = 0;
    if (!in.read(reinterpret_cast<char*>(&len), sizeof len)) break;
    std::string name(len, '\0');
    uint8_t dtype = 0;
    uint64_t n = 0;
    in.read(name.data(), len).read(reinterpret_cast<char*>(&dtype), 1).read(reinterpret_cast<char*>(&n), sizeof n);
    Tensor t;
    t.bf16 = dtype == 1;
    t.bytes.resize(n * (t.bf16 ? 2 : 4));
    in.read(t.bytes.data(), t.bytes.size());
    for (uint64_t i = 0; i < n; ++i) {
      float f = 0;
      if (t.bf16) {
        uint32_t bits = uint32_t(uint8_t(t.bytes[2 * i])) << 16 | uint32_t(uint8_t(t.bytes[2 * i + 1])) << 24;
        std::memcpy(&f, &bits, 4);
      } else {
        std::memcpy(&f, t.bytes.data() + 4 * i, 4);
      }
      t.values.push_back(f);
    }
    out[name] = std::move(t);
  }
  return out;
}

// "loss 4.0531 ... grad-norm 1.62" of every step line peer-train printed.
std::vector<std::string> StepLines(const std::string& log) {
  std::vector<std::string> out;
  const std::regex line("loss ([0-9.]+) .* grad-norm ([0-9.]+)");
  for (auto it = std::sregex_iterator(log.begin(), log.end(), line); it != std::sregex_iterator(); ++it)
    out.push_back((*it)[1].str() + " " + (*it)[2].str());
  return out;
}

// The model W ranks trained (`ranks`, rank 0's dump) against one process's (`single`): to 1e-5
// relative over all parameters. Single tensors may differ more: summing the batch in W parts
// rounds otherwise, and Adam turns a gradient that is pure rounding noise (the attention key bias,
// which softmax ignores) into full-size steps — so a tensor is held to 1e-3, which still catches
// one that is not summed over the ranks or not sent at all. True if the frozen segment 0 was compared.
bool ExpectSameModel(const std::map<std::string, Tensor>& single, const std::map<std::string, Tensor>& ranks,
                     int world) {
  double diff_all = 0, norm_all = 0, worst = 0;
  std::string worst_name;
  bool saw_frozen = false;
  for (const auto& [tname, t] : single) {
    if (!ranks.count(tname)) {
      ADD_FAILURE() << tname << " missing";
      continue;
    }
    const Tensor& d = ranks.at(tname);
    if (d.values.size() != t.values.size()) {
      ADD_FAILURE() << tname << " has another size";
      continue;
    }
    double diff = 0, norm = 0;
    for (size_t i = 0; i < t.values.size(); ++i) {
      diff += (d.values[i] - t.values[i]) * (d.values[i] - t.values[i]);
      norm += t.values[i] * t.values[i];
    }
    diff_all += diff;
    norm_all += norm;
    const double rel = norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
    if (rel > worst) worst = rel, worst_name = tname;
    EXPECT_LE(rel, 1e-3) << world << " ranks vs one process: " << tname;
    saw_frozen |= tname.find("segment0.down") != std::string::npos;
  }
  const double rel_all = std::sqrt(diff_all / norm_all);
  std::printf("%d ranks vs one process: relative difference %.2e over all parameters, worst tensor %s %.2e\n", world,
              rel_all, worst_name.c_str(), worst);
  EXPECT_LE(rel_all, 1e-5) << world << " ranks";
  return saw_frozen;
}

class Distributed : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/peerd_distributed_" + std::to_string(getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    ASSERT_TRUE(fs::exists(std::string(PEERD_CORPUS_DIR) + "/kjv/train.txt")) << "run scripts/corpora.sh kjv";
    // Small enough for 20 steps in seconds on one thread; a batch of 8 splits over 2 and 4 ranks.
    std::ofstream(dir_ + "/config.json") << R"({"model": {"dModel": 64, "context": 64, "peer": {"nKeys": 16}},
              "train": {"batchSize": 8, "warmupSteps": 5, "evalBytes": 2048, "evalEvery": 0, "logEvery": 5}})";
  }
  // Starts `world` ranks training `steps` steps (segments frozen and fresh ones added at step
  // `grow_at`), each dumping its parameters to dir/NAME-rRANK.params.
  std::vector<std::unique_ptr<Rank>> Launch(int world, const std::string& name, int steps = 20, int grow_at = 10,
                                            const std::string& config = "config.json") {
    const uint16_t port = RendezvousPort();
    std::vector<std::unique_ptr<Rank>> ranks;
    for (int r = 0; r < world; ++r)
      ranks.push_back(std::make_unique<Rank>(
          "--config " + dir_ + "/" + config + " --corpus " + std::string(PEERD_CORPUS_DIR) +
              "/kjv --threads 1 --steps " + std::to_string(steps) + " --grow-at " + std::to_string(grow_at) +
              " --world-size " + std::to_string(world) + " --rank " + std::to_string(r) + " --rendezvous 127.0.0.1:" +
              std::to_string(port) + " --collective-timeout-seconds 20 --dump-params " + Params(name, r),
          dir_ + "/" + name + "-r" + std::to_string(r) + ".log"));
    return ranks;
  }
  std::string Params(const std::string& name, int rank) const {
    return dir_ + "/" + name + "-r" + std::to_string(rank) + ".params";
  }
  std::string dir_;
};

TEST_F(Distributed, TwoAndFourRanksTrainTheSameModelAsOneProcess) {
  std::string one_log;
  {
    auto one = Launch(1, "w1");
    ASSERT_EQ(one[0]->Wait(), 0) << one[0]->log();
    one_log = one[0]->log();
  }
  ASSERT_EQ(StepLines(one_log).size(), 4u) << one_log;
  const auto single = ReadDump(Params("w1", 0));
  ASSERT_FALSE(single.empty());
  bool saw_frozen = false;
  for (int world : {2, 4}) {
    const std::string name = "w" + std::to_string(world);
    auto ranks = Launch(world, name);
    for (int r = 0; r < world; ++r) ASSERT_EQ(ranks[r]->Wait(), 0) << "rank " << r << ": " << ranks[r]->log();
    EXPECT_NE(ranks[0]->log().find("collectives"), std::string::npos) << ranks[0]->log();
    const auto root = ReadDump(Params(name, 0));
    ASSERT_EQ(root.size(), single.size());
    // Every rank holds exactly rank 0's bits: the same gradients, the same update, frozen rows included.
    for (int r = 1; r < world; ++r) {
      const auto other = ReadDump(Params(name, r));
      ASSERT_EQ(other.size(), root.size());
      for (const auto& [tname, t] : root)
        EXPECT_EQ(other.at(tname).bytes, t.bytes) << world << " ranks, rank " << r << ": " << tname;
    }
    saw_frozen |= ExpectSameModel(single, root, world);
    EXPECT_EQ(StepLines(ranks[0]->log()), StepLines(one_log)) << world << " ranks";
  }
  EXPECT_TRUE(saw_frozen) << "the segment frozen at step 10 should be among the compared tensors";
}

// A batch of one row over two ranks: rank 0's share is empty. It still takes part in every
// all-reduce (with zero gradients), and the model is the one process's.
TEST_F(Distributed, ARankWithAnEmptyShareOfTheBatchStillTakesPart) {
  std::ofstream(dir_ + "/one_row.json") << R"({"model": {"dModel": 64, "context": 64, "peer": {"nKeys": 16}},
            "train": {"batchSize": 1, "warmupSteps": 5, "evalBytes": 2048, "evalEvery": 0, "logEvery": 5}})";
  auto one = Launch(1, "b1w1", 12, 6, "one_row.json");
  ASSERT_EQ(one[0]->Wait(), 0) << one[0]->log();
  auto two = Launch(2, "b1w2", 12, 6, "one_row.json");
  for (int r = 0; r < 2; ++r) ASSERT_EQ(two[r]->Wait(), 0) << "rank " << r << ": " << two[r]->log();
  const auto single = ReadDump(Params("b1w1", 0)), root = ReadDump(Params("b1w2", 0)),
             other = ReadDump(Params("b1w2", 1));
  ASSERT_EQ(root.size(), single.size());
  for (const auto& [tname, t] : root) EXPECT_EQ(other.at(tname).bytes, t.bytes) << tname;
  ExpectSameModel(single, root, 2);
  EXPECT_EQ(StepLines(two[0]->log()), StepLines(one[0]->log()));
}

TEST_F(Distributed, ARankThatDiesStopsTheOthersWithAClearError) {
  auto ranks = Launch(2, "dies", /*steps=*/100000, /*grow_at=*/0);
  // Let them train a little, then kill rank 1.
  for (int i = 0; i < 600 && ranks[0]->log().find("step ") == std::string::npos; ++i)
    std::this_thread::sleep_for(100ms);
  ASSERT_NE(ranks[0]->log().find("step "), std::string::npos) << ranks[0]->log();
  ranks[1]->Kill();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(ranks[0]->Wait(60s), 1) << ranks[0]->log();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
  EXPECT_NE(ranks[0]->log().find("has gone or stopped answering"), std::string::npos) << ranks[0]->log();
}

TEST_F(Distributed, ARankThatNeverJoinsIsReportedNotWaitedForForever) {
  const uint16_t port = RendezvousPort();
  Rank alone("--config " + dir_ + "/config.json --corpus " + std::string(PEERD_CORPUS_DIR) +
                 "/kjv --threads 1 --steps 5 --world-size 2 --rank 0 --rendezvous 127.0.0.1:" + std::to_string(port) +
                 " --collective-timeout-seconds 3",
             dir_ + "/alone.log");
  EXPECT_EQ(alone.Wait(60s), 1) << alone.log();
  EXPECT_NE(alone.log().find("could not join the job"), std::string::npos) << alone.log();
}

// Two peerd ranks on loopback: rank 0 (PeerdProcess: data, ports, store) and rank 1 (a worker).
class DistributedPeerd : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/peerd_ranks_" + std::to_string(getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    std::ofstream(dir_ + "/config.json") << peerd::testing::kTinyConfigJson;
    std::ifstream kjv(std::string(PEERD_CORPUS_DIR) + "/kjv/train.txt");
    ASSERT_TRUE(kjv) << "run scripts/corpora.sh kjv";
    std::string text(160'000, '\0');
    kjv.read(text.data(), text.size());
    text.resize(text.rfind("\n\n") + 2);  // whole chapters
    const size_t half = text.rfind("\n\n", text.size() / 2) + 2;
    std::ofstream(dir_ + "/kjv1.txt") << text.substr(0, half);
    std::ofstream(dir_ + "/kjv2.txt") << text.substr(half);
    rendezvous_ = "127.0.0.1:" + std::to_string(RendezvousPort());
  }
  std::string RankFlags(int rank) const {
    return "--world-size 2 --rank " + std::to_string(rank) + " --rendezvous " + rendezvous_ +
           " --threads 1 --collective-timeout-seconds 20";
  }
  // Starts rank 1, then rank 0 (which returns once both joined and its ports are open).
  void StartRanks(PeerdProcess& rank0) {
    worker_ = std::make_unique<Rank>(RankFlags(1), dir_ + "/rank1.log", PEERD_BIN);
    ASSERT_NO_FATAL_FAILURE(rank0.Start(RankFlags(0) + " --checkpoint-every-steps 15"));
  }
  static bool Agree(const json& s) {
    if (s.value("worldSize", 0) != 2 || !s.value("ranksAgree", false) || s["ranks"].size() != 2) return false;
    return s["ranks"][0]["modelDigest"] == s["ranks"][1]["modelDigest"] &&
           U(s["ranks"][0], "step") == U(s["ranks"][1], "step");
  }
  std::string dir_, rendezvous_;
  std::unique_ptr<Rank> worker_;
};

TEST_F(DistributedPeerd, AdminAddAndFreezeDuringARunLeaveEveryRanksPoolIdentical) {
  PeerdProcess rank0(dir_);
  ASSERT_NO_FATAL_FAILURE(StartRanks(rank0));
  json s = rank0.CtlJson("status");
  EXPECT_TRUE(Agree(s)) << "right after joining: " << s.dump();
  ASSERT_EQ(rank0.Ingest("kjv", dir_ + "/kjv1.txt").code, 0);
  rank0.WaitFor([](const json& st) { return U(st, "step") >= 20; });
  // Freeze and add while batches keep coming: each change is compared across the ranks.
  ASSERT_EQ(rank0.Ctl("segments freeze 0").code, 0);
  s = rank0.CtlJson("status");
  EXPECT_TRUE(Agree(s)) << "after the freeze: " << s.dump();
  ASSERT_EQ(rank0.Ctl("segments add").code, 0);
  s = rank0.CtlJson("status");
  EXPECT_TRUE(Agree(s)) << "after the add: " << s.dump();
  ASSERT_EQ(rank0.Ctl("policy set replayRatio=0.5 lr=0.001").code, 0);
  s = rank0.CtlJson("status");
  EXPECT_TRUE(Agree(s)) << "after the policy change: " << s.dump();
  // A second task: batches now replay the first (shared across the ranks like fresh rows) and
  // distil replayed rows towards the teacher taken at the add.
  ASSERT_EQ(rank0.Ingest("kjv-b", dir_ + "/kjv2.txt").code, 0);
  // Trained up to a tail shorter than one sequence (context 32 + 1), which waits for more text.
  s = rank0.WaitFor([](const json& st) { return U(st, "spoolBacklogBytes") < 33 && U(st, "step") >= 60; });
  ASSERT_EQ(rank0.Ctl("checkpoint").code, 0);
  s = rank0.CtlJson("status");
  EXPECT_TRUE(Agree(s)) << "after training on with the new segment: " << s.dump();
  EXPECT_EQ(U(s["ranks"][0], "step"), U(s, "step"));
  EXPECT_GT(s.value("collectiveSecondsPerStep", 0.0), 0);
  // rank 0 stopping stops rank 1 cleanly.
  EXPECT_EQ(rank0.Kill(SIGTERM), 0);
  EXPECT_EQ(worker_->Wait(30s), 0) << worker_->log();
  EXPECT_NE(worker_->log().find("froze layer 0 segment 0"), std::string::npos) << worker_->log();
  EXPECT_NE(worker_->log().find("rank 0 stopped"), std::string::npos) << worker_->log();
}

TEST_F(DistributedPeerd, ALostRankStopsTrainingAndARestartResumesFromTheCheckpoint) {
  PeerdProcess rank0(dir_);
  ASSERT_NO_FATAL_FAILURE(StartRanks(rank0));
  ASSERT_EQ(rank0.Ingest("kjv", dir_ + "/kjv1.txt").code, 0);
  rank0.WaitFor([](const json& st) { return U(st, "step") >= 20; });
  ASSERT_EQ(rank0.Ctl("segments freeze 0").code, 0);
  ASSERT_EQ(rank0.Ctl("segments add").code, 0);
  json s = rank0.WaitFor([](const json& st) { return U(st, "lastCheckpointStep") >= 30; });
  std::string checksum;
  for (const auto& seg : s["segments"])
    if (seg.value("id", -1) == 0) checksum = seg.value("checksum", "");
  ASSERT_FALSE(checksum.empty()) << s.dump();
  // Rank 1 dies: rank 0 says why and exits with status 3, without a checkpoint.
  worker_->Kill();
  const auto killed = std::chrono::steady_clock::now();
  EXPECT_EQ(rank0.WaitExit(60s), 3);
  EXPECT_LT(std::chrono::steady_clock::now() - killed, 30s);
  const std::string log = Slurp(dir_ + "/peerd.log");
  EXPECT_NE(log.find("training stopped: "), std::string::npos) << log;
  EXPECT_NE(log.find("restart every rank"), std::string::npos) << log;
  const std::regex checkpoint("checkpoint at step ([0-9]+)");
  uint64_t last_checkpoint = 0;
  for (auto it = std::sregex_iterator(log.begin(), log.end(), checkpoint); it != std::sregex_iterator(); ++it)
    last_checkpoint = std::stoull((*it)[1]);
  ASSERT_GE(last_checkpoint, 30u) << log;

  // Both ranks again: the job resumes from that checkpoint, with the frozen segment as it was.
  ASSERT_NO_FATAL_FAILURE(StartRanks(rank0));
  s = rank0.CtlJson("status");
  EXPECT_GE(U(s, "step"), last_checkpoint);
  EXPECT_TRUE(Agree(s)) << s.dump();
  EXPECT_EQ(U(s["ranks"][1], "step"), last_checkpoint) << "rank 1 joins at rank 0's restored step";
  for (const auto& seg : s["segments"])
    if (seg.value("id", -1) == 0) {
      EXPECT_EQ(seg.value("checksum", ""), checksum) << s.dump();
    }
  // Everything acked gets trained, the rest of the first slice and all of the second.
  ASSERT_EQ(rank0.Ingest("kjv", dir_ + "/kjv2.txt").code, 0);
  // (up to a tail shorter than one sequence, context 32 + 1, which waits for more text).
  s = rank0.WaitFor([](const json& st) { return U(st, "spoolBacklogBytes") < 33; });
  EXPECT_LT(U(s, "spoolBacklogBytes"), 33u);
  EXPECT_EQ(rank0.Kill(SIGTERM), 0);
  EXPECT_EQ(worker_->Wait(30s), 0) << worker_->log();
}

}  // namespace
