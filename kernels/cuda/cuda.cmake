# kernels/cuda: the CUDA kernels (docs/DESIGN.md §5), built when a CUDA compiler is found.
#
# Include from the top-level CMakeLists.txt after find_package(Torch). Defines:
#   PEERD_WITH_CUDA_KERNELS  ON when the kernels are built, else OFF
#   peer_kernels_cuda        (when ON) a static library: the LibTorch glue (*.cc, no CUDA headers)
#                            over peer_kernels_cuda_device, the kernels (*.cu, no LibTorch
#                            headers). It carries the compile definition PEERD_WITH_CUDA_KERNELS
#                            to whatever links it.
# Options: -DPEERD_CUDA=OFF skips CUDA altogether; -DCMAKE_CUDA_ARCHITECTURES=... (or
# -DPEERD_CUDA_ARCHITECTURES=...) picks the GPUs to build for, Hopper (90) by default.
#
# The glue compiles against any LibTorch, CPU-only included (CI's Debian 1.13): it finds the
# device through LibTorch at run time, so a CUDA compiler is all the build needs. Kernels only
# run where LibTorch itself has CUDA.

option(PEERD_CUDA "Build the CUDA kernels when a CUDA compiler is found" ON)
set(PEERD_WITH_CUDA_KERNELS OFF)

if(PEERD_CUDA)
  # nvcc is often installed but not on PATH (/usr/local/cuda/bin): point CMake at it, through the
  # variable CMake's own compiler detection reads, so check_language still tests that it works.
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    file(GLOB _peerd_cuda_bins LIST_DIRECTORIES true /usr/local/cuda/bin /usr/local/cuda-*/bin)
    find_program(PEERD_NVCC nvcc HINTS ${_peerd_cuda_bins})
    if(PEERD_NVCC)
      set(ENV{CUDACXX} "${PEERD_NVCC}")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
endif()

if(PEERD_CUDA AND CMAKE_CUDA_COMPILER)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  enable_language(CUDA)
  # PyTorch's CMake config (CUDA builds) sets CMAKE_CUDA_ARCHITECTURES to OFF and passes its own
  # -gencode flags instead; the kernels still get an explicit target.
  if(CMAKE_CUDA_ARCHITECTURES AND NOT CMAKE_CUDA_ARCHITECTURES STREQUAL "OFF")
    set(_peerd_archs "${CMAKE_CUDA_ARCHITECTURES}")
  else()
    set(_peerd_archs 90)
  endif()
  set(PEERD_CUDA_ARCHITECTURES "${_peerd_archs}" CACHE STRING "GPU architectures of peer_kernels_cuda")
  find_package(CUDAToolkit REQUIRED)

  set(_peerd_cuda_dir "${CMAKE_CURRENT_LIST_DIR}")
  get_filename_component(_peerd_root "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)
  # The kernels, apart: nvcc never sees LibTorch's headers or flags (kernels/cuda/launch.h).
  add_library(peer_kernels_cuda_device STATIC
    ${_peerd_cuda_dir}/retrieval.cu ${_peerd_cuda_dir}/expert_mixture.cu ${_peerd_cuda_dir}/adamw_rows.cu)
  target_include_directories(peer_kernels_cuda_device PRIVATE ${_peerd_root})
  # One CUDA runtime in the process: the shared one, which LibTorch's CUDA build also loads.
  set_target_properties(peer_kernels_cuda_device PROPERTIES
    CUDA_ARCHITECTURES "${PEERD_CUDA_ARCHITECTURES}"
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_RUNTIME_LIBRARY Shared
    POSITION_INDEPENDENT_CODE ON)
  target_compile_options(peer_kernels_cuda_device PRIVATE -Xcompiler=-Wall,-Wextra)
  target_link_libraries(peer_kernels_cuda_device PUBLIC CUDA::cudart)

  # The LibTorch glue: what the rest of peerd links.
  add_library(peer_kernels_cuda STATIC
    ${_peerd_cuda_dir}/product_key_retrieval.cc ${_peerd_cuda_dir}/expert_mixture.cc
    ${_peerd_cuda_dir}/adamw_rows.cc)
  target_include_directories(peer_kernels_cuda PUBLIC ${_peerd_root})
  target_compile_definitions(peer_kernels_cuda PUBLIC PEERD_WITH_CUDA_KERNELS)
  target_compile_options(peer_kernels_cuda PRIVATE -Wall -Wextra)
  target_link_libraries(peer_kernels_cuda PUBLIC ${TORCH_LIBRARIES} PRIVATE peer_kernels_cuda_device)
  set(PEERD_WITH_CUDA_KERNELS ON)
  message(STATUS
    "peerd: CUDA kernels ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${PEERD_CUDA_ARCHITECTURES})")
else()
  message(STATUS "peerd: CUDA kernels OFF (no CUDA compiler found, or PEERD_CUDA=OFF)")
endif()
