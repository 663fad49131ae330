// BatchSource: training batches cut from the spool in arrival order, each byte trained once,
// plus optional replay of earlier documents: balanced over the tasks trained before, other than
// the one training now (uniform over documents would let a task of many small documents crowd
// out one of few large ones: 4,241 fortunes against 24 Python files in the demo). It tracks the cursor — the first
// spooled byte not yet in a batch — which checkpoints record, so a restart trains exactly what was not trained yet.
#pragma once

#include <torch/torch.h>

#include <deque>
#include <map>
#include <random>
#include <string>

#include "service/net/spool.h"
#include "service/training_journal.h"

namespace peerd {

struct SpoolCursor {
  uint64_t index = 1;           // spooled document
  uint64_t offset = 0;          // tokens of it already trained (its bytes, then its end-of-document token)
  uint64_t consumed_bytes = 0;  // text bytes trained, all time
  // Fresh tokens trained per ingest task, all time: the spool records each document's task, so
  // the forgetting report knows which task each phase trained (EvalRow.trained_tokens).
  std::map<std::string, uint64_t> tokens_by_task;
};

class BatchSource {
 public:
  BatchSource(Spool* spool, SpoolCursor cursor, uint64_t seed) : spool_(spool), cursor_(cursor), rng_(seed) {}

  // Up to `batch` sequences of seq_len + 1 tokens ([b, seq_len + 1] int64), of which a share
  // `replay_ratio` is drawn from documents before the cursor of other tasks than the next fresh
  // document's: those come first, and *replayed says how many there are (fresh rows take the
  // place of replayed ones while no other task has been trained, or none of its text is kept).
  // Fewer than `batch` only when `allow_partial`; an undefined tensor when there is not enough
  // new data.
  torch::Tensor Next(int64_t batch, int64_t seq_len, double replay_ratio, bool allow_partial, Status* status,
                     int64_t* replayed = nullptr);
  const SpoolCursor& cursor() const { return cursor_; }
  // The fresh text the last Next() took, in order (what the training journal records).
  const std::vector<TrainedSpan>& last_fresh() const { return last_fresh_; }
  // Fresh tokens read from the spool and not yet trained.
  int64_t buffered_tokens() const;

 private:
  struct Piece {
    uint64_t index, offset;
    std::string task;
    std::vector<int64_t> tokens;  // the document's remaining bytes and its end-of-document token
  };
  Status Fill(int64_t want);
  torch::Tensor Take(int64_t n);  // n fresh tokens
  // Up to `count` windows of n tokens from documents before the cursor: a task other than
  // `current` at random, then a random document of it (and the task's next ones, for length).
  // Documents whose text the spool pruned are skipped, never an error: with none left, no rows.
  Status Replay(int64_t count, int64_t n, const std::string& current, std::vector<torch::Tensor>* rows);
  // Drops from trained_ the documents the spool pruned, `missing` among them, and tasks left empty.
  void ForgetPruned(uint64_t missing);

  Spool* spool_;
  SpoolCursor cursor_;
  std::vector<TrainedSpan> last_fresh_;
  std::deque<Piece> buffer_;
  uint64_t next_read_ = 0;  // next spool index to read into the buffer (0: from the cursor)
  // Documents wholly trained and not pruned, by task (read from the spool's id index on the first
  // replay, then kept up as documents are trained; pruned ones dropped when a replay meets one).
  std::map<std::string, std::vector<uint64_t>> trained_;
  bool trained_indexed_ = false;
  std::mt19937_64 rng_;
};

}  // namespace peerd
