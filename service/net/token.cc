#include "service/net/token.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>

namespace peerd {

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() != b.size();
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i)
    diff |= static_cast<unsigned char>((i < a.size() ? a[i] : 0) ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

std::string RandomToken() {
  std::random_device rd;  // the kernel's entropy
  static const char kHex[] = "0123456789abcdef";
  std::string token;
  for (int i = 0; i < 32; ++i) {
    unsigned v = rd() & 0xff;
    token.push_back(kHex[v >> 4]);
    token.push_back(kHex[v & 15]);
  }
  return token;
}

Status LoadOrCreateToken(const std::string& path, std::string* token) {
  std::ifstream in(path);
  if (in) {
    std::getline(in, *token);
    if (token->empty())
      return Status::InvalidArgument("token file '" + path + "' is empty: delete it to get a new token");
    return Status::OK();
  }
  *token = RandomToken();
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return Status::IOError("cannot create token file '" + path + "': " + std::strerror(errno));
  const std::string line = *token + "\n";
  const bool ok = write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) && fsync(fd) == 0;
  close(fd);
  if (!ok) return Status::IOError("cannot write token file '" + path + "'");
  return Status::OK();
}

}  // namespace peerd
