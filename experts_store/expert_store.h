// ExpertStore: frozen PEER experts in RocksDB — the source of truth; memory is a cache of it.
//
// The store knows bytes and segments, not training: a segment arrives as sub-key bytes and one
// row of bytes per expert (down ‖ up, in the segment's dtype), with a manifest. Freezing writes
// all of it in one WriteBatch with a synced WAL, so after any crash a segment is either absent
// (still training, as of the caller's last checkpoint) or frozen in full. Opening verifies what it
// is asked to and refuses, naming the segment, anything whose checksum does not hold.
//
// Thread-safety: const methods may be called concurrently; FreezeSegment needs external
// serialisation against other FreezeSegment calls for the same segment.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "experts_store/data_dir_db.h"
#include "proto/store.pb.h"

namespace peerd {

class ExpertStore {
 public:
  // Opens (or creates) the store in directory `dir`. Errors name the directory and say what to do:
  // not a store, a store of a newer schema version, a read-only or unreadable directory.
  static Status Open(const std::string& dir, const DataDirOptions& options, std::unique_ptr<ExpertStore>* out);
  // A view of an open database (which it keeps open).
  explicit ExpertStore(std::shared_ptr<DataDirDb> db);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // Bytes of one expert's row in `dtype` (down ‖ up).
  static size_t RowBytes(RowDtype dtype, uint32_t d_model);

  // Writes segment (m.layer, m.segment) frozen: sub_keys (fp32 [heads, 2, n_keys, dk/2]), and
  // row(e, &bytes) for every expert e in [0, n_keys²) — all in one synced WriteBatch. Fills in
  // m's state and checksum and returns it in *written. FailedPrecondition if already frozen;
  // InvalidArgument for sizes that do not match the manifest.
  using RowWriter = std::function<void(uint32_t expert, std::string* row)>;
  Status FreezeSegment(const SegmentManifest& m, std::string_view sub_keys, const RowWriter& row,
                       SegmentManifest* written = nullptr);

  // Every segment manifest, ordered by (layer, segment).
  Status Manifests(std::vector<SegmentManifest>* out) const;
  Status ReadSubKeys(uint32_t layer, uint32_t segment, std::string* out) const;
  // Rows of the given experts (batched MultiGet); out[i] is the row of experts[i].
  Status ReadRows(uint32_t layer, uint32_t segment, const std::vector<uint32_t>& experts,
                  std::vector<std::string>* out) const;
  // Every row of the segment in expert order, verified against the manifest's checksum, handed
  // to visit(expert, bytes). Corruption (naming the segment) if the rows or the checksum are wrong.
  Status ScanSegment(const SegmentManifest& m, const std::function<void(uint32_t, std::string_view)>& visit) const;
  // ScanSegment without a visitor: the segment's bytes are all there and their checksum holds.
  Status VerifySegment(const SegmentManifest& m) const { return ScanSegment(m, nullptr); }

  // Flushes memtables to SST files (tests, benchmarks).
  Status Flush();
  // Rows read from the database so far (ReadRows, ScanSegment): what opening and the row cache cost.
  uint64_t rows_read() const { return rows_read_.load(); }
  const std::string& dir() const { return db_->dir(); }
  const std::shared_ptr<DataDirDb>& db() const { return db_; }

 private:
  std::shared_ptr<DataDirDb> db_;
  rocksdb::ColumnFamilyHandle* experts_;
  rocksdb::ColumnFamilyHandle* subkeys_;
  rocksdb::ColumnFamilyHandle* manifests_;
  mutable std::atomic<uint64_t> rows_read_{0};
};

// A name for a segment in messages: "layer 0 segment 3".
std::string SegmentName(uint32_t layer, uint32_t segment);

}  // namespace peerd
