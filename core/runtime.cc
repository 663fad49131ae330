#include "core/runtime.h"

#include <dlfcn.h>
#include <malloc.h>

#include <fstream>
#include <thread>

namespace peerd {

void KeepFreedMemory() {
  mallopt(M_MMAP_MAX, 0);              // every block from the heap, which stays mapped
  mallopt(M_TRIM_THRESHOLD, 1 << 30);  // hand the free top of the heap back only past 1 GiB
}

int SetComputeThreads(uint32_t threads) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  at::set_num_threads(static_cast<int>(threads));
  // LibTorch parallelises across its own OpenMP threads; OpenBLAS's pthreads on top of them
  // oversubscribe the cores (measured on 2 cores: a training step runs at half speed). One BLAS
  // thread per caller. Looked up at run time: the symbol exists only when libblas.so.3 is OpenBLAS.
  using SetBlasThreads = void (*)(int);
  if (auto set = reinterpret_cast<SetBlasThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set(1);
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
    if (path.find("openblas") != std::string::npos) return path;
    if (path.find("libblas") != std::string::npos) found = path;
  }
  return found.empty() ? "no BLAS library mapped" : found + " (not OpenBLAS: expect ~20x slower matrix products)";
}

}  // namespace peerd
