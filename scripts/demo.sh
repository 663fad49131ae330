#!/usr/bin/env bash
# The main job, end to end through the public interface only (peerd, peer-ingest, peerctl):
# start peerd on embedded defaults, register the held-out tasks, then for each domain in turn
# add a fresh expert segment (the first domain trains the one peerd starts with), stream the
# domain in, wait until it is trained, freeze the segment and evaluate every task. Prints the
# bits-per-byte matrix and the forgetting metrics, and writes to demo-out/: report.md, report.json,
# history.json, heatmap.png/.svg and curves.png/.svg (peerctl report), and dashboard.png (the live
# page in headless Chromium).
#
# The policy (DEMO_POLICY) is `routed` by default: routing isolation with no trained text kept
# (docs/DESIGN.md §4b). The first domain, `broad` (documentation that none of the others is), is
# the base phase that trains the whole model; each later domain is a branch of its own — a segment
# and its adapter — and the spool forgets each document once it is trained and checkpointed.
# DEMO_POLICY=recipe runs peerd's default instead: 25 % replay of old text + distillation.
#   usage: scripts/demo.sh [--quick]
# env: BUILD=build, DEMO_OUT=demo-out, DEMO_POLICY=routed|recipe; for other corpora and models
# (the end-to-end test uses these): DEMO_DOMAINS="a b" (folders of DEMO_CORPUS with train.txt and
# heldout.txt; setting DEMO_CORPUS skips scripts/corpora.sh), DEMO_CONFIG=peerd's --config file,
# DEMO_PORT=7170 (data; admin is the next port), DEMO_SLICE_KB, DEMO_HELDOUT_KB, DEMO_EVAL_EVERY
# (seconds).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="${BUILD:-build}"
out="${DEMO_OUT:-demo-out}"
read -r -a domains <<< "${DEMO_DOMAINS:-broad kjv c-code fortunes-de man-pages sparv python}"
policy=${DEMO_POLICY:-routed}
case "$policy" in routed|recipe) ;; *) echo "demo: DEMO_POLICY must be routed or recipe, got '$policy'" >&2; exit 2 ;; esac
slice_kb=600       # training text per domain (1 MB per domain took 17 minutes in all on 2 cores)
heldout_kb=40      # held-out text per task (every evaluation scores every task)
eval_every=60      # seconds between evaluations while a domain trains (the plot's points)
if [ "${1:-}" = "--quick" ]; then slice_kb=100; heldout_kb=16; eval_every=15; fi
slice_kb=${DEMO_SLICE_KB:-$slice_kb}; heldout_kb=${DEMO_HELDOUT_KB:-$heldout_kb}; eval_every=${DEMO_EVAL_EVERY:-$eval_every}
port=${DEMO_PORT:-7170}
corpus=${DEMO_CORPUS:-data/corpora}
config_args=()
[ -n "${DEMO_CONFIG:-}" ] && config_args=(--config "$DEMO_CONFIG")

[ -n "${DEMO_CORPUS:-}" ] || bash scripts/corpora.sh "${domains[@]}"
rm -rf "$out"
mkdir -p "$out"
data="$out/peerd-data"
admin=127.0.0.1:$((port + 1))
ctl() { "$build/peerctl" --admin "$admin" --token-file "$data/admin.token" "$@"; }

"$build/peerd" --data-dir "$data" --data-listen "127.0.0.1:$port" --admin-listen "$admin" \
  --task-root "$root" --task-root "$(cd "$out" && pwd)" "${config_args[@]}" > "$out/peerd.log" 2>&1 &
peerd_pid=$!
trap 'kill $peerd_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$data/admin.token" ] && ctl status >/dev/null 2>&1 && break; sleep 0.2; done
ctl status >/dev/null || { echo "demo: peerd did not start:"; cat "$out/peerd.log"; exit 1; }

if [ "$policy" = routed ]; then
  ctl policy set routed=true replayRatio=0 distillWeight=0 keepTrainedText=false >/dev/null
