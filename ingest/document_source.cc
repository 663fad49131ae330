#include "ingest/document_source.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
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

bool DocumentSource::LoadNextInput() {
  while (next_input_ < inputs_.size()) {
    name_ = inputs_[next_input_++];
    if (name_ == "-") {
      data_.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
      name_ = "stdin";
    } else {
      std::ifstream in(name_, std::ios::binary);
      if (!in) {
        status_ = Status::IOError("cannot read '" + name_ + "'");
        return false;
      }
      std::ostringstream ss;
      ss << in.rdbuf();
      data_ = ss.str();
    }
    pos_ = 0;
    base_ = 0;
    if (!data_.empty()) return true;
  }
  return false;
}

bool DocumentSource::WaitForMore() {
  while (!follow_stop_->load()) {
    std::error_code ec;
    const uint64_t size = fs::file_size(name_, ec);
    const uint64_t have = base_ + data_.size();
    if (!ec && size > have) {
      std::ifstream in(name_, std::ios::binary);
      in.seekg(static_cast<std::streamoff>(have));
      std::string more(size - have, '\0');
      in.read(more.data(), static_cast<std::streamsize>(more.size()));
      more.resize(static_cast<size_t>(in.gcount()));
      base_ += pos_;
      data_ = data_.substr(pos_) + more;
      pos_ = 0;
      return true;
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
    const bool following = follow_stop_ && last_input && name_ != "stdin" && !name_.empty();
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
    if (following && !complete) {
      if (!WaitForMore()) return false;
      continue;
    }
    const size_t start = pos_;
    pos_ = next;
    std::string text = data_.substr(start, end - start);
    if (text.find_first_not_of(" \t\r\n") == std::string::npos) continue;  // blank: nothing to train on
    doc->id = name_ + "@" + std::to_string(base_ + start) + "+" + std::to_string(end - start);
    doc->text = std::move(text);
    return true;
  }
}

}  // namespace peerd
