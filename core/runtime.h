// Process-wide LibTorch settings. LibTorch here defaults to one intra-op thread; every program
// calls SetComputeThreads once at start.
#pragma once

#include <cstdint>
#include <string>

namespace peerd {

// Sets LibTorch's intra-op thread count (0 = one per core) and returns the count in force.
int SetComputeThreads(uint32_t threads);
// Keeps freed memory in the process for the next step instead of handing it back to the kernel.
// A training step frees and re-allocates the same large tensors (sparse row gradients of 1M-row
// tables are hundreds of MB); glibc maps every block over 32 MB afresh, so each step paid for
// faulting and zeroing them again — measured at ~30% of a 1M-expert layer step. RSS stays at its
// peak, which training reaches every step anyway. Call once the model is built (initialisation's
// temporaries are then already back with the kernel).
void KeepFreedMemory();
// Seeds LibTorch's global generator (parameter initialisation).
void SeedCompute(uint64_t seed);
// "OpenBLAS" or what the build reports otherwise: printed at start so a slow BLAS is visible.
std::string BlasInfo();

}  // namespace peerd
