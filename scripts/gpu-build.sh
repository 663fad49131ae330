#!/usr/bin/env bash
# Builds peerd with its CUDA kernels (kernels/cuda/, docs/DESIGN.md §5) on the lent GPU machine, runs
# the kernel tests there and prints the layer benchmark.
#
# That machine has nvcc (CUDA 13), CMake, ninja, a C++ compiler and PyTorch 2.x, whose LibTorch
# peerd builds against; it has none of peerd's other libraries and no network. Those travel as
# Debian bookworm .deb files, downloaded beforehand on a machine with Debian's archive, and are
# unpacked there into a private prefix (never into /).
#
#   scripts/gpu-build.sh fetch   here: downloads the .debs into .gpu-debs/ (git-ignored, ~25 MB)
#   scripts/gpu-build.sh         there: unpack, configure, build, test, bench — through the
#                                device tool, carrying the .debs, in one call (a machine comes
#                                back bare after each):
#       run(command="bash scripts/gpu-build.sh", carry=[".gpu-debs"], timeout_s=600)
#
# Environment (all optional):
#   BUILD         build directory                    (default /tmp/peerd-gpu-build)
#   PREFIX        where the .debs are unpacked        (default /tmp/peerd-gpu-prefix)
#   JOBS          parallel compile jobs               (default: the number of cores)
#   GTEST_FILTER  which tests run                     (default 'KernelsCuda*:Kernels*')
#   BENCH=0       skip the layer benchmark (building peer-bench takes a minute or two more)
#   BENCH_ARGS    arguments to `peer-bench layer`     (default: three implementations, one size)
#   TORCH_CMAKE, TORCH_LIB   LibTorch's CMake prefix and library folder (default: python3's torch)
#   ALLOW_CUDA_MISMATCH=1    build even when PyTorch's CUDA major version is not nvcc's
#   OUT           when set (the device tool sets it), the full logs are written there
# Each step prints a line starting with "gpu-build:"; the script stops at the first that fails.
set -euo pipefail

cd "$(dirname "$0")/.."
DEBS=.gpu-debs

# What peerd links besides LibTorch, with the runtime libraries the -dev packages' symlinks point
# to. RocksDB's CMake config asks for its compression libraries' -dev packages too.
PACKAGES=(
  librocksdb-dev librocksdb7.8
  libgflags-dev libgflags2.2 libsnappy-dev libsnappy1v5 zlib1g-dev zlib1g libbz2-dev libbz2-1.0
  liblz4-dev liblz4-1 libzstd-dev libzstd1
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 protobuf-compiler libprotoc32
  libgtest-dev
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9
  nlohmann-json3-dev libcli11-dev libxxhash-dev libxxhash0
  libboost1.74-dev
  pkgconf pkgconf-bin libpkgconf3
)

say() { echo "gpu-build: $*"; }
die() { echo "gpu-build: error: $*" >&2; exit 1; }

if [ "${1:-}" = fetch ]; then
  mkdir -p "$DEBS"
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$DEBS/" "$exclude" 2>/dev/null || echo "/$DEBS/" >>"$exclude"
  (cd "$DEBS" && apt-get download "${PACKAGES[@]}")
  say "$(ls "$DEBS"/*.deb | wc -l) packages, $(du -sh "$DEBS" | cut -f1) in $DEBS"
  exit 0
