#include "core/text_file.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace peerd {

Status ReadTextFile(const std::string& path, std::string* bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError("cannot read '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  *bytes = ss.str();
  if (bytes->empty())
    return Status::InvalidArgument("'" + path + "' is empty: there is nothing to train or evaluate on");
  return Status::OK();
}

}  // namespace peerd
