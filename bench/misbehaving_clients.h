// MisbehavingClients: clients that misbehave against a data port until stopped, so that a
// benchmark can measure what they cost the well-behaved ones, which should keep their
// throughput. Each kind runs on its own threads with plain blocking sockets:
//   silent        hello, then nothing (held open; the idle timeout's business)
//   half_frame    hello, then two bytes of a length prefix, then nothing
//   non_reader    hello, then documents as fast as TCP takes them, never reading an ack; after
//                 `non_reader_bytes` it holds the socket, still reading nothing
//   garbage       connect, send random bytes, read the error, reconnect: in a loop
//   cut_mid_frame connect, hello, half a document frame, close: in a loop
// No LibTorch: this is ingest-side code.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace peerd::bench {

struct MisbehavingCounts {
  int silent = 16;
  int half_frame = 16;
  int non_reader = 2;
  uint64_t non_reader_bytes = 1 << 20;
  int garbage = 2;
  int cut_mid_frame = 2;
};

class MisbehavingClients {
 public:
  // Starts every client against 127.0.0.1:`port`; they run until Stop() or destruction.
  MisbehavingClients(uint16_t port, std::string token, const MisbehavingCounts& counts);
  ~MisbehavingClients();  // Stop()
  MisbehavingClients(const MisbehavingClients&) = delete;
  MisbehavingClients& operator=(const MisbehavingClients&) = delete;

  void Stop();
  uint64_t connections() const { return connections_; }  // connections opened so far, all kinds
  uint64_t bytes_sent() const { return bytes_sent_; }

 private:
  void Silent(bool half_frame);
  void NonReader(int index, uint64_t bytes);
  void GarbageLoop(uint64_t seed);
  void CutMidFrameLoop(int index);
  int Connect();                                   // a socket fd, or -1
  bool SendAll(int fd, const std::string& bytes);  // false when the peer closed or send timed out
  void HoldUntilStopped() const;

  const uint16_t port_;
  const std::string token_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> connections_{0}, bytes_sent_{0};
  std::vector<std::thread> threads_;
};

}  // namespace peerd::bench
