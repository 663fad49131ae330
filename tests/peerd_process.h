// PeerdProcess: the real peerd binary as a child process, for tests that drive the service through
// its public interface (peerctl, peer-ingest, the ports). Header-only; no LibTorch.
//
// The binaries come from compile definitions: PEERD_BIN, PEER_INGEST_BIN, PEERCTL_BIN.
#pragma once

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace peerd::testing {

using nlohmann::json;
using namespace std::chrono_literals;

struct ShellResult {
  int code;
  std::string out;
};

// Runs `cmd` with /bin/sh; stdout and stderr together.
inline ShellResult Sh(const std::string& cmd) {
  ShellResult r{0, ""};
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

inline std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A port for a server whose address every party must know before it binds (a rendezvous). Taken
// below the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, from which bind(0)
// and connect() draw), so no other test's server or client can be handed it between this probe and
// the bind; probed free on 127.0.0.1, starting at a place that differs per process.
inline uint16_t RendezvousPort() {
  unsigned low = 32768, high = 60999;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low >> high;
  const unsigned first = 10000, count = low > first + 1000 ? low - first : 1000;
  static unsigned next = static_cast<unsigned>(getpid()) * 7919u;
  for (unsigned tries = 0; tries < count; ++tries) {
    const uint16_t port = static_cast<uint16_t>(first + next++ % count);
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    const bool free = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    close(fd);
    if (free) return port;
  }
  ADD_FAILURE() << "no free port in [" << first << ", " << first + count << ") on 127.0.0.1";
  return 0;
}

// A model small enough that peerd starts in about a second and steps fast on one thread.
inline constexpr char kTinyConfigJson[] =
    R"({"model": {"dModel": 32, "nLayers": 1, "context": 32, "peer": {"nKeys": 16}}, "train": {"batchSize": 4}})";

// Up to `max` non-empty lines of a text file (KJV train.txt: a verse each).
inline std::vector<std::string> NonEmptyLines(const std::string& path, size_t max) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  for (std::string line; lines.size() < max && std::getline(in, line);)
    if (!line.empty()) lines.push_back(std::move(line));
  return lines;
}

// Polls the file at `path` until it holds `needle` or `limit` passes; says which when it fails.
inline ::testing::AssertionResult FileShows(const std::string& path, const std::string& needle,
                                            std::chrono::milliseconds limit = 10'000ms) {
  for (auto end = std::chrono::steady_clock::now() + limit;; std::this_thread::sleep_for(20ms)) {
    if (Slurp(path).find(needle) != std::string::npos) return ::testing::AssertionSuccess();
    if (std::chrono::steady_clock::now() >= end)
      return ::testing::AssertionFailure()
             << path << " did not show '" << needle << "' within " << limit.count() << " ms";
  }
}

// A JSON number that protobuf's JSON mapping may print as a string (64-bit fields).
inline uint64_t U(const json& j, const char* key) {
  if (!j.contains(key)) return 0;
  return j[key].is_string() ? std::stoull(j[key].get<std::string>()) : j[key].get<uint64_t>();
}

// Waits up to `limit` for child *pid to exit: its exit code (then *pid = -1), or -1 (still running,
// or killed by a signal).
inline int WaitForExit(pid_t* pid, std::chrono::seconds limit) {
  for (auto end = std::chrono::steady_clock::now() + limit; *pid > 0 && std::chrono::steady_clock::now() < end;
       std::this_thread::sleep_for(50ms)) {
    int status = 0;
    if (waitpid(*pid, &status, WNOHANG) == *pid) {
      *pid = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
  }
  return -1;
}

class PeerdProcess {
 public:
  // `dir` holds config.json (without one, peerd starts without --config); peerd keeps its data in
  // dir/data and logs to dir/peerd.log. The first
  // start lets peerd bind free ports itself (port 0, so no other process can take them between a
  // probe and the bind); with `keep_ports`, every later start binds the ports the first one got,
  // so that clients reconnect across restarts.
  explicit PeerdProcess(std::string dir, bool keep_ports = false) : dir_(std::move(dir)), keep_ports_(keep_ports) {}
  ~PeerdProcess() { Kill(SIGKILL); }

  // Starts peerd (extra flags appended) and waits until it logs its ports. Files may be read from
  // `dir` (--task-root) unless the flags name other roots.
  void Start(const std::string& extra_flags = "--checkpoint-every-steps 15") {
    const std::string log = dir_ + "/peerd.log";
    const size_t log_start = std::filesystem::exists(log) ? std::filesystem::file_size(log) : 0;
    const bool reuse = keep_ports_ && !data_port_.empty();
    const std::string data = reuse ? data_port_ : "0", admin = reuse ? admin_port_ : "0";
    pid_ = fork();
    if (pid_ == 0) {
      const std::string config =
          std::filesystem::exists(dir_ + "/config.json") ? " --config " + dir_ + "/config.json" : "";
      const std::string cmd = std::string(PEERD_BIN) + " --data-dir " + dir_ + "/data" + config +
                              " --data-listen 127.0.0.1:" + data + " --admin-listen 127.0.0.1:" + admin +
                              (extra_flags.find("--task-root") == std::string::npos ? " --task-root " + dir_ : "") +
                              " " + extra_flags + " >> " + log + " 2>&1";
      execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), nullptr);
      _exit(127);
    }
    const std::regex ports("data port 127\\.0\\.0\\.1:([0-9]+).*admin API 127\\.0\\.0\\.1:([0-9]+)");
    for (int i = 0; i < 600; ++i) {
      const std::string text = Slurp(log).substr(log_start);
      std::smatch m;
      if (std::regex_search(text, m, ports)) {
        data_port_ = m[1];
        admin_port_ = m[2];
        return;
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        FAIL() << "peerd exited while starting: " << text;
      }
      std::this_thread::sleep_for(100ms);
    }
    FAIL() << "peerd did not start: " << Slurp(log).substr(log_start);
  }

  // Sends `sig` and reaps; the exit code, or -1 when killed by a signal.
  int Kill(int sig) {
    if (pid_ <= 0) return -1;
    kill(pid_, sig);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  // Waits up to `limit` for peerd to exit by itself: its exit code, or -1 (still running, or killed
  // by a signal).
  int WaitExit(std::chrono::seconds limit) { return WaitForExit(&pid_, limit); }
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  ShellResult Ctl(const std::string& args, const std::string& token_file = "") const {
    return Sh(std::string(PEERCTL_BIN) + " --admin 127.0.0.1:" + admin_port_ + " --token-file " +
              (token_file.empty() ? dir_ + "/data/admin.token" : token_file) + " " + args);
  }
  json CtlJson(const std::string& args) const {
    ShellResult r = Ctl("--json " + args);
    EXPECT_EQ(r.code, 0) << args << ": " << r.out;
    return json::parse(r.out, nullptr, false);
  }
  // peer-ingest's command line for `task` and `file`, its acked ids kept in dir/TASK.acked.
  std::string IngestCommand(const std::string& task, const std::string& file, const std::string& flags = "") const {
    return std::string(PEER_INGEST_BIN) + " " + flags + " --server 127.0.0.1:" + data_port_ + " --task " + task +
           " --token-file " + dir_ + "/data/data.token --resume " + dir_ + "/" + task + ".acked " + file;
  }
  ShellResult Ingest(const std::string& task, const std::string& file) const { return Sh(IngestCommand(task, file)); }

  // Polls status until pred holds (or the deadline passes); returns the last status.
  json WaitFor(const std::function<bool(const json&)>& pred, std::chrono::seconds limit = 120s) const {
    json s;
    for (auto end = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < end;
         std::this_thread::sleep_for(200ms)) {
      s = CtlJson("status");
      if (!s.is_discarded() && pred(s)) return s;
    }
    ADD_FAILURE() << "timed out; last status: " << s.dump();
    return s;
  }

  const std::string& dir() const { return dir_; }
  std::string data_dir() const { return dir_ + "/data"; }
  const std::string& data_port() const { return data_port_; }
  const std::string& admin_port() const { return admin_port_; }

 private:
  std::string dir_;
  std::string data_port_, admin_port_;  // empty until the first start
  bool keep_ports_;
  pid_t pid_ = -1;
};

}  // namespace peerd::testing
