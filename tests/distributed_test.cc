// Multi-rank training (DESIGN.md §6, issue 8), through the real programs: peer-train processes
// joined by c10d on loopback train the same model as one process given the same global batches;
// a rank that dies stops the others with a clear error. No LibTorch here: the ranks' parameters
// are compared from the files `peer-train --dump-params` writes.
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
using peerd::testing::FreeLoopbackPort;
using peerd::testing::Slurp;

// A peer-train process, its output in `log`.
class Rank {
 public:
  Rank(const std::string& args, const std::string& log) : log_(log) {
    pid_ = fork();
    if (pid_ == 0) {
      const std::string cmd = "exec " + std::string(PEER_TRAIN_BIN) + " " + args + " > " + log + " 2>&1";
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
  // The exit code, or -1 after `limit` (the process is then killed) or a signal.
  int Wait(std::chrono::seconds limit = 300s) {
    for (auto end = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < end;
         std::this_thread::sleep_for(50ms)) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
    }
    return -1;
  }
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

// Reads a --dump-params file (format in service/peer_train.cc).
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

class Distributed : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/peerd_distributed_" + std::to_string(getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    ASSERT_TRUE(fs::exists(std::string(PEERD_CORPUS_DIR) + "/kjv/train.txt")) << "run scripts/corpora.sh kjv";
    // Small enough for 20 steps in seconds on one thread; a batch of 8 splits over 2 and 4 ranks.
    std::ofstream(dir_ + "/config.json")
        << R"({"model": {"dModel": 64, "context": 64, "peer": {"nKeys": 16}},
              "train": {"batchSize": 8, "warmupSteps": 5, "evalBytes": 2048, "evalEvery": 0, "logEvery": 5}})";
  }
  // Starts `world` ranks training `steps` steps (segments frozen and fresh ones added at step
  // `grow_at`), each dumping its parameters to dir/NAME-rRANK.params.
  std::vector<std::unique_ptr<Rank>> Launch(int world, const std::string& name, int steps = 20, int grow_at = 10) {
    const uint16_t port = FreeLoopbackPort();
    std::vector<std::unique_ptr<Rank>> ranks;
    for (int r = 0; r < world; ++r)
      ranks.push_back(std::make_unique<Rank>(
          "--config " + dir_ + "/config.json --corpus " + std::string(PEERD_CORPUS_DIR) + "/kjv --threads 1 --steps " +
              std::to_string(steps) + " --grow-at " + std::to_string(grow_at) + " --world-size " +
              std::to_string(world) + " --rank " + std::to_string(r) + " --rendezvous 127.0.0.1:" +
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
      for (const auto& [tname, t] : root) EXPECT_EQ(other.at(tname).bytes, t.bytes) << world << " ranks, rank " << r << ": " << tname;
    }
    // And the model one process trains on the same global batches: to 1e-5 relative over all
    // parameters. Single tensors may differ more: summing the batch in W parts rounds otherwise,
    // and Adam turns a gradient that is pure rounding noise (the attention key bias, which softmax
    // ignores) into full-size steps — so a tensor is held to 1e-3, which still catches one that
    // is not summed over the ranks or not sent at all.
    double diff_all = 0, norm_all = 0, worst = 0;
    std::string worst_name;
    for (const auto& [tname, t] : single) {
      ASSERT_TRUE(root.count(tname)) << tname;
      const Tensor& d = root.at(tname);
      ASSERT_EQ(d.values.size(), t.values.size()) << tname;
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
    std::printf("%d ranks vs one process after 20 steps: relative difference %.2e over all parameters, worst tensor %s %.2e\n",
                world, rel_all, worst_name.c_str(), worst);
    EXPECT_LE(rel_all, 1e-5) << world << " ranks";
    // The same loss and gradient norm at every logged step: the loss and the gradients are the
    // global batch's, not a rank's share (Adam alone would hide a gradient off by a factor W).
    EXPECT_EQ(StepLines(ranks[0]->log()), StepLines(one_log)) << world << " ranks";
  }
  EXPECT_TRUE(saw_frozen) << "the segment frozen at step 10 should be among the compared tensors";
}

TEST_F(Distributed, ARankThatDiesStopsTheOthersWithAClearError) {
  auto ranks = Launch(2, "dies", /*steps=*/100000, /*grow_at=*/0);
  // Let them train a little, then kill rank 1.
  for (int i = 0; i < 600 && ranks[0]->log().find("step ") == std::string::npos; ++i) std::this_thread::sleep_for(100ms);
  ASSERT_NE(ranks[0]->log().find("step "), std::string::npos) << ranks[0]->log();
  ranks[1]->Kill();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(ranks[0]->Wait(60s), 1) << ranks[0]->log();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
  EXPECT_NE(ranks[0]->log().find("has gone or stopped answering"), std::string::npos) << ranks[0]->log();
}

TEST_F(Distributed, ARankThatNeverJoinsIsReportedNotWaitedForForever) {
  const uint16_t port = FreeLoopbackPort();
  Rank alone("--config " + dir_ + "/config.json --corpus " + std::string(PEERD_CORPUS_DIR) +
                 "/kjv --threads 1 --steps 5 --world-size 2 --rank 0 --rendezvous 127.0.0.1:" + std::to_string(port) +
                 " --collective-timeout-seconds 3",
             dir_ + "/alone.log");
  EXPECT_EQ(alone.Wait(60s), 1) << alone.log();
  EXPECT_NE(alone.log().find("could not join the job"), std::string::npos) << alone.log();
}

}  // namespace
