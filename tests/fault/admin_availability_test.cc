// The admin API stays available to its operator while other clients misbehave: the real peerd
// (tiny model, --admin-timeout-seconds 3) beside 40 silent connections, slow-loris headers, a
// client that pipelines requests and never reads the answers, and 32 unauthenticated 60 MB uploads
// sent slowly. An authenticated GET /v1/status must be answered within a second throughout; the
// silent, slow and non-reading connections must be closed by peerd once their deadline passes; the
// uploads must be refused on their headers (401) without peerd reading or holding their bodies.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>
#include <vector>

#include "tests/peerd_process.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using peerd::testing::PeerdProcess;
using peerd::testing::Slurp;

// A connected socket to 127.0.0.1:port, or -1.
int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
  if (fd >= 0) close(fd);
  return -1;
}

bool SendAll(int fd, const std::string& bytes) {
  for (size_t sent = 0; sent < bytes.size();) {
    const ssize_t n = send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

// Whatever fd receives until the peer closes it or `limit` passes; *closed says which.
std::string ReadUntilClosed(int fd, std::chrono::milliseconds limit, bool* closed) {
  std::string in;
  *closed = false;
  for (const auto end = Clock::now() + limit; Clock::now() < end;) {
    pollfd p{fd, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
    if (::poll(&p, 1, static_cast<int>(std::max<int64_t>(1, left.count()))) <= 0) continue;
    char buf[65536];
    const ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      in.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    *closed = true;  // 0: closed; < 0: reset
    return in;
  }
  return in;
}

double RssMb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024;
  return -1;
}

TEST(AdminAvailability, MisbehavingClientsNeitherStarveTheOperatorNorStayOpen) {
  const std::string dir = ::testing::TempDir() + "/peerd_admin_availability_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << peerd::testing::kTinyConfigJson;
  PeerdProcess peerd(dir);
  peerd.Start("--admin-timeout-seconds 3");
  ASSERT_TRUE(peerd.running());
  const int port = std::stoi(peerd.admin_port());
  std::string token;
  std::getline(std::ifstream(dir + "/data/admin.token"), token);
  const std::string status_request =
      "GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + "\r\n\r\n";
  const double rss_start = RssMb(peerd.pid());

  // 40 silent connections.
  std::vector<int> silent;
  for (int i = 0; i < 40; ++i) silent.push_back(Connect(port));
  // 5 slow-loris clients: a header byte every 300 ms, never finishing.
  std::vector<int> slow;
  for (int i = 0; i < 5; ++i) slow.push_back(Connect(port));
  std::atomic<bool> stop{false};
  std::thread loris([&] {
    const std::string line = "GET /v1/status HTTP/1.1\r\nX-Slow: " + std::string(200, 'a');
    for (size_t i = 0; i < line.size() && !stop; ++i) {
      for (int fd : slow) send(fd, &line[i], 1, MSG_NOSIGNAL);
      std::this_thread::sleep_for(300ms);
    }
  });
  // A client that pipelines 20,000 authenticated requests and reads none of the answers.
  const int pipeliner = Connect(port);
  std::thread pipelining([&] {
    std::string many;
    for (int i = 0; i < 20000 && !stop; ++i) many += status_request;
    SendAll(pipeliner, many);  // ends when peerd closes the connection
  });
  // 32 unauthenticated uploads announcing 60 MB each, their bodies trickling in.
  std::vector<int> uploads;
  for (int i = 0; i < 32; ++i) {
    uploads.push_back(Connect(port));
    SendAll(uploads.back(),
            "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 60000000\r\n\r\n{\"name\": \"t\", \"text\": \"");
  }
  std::thread trickle([&] {
    const std::string chunk(64 << 10, 'x');
    for (int round = 0; round < 40 && !stop; ++round) {
      for (int fd : uploads) send(fd, chunk.data(), chunk.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      std::this_thread::sleep_for(100ms);
    }
  });

  // The operator, every 250 ms for 8 s: answered within a second each time.
  double slowest = 0;
  int answered = 0, asked = 0;
  for (const auto end = Clock::now() + 8s; Clock::now() < end; std::this_thread::sleep_for(250ms)) {
    ++asked;
    const auto start = Clock::now();
    const int fd = Connect(port);
    if (fd < 0) continue;
    SendAll(fd,
            "GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + "\r\nConnection: close\r\n\r\n");
    bool closed = false;
    const std::string reply = ReadUntilClosed(fd, 2000ms, &closed);
    close(fd);
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    slowest = std::max(slowest, seconds);
    if (reply.rfind("HTTP/1.1 200", 0) == 0 && seconds < 1.0) ++answered;
  }
  EXPECT_EQ(answered, asked) << "slowest answer " << slowest << " s";

  // Every upload was refused on its headers: 401, and the connection closed.
  for (int fd : uploads) {
    bool closed = false;
    const std::string reply = ReadUntilClosed(fd, 2000ms, &closed);
    EXPECT_EQ(reply.rfind("HTTP/1.1 401", 0), 0u) << reply.substr(0, 100);
    EXPECT_TRUE(closed);
  }
  // By now (8 s > the 3 s deadline, plus the watchdog's tick) peerd has closed the silent, the
  // slow and the non-reading connections.
  for (int fd : silent) {
    bool closed = false;
    const std::string got = ReadUntilClosed(fd, 1000ms, &closed);
    EXPECT_TRUE(closed) << "a silent connection is still open after 8 s";
    EXPECT_TRUE(got.empty()) << got;
  }
  for (int fd : slow) {
    bool closed = false;
    ReadUntilClosed(fd, 1000ms, &closed);
    EXPECT_TRUE(closed) << "a slow-loris connection is still open after 8 s";
  }
  bool pipeliner_closed = false;
  ReadUntilClosed(pipeliner, 10000ms, &pipeliner_closed);  // drains what peerd had sent
  EXPECT_TRUE(pipeliner_closed) << "the non-reading client is still connected";
  stop = true;
  shutdown(pipeliner, SHUT_RDWR);
  pipelining.join();
  loris.join();
  trickle.join();
  const double rss_end = RssMb(peerd.pid());
  // 32 × 60 MB announced: none of it may be held. Threads and buffers for ~80 connections fit in
  // far less than one upload.
  EXPECT_LT(rss_end - rss_start, 48.0) << "peerd grew from " << rss_start << " to " << rss_end << " MB";
  std::printf("admin availability: %d/%d operator requests answered within 1 s (slowest %.3f s); RSS %.0f -> %.0f MB\n",
              answered, asked, slowest, rss_start, rss_end);
  for (int fd : silent) close(fd);
  for (int fd : slow) close(fd);
  for (int fd : uploads) close(fd);
  close(pipeliner);
  EXPECT_EQ(peerd.Kill(SIGTERM), 0) << Slurp(dir + "/peerd.log");
  fs::remove_all(dir);
}

}  // namespace
