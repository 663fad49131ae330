// TrainingJournal: an append-only text file saying which spooled text each training step trained,
// so that "every acknowledged document is trained exactly once" can be checked from outside the
// trainer's own counters (the checkpoint's cursor and byte count). peerd writes it when started
// with --training-journal FILE; tests/fault/crash_loop_test.cc reads it across kills.
//
// Lines, in the order things happened:
//   start STEP INDEX OFFSET    peerd opened its model at STEP (the checkpoint's), resuming the
//                              spool at document INDEX, token OFFSET; every step line written
//                              before with a step above STEP was rolled back and is trained again
//   step STEP INDEX FROM TO    step STEP trained tokens [FROM, TO) of spooled document INDEX
//                              (a document's tokens are its bytes, then its end-of-document token)
// Replayed text is not fresh and is not listed. Each step's lines go out in one write(2), after
// the step and before any checkpoint that includes it; the file is synced before each checkpoint,
// so that what a checkpoint covers is in the journal even after a power loss.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace peerd {

struct TrainedSpan {
  uint64_t index = 0;         // spooled document
  uint64_t from = 0, to = 0;  // its tokens [from, to)
};

class TrainingJournal {
 public:
  TrainingJournal() = default;  // writes nothing
  ~TrainingJournal();
  TrainingJournal(const TrainingJournal&) = delete;
  TrainingJournal& operator=(const TrainingJournal&) = delete;

  // Opens `path` for appending (created when missing).
  Status Open(const std::string& path);
  bool open() const { return fd_ >= 0; }

  Status Started(int64_t step, uint64_t index, uint64_t offset);
  Status Trained(int64_t step, const std::vector<TrainedSpan>& spans);
  Status Sync();

 private:
  Status Append(const std::string& lines);

  std::string path_;
  int fd_ = -1;
};

}  // namespace peerd