fi
echo "demo: policy $policy ($(ctl --json policy get | python3 -c 'import json,sys; p=json.load(sys.stdin); print("routed" if p["routed"] else "shared", "training,", "replay", p["replayRatio"], "- trained text", "kept" if p["keepTrainedText"] else "not kept")'))"
# slice SRC KB OUT [documents]: the first KB kilobytes of SRC; with "documents", cut at its last
# blank line (whole documents), or at its last line end when it has none. An error when that
# leaves under min_bytes.
min_bytes=2000
slice() {
  head -c $(($2 * 1000)) "$1" | python3 -c '
import sys
text = sys.stdin.buffer.read()
cut = len(text)
if sys.argv[3] == "documents":
    cut = text.rfind(b"\n\n")
    cut = cut + 2 if cut >= 0 else text.rfind(b"\n") + 1
whole = " in whole lines" if sys.argv[3] else ""
if cut < int(sys.argv[2]):
    sys.exit(f"demo: {sys.argv[1]}: its first {len(text)} bytes give {cut} bytes of text{whole}, "
             f"under the {sys.argv[2]} a domain needs: give more text (DEMO_SLICE_KB, DEMO_HELDOUT_KB) or another domain")
sys.stdout.buffer.write(text[:cut])' "$1" "$min_bytes" "${4:-}" > "$3"
}
for d in "${domains[@]}"; do
  slice "$corpus/$d/heldout.txt" "$heldout_kb" "$out/heldout-$d.txt"
  ctl tasks add "$d" "$out/heldout-$d.txt" >/dev/null
done
echo "demo: peerd up ($(ctl --json status | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["totalParameters"], "parameters,", s["activeParameters"], "active per token")')); ${#domains[@]} held-out tasks registered"
ctl eval run --label init >/dev/null

start=$(date +%s)
for i in "${!domains[@]}"; do
  d=${domains[$i]}
  if [ "$i" -gt 0 ]; then
    id=$(ctl --json segments add | python3 -c 'import json,sys; print(json.load(sys.stdin)["ids"][0])')
  else
    id=0  # the segment peerd starts with
  fi
  slice "$corpus/$d/train.txt" "$slice_kb" "$out/train-$d.txt" documents
  "$build/peer-ingest" --server "127.0.0.1:$port" --task "$d" --token-file "$data/data.token" --no-resume "$out/train-$d.txt" 2>&1 | sed 's/^/  /'
  # Until the backlog is trained (less than one training window left), an evaluation every
  # eval_every seconds meanwhile: wait trained exits 3 when its --timeout runs out.
  t0=$(date +%s)
  for (( ; ; )); do
    rc=0
    ctl wait trained --timeout "$eval_every" > /dev/null 2> "$out/wait.log" || rc=$?
    [ "$rc" -eq 0 ] && break
    if [ "$rc" -ne 3 ]; then echo "demo: training $d stopped:"; cat "$out/wait.log"; exit 1; fi
    ctl eval run --label "during $d" >/dev/null
    echo "  $d: $(grep 'of the backlog trained' "$out/wait.log" | tail -n 1 | sed 's/^.*trained, //')"
  done
  ctl segments freeze "$id" >/dev/null
  ctl eval run --label "after $d" > /dev/null
  echo "demo: $d trained in $(( $(date +%s) - t0 )) s, segment $id frozen; $(ctl status | head -1)"
done
echo "demo: all domains in $(( $(date +%s) - start )) s"
ctl checkpoint >/dev/null
ctl --json status | python3 -c 'import json,sys; s=json.load(sys.stdin); print("demo: the spool received %s text bytes and keeps %s of them" % (s["spoolBytes"], s["spoolKeptBytes"]))'
ctl --json segments > "$out/segments.json"
ctl segments
ctl report "$out"  # report.json, history.json, report.md, heatmap and curves as PNG and SVG
if bash scripts/dashboard.sh screenshot "$admin" "$data/admin.token" "$out/dashboard.png"; then
  echo "demo: the live page (http://$admin/ while peerd runs) as $out/dashboard.png"
else
  echo "demo: no screenshot of the live page (see the message above)"
fi
kill -TERM $peerd_pid; wait $peerd_pid || true
trap - EXIT
