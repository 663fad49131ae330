// The wall clock as milliseconds since the Unix epoch: the time stamps peerd stores (spooled
// documents, checkpoints, evaluation rows). Header-only, no LibTorch.
#pragma once

#include <chrono>
#include <cstdint>

namespace peerd {

inline uint64_t UnixMillis() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

}  // namespace peerd