fi
[ $# -eq 0 ] || die "usage: scripts/gpu-build.sh [fetch]"

BUILD=${BUILD:-/tmp/peerd-gpu-build}
PREFIX=${PREFIX:-/tmp/peerd-gpu-prefix}
JOBS=${JOBS:-$(nproc)}
LOGS=${OUT:-$BUILD/logs}
ARCH_LIB=lib/x86_64-linux-gnu
start=$SECONDS
elapsed() { echo "$((SECONDS - start)) s"; }

# --- the machine -----------------------------------------------------------------------------
for tool in nvcc cmake ninja python3 c++; do
  command -v "$tool" >/dev/null || { [ "$tool" = nvcc ] && [ -x /usr/local/cuda/bin/nvcc ]; } ||
    die "$tool not found"
done
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
ls "$DEBS"/*.deb >/dev/null 2>&1 || die "no .debs in $DEBS: run 'scripts/gpu-build.sh fetch' first and carry $DEBS"
TORCH_CMAKE=${TORCH_CMAKE:-$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')}
TORCH_LIB=${TORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')}
SITE=$(dirname "$(dirname "$TORCH_LIB")")
say "torch $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1 | tail -1)," \
  "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), cmake $(cmake --version | head -1 | cut -d' ' -f3)," \
  "$(c++ --version | head -1)"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } || true
# Two checks that would otherwise surface as pages of link errors or a second CUDA runtime:
# - wheels before PyTorch 2.7 use the old std::string ABI, and every Debian library peerd links
#   (protobuf, gtest, RocksDB, spdlog) the new one;
# - kernels/cuda links the shared CUDA runtime of nvcc's toolkit, which must be the one LibTorch's
#   CUDA build loads (the same major version).
abi=$(python3 -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))' 2>/dev/null || echo 1)
[ "$abi" = 1 ] || die "this PyTorch uses the pre-C++11 string ABI (_GLIBCXX_USE_CXX11_ABI=0), which Debian's" \
  "libraries cannot link with: use a PyTorch >= 2.7 wheel, or point TORCH_CMAKE/TORCH_LIB at a cxx11-ABI LibTorch"
torch_cuda=$(python3 -c 'import torch; print((torch.version.cuda or "").split(".")[0])' 2>/dev/null || true)
nvcc_cuda=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
if [ -n "$torch_cuda" ] && [ "$torch_cuda" != "$nvcc_cuda" ] && [ "${ALLOW_CUDA_MISMATCH:-0}" != 1 ]; then
  die "PyTorch was built with CUDA $torch_cuda but nvcc is CUDA $nvcc_cuda: two CUDA runtimes in one process." \
    "Put a CUDA $torch_cuda nvcc first in PATH, or set ALLOW_CUDA_MISMATCH=1 to try anyway"
fi

# --- the libraries: unpacked into $PREFIX, made relocatable --------------------------------------
mkdir -p "$PREFIX" "$LOGS"
for deb in "$DEBS"/*.deb; do
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$deb" "$PREFIX"
  else  # a .deb is an ar archive holding data.tar.*
    tmp=$(mktemp -d) && (cd "$tmp" && ar x "$OLDPWD/$deb" && tar -xf data.tar.* -C "$PREFIX") && rm -rf "$tmp"
  fi
done
# RocksDB's exported target names libbz2 by its absolute Debian path; pkg-config files name /usr.
sed -i "s|/usr/$ARCH_LIB/libbz2.so|$PREFIX/usr/$ARCH_LIB/libbz2.so|g" "$PREFIX/usr/$ARCH_LIB/cmake/rocksdb/"*.cmake
sed -i "s|^prefix=/usr\$|prefix=$PREFIX/usr|" "$PREFIX"/usr/{$ARCH_LIB,share}/pkgconfig/*.pc 2>/dev/null || true
export PATH=$PREFIX/usr/bin:$PATH
# The prefix's libraries; and the CUDA libraries PyTorch's wheel keeps beside it, which the linker
# must find to check libtorch_cuda.so's needs, and the tests to run.
NVIDIA_LIBS=
for dir in "$SITE"/nvidia/*/lib; do [ -d "$dir" ] && NVIDIA_LIBS+="$dir:"; done
export LD_LIBRARY_PATH=$PREFIX/usr/$ARCH_LIB:$TORCH_LIB:$NVIDIA_LIBS${LD_LIBRARY_PATH:-}
export PKG_CONFIG_PATH=$PREFIX/usr/$ARCH_LIB/pkgconfig:$PREFIX/usr/share/pkgconfig
PKG_CONFIG=$(command -v pkg-config || echo "$PREFIX/usr/bin/pkgconf")
say "$(ls "$DEBS"/*.deb | wc -l) packages unpacked into $PREFIX; protoc $("$PREFIX/usr/bin/protoc" --version) ($(elapsed))"

# --- configure ---------------------------------------------------------------------------------
# TORCH_CUDA_ARCH_LIST spares PyTorch's CMake config from probing the GPU; CMAKE_POLICY_VERSION_MINIMUM
# lets a CMake 4 read the older config files among the .debs.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DTorch_DIR="$TORCH_CMAKE/Torch" -DCMAKE_PREFIX_PATH="$PREFIX/usr;$TORCH_CMAKE" \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" -DCMAKE_CUDA_ARCHITECTURES=90 -DPEERD_CUDA_ARCHITECTURES=90 \
  -DProtobuf_PROTOC_EXECUTABLE="$PREFIX/usr/bin/protoc" -DPKG_CONFIG_EXECUTABLE="$PKG_CONFIG" \
  -DCMAKE_CXX_FLAGS="-isystem $PREFIX/usr/include" -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
  >"$LOGS/configure.log" 2>&1 || { tail -40 "$LOGS/configure.log"; die "configure failed ($LOGS/configure.log)"; }
grep -q "CUDA kernels ON" "$LOGS/configure.log" ||
  { grep "peerd:" "$LOGS/configure.log" || true; die "configured without the CUDA kernels"; }
say "configured: $(grep -o 'CUDA kernels ON.*' "$LOGS/configure.log") ($(elapsed))"

# --- build and test the kernels first, so a short lease still answers the main question ----------
build() {
  cmake --build "$BUILD" -j "$JOBS" --target "$1" >"$LOGS/build-$1.log" 2>&1 ||
    { grep -E "error|Error" "$LOGS/build-$1.log" | head -30; die "building $1 failed ($LOGS/build-$1.log)"; }
  say "built $1 ($(elapsed))"
}
build peer_tests
set +e
"$BUILD/peer_tests" --gtest_filter="${GTEST_FILTER:-KernelsCuda*:Kernels*}" 2>&1 | tee "$LOGS/tests.log" |
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[==========\]|Failure|error|seed"
tests=${PIPESTATUS[0]}
set -e
say "tests exit $tests ($(elapsed))"

[ "${BENCH:-1}" = 1 ] || { say "done ($(elapsed)); tests exit $tests"; exit "$tests"; }
build peer-bench
if [ -z "${BENCH_ARGS:-}" ]; then
  BENCH_ARGS="--impl peerd,fused,dense-ffn --experts 65536 --tokens 4096 --threads $JOBS --rounds 1"
  # Once the bench can place the layer on the GPU, measure it there.
  "$BUILD/peer-bench" layer --help 2>&1 | grep -q -- --device && BENCH_ARGS="$BENCH_ARGS --device cuda"
fi
say "peer-bench layer $BENCH_ARGS"
# shellcheck disable=SC2086  # BENCH_ARGS is a word list
"$BUILD/peer-bench" layer $BENCH_ARGS 2>&1 | tee "$LOGS/bench.log"
say "done ($(elapsed)); tests exit $tests"
exit "$tests"
