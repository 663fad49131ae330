// Reading a whole text file as bytes, with a Status naming the file when it cannot be read.
#pragma once

#include <string>

#include "core/status.h"

namespace peerd {

// Reads `path` into *bytes. A missing, unreadable or empty file is an error naming the path.
Status ReadTextFile(const std::string& path, std::string* bytes);

}  // namespace peerd
