#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, with clang, into build-fuzz/) and runs each for SECONDS
# on a copy of its seed corpus (tests/fuzz/corpus/NAME/ stays as it is in the repository). Prints
# one line per target: target, seconds, executions, new corpus units, result. Exits non-zero when
# any target crashed, leaked, tripped a sanitizer or did not build; the crashing input is kept in
# build-fuzz/artifacts/NAME/.
#   usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (default 60 s; TARGET e.g. admin_requests; default all)
#   env:   FUZZ_BUILD (build-fuzz), FUZZ_RSS_MB (2048), FUZZ_JOBS (2)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift $(($# > 0 ? 1 : 0))
build=${FUZZ_BUILD:-$root/build-fuzz}
rss_mb=${FUZZ_RSS_MB:-2048}

cxx=$(command -v clang++-14 || command -v clang++ || true)
cc=$(command -v clang-14 || command -v clang || true)
if [ -z "$cxx" ] || [ -z "$cc" ]; then
  echo "fuzz.sh: clang is not installed (scripts/setup.sh installs clang and libclang-rt-14-dev)" >&2
  exit 2
fi

# Targets: those given, or every peerd_fuzzer() line that is not commented out.
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^peerd_fuzzer(\([a-z0-9_]*\)_fuzz .*/\1/p' "$root/tests/fuzz/CMakeLists.txt")
fi

if [ ! -f "$build/build.ninja" ]; then
  CC=$cc CXX=$cxx cmake -S "$root/tests/fuzz" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
build_targets=()
for t in "${targets[@]}"; do build_targets+=("${t}_fuzz"); done
if ! cmake --build "$build" -j "${FUZZ_JOBS:-2}" --target "${build_targets[@]}" >"$build/build.log" 2>&1; then
  tail -n 40 "$build/build.log" >&2
  echo "fuzz.sh: the fuzzers did not build (log: $build/build.log)" >&2
  exit 1
fi

# Each target runs in its own process, all at once (libFuzzer uses one core each): 60 s for both.
run_target() {
  local t=$1 work before after execs log rc=0 result
  work=$(mktemp -d "${TMPDIR:-/tmp}/peerd-fuzz-$t.XXXXXX")
  mkdir -p "$work/corpus" "$build/artifacts/$t"
  seeds="$root/tests/fuzz/corpus/$t"
  [ -d "$seeds" ] && cp -r "$seeds/." "$work/corpus/"
  before=$(find "$work/corpus" -type f | wc -l)
  log="$build/$t.log"
  # New units go to the copy (the first corpus directory); the repository's seeds are untouched.
  "$build/${t}_fuzz" -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$build/artifacts/$t/" "$work/corpus" >"$log" 2>&1 || rc=$?
  after=$(find "$work/corpus" -type f | wc -l)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  if [ "$rc" -eq 0 ]; then
    result=ok
  else
    result="FAILED (exit $rc; log $log; input in $build/artifacts/$t/)"
    grep -aE "ERROR|runtime error|_fuzz:|==[0-9]+==|SUMMARY" "$log" | head -n 20 >&2 || tail -n 30 "$log" >&2
  fi
  printf 'fuzz %-16s %5ss %12s executions %6s new corpus units  %s\n' "$t" "$seconds" "${execs:-?}" \
      "$((after - before))" "$result" >"$build/$t.result"
  rm -rf "$work"
  [ "$rc" -eq 0 ]
}

pids=()
for t in "${targets[@]}"; do
  run_target "$t" &
  pids+=($!)
done
failed=0
for i in "${!targets[@]}"; do
  wait "${pids[$i]}" || failed=1
  cat "$build/${targets[$i]}.result"
done
exit "$failed"
