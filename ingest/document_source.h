// DocumentSource: files, directories and stdin cut into documents for peer-ingest. No LibTorch.
//
// A document's id is stable across runs — "<path>@<offset>+<length>" — so a resumed or repeated
// run names the same documents the same way and the server stores each once. A followed file that
// is truncated or replaced (log rotation) is read again from its start; its documents then carry
// "~<n>:<inode>" after the id (the n-th new start in this run), so the server does not take them
// for the earlier file's documents at the same offsets.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace peerd {

struct IngestDocument {
  std::string id, text;
};

enum class SplitMode { kFile, kBlankLine, kLine, kBytes };

struct SplitSpec {
  SplitMode mode = SplitMode::kBlankLine;
  uint64_t bytes = 0;  // kBytes: chunk size
};

// Parses "file", "blank-line", "line" or "bytes:N".
Status ParseSplit(const std::string& text, SplitSpec* out);

class DocumentSource {
 public:
  // `paths`: files, directories (walked recursively, in name order) or "-" for stdin.
  static Status Open(const std::vector<std::string>& paths, SplitSpec split, std::unique_ptr<DocumentSource>* out);
  // Like `tail -F`: after the end of the last input (a regular file), keep watching it and yield
  // each document appended to it once it is complete (its separator written), until *stop. When
  // the file shrinks (truncated) or its name points at another file (rotated: the old one's last
  // bytes are read first, its unterminated tail as a last document), reading starts again at the
  // new file's start, and `on_restart` (if set) is told why.
  void Follow(const std::atomic<bool>* stop, std::function<void(const std::string& why)> on_restart = {}) {
    follow_stop_ = stop;
    on_restart_ = std::move(on_restart);
  }
  ~DocumentSource();
  // While following, `hook` runs about every 200 ms when the file has nothing new (the sender
  // looks after its connection meanwhile); returning false ends the source.
  void WhileWaiting(std::function<bool()> hook) { while_waiting_ = std::move(hook); }
  // The next non-empty document; false at the end. A read error ends the source with status().
  bool Next(IngestDocument* doc);
  const Status& status() const { return status_; }

 private:
  bool LoadNextInput();
  std::vector<std::string> inputs_;  // files in order ("-" for stdin)
  size_t next_input_ = 0;
  SplitSpec split_;
  // Waits for bytes appended to the followed file; false once *follow_stop_ is set.
  bool WaitForMore();
  // Starts the followed file again from offset 0 (held_ reopened by name when `reopen`).
  bool Restart(bool reopen, const std::string& why);
  std::string name_, data_;  // the current input, read whole (in follow mode: what is not yet cut)
  size_t pos_ = 0;
  uint64_t base_ = 0;                  // file offset of data_[0]
  int held_ = -1;                      // following: the followed file, open (it may be renamed away meanwhile)
  uint64_t restarts_ = 0, inode_ = 0;  // new starts of the followed file in this run; its inode
  bool tail_complete_ = false;         // the held file was replaced: its unterminated tail is whole
  const std::atomic<bool>* follow_stop_ = nullptr;
  std::function<void(const std::string&)> on_restart_;
  std::function<bool()> while_waiting_;
  Status status_;
};

}  // namespace peerd
