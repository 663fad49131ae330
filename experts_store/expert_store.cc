#include "experts_store/expert_store.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>
#include <xxhash.h>

#include "experts_store/format.h"

namespace peerd {

using namespace store;

std::string SegmentName(uint32_t layer, uint32_t segment) {
  return "layer " + std::to_string(layer) + " segment " + std::to_string(segment);
}

namespace {

class SegmentHasher {
 public:
  SegmentHasher() : state_(XXH3_createState()) { XXH3_64bits_reset(state_); }
  ~SegmentHasher() { XXH3_freeState(state_); }
  void Add(std::string_view bytes) { XXH3_64bits_update(state_, bytes.data(), bytes.size()); }
  uint64_t Digest() const { return XXH3_64bits_digest(state_); }

 private:
  XXH3_state_t* state_;
};

}  // namespace

size_t ExpertStore::RowBytes(RowDtype dtype, uint32_t d_model) {
  return size_t{2} * d_model * (dtype == ROW_DTYPE_BF16 ? 2 : 4);
}

Status ExpertStore::Open(const std::string& dir, const DataDirOptions& options, std::unique_ptr<ExpertStore>* out) {
  std::shared_ptr<DataDirDb> db;
  if (Status st = DataDirDb::Open(dir, options, &db); !st.ok()) return st;
  *out = std::make_unique<ExpertStore>(std::move(db));
  return Status::OK();
}

ExpertStore::ExpertStore(std::shared_ptr<DataDirDb> db)
    : db_(std::move(db)),
      experts_(db_->family(Family::kExperts)),
      subkeys_(db_->family(Family::kSubKeys)),
      manifests_(db_->family(Family::kManifests)) {}

ExpertStore::~ExpertStore() = default;

Status ExpertStore::FreezeSegment(const SegmentManifest& given, std::string_view sub_keys, const RowWriter& row,
                                  SegmentManifest* written) {
  const std::string name = SegmentName(given.layer(), given.segment());
  if (given.n_keys() == 0 || given.d_model() == 0 || given.heads() == 0 || given.query_dim() % 2 != 0 ||
      (given.dtype() != ROW_DTYPE_FP32 && given.dtype() != ROW_DTYPE_BF16))
    return Status::InvalidArgument(name +
                                   ": manifest needs n_keys, d_model, heads > 0, an even query_dim "
                                   "and dtype fp32 or bf16");
  const size_t want_subkeys = size_t{given.heads()} * given.n_keys() * given.query_dim() * sizeof(float);
  if (sub_keys.size() != want_subkeys)
    return Status::InvalidArgument(name + ": sub-keys are " + std::to_string(sub_keys.size()) +
                                   " bytes, the manifest says " + std::to_string(want_subkeys));
  const std::string key = SegmentKey(given.layer(), given.segment());
  std::string existing;
  rocksdb::Status s = db_->db()->Get(rocksdb::ReadOptions(), manifests_, key, &existing);
  if (s.ok()) return Status::FailedPrecondition(name + " is already frozen: a frozen segment never changes");
  if (!s.IsNotFound()) return FromRocks(s, name);

  SegmentManifest m = given;
  m.set_state(SEGMENT_STATE_FROZEN);
  const size_t row_bytes = RowBytes(m.dtype(), m.d_model());
  // n_keys² in 64 bits: 65,536² would wrap to 0 in 32. An expert's index (< n_keys²) fits 32.
  const uint64_t experts = uint64_t{m.n_keys()} * m.n_keys();
  SegmentHasher hash;
  hash.Add(sub_keys);
  rocksdb::WriteBatch batch;
  std::string bytes;
  for (uint64_t i = 0; i < experts; ++i) {
    const auto e = static_cast<uint32_t>(i);
    bytes.clear();
    row(e, &bytes);
    if (bytes.size() != row_bytes)
      return Status::InvalidArgument(name + ": row " + std::to_string(e) + " is " + std::to_string(bytes.size()) +
                                     " bytes, expected " + std::to_string(row_bytes));
    hash.Add(bytes);
    batch.Put(experts_, ExpertKey(m.layer(), m.segment(), e), bytes);
  }
  m.set_checksum(hash.Digest());
  batch.Put(subkeys_, key, rocksdb::Slice(sub_keys.data(), sub_keys.size()));
  batch.Put(manifests_, key, m.SerializeAsString());
  // Acknowledged frozen means on disk.
  if (Status st = db_->SyncedWrite(&batch, "freezing " + name); !st.ok()) return st;
  if (written) *written = m;
  return Status::OK();
}

Status ExpertStore::Manifests(std::vector<SegmentManifest>* out) const {
  out->clear();
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(rocksdb::ReadOptions(), manifests_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    SegmentManifest m;
    if (it->key().size() != 8 || !m.ParseFromArray(it->value().data(), static_cast<int>(it->value().size())))
      return Status::Corruption("unreadable segment manifest in '" + dir() + "'");
    if (m.layer() != GetBigEndian32(it->key().data()) || m.segment() != GetBigEndian32(it->key().data() + 4))
      return Status::Corruption("segment manifest under the key of " +
                                SegmentName(GetBigEndian32(it->key().data()), GetBigEndian32(it->key().data() + 4)) +
                                " names " + SegmentName(m.layer(), m.segment()));
    out->push_back(std::move(m));
  }
  return FromRocks(it->status(), "reading segment manifests in '" + dir() + "'");
}

Status ExpertStore::ReadSubKeys(uint32_t layer, uint32_t segment, std::string* out) const {
  return FromRocks(db_->db()->Get(rocksdb::ReadOptions(), subkeys_, SegmentKey(layer, segment), out),
                   "sub-keys of " + SegmentName(layer, segment));
}

Status ExpertStore::ReadRows(uint32_t layer, uint32_t segment, const std::vector<uint32_t>& experts,
                             std::vector<std::string>* out) const {
  const size_t n = experts.size();
  std::vector<std::string> keys(n);
  std::vector<rocksdb::Slice> slices(n);
  for (size_t i = 0; i < n; ++i) {
    keys[i] = ExpertKey(layer, segment, experts[i]);
    slices[i] = keys[i];
  }
  std::vector<rocksdb::PinnableSlice> values(n);
  std::vector<rocksdb::Status> statuses(n);
  db_->db()->MultiGet(rocksdb::ReadOptions(), experts_, n, slices.data(), values.data(), statuses.data());
  rows_read_ += n;
  out->resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (!statuses[i].ok())
      return FromRocks(statuses[i], "row " + std::to_string(experts[i]) + " of " + SegmentName(layer, segment));
    (*out)[i].assign(values[i].data(), values[i].size());
  }
  return Status::OK();
}

