// HOST:PORT as peerd's programs take it ("127.0.0.1:7070", "localhost:7070", "[::1]:7070"), parsed
// once for the ports peerd listens on and the clients that connect to them. No dependencies.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/status.h"

namespace peerd {

// Splits "host:port" (an IPv6 host in brackets, which are dropped); InvalidArgument naming the
// text when it is not one.
inline Status ParseHostPort(const std::string& text, std::string* host, uint16_t* port) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size())
    return Status::InvalidArgument("'" + text + "' is not HOST:PORT (e.g. 127.0.0.1:7070 or [::1]:7070)");
  // An IPv6 host is bracketed ("[::1]:7070"), so that its colons are not the port's.
  const bool bracketed = text[0] == '[';
  if (bracketed && text[colon - 1] != ']')
    return Status::InvalidArgument("'" + text + "' is not [IPV6]:PORT (e.g. [::1]:7070)");
  try {
    size_t used = 0;
    unsigned long p = std::stoul(text.substr(colon + 1), &used);
    if (used != text.size() - colon - 1 || p > 65535) throw std::out_of_range("port");
    *host = bracketed ? text.substr(1, colon - 2) : text.substr(0, colon);
    *port = static_cast<uint16_t>(p);
  } catch (const std::exception&) {
    return Status::InvalidArgument("'" + text + "' has no valid port (0-65535)");
  }
  return Status::OK();
}

}  // namespace peerd
