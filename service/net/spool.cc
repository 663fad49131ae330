#include "service/net/spool.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <future>
#include <unordered_set>

#include "core/unix_time.h"
#include "proto/wire.pb.h"

namespace peerd {

namespace {

void PutBe64(std::string* out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out->push_back(static_cast<char>(v >> (8 * i)));
}

uint64_t GetBe64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

std::string DocKey(uint64_t index) {
  std::string k = "d";
  PutBe64(&k, index);
  return k;
}

std::string IdKey(const std::string& task, const std::string& id) { return "i" + task + '\0' + id; }

const char kCounterKey[] = "n";
const char kPruneKey[] = "p";

// The 16-byte record at `key` of the spool family as two numbers; left as they are when absent.
Status GetPair(const DataDirDb& db, const char* key, const std::string& malformed, uint64_t* a, uint64_t* b) {
  std::string value;
  rocksdb::Status s = db.db()->Get(rocksdb::ReadOptions(), db.family(Family::kSpool), key, &value);
  if (s.IsNotFound()) return Status::OK();
  if (!s.ok()) return FromRocks(s, "reading the spool in '" + db.dir() + "'");
  if (value.size() != 16) return Status::Corruption(malformed);
  *a = GetBe64(value.data());
  *b = GetBe64(value.data() + 8);
  return Status::OK();
}

Status Pruned(uint64_t index) {
  return Status::NotFound("spooled document " + std::to_string(index) +
                          ": its text was pruned after training (keep_trained_text is off)");
}

}  // namespace

Spool::Spool(std::shared_ptr<DataDirDb> db) : db_(std::move(db)) {}

Status Spool::Open(std::shared_ptr<DataDirDb> db, std::unique_ptr<Spool>* out) {
  std::unique_ptr<Spool> spool(new Spool(std::move(db)));
  Spool& sp = *spool;
  const std::string& dir = sp.db_->dir();
  if (Status st = GetPair(*sp.db_, kCounterKey, "spool counters in '" + dir + "' are malformed", &sp.last_index_,
                          &sp.total_bytes_);
      !st.ok())
    return st;
  const std::string prune_record = "the spool's prune record in '" + dir + "'";
  if (Status st = GetPair(*sp.db_, kPruneKey, prune_record + " is malformed", &sp.pruned_before_, &sp.pruned_bytes_);
      !st.ok())
    return st;
  // Prune only ever removes stored documents, so the record lies within the counters.
  if (sp.pruned_before_ == 0 || sp.pruned_before_ > sp.last_index_ + 1 || sp.pruned_bytes_ > sp.total_bytes_)
    return Status::Corruption(prune_record + " (documents before " + std::to_string(sp.pruned_before_) + ", " +
                              std::to_string(sp.pruned_bytes_) + " bytes) does not fit its counters (" +
                              std::to_string(sp.last_index_) + " documents, " + std::to_string(sp.total_bytes_) +
                              " bytes)");
  sp.pruning_before_ = sp.pruned_before_;
  // Whether the last run compacted what it pruned is not recorded (it may have died in between):
  // the next Prune compacts the whole pruned range once more.
  if (sp.pruned_before_ > 1) sp.uncompacted_from_ = 1;
  spool->writer_ = std::thread([p = spool.get()] { p->WriterLoop(); });
  *out = std::move(spool);
  return Status::OK();
}

Spool::~Spool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (writer_.joinable()) writer_.join();
}

void Spool::Append(const std::string& task, std::vector<NewDocument> docs, Done done) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back({task, std::move(docs), std::move(done)});
  }
  wake_.notify_one();
}

Status Spool::AppendAndWait(const std::string& task, std::vector<NewDocument> docs, uint64_t* duplicates) {
  std::promise<std::pair<Status, uint64_t>> result;
  Append(task, std::move(docs), [&](const Status& st, uint64_t dups) { result.set_value({st, dups}); });
  auto [st, dups] = result.get_future().get();
  if (duplicates) *duplicates = dups;
  return st;
}

