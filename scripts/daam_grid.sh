#!/usr/bin/env bash
# Issue 14: the DAAM comparison of docs/DAAM.md — both speech networks x 3 front blocks (DAAM, multi-head attention,
# none) x 5 seeds on both tasks of the offline speech corpus, then token selection for audio and the importance
# figures. One run per line of runs/daam/results.jsonl; resumable (finished runs are skipped). About 2 CPU-hours;
# JOBS=2 runs the two task-A/B halves side by side.
# Usage: scripts/daam_grid.sh [OUT]          tables: tokensieve train daam-report --out OUT
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/daam}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
JOBS=${JOBS:-1}
"$TS" train daam-corpus --tasks a,b
first() {
  "$TS" train daam --out "$OUT" --task a --networks cnnlstm --attention daam,mha,none --seeds 0-4 --epochs 30 --segments 4
  "$TS" train daam --out "$OUT" --task b --networks cnnlstm --attention daam,mha,none --seeds 0-4 --epochs 30
  "$TS" train daam --out "$OUT" --task b --networks transformer --attention daam,mha,none --time-axis \
    --feedforward 512 --seeds 0-4 --epochs 10
  "$TS" train daam --out "$OUT" --task b --networks transformer --attention daam --time-axis --time-heads 1 \
    --feedforward 512 --seeds 0-4 --epochs 10
}
second() {
  "$TS" train daam --out "$OUT" --task a --networks transformer --attention daam,mha,none --time-axis \
    --feedforward 512 --seeds 0-4 --epochs 10 --segments 4
}
if [ "$JOBS" -gt 1 ]; then first & second; wait; else first; second; fi
"$TS" train daam-frames --out "$OUT" --task b --keep 0.5,0.25 --json "$OUT/frames_b.json"
"$TS" train daam-frames --out "$OUT" --task a --keep 0.5,0.25 --json "$OUT/frames_a.json"
"$TS" train daam-figures --out "$OUT" --figdir docs/figures
"$TS" train daam-report --out "$OUT"
