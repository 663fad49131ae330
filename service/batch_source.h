// BatchSource: training batches cut from the spool in arrival order, each byte trained once,
// plus optional replay of earlier documents. It tracks the cursor — the first spooled byte not yet
// in a batch — which checkpoints record, so a restart trains exactly what was not trained yet.
#pragma once

#include <torch/torch.h>

#include <deque>
#include <random>

#include "service/spool.h"

namespace peerd {

struct SpoolCursor {
  uint64_t index = 1;   // spooled document
  uint64_t offset = 0;  // tokens of it already trained (its bytes, then its end-of-document token)
  uint64_t consumed_bytes = 0;  // text bytes trained, all time
};

class BatchSource {
 public:
  BatchSource(Spool* spool, SpoolCursor cursor, uint64_t seed) : spool_(spool), cursor_(cursor), rng_(seed) {}

  // Up to `batch` sequences of seq_len + 1 tokens ([b, seq_len + 1] int64), of which a share
  // `replay_ratio` is drawn from documents before the cursor: those come first, and *replayed
  // says how many there are. Fewer than `batch` only when `allow_partial`; an undefined tensor
  // when there is not enough new data.
  torch::Tensor Next(int64_t batch, int64_t seq_len, double replay_ratio, bool allow_partial, Status* status,
                     int64_t* replayed = nullptr);
  const SpoolCursor& cursor() const { return cursor_; }
  // Fresh tokens read from the spool and not yet trained.
  int64_t buffered_tokens() const;

 private:
  struct Piece {
    uint64_t index, offset;
    std::vector<int64_t> tokens;  // the document's remaining bytes and its end-of-document token
  };
  Status Fill(int64_t want);
  torch::Tensor Take(int64_t n);  // n fresh tokens
  // `count` windows of n tokens from random documents before the cursor.
  Status Replay(int64_t count, int64_t n, std::vector<torch::Tensor>* rows);

  Spool* spool_;
  SpoolCursor cursor_;
  std::deque<Piece> buffer_;
  uint64_t next_read_ = 0;  // next spool index to read into the buffer (0: from the cursor)
  std::mt19937_64 rng_;
};

}  // namespace peerd
