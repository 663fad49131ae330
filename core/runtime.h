// Process-wide LibTorch settings. LibTorch here defaults to one intra-op thread; every program
// calls SetComputeThreads once at start.
#pragma once

#include <cstdint>
#include <string>

namespace peerd {

// Sets LibTorch's intra-op thread count (0 = one per core) and returns the count in force.
int SetComputeThreads(uint32_t threads);
// Seeds LibTorch's global generator (parameter initialisation).
void SeedCompute(uint64_t seed);
// "OpenBLAS" or what the build reports otherwise: printed at start so a slow BLAS is visible.
std::string BlasInfo();

}  // namespace peerd
