// Access tokens of peerd's two ports: generated at first start into files only their owner can
// read, compared in constant time. No LibTorch.
#pragma once

#include <string>

#include "core/status.h"

namespace peerd {

// Reads the token in `path`, or, when the file does not exist, writes a new random one there
// (mode 0600) and returns it.
Status LoadOrCreateToken(const std::string& path, std::string* token);

// 32 random bytes from the kernel's entropy, as 64 hex digits.
std::string RandomToken();

// Compares without letting the time taken depend on where the strings differ.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

}  // namespace peerd
