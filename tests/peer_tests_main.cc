// peer_tests' main: GoogleTest, plus helper modes that tests start as separate processes
// (a second process is the honest test of "reopened in a new process").
#include <gtest/gtest.h>

#include <cstring>

#include "core/runtime.h"

namespace peerd::testing {
int PoolStoreReader(const char* dir);  // tests/pool_store_test.cc
}

int main(int argc, char** argv) {
  peerd::ReexecWithTunedEnvironment(argv);
  if (argc == 3 && std::strcmp(argv[1], "--pool-store-reader") == 0) return peerd::testing::PoolStoreReader(argv[2]);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
