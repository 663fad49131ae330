// Implementation of kernels/cpu/blas_threads.h.
#include "kernels/cpu/blas_threads.h"

#include <dlfcn.h>

#include <mutex>

namespace peerd::kernels::cpu {
namespace {

// Looked up at run time: the symbols exist only when libblas.so.3 is OpenBLAS.
struct OpenBlas {
  using Set = void (*)(int);
  using Get = int (*)();
  using Name = char* (*)();
  Set set = reinterpret_cast<Set>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  Get get = reinterpret_cast<Get>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  Name corename = reinterpret_cast<Name>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  bool present() const { return set && get; }
};

const OpenBlas& Blas() {
  static const OpenBlas blas;
  return blas;
}

std::mutex scope_mu;
int scopes = 0;    // SingleThreadedBlas objects alive
int previous = 0;  // the thread count the first of them found

}  // namespace

void SetBlasThreads(int threads) {
  if (!Blas().present()) return;
  std::lock_guard<std::mutex> lock(scope_mu);
  if (scopes > 0)
    previous = threads;  // the last scope to leave sets it
  else
    Blas().set(threads);
}

int BlasThreads() { return Blas().present() ? Blas().get() : 0; }

std::string BlasCoreName() { return Blas().corename ? Blas().corename() : ""; }

SingleThreadedBlas::SingleThreadedBlas() {
  if (!Blas().present()) return;
  std::lock_guard<std::mutex> lock(scope_mu);
  if (scopes++ == 0) {
    previous = Blas().get();
    if (previous != 1) Blas().set(1);
  }
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (!Blas().present()) return;
  std::lock_guard<std::mutex> lock(scope_mu);
  if (--scopes == 0 && previous != 1) Blas().set(previous);
}

}  // namespace peerd::kernels::cpu
