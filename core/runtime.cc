#include "core/runtime.h"

#include <malloc.h>
#include <strings.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include <fstream>
#include <thread>

#include "kernels/cpu/blas_threads.h"

namespace peerd {

void ReexecWithTunedEnvironment(char** argv) {
  bool changed = false;
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    changed = true;
  }
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (!tunables || !std::strstr(tunables, "glibc.malloc.hugetlb")) {
    const std::string more = "glibc.malloc.hugetlb=1";
    setenv("GLIBC_TUNABLES", tunables && *tunables ? (std::string(tunables) + ":" + more).c_str() : more.c_str(), 1);
    changed = true;
  }
  if (changed) execv("/proc/self/exe", argv);
}

void KeepFreedMemory() {
  mallopt(M_MMAP_MAX, 0);              // every block from the heap, which stays mapped
  mallopt(M_TRIM_THRESHOLD, 1 << 30);  // hand the free top of the heap back only past 1 GiB
}

int SetComputeThreads(uint32_t threads) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  at::set_num_threads(static_cast<int>(threads));
  // LibTorch parallelises across its own OpenMP threads, which spin while idle; OpenBLAS's
  // pthreads on top of them fight the spinning threads for the cores (measured on 2 cores: a
  // training step runs at half speed). So one BLAS thread per caller — unless OMP_WAIT_POLICY is
  // passive (idle OpenMP threads sleep; read by libgomp at load, so only the environment can set
  // it): then BLAS gets every thread (measured: the 1M-expert layer step 1.2-1.4x faster).
  // (The retrieval lowers it to one inside its own parallel GEMM tasks: kernels/cpu/blas_threads.h.)
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  const bool passive = wait && strcasecmp(wait, "passive") == 0;
  kernels::cpu::SetBlasThreads(passive ? static_cast<int>(threads) : 1);
  return at::get_num_threads();
}

void SeedCompute(uint64_t seed) { torch::manual_seed(seed); }

std::string BlasInfo() {
  // Debian's LibTorch links the generic libblas.so.3, which the alternatives system points at
  // OpenBLAS when libopenblas0-pthread is installed, or at the slow reference BLAS otherwise:
  // the mapped file tells which one this process really got.
  std::ifstream maps("/proc/self/maps");
  std::string line, found;
  while (std::getline(maps, line)) {
    auto at = line.find('/');
    if (at == std::string::npos) continue;
    std::string path = line.substr(at);
    if (path.find("openblas") != std::string::npos) return path + " (" + kernels::cpu::BlasCoreName() + " kernels)";
    if (path.find("libblas") != std::string::npos) found = path;
  }
  return found.empty() ? "no BLAS library mapped" : found + " (not OpenBLAS: expect ~20x slower matrix products)";
}

}  // namespace peerd
