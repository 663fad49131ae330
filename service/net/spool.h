// Spool: documents streamed into peerd, durable before they are acknowledged, read back in
// arrival order by the trainer (and at random, for replay). A view of the data directory's
// RocksDB (column family "spool"); no LibTorch.
//
// Layout of the "spool" column family:
//   'd' be64(index)          -> SpooledDocument   arrival order, indices from 1, never reused
//   'i' task '\0' id         -> be64(index)       a (task, id) is stored once, however often sent
//   'n'                      -> be64(last index) be64(total text bytes)
//   'p'                      -> be64(pruned before) be64(pruned text bytes)
//                               written by Prune; absent until the first prune (nothing pruned)
// Appends are group-committed: Append() queues a request; one writer thread commits everything
// waiting in one WriteBatch with a synced WAL, then runs each request's callback — so a callback
// with OK means the documents are on disk, and many clients share one fsync.
// A failed commit (disk full) acknowledges nothing and is remembered in stats().write_error; the
// next commits try again (DataDirDb::SyncedWrite resumes the database first), so once space is back
// writes and acks go on by themselves.
//
// Prune() forgets the text of documents already trained (peerd with keep_trained_text off keeps
// no old document; with it on, what a SpoolRetention bound allows): their 'd' records go, their
// 'i' records stay — ids, not text — so a resent (task, id) is still a duplicate and is not
// trained twice.
//
// Thread-safe.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "experts_store/data_dir_db.h"

namespace peerd {

struct SpoolEntry {
  uint64_t index = 0;
  std::string task, id, text;
};

// A bound on the trained text the spool keeps (for replay) when keep_trained_text is on: the
// oldest trained documents go first, until the kept text is within `max_bytes` and none is older
// than `max_age_seconds` (0: no bound of that kind). Untrained documents, and trained ones that no
// durable checkpoint covers yet, are kept whatever the bound: retention never costs an acked
// document its training. Replay draws from what is kept, so a bound trades how far back replay
// reaches for disk.
struct SpoolRetention {
  uint64_t max_bytes = 0;
  uint64_t max_age_seconds = 0;
  bool bounded() const { return max_bytes > 0 || max_age_seconds > 0; }
};

struct SpoolStats {
  uint64_t documents = 0;      // stored, all time
  uint64_t bytes = 0;          // text bytes stored, all time
  uint64_t duplicates = 0;     // appends of a (task, id) already stored (since open)
  uint64_t commits = 0;        // WriteBatches synced (since open)
  uint64_t backlog_bytes = 0;  // text bytes after the consumer's cursor
  // Documents not wholly consumed: each still owes its end-of-document token, so the backlog in
  // tokens is backlog_bytes + backlog_documents.
  uint64_t backlog_documents = 0;
  uint64_t kept_bytes = 0;  // text bytes still stored: `bytes` less what Prune removed
  std::string write_error;  // why the last commit failed (disk full, read-only); "" once one succeeds
};

class Spool {
 public:
  static Status Open(std::shared_ptr<DataDirDb> db, std::unique_ptr<Spool>* out);
  ~Spool();  // commits what is queued, then stops the writer

  struct NewDocument {
    std::string id, text;
  };
  // (status, duplicates among these documents). Runs on the writer thread: keep it short.
  using Done = std::function<void(const Status&, uint64_t duplicates)>;
  // Queues documents of `task` for the next group commit; `done` runs once they are durable (or
  // the write failed: then none of them is stored).
  void Append(const std::string& task, std::vector<NewDocument> docs, Done done);
  // Append and wait.
  Status AppendAndWait(const std::string& task, std::vector<NewDocument> docs, uint64_t* duplicates = nullptr);

  // Up to `max` documents with index >= from, in order. NotFound when `from` is below
  // pruned_before(): that text is gone, and a reader starting there (a cursor behind the prune)
  // would otherwise silently skip documents it never trained.
  Status Read(uint64_t from, size_t max, std::vector<SpoolEntry>* out) const;
  // One document by index. NotFound when it was pruned (the message says so).
  Status Get(uint64_t index, SpoolEntry* out) const;
  // The indices of the documents in [pruned_before(), before), by task, each list ascending (from
  // the id index, without reading any text).
  Status TaskIndex(uint64_t before, std::map<std::string, std::vector<uint64_t>>* out) const;
  uint64_t last_index() const;

  // Removes the text of every document with index < `before` (clamped to last_index() + 1), in
  // one synced WriteBatch with the new 'p' record, then compacts that key range so the text leaves
  // the files too. The caller guarantees those documents are wholly trained and covered by a
  // durable checkpoint. `before` <= pruned_before(): nothing to do (OK). Prunes are serialized;
  // appends and reads go on meanwhile.
  Status Prune(uint64_t before);
  // First index whose text is kept (1: nothing pruned).
  uint64_t pruned_before() const;
  // Where Prune() must go to honour `retention`, never past `limit` (the first document a durable
  // checkpoint does not cover in full): *before = pruned_before() when nothing is due. `now_ms` is
  // the wall clock the ages are taken against; documents stored without a time have no age.
  Status RetentionHorizon(const SpoolRetention& retention, uint64_t limit, uint64_t now_ms, uint64_t* before) const;

  // The consumer (trainer) reports how far it has read: documents before `next_index` and their
  // `consumed_bytes` of text. Backlog = stored bytes − consumed bytes.
  void SetConsumed(uint64_t next_index, uint64_t consumed_bytes);
  SpoolStats stats() const;

 private:
  explicit Spool(std::shared_ptr<DataDirDb> db);
  void WriterLoop();
  struct Request {
    std::string task;
    std::vector<NewDocument> docs;
    Done done;
  };
  Status Commit(std::vector<Request>& batch, std::vector<uint64_t>* duplicates);
  // Text bytes of the documents in [from, before).
  Status TextBytes(uint64_t from, uint64_t before, uint64_t* bytes) const;
  Status CompactPruned(uint64_t from, uint64_t before);
  uint64_t prune_horizon() const;  // pruning_before_

  std::shared_ptr<DataDirDb> db_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<Request> queue_;
  bool stopping_ = false;
  uint64_t last_index_ = 0, total_bytes_ = 0;  // guarded by mu_; durable values
  uint64_t consumed_index_ = 1, consumed_bytes_ = 0;
  uint64_t duplicates_ = 0, commits_ = 0;
  // Guarded by mu_. pruned_*: durable ('p'). pruning_before_: what a Prune in progress deletes
  // (>= pruned_before_), so that a Get racing it still says "pruned", not just "not found".
  uint64_t pruned_before_ = 1, pruned_bytes_ = 0, pruning_before_ = 1;
  std::string write_error_;
  // Held for a whole Prune: two at once would count the same documents' bytes twice.
  std::mutex prune_mu_;
  // Guarded by prune_mu_: first pruned index not known to be compacted (a compaction failed, or
  // the spool was reopened; 0: none), compacted again by the next Prune.
  uint64_t uncompacted_from_ = 0;
  std::thread writer_;
};

}  // namespace peerd
