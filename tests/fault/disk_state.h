// What the fault tests check of a store after a crash, a power loss or a failing disk: it opens,
// every frozen segment still matches the checksum its manifest recorded at the freeze, and the
// trainer's last checkpoint record is readable — all read with the store's own code.
#pragma once

#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include <cstdint>
#include <map>
#include <string>

#include "experts_store/data_dir_db.h"
#include "experts_store/expert_store.h"
#include "proto/admin.pb.h"

namespace peerd::testing {

// Verifies every frozen segment of `store` (a failed check is a test failure naming the segment)
// and returns them: segment id → the manifest's checksum. Use under ASSERT_NO_FATAL_FAILURE.
inline void VerifyFrozenSegments(ExpertStore& store, std::map<uint32_t, uint64_t>* frozen) {
  std::vector<SegmentManifest> manifests;
  Status st = store.Manifests(&manifests);
  ASSERT_TRUE(st.ok()) << "the store's manifests are unreadable: " << st.ToString();
  for (const SegmentManifest& m : manifests) {
    if (m.state() != SEGMENT_STATE_FROZEN) continue;
    Status v = store.VerifySegment(m);
    EXPECT_TRUE(v.ok()) << "frozen segment " << m.segment() << ": " << v.ToString();
    (*frozen)[m.segment()] = m.checksum();
  }
}

// What a data directory says while nothing has it open.
struct DiskState {
  std::map<uint32_t, uint64_t> frozen;  // frozen segment id -> checksum
  CheckpointMeta checkpoint;            // default when none was written yet
};

inline void ReadDisk(const std::string& data_dir, DiskState* out) {
  std::shared_ptr<DataDirDb> db;
  Status st = DataDirDb::Open(data_dir, {}, &db);
  ASSERT_TRUE(st.ok()) << "the store does not open: " << st.ToString();
  ExpertStore store(db);
  ASSERT_NO_FATAL_FAILURE(VerifyFrozenSegments(store, &out->frozen));
  // The trainer's record: the checkpoint's meta (service/checkpoint.cc keeps it under "meta").
  std::string meta;
  rocksdb::Status s = db->db()->Get(rocksdb::ReadOptions(), db->family(Family::kCheckpoints), "meta", &meta);
  if (s.ok()) {
    ASSERT_TRUE(out->checkpoint.ParseFromString(meta)) << "the checkpoint record is unreadable";
  } else {
    ASSERT_TRUE(s.IsNotFound()) << s.ToString();
  }
}

}  // namespace peerd::testing