void Spool::WriterLoop() {
  for (;;) {
    std::vector<Request> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      while (!queue_.empty()) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
    }
    std::vector<uint64_t> duplicates;
    Status st = Commit(batch, &duplicates);
    for (size_t i = 0; i < batch.size(); ++i) batch[i].done(st, st.ok() ? duplicates[i] : 0);
  }
}

Status Spool::Commit(std::vector<Request>& batch, std::vector<uint64_t>* duplicates) {
  rocksdb::ColumnFamilyHandle* cf = db_->family(Family::kSpool);
  uint64_t next, bytes;
  {
    std::lock_guard<std::mutex> lock(mu_);
    next = last_index_;
    bytes = total_bytes_;
  }
  const uint64_t now_ms = UnixMillis();
  rocksdb::WriteBatch wb;
  std::unordered_set<std::string> in_batch;
  uint64_t dup_total = 0;
  duplicates->assign(batch.size(), 0);
  for (size_t r = 0; r < batch.size(); ++r) {
    for (const NewDocument& d : batch[r].docs) {
      std::string id_key = IdKey(batch[r].task, d.id);
      std::string existing;
      bool dup = in_batch.count(id_key) > 0;
      if (!dup) {
        rocksdb::Status s = db_->db()->Get(rocksdb::ReadOptions(), cf, id_key, &existing);
        if (!s.ok() && !s.IsNotFound()) return FromRocks(s, "spool lookup");
        dup = s.ok();
      }
      if (dup) {
        ++(*duplicates)[r];
        ++dup_total;
        continue;
      }
      ++next;
      bytes += d.text.size();
      SpooledDocument doc;
      doc.set_task(batch[r].task);
      doc.set_id(d.id);
      doc.set_text(d.text);
      doc.set_unix_ms(now_ms);
      std::string index;
      PutBe64(&index, next);
      wb.Put(cf, DocKey(next), doc.SerializeAsString());
      wb.Put(cf, id_key, index);
      in_batch.insert(std::move(id_key));
    }
  }
  std::string counters;
  PutBe64(&counters, next);
  PutBe64(&counters, bytes);
  wb.Put(cf, kCounterKey, counters);
  Status written = db_->SyncedWrite(&wb, "the spool");  // acknowledged means on disk
  if (!written.ok()) {
    // A full disk clears by itself; a filesystem the kernel turned read-only needs an operator.
    const bool read_only = written.message().find("Read-only file system") != std::string::npos;
    Status error = Status::IOError(written.message() + ": documents are not acknowledged" +
                                   (read_only ? " until the data directory is repaired and peerd restarted" : ""));
    std::lock_guard<std::mutex> lock(mu_);
    write_error_ = error.message();
    return error;
  }
  std::lock_guard<std::mutex> lock(mu_);
  write_error_.clear();
  last_index_ = next;
  total_bytes_ = bytes;
  duplicates_ += dup_total;
  ++commits_;
  return Status::OK();
}

Status Spool::Read(uint64_t from, size_t max, std::vector<SpoolEntry>* out) const {
  out->clear();
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kSpool)));
  for (it->Seek(DocKey(std::max<uint64_t>(from, 1))); it->Valid() && out->size() < max; it->Next()) {
    if (it->key().size() != 9 || it->key()[0] != 'd') break;
    SpooledDocument doc;
    if (!doc.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return Status::Corruption("spooled document " + std::to_string(GetBe64(it->key().data() + 1)) + " is unreadable");
    out->push_back({GetBe64(it->key().data() + 1), doc.task(), doc.id(), doc.text()});
  }
  if (Status st = FromRocks(it->status(), "reading the spool"); !st.ok()) return st;
  // Checked after reading, so that a Prune racing this read cannot make it skip documents silently.
  if (const uint64_t horizon = prune_horizon(); std::max<uint64_t>(from, 1) < horizon) {
    out->clear();
    return Status::NotFound("reading the spool from document " + std::to_string(from) + ": documents before " +
                            std::to_string(horizon) + " were pruned after training (keep_trained_text is off)");
  }
  return Status::OK();
}

