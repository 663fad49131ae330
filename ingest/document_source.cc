#include "ingest/document_source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <thread>

namespace peerd {

namespace fs = std::filesystem;

Status ParseSplit(const std::string& text, SplitSpec* out) {
  if (text == "file")
    *out = {SplitMode::kFile, 0};
  else if (text == "blank-line")
    *out = {SplitMode::kBlankLine, 0};
  else if (text == "line")
    *out = {SplitMode::kLine, 0};
  else if (text.rfind("bytes:", 0) == 0) {
    try {
      size_t used = 0;
      const uint64_t n = std::stoull(text.substr(6), &used);
      if (used != text.size() - 6 || n == 0) throw std::invalid_argument("n");
      *out = {SplitMode::kBytes, n};
    } catch (const std::exception&) {
      return Status::InvalidArgument("--split bytes:N needs a positive whole N, got '" + text + "'");
    }
  } else {
    return Status::InvalidArgument("--split must be file, blank-line, line or bytes:N, got '" + text + "'");
  }
  return Status::OK();
}

Status DocumentSource::Open(const std::vector<std::string>& paths, SplitSpec split,
                            std::unique_ptr<DocumentSource>* out) {
  auto source = std::make_unique<DocumentSource>();
  source->split_ = split;
  if (paths.empty()) return Status::InvalidArgument("no input: give files, directories or - for stdin");
  for (const std::string& p : paths) {
    std::error_code ec;
    if (p == "-") {
      source->inputs_.push_back(p);
    } else if (fs::is_directory(p, ec)) {
      std::vector<std::string> files;
      for (auto it = fs::recursive_directory_iterator(p, ec); !ec && it != fs::recursive_directory_iterator();
           it.increment(ec))
        if (it->is_regular_file()) files.push_back(it->path().string());
      if (ec) return Status::IOError("cannot walk directory '" + p + "': " + ec.message());
      std::sort(files.begin(), files.end());
      source->inputs_.insert(source->inputs_.end(), files.begin(), files.end());
    } else if (fs::is_regular_file(p, ec)) {
      source->inputs_.push_back(p);
    } else {
      return Status::NotFound("input '" + p + "' is neither a file nor a directory");
    }
  }
  *out = std::move(source);
  return Status::OK();
}

DocumentSource::~DocumentSource() {
  if (held_ >= 0) ::close(held_);
}

namespace {

// Reads [from, end of file) of `fd` into *out (appended); false on a read error.
bool ReadFrom(int fd, uint64_t from, std::string* out) {
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::pread(fd, buf, sizeof buf, static_cast<off_t>(from));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) return true;
    out->append(buf, static_cast<size_t>(n));
    from += static_cast<uint64_t>(n);
  }
}

}  // namespace

bool DocumentSource::LoadNextInput() {
  while (next_input_ < inputs_.size()) {
    name_ = inputs_[next_input_++];
    data_.clear();
    if (name_ == "-") {
      data_.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
      name_ = "stdin";
    } else {
      const int fd = ::open(name_.c_str(), O_RDONLY | O_CLOEXEC);
      struct stat st {};
      if (fd < 0 || ::fstat(fd, &st) != 0 || !ReadFrom(fd, 0, &data_)) {
        status_ = Status::IOError("cannot read '" + name_ + "': " + std::strerror(errno));
        if (fd >= 0) ::close(fd);
        return false;
      }
      // The followed file stays open: what it is, not what its name points at later.
      if (follow_stop_ && next_input_ == inputs_.size()) {
        held_ = fd;
        inode_ = st.st_ino;
      } else {
        ::close(fd);
      }
    }
    pos_ = 0;
    base_ = 0;
    if (!data_.empty() || held_ >= 0) return true;
  }
  return false;
}

bool DocumentSource::Restart(bool reopen, const std::string& why) {
  if (reopen) {
    const int fd = ::open(name_.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0) {
      if (fd >= 0) ::close(fd);
      return false;  // the new file is not there yet: try again on the next poll
    }
    ::close(held_);
    held_ = fd;
    inode_ = st.st_ino;
  }
  data_.clear();
  pos_ = 0;
  base_ = 0;
  tail_complete_ = false;
  ++restarts_;
  if (on_restart_) on_restart_(name_ + " " + why + ": reading it again from its start");
  return true;
}

bool DocumentSource::WaitForMore() {
  while (!follow_stop_->load()) {
    struct stat held {
    }, named{};
    const uint64_t have = base_ + data_.size();
    if (::fstat(held_, &held) == 0) {
      if (static_cast<uint64_t>(held.st_size) > have) {
        std::string more;
        if (!ReadFrom(held_, have, &more)) {
          status_ = Status::IOError("cannot read '" + name_ + "': " + std::strerror(errno));
          return false;
        }
        base_ += pos_;
        data_ = data_.substr(pos_) + more;
        pos_ = 0;
        return true;
      }
      if (static_cast<uint64_t>(held.st_size) < have) {
        Restart(/*reopen=*/false, "was truncated");
        continue;
      }
    }
    // Nothing new in the file held: has its name moved on to another file?
    if (::stat(name_.c_str(), &named) == 0 && (named.st_ino != held.st_ino || named.st_dev != held.st_dev)) {
      if (pos_ < data_.size()) {  // the replaced file will not grow: its tail is a whole document
        tail_complete_ = true;
        return true;
      }
      if (Restart(/*reopen=*/true, "was replaced (rotated)")) continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    if (while_waiting_ && !while_waiting_()) return false;
  }
  return false;
}

bool DocumentSource::Next(IngestDocument* doc) {
  for (;;) {
    if (!status_.ok()) return false;
    const bool last_input = next_input_ >= inputs_.size();
    const bool following = follow_stop_ && last_input && held_ >= 0;
    if (pos_ >= data_.size()) {
      if (following) {
        if (!WaitForMore()) return false;
      } else if (!LoadNextInput()) {
        return false;
      }
    }
    size_t end = data_.size(), next = data_.size();
    bool complete = true;  // its separator has been read (the end of a finished input counts)
    switch (split_.mode) {
      case SplitMode::kFile: break;
      case SplitMode::kLine: {
        size_t nl = data_.find('\n', pos_);
        if (nl != std::string::npos)
          end = nl + 1, next = nl + 1;
        else
          complete = false;
        break;
      }
      case SplitMode::kBlankLine: {
        size_t gap = data_.find("\n\n", pos_);
        if (gap != std::string::npos) {
          end = gap + 1;
          next = data_.find_first_not_of('\n', gap);
          if (next == std::string::npos) next = data_.size();
        } else {
          complete = false;
        }
        break;
      }
      case SplitMode::kBytes:
        end = next = std::min<size_t>(data_.size(), pos_ + split_.bytes);
        complete = end - pos_ == split_.bytes;
        break;
    }
    // While following, a document without its separator may still be growing: wait for it.
    if (following && !complete && !tail_complete_) {
      if (!WaitForMore()) return false;
      continue;
    }
    const size_t start = pos_;
    pos_ = next;
    std::string text = data_.substr(start, end - start);
    if (text.find_first_not_of(" \t\r\n") == std::string::npos) continue;  // blank: nothing to train on
    doc->id = name_ + "@" + std::to_string(base_ + start) + "+" + std::to_string(end - start);
    if (restarts_) doc->id += "~" + std::to_string(restarts_) + ":" + std::to_string(inode_);
    doc->text = std::move(text);
    return true;
  }
}

}  // namespace peerd
