// What the fault tests check of a store after a crash or a failing disk: it opens, and every
// frozen segment still matches the checksum its manifest recorded at the freeze.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <map>

#include "experts_store/expert_store.h"

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

}  // namespace peerd::testing
