#!/usr/bin/env bash
# The DAAM comparison of docs/DAAM.md — both speech networks x 3 front blocks (DAAM, multi-head attention, none) x
# 5 seeds on both tasks of the offline speech corpus (paired by seed: a seed fixes the initialisation of the shared
# layers and the batch order), then token selection for audio (the trained weights: daam-frames; a selector trained
# for dropping: daam-select), the importance figures and the tables. One run per line of OUT/results.jsonl;
# resumable (finished runs are skipped).
#
# MODULES=official (default): the DAAM modules and speech networks as the authors' code computes them; runs
#   are named ...-official and go to runs/daam-official, figures to docs/figures/official — the rows of
#   the earlier networks (runs/daam) stay apart, and `daam-report --compare runs/daam` sets them side by side.
# MODULES=v1: the earlier networks (reproduces the earlier rows of docs/DAAM.md in runs/daam).
#
# About 2.5 CPU-hours on one free core (estimated from pinned one-epoch smoke runs; the selector adds ~15 min);
# JOBS=2 runs the task-A/B halves side by side on two free cores.
# Usage: scripts/daam_grid.sh [OUT]          tables: tokensieve train daam-report --out OUT [--compare runs/daam]
set -euo pipefail
cd "$(dirname "$0")/.."
MODULES=${MODULES:-official}
if [ "$MODULES" = official ]; then DEFAULT_OUT=runs/daam-official; FIGDIR=${FIGDIR:-docs/figures/official}
else DEFAULT_OUT=runs/daam; FIGDIR=${FIGDIR:-docs/figures}; fi
OUT=${1:-$DEFAULT_OUT}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
JOBS=${JOBS:-1}
M=(--modules "$MODULES")
"$TS" train daam-corpus --tasks a,b
first() {
  "$TS" train daam --out "$OUT" "${M[@]}" --task a --networks cnnlstm --attention daam,mha,none --seeds 0-4 \
    --epochs 30 --segments 4
  "$TS" train daam --out "$OUT" "${M[@]}" --task b --networks cnnlstm --attention daam,mha,none --seeds 0-4 --epochs 30
  "$TS" train daam --out "$OUT" "${M[@]}" --task b --networks transformer --attention daam --time-axis --time-heads 1 \
    --feedforward 512 --seeds 0-4 --epochs 10
}
second() {  # about as long as first(): the two halves end together with JOBS=2
  "$TS" train daam --out "$OUT" "${M[@]}" --task a --networks transformer --attention daam,mha,none --time-axis \
    --feedforward 512 --seeds 0-4 --epochs 10 --segments 4
  "$TS" train daam --out "$OUT" "${M[@]}" --task b --networks transformer --attention daam,mha,none --time-axis \
    --feedforward 512 --seeds 0-4 --epochs 10
}
if [ "$JOBS" -gt 1 ]; then first & second; wait; else first; second; fi
"$TS" train daam-frames --out "$OUT" --task b --keep 0.5,0.25 --json "$OUT/frames_b.json"
"$TS" train daam-frames --out "$OUT" --task a --keep 0.5,0.25 --json "$OUT/frames_a.json"
if [ "$MODULES" = official ]; then  # the selector trained for dropping (reuses the task-B daam+time runs above)
  "$TS" train daam-select --out "$OUT" --task b --seeds 0-4 --epochs 10 --feedforward 512 --keep 0.25,0.5
fi
"$TS" train daam-figures --out "$OUT" --figdir "$FIGDIR"
"$TS" train daam-report --out "$OUT"
