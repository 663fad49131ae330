#include "bench/misbehaving_clients.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <random>

#include "proto/frame.h"
#include "proto/wire.pb.h"

namespace peerd::bench {

namespace {

std::string HelloFrame(const std::string& token, const std::string& task) {
  ClientFrame hello;
  hello.mutable_hello()->set_protocol_version(wire::kProtocolVersion);
  hello.mutable_hello()->set_token(token);
  hello.mutable_hello()->set_task(task);
  return wire::EncodeFrame(hello);
}

std::string DocumentFrame(const std::string& id, uint64_t seq, size_t bytes) {
  ClientFrame doc;
  doc.mutable_document()->set_seq(seq);
  doc.mutable_document()->set_id(id);
  doc.mutable_document()->set_text(std::string(bytes, 'r'));
  return wire::EncodeFrame(doc);
}

}  // namespace

MisbehavingClients::MisbehavingClients(uint16_t port, std::string token, const MisbehavingCounts& counts)
    : port_(port), token_(std::move(token)) {
  for (int i = 0; i < counts.silent; ++i) threads_.emplace_back([this] { Silent(false); });
  for (int i = 0; i < counts.half_frame; ++i) threads_.emplace_back([this] { Silent(true); });
  for (int i = 0; i < counts.non_reader; ++i)
    threads_.emplace_back([this, i, b = counts.non_reader_bytes] { NonReader(i, b); });
  for (int i = 0; i < counts.garbage; ++i) threads_.emplace_back([this, i] { GarbageLoop(1000 + i); });
  for (int i = 0; i < counts.cut_mid_frame; ++i) threads_.emplace_back([this, i] { CutMidFrameLoop(i); });
}

MisbehavingClients::~MisbehavingClients() { Stop(); }

void MisbehavingClients::Stop() {
  stop_ = true;
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

int MisbehavingClients::Connect() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  // Blocking calls wake every second so that Stop() is never kept waiting long.
  timeval second{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &second, sizeof second);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &second, sizeof second);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port_);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  ++connections_;
  return fd;
}

bool MisbehavingClients::SendAll(int fd, const std::string& bytes) {
  size_t sent = 0;
  while (sent < bytes.size() && !stop_) {
    const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
    bytes_sent_ += static_cast<uint64_t>(n);
  }
  return sent == bytes.size();
}

void MisbehavingClients::HoldUntilStopped() const {
  while (!stop_) std::this_thread::sleep_for(std::chrono::milliseconds(20));
}

void MisbehavingClients::Silent(bool half_frame) {
  const int fd = Connect();
  if (fd < 0) return;
  if (SendAll(fd, HelloFrame(token_, "silent")) && half_frame) SendAll(fd, std::string("\0\0", 2));
  HoldUntilStopped();
  ::close(fd);
}

void MisbehavingClients::NonReader(int index, uint64_t bytes) {
  const int fd = Connect();
  if (fd < 0) return;
  bool open = SendAll(fd, HelloFrame(token_, "non-reader"));
  for (uint64_t seq = 1, sent = 0; open && sent < bytes && !stop_; ++seq) {
    const std::string frame = DocumentFrame("nr" + std::to_string(index) + "-" + std::to_string(seq), seq, 4000);
    open = SendAll(fd, frame);
    sent += frame.size();
  }
  HoldUntilStopped();
  ::close(fd);
}

void MisbehavingClients::GarbageLoop(uint64_t seed) {
  std::mt19937_64 rng(seed);
  while (!stop_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // a loop, not a port exhaustion
    const int fd = Connect();
    if (fd < 0) continue;
    std::string garbage(64, '\0');
    for (char& c : garbage) c = static_cast<char>(rng());
    if (SendAll(fd, garbage)) {
      char reply[256];
      while (!stop_ && ::recv(fd, reply, sizeof reply, 0) > 0) {}  // the error frame, then peerd closes
    }
    ::close(fd);
  }
}

void MisbehavingClients::CutMidFrameLoop(int index) {
  for (uint64_t seq = 1; !stop_; ++seq) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const int fd = Connect();
    if (fd < 0) continue;
    const std::string frame = DocumentFrame("cut" + std::to_string(index), seq, 2000);
    if (SendAll(fd, HelloFrame(token_, "cut-mid-frame"))) SendAll(fd, frame.substr(0, frame.size() / 2));
    ::close(fd);
  }
}

}  // namespace peerd::bench
