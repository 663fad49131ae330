// The expert store's on-disk format, in one place.
//
// One RocksDB database per data directory. Column families:
//   default      "meta" -> StoreMeta (schema version); "config" -> Config, the configuration the
//                data directory was first trained with (service/data_dir_config.h)
//   experts      (layer, segment, expert) -> down ‖ up of that expert, D values each, in the
//                segment's RowDtype (fp32 or bf16, little-endian)
//   subkeys      (layer, segment) -> the segment's sub-keys, fp32 [heads, 2, n_keys, dk/2]
//   manifests    (layer, segment) -> SegmentManifest
//   spool        'd' be64(index) -> SpooledDocument, 'i' task '\0' id -> be64(index), and the
//                counters under 'n' and 'p' (service/net/spool.h has the layout)
//   checkpoints  "meta" -> CheckpointMeta, naming its generation and listing its tensors (every
//                parameter outside frozen segments, every buffer, their AdamW state);
//                "piece" be64(generation) be32(tensor) be32(piece) -> that piece of the tensor's
//                raw bytes; "tensors" -> the one LibTorch archive of a checkpoint written before
//                pieces (service/checkpoint.cc)
//   evals        "task/" name -> the task's held-out text, "row/" be64(n) -> EvalRow, the
//                evaluation numbered n from 0 (service/task_store.cc)
// The expert store's keys (experts, subkeys, manifests) are big-endian u32s so that a segment's
// experts are one contiguous key range, in expert order. A segment's checksum is xxHash3-64 over
// its sub-key bytes followed by every row's bytes in expert order, exactly as stored.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peerd::store {

inline constexpr uint32_t kSchemaVersion = 1;
inline constexpr char kMetaKey[] = "meta";

inline constexpr char kExpertsCF[] = "experts";
inline constexpr char kSubKeysCF[] = "subkeys";
inline constexpr char kManifestsCF[] = "manifests";
inline constexpr char kSpoolCF[] = "spool";
inline constexpr char kCheckpointsCF[] = "checkpoints";
inline constexpr char kEvalsCF[] = "evals";

inline void PutBigEndian32(std::string* out, uint32_t v) {
  char b[4] = {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
  out->append(b, 4);
}

inline uint32_t GetBigEndian32(const char* p) {
  auto u = [&](int i) { return uint32_t(static_cast<unsigned char>(p[i])); };
  return (u(0) << 24) | (u(1) << 16) | (u(2) << 8) | u(3);
}

// (layer, segment): 8 bytes; the prefix of all the segment's expert keys.
inline std::string SegmentKey(uint32_t layer, uint32_t segment) {
  std::string k;
  PutBigEndian32(&k, layer);
  PutBigEndian32(&k, segment);
  return k;
}

// (layer, segment, expert): 12 bytes.
inline std::string ExpertKey(uint32_t layer, uint32_t segment, uint32_t expert) {
  std::string k = SegmentKey(layer, segment);
  PutBigEndian32(&k, expert);
  return k;
}

}  // namespace peerd::store