Status Spool::Get(uint64_t index, SpoolEntry* out) const {
  std::string value;
  rocksdb::Status s = db_->db()->Get(rocksdb::ReadOptions(), db_->family(Family::kSpool), DocKey(index), &value);
  if (s.IsNotFound() && index < prune_horizon()) return Pruned(index);
  if (!s.ok()) return FromRocks(s, "spooled document " + std::to_string(index));
  SpooledDocument doc;
  if (!doc.ParseFromString(value))
    return Status::Corruption("spooled document " + std::to_string(index) + " is unreadable");
  *out = {index, doc.task(), doc.id(), doc.text()};
  return Status::OK();
}

Status Spool::TaskIndex(uint64_t before, std::map<std::string, std::vector<uint64_t>>* out) const {
  out->clear();
  const uint64_t first = prune_horizon();  // the 'i' records outlive the text: list kept documents only
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), db_->family(Family::kSpool)));
  for (it->Seek("i"); it->Valid() && it->key().starts_with("i"); it->Next()) {
    const std::string key = it->key().ToString();
    const size_t nul = key.find('\0', 1);
    if (nul == std::string::npos || it->value().size() != 8)
      return Status::Corruption("a spool id record is unreadable");
    const uint64_t index = GetBe64(it->value().data());
    if (index >= first && index < before) (*out)[key.substr(1, nul - 1)].push_back(index);
  }
  for (auto& [task, indices] : *out) std::sort(indices.begin(), indices.end());
  return FromRocks(it->status(), "indexing the spool by task");
}

uint64_t Spool::last_index() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_index_;
}

uint64_t Spool::pruned_before() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pruned_before_;
}

Status Spool::RetentionHorizon(const SpoolRetention& retention, uint64_t limit, uint64_t now_ms,
                               uint64_t* before) const {
  uint64_t kept;
  {
    std::lock_guard<std::mutex> lock(mu_);
    *before = pruned_before_;
    kept = total_bytes_ - pruned_bytes_;
    limit = std::min(limit, last_index_ + 1);
  }
  if (!retention.bounded() || *before >= limit) return Status::OK();
  const uint64_t max_age_ms = retention.max_age_seconds * 1000;
  const std::string upper = DocKey(limit);
  const rocksdb::Slice upper_slice(upper);
  rocksdb::ReadOptions options;
  options.iterate_upper_bound = &upper_slice;
  options.fill_cache = false;
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(options, db_->family(Family::kSpool)));
  // Oldest first: documents arrive in index order, so the first one within both bounds ends it.
  for (it->Seek(DocKey(*before)); it->Valid(); it->Next()) {
    SpooledDocument doc;
    if (!doc.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return Status::Corruption("spooled document " + std::to_string(GetBe64(it->key().data() + 1)) +
                                " is unreadable: cannot apply the retention bound");
    const bool over_bytes = retention.max_bytes && kept > retention.max_bytes;
    const bool too_old = max_age_ms && doc.unix_ms() && doc.unix_ms() + max_age_ms < now_ms;
    if (!over_bytes && !too_old) break;
    kept -= std::min<uint64_t>(kept, doc.text().size());
    *before = GetBe64(it->key().data() + 1) + 1;
  }
  return FromRocks(it->status(), "reading the spool to apply the retention bound");
}

uint64_t Spool::prune_horizon() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pruning_before_;
}

