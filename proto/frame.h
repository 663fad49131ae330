// Frames of the data port (proto/wire.proto): a 4-byte big-endian length, then the message.
// Shared by peerd and peer-ingest; header-only, no dependencies beyond protobuf.
#pragma once

#include <cctype>
#include <cstdint>
#include <string>

namespace peerd::wire {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr uint32_t kHeaderBytes = 4;

// Serialises `message` behind its length prefix.
template <typename Message>
std::string EncodeFrame(const Message& message) {
  std::string body = message.SerializeAsString();
  const uint32_t n = static_cast<uint32_t>(body.size());
  std::string frame = {static_cast<char>(n >> 24), static_cast<char>(n >> 16), static_cast<char>(n >> 8),
                       static_cast<char>(n)};
  return frame + body;
}

inline uint32_t DecodeLength(const unsigned char* header) {
  return (uint32_t{header[0]} << 24) | (uint32_t{header[1]} << 16) | (uint32_t{header[2]} << 8) | header[3];
}

// Task names go into logs, keys and file names: keep them plain.
inline bool ValidTaskName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) return false;
  return true;
}

}  // namespace peerd::wire
