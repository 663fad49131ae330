#!/usr/bin/env bash
# Builds peerd, peer-ingest, peerctl and the fault suite with AddressSanitizer and
# UndefinedBehaviorSanitizer (g++, into build-asan/; LibTorch itself is not instrumented) and runs
# the fault suite and the admin catalogue against the sanitized peerd. A sanitizer report in any
# peerd log fails the run. Not part of `make test` (the build alone takes ~15 minutes on 2 cores).
#   usage: scripts/sanitize.sh [GTEST_FILTER]   (default: every fault test, reduced counts)
#          scripts/sanitize.sh --thread [GTEST_FILTER]
#   env:   ASAN_BUILD (build-asan), TSAN_BUILD (build-tsan), PEERD_FAULT_CYCLES (3), PEERD_FAULT_LOAD_KB (10)
# --thread builds the tests of the parts without LibTorch (net_tests: spool, data port, admin request
# parsing, peer-ingest's client; store_tests) with ThreadSanitizer into build-tsan/ and runs them; a
# race report fails the run. LibTorch and its OpenMP threads are not instrumented, so binaries that
# train are left out (ThreadSanitizer would report their thread pool's own synchronisation).
# The load test takes ~3 minutes here: its ingest is paced by training (--backlog-mb 1), and an
# ASan peerd trains ~5x slower; its RSS bound is not checked under ASan (quarantine, shadow).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)

if [ "${1:-}" = "--thread" ]; then
  build=${TSAN_BUILD:-$root/build-tsan}
  filter=${2:-*}
  if [ ! -f "$build/build.ninja" ]; then
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPEERD_CUDA=OFF \
      -DCMAKE_CXX_FLAGS="-fsanitize=thread" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" >/dev/null
  fi
  cmake --build "$build" -j "$(nproc)" --target net_tests store_tests
  # A test that forks a child after starting threads is beyond ThreadSanitizer (it cannot follow a
  # multi-threaded fork): those two are left out.
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
  status=0
  "$build/net_tests" --gtest_filter="$filter:-DataPort.EveryAckedDocumentSurvivesSigkillOfTheServer" || status=$?
  "$build/store_tests" --gtest_filter="$filter:-ExpertStore.SigkillDuringFreezeLeavesTheSegmentTrainingOrFrozenInFull" ||
    status=$?
  echo "sanitize.sh: net_tests and store_tests under ThreadSanitizer: $([ $status -eq 0 ] && echo passed || echo FAILED)"
  exit $status
fi

build=${ASAN_BUILD:-$root/build-asan}
filter=${1:-*}
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"

if [ ! -f "$build/build.ninja" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPEERD_CUDA=OFF \
    -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
fi
cmake --build "$build" -j "$(nproc)" --target peerd peer-ingest peerctl fault_tests admin_fault_tests

# LibTorch's own allocations are not instrumented; leaks at exit of a LibTorch process are its
# static state, not peerd's (LeakSanitizer off). Everything else aborts on the first report.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PEERD_FAULT_CYCLES=${PEERD_FAULT_CYCLES:-3}
# A fresh folder for the tests' data and peerd's logs, searched for reports afterwards.
export TEST_TMPDIR=$(mktemp -d /tmp/peerd-sanitize.XXXXXX)
status=0
"$build/fault_tests" --gtest_filter="$filter" || status=$?
"$build/admin_fault_tests" --gtest_filter="$filter" || status=$?
# peerd runs as the tests' child: its reports land in the logs they keep there.
reports=$(grep -rlE "ERROR: AddressSanitizer|runtime error:" "$TEST_TMPDIR" 2>/dev/null || true)
if [ -n "$reports" ]; then
  echo "sanitize.sh: sanitizer reports in: $reports" >&2
  status=1
fi
echo "sanitize.sh: fault suite under ASan+UBSan: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
