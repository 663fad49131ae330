#!/usr/bin/env bash
# The long, capacity-bound stream (bench/LONG.md): twelve real domains after the broad base phase,
# dense and dense+recipe (seed 1 also at 0.5× and 2× the matched width), routed and routed+recipe, three
# seeds. The routed policies route as peerd does by default (train.routeCandidates 4: each window
# runs the one of four candidate branches that predicted the 512 bytes before it best); the same
# models routed by the bigram router alone are the report's POLICY/bigram rows. Then
# scripts/long_report.py fills bench/LONG.md's tables and draws bench/long.svg and bench/long-curves.svg.
#
#   scripts/long_stream.sh [BUILD_DIR]     environment: STEPS (per domain, 1000), D_MODEL (64),
#                                          SEEDS ("1 2 3"), JOBS (seeds run at once, 1), OUT,
#                                          DOC (bench/LONG.md), PLOT (bench/long.svg),
#                                          CURVES (bench/long-curves.svg)
#
# Seed 1 also runs the width sweep, records each phase's held-out curve and scores every task on
# every branch at the end (--branch-scores). Each seed runs one compute thread, so JOBS=2 on two
# cores halves the wall time without changing a figure.
set -euo pipefail
BUILD=${1:-build}
STEPS=${STEPS:-1000}
D_MODEL=${D_MODEL:-64}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-1}
OUT=${OUT:-bench-out/long}
DOC=${DOC:-bench/LONG.md}
PLOT=${PLOT:-bench/long.svg}
CURVES=${CURVES:-bench/long-curves.svg}
DOMAINS=kjv,c-code,fortunes-de,man-pages,sparv,python,go-code,rust-code,ruby-code,emacs-lisp,latex,sql-docs

bash scripts/corpora.sh long
mkdir -p "$OUT"
run_seed() {
  local seed=$1 extra=()
  if [[ $seed == "${SEEDS%% *}" ]]; then extra=(--dense-widths 0.5,2 --curve-every 250 --branch-scores); fi
  "$BUILD/peer-bench" forgetting --domains "$DOMAINS" --pretrain broad:600 --steps "$STEPS" --d-model "$D_MODEL" \
    --policies dense,dense+recipe,routed,routed+recipe --route-by model --route-candidates 4 "${extra[@]}" \
    --seed "$seed" --threads 1 --json-out "$OUT/seed$seed.jsonl" > "$OUT/seed$seed.txt" 2> "$OUT/seed$seed.log"
  echo "long stream: seed $seed done ($OUT/seed$seed.txt)"
}
running=0
for seed in $SEEDS; do
  run_seed "$seed" &
  running=$((running + 1))
  if ((running >= JOBS)); then wait -n; running=$((running - 1)); fi
done
wait
scripts/long_report.py --doc "$DOC" --plot "$PLOT" --curves "$CURVES" --json "$OUT/summary.json" "$OUT"/seed*.jsonl
