// Process-wide LibTorch settings. LibTorch here defaults to one intra-op thread; every program
// calls SetComputeThreads once at start.
#pragma once

#include <cstdint>
#include <string>

namespace peerd {

// Sets two variables that only the environment can set, read once when the process loads, and
// re-executes this program (same pid, same arguments) with them; call first thing in main, before
// any thread exists. Each is left alone when the user already set it.
// - OMP_WAIT_POLICY=passive: idle OpenMP threads sleep rather than spin. Measured on 2 cores:
//   peer-train 4,585 -> 24,404 tokens/s (same losses), the 1M-expert layer step 1.1x, a dense FFN
//   step 5x — spinning OpenMP threads starve OpenBLAS and each other.
// - GLIBC_TUNABLES=glibc.malloc.hugetlb=1: malloc asks for transparent huge pages (madvise), so
//   the expert tables, their optimizer moments and row gradients sit in 2 MB pages and random row
//   reads stop missing the TLB. Measured: the fused 1M-expert layer step 1.13-1.17x, 65k 1.2x.
// If exec fails (no /proc) the program goes on as it is, only slower.
void ReexecWithTunedEnvironment(char** argv);
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
// The BLAS library this process mapped (with OpenBLAS's kernel set: OPENBLAS_CORETYPE may force
// slower ones), or what it got instead: printed at start so a slow BLAS is visible.
std::string BlasInfo();

}  // namespace peerd