Status Spool::Prune(uint64_t before) {
  std::lock_guard<std::mutex> prune_lock(prune_mu_);
  uint64_t from, pruned_bytes;
  {
    std::lock_guard<std::mutex> lock(mu_);
    from = pruned_before_;
    before = std::min(before, last_index_ + 1);
    pruned_bytes = pruned_bytes_;
  }
  if (before <= from) return uncompacted_from_ ? CompactPruned(uncompacted_from_, from) : Status::OK();
  uint64_t bytes = 0;
  if (Status st = TextBytes(from, before, &bytes); !st.ok()) return st;
  pruned_bytes += bytes;
  rocksdb::ColumnFamilyHandle* cf = db_->family(Family::kSpool);
  rocksdb::WriteBatch wb;
  // One range tombstone, however many documents: the indices below `before` are never reused.
  wb.DeleteRange(cf, DocKey(from), DocKey(before));
  std::string record;
  PutBe64(&record, before);
  PutBe64(&record, pruned_bytes);
  wb.Put(cf, kPruneKey, record);  // with the deletion: a crash leaves both or neither
  {
    std::lock_guard<std::mutex> lock(mu_);
    pruning_before_ = before;
  }
  Status written = db_->SyncedWrite(&wb, "pruning the spool");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!written.ok()) {
      pruning_before_ = pruned_before_;
      return written;
    }
    pruned_before_ = before;
    pruned_bytes_ = pruned_bytes;
  }
  return CompactPruned(uncompacted_from_ ? uncompacted_from_ : from, before);
}

Status Spool::TextBytes(uint64_t from, uint64_t before, uint64_t* bytes) const {
  *bytes = 0;
  const std::string upper = DocKey(before);
  const rocksdb::Slice upper_slice(upper);
  rocksdb::ReadOptions options;
  options.iterate_upper_bound = &upper_slice;
  options.fill_cache = false;  // text about to be deleted: keep the cache for what is read again
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(options, db_->family(Family::kSpool)));
  for (it->Seek(DocKey(from)); it->Valid(); it->Next()) {
    SpooledDocument doc;
    if (!doc.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return Status::Corruption("spooled document " + std::to_string(GetBe64(it->key().data() + 1)) +
                                " is unreadable: cannot count its bytes to prune it");
    *bytes += doc.text().size();
  }
  return FromRocks(it->status(), "counting the spool's bytes to prune");
}

// A deletion only writes a tombstone: the text stays in the SST files below it — readable by
// anyone with the directory and sst_dump — until a compaction happens to merge the two, which for
// old data in the bottom level may be never. Compacting the pruned range now rewrites the files
// that hold it without the text (kForceOptimized: the bottom level too, where the text usually
// sits). The WAL that logged a document holds it until every column family written alongside has
// flushed; RocksDB retires such logs by itself as the families flush.
Status Spool::CompactPruned(uint64_t from, uint64_t before) {
  const std::string begin = DocKey(from), end = DocKey(before);
  const rocksdb::Slice begin_slice(begin), end_slice(end);
  rocksdb::CompactRangeOptions options;
  options.exclusive_manual_compaction = false;  // background compactions (and so appends) go on
  options.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForceOptimized;
  rocksdb::Status s = db_->db()->CompactRange(options, db_->family(Family::kSpool), &begin_slice, &end_slice);
  if (!s.ok()) {
    uncompacted_from_ = from;  // the next Prune tries again
    return FromRocks(s, "the text of documents before " + std::to_string(before) +
                            " is deleted, but compacting it out of the spool's files failed");
  }
  uncompacted_from_ = 0;
  return Status::OK();
}

void Spool::SetConsumed(uint64_t next_index, uint64_t consumed_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  consumed_index_ = next_index;
  consumed_bytes_ = consumed_bytes;
}

SpoolStats Spool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SpoolStats s;
  s.documents = last_index_;
  s.bytes = total_bytes_;
  s.duplicates = duplicates_;
  s.commits = commits_;
  s.backlog_bytes = total_bytes_ > consumed_bytes_ ? total_bytes_ - consumed_bytes_ : 0;
  s.backlog_documents = last_index_ >= consumed_index_ ? last_index_ - consumed_index_ + 1 : 0;
  s.kept_bytes = total_bytes_ - pruned_bytes_;
  s.write_error = write_error_;
  return s;
}

}  // namespace peerd
