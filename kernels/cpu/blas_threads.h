// One BLAS thread for the calling scope, for GEMMs that already run inside parallel tasks.
//
// The retrieval computes its sub-key scores as one GEMM per (segment, head, half), each inside a
// task of at::parallel_for. OpenBLAS (pthreads build) would give each of those GEMMs every core
// as well: on 2 cores, two tasks each asking 2 BLAS threads, and OpenBLAS's workers yield-spinning
// between calls, left the GEMMs running at a third of a single core's rate. Measured on the 1M-
// expert layer (bench/KERNELS.md, 2026-12-01): the retrieval's forward 25% faster with one BLAS
// thread per task. The count is process-wide in OpenBLAS, so nested or concurrent scopes share
// one: the first to enter lowers it, the last to leave puts back what it found. Without OpenBLAS
// (the reference BLAS is single-threaded anyway) this does nothing.
#pragma once

#include <string>

namespace peerd::kernels::cpu {

// OpenBLAS's thread count (process-wide). Setting it while a SingleThreadedBlas scope is alive
// takes effect when the last scope ends. Without OpenBLAS: SetBlasThreads does nothing and
// BlasThreads returns 0.
void SetBlasThreads(int threads);
int BlasThreads();
// The kernel set OpenBLAS chose for this CPU ("Haswell", "SkylakeX", ...); empty without OpenBLAS.
std::string BlasCoreName();

class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

}  // namespace peerd::kernels::cpu