Status ExpertStore::ScanSegment(const SegmentManifest& m,
                                const std::function<void(uint32_t, std::string_view)>& visit) const {
  const std::string name = SegmentName(m.layer(), m.segment());
  std::string sub_keys;
  if (Status st = ReadSubKeys(m.layer(), m.segment(), &sub_keys); !st.ok())
    return Status::Corruption(name + " is frozen but its sub-keys are missing: " + st.message());
  SegmentHasher hash;
  hash.Add(sub_keys);
  const std::string begin = SegmentKey(m.layer(), m.segment());
  const std::string end = SegmentKey(m.layer(), m.segment() + 1);  // segment ids stay below 2^32-1
  rocksdb::Slice upper(end);
  rocksdb::ReadOptions ro;
  ro.iterate_upper_bound = &upper;
  ro.fill_cache = false;  // a scan would only evict what readers need
  ro.verify_checksums = true;
  ro.readahead_size = size_t{8} << 20;  // a segment is one contiguous range: read it in big strides
  const size_t row_bytes = RowBytes(m.dtype(), m.d_model());
  const uint64_t experts = uint64_t{m.n_keys()} * m.n_keys();
  uint64_t next = 0;
  std::unique_ptr<rocksdb::Iterator> it(db_->db()->NewIterator(ro, experts_));
  for (it->Seek(begin); it->Valid(); it->Next()) {
    const uint32_t e = GetBigEndian32(it->key().data() + 8);
    if (it->key().size() != 12 || e != next || it->value().size() != row_bytes)
      return Status::Corruption(name + ": row " + std::to_string(next) + " is missing or malformed");
    std::string_view row(it->value().data(), it->value().size());
    hash.Add(row);
    if (visit) visit(e, row);
    ++next;
  }
  rows_read_ += next;
  if (!it->status().ok()) return Status::Corruption(name + ": its rows cannot be read: " + it->status().ToString());
  if (next != experts)
    return Status::Corruption(name + ": " + std::to_string(next) + " rows stored, the manifest says " +
                              std::to_string(experts));
  if (hash.Digest() != m.checksum())
    return Status::Corruption(name +
                              ": checksum mismatch — its stored bytes are not the bytes that were frozen; "
                              "restore the data directory from a backup");
  return Status::OK();
}

Status ExpertStore::Flush() {
  rocksdb::FlushOptions fo;
  return FromRocks(db_->db()->Flush(fo, {experts_, subkeys_, manifests_}), "flushing the store");
}

}  // namespace peerd
