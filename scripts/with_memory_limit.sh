#!/bin/sh
# with_memory_limit.sh BYTES COMMAND...: runs COMMAND in a memory cgroup of its own capped at BYTES
# (e.g. 4G), the page cache it fills included — to measure a pool larger than memory on a machine
# that has more (bench/POOL.md). Needs root and a cgroup memory controller (v2 or v1).
set -eu
[ $# -ge 2 ] || { echo "usage: $0 BYTES COMMAND..." >&2; exit 2; }
limit=$1
shift
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  group=/sys/fs/cgroup/peerd-limit-$$
  mkdir "$group" && echo "$limit" > "$group/memory.max"
elif [ -d /sys/fs/cgroup/memory ]; then
  group=/sys/fs/cgroup/memory/peerd-limit-$$
  mkdir "$group" && echo "$limit" > "$group/memory.limit_in_bytes"
else
  echo "$0: no cgroup memory controller under /sys/fs/cgroup" >&2
  exit 1
fi
rc=0
sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$group" "$@" || rc=$?
rmdir "$group"
exit $rc
