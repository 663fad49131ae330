#!/usr/bin/env bash
# Installs, from Debian's archive, everything peerd needs to build, test and run its demo.
# Idempotent and quiet: when every package is present it prints nothing and exits 0.
#   usage: scripts/setup.sh [EXTRA_PACKAGE...]   (corpora.sh passes each domain's packages)
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  libtorch-dev libopenblas0-pthread   # without OpenBLAS, LibTorch uses the reference BLAS (~20x slower)
  libgloo-dev                         # headers of c10d's Gloo process group: multi-rank training
  librocksdb-dev
  libboost-dev libboost-system-dev    # Asio, Beast
  libprotobuf-dev protobuf-compiler
  libgtest-dev libgmock-dev
  libcli11-dev libxxhash-dev nlohmann-json3-dev libspdlog-dev
  python3 python3-torch               # runs peer_ref.py, the external PyTorch reference of `peer-bench layer`
  python3-prometheus-client           # the tests read GET /metrics with the Prometheus project's own parser
  python3-matplotlib                  # peerctl report draws the heatmap and curves with it
  chromium                            # renders the live page: its test, and the demo's screenshot
  clang libclang-rt-14-dev            # the libFuzzer fuzzers (scripts/fuzz.sh): clang++, libclang_rt.fuzzer
  bible-kjv                           # the demo's and tests' first real text (scripts/corpora.sh)
)

packages+=("$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: missing packages: ${missing[*]}" >&2
  echo "setup.sh: run as root (or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup.sh: done"
