#!/usr/bin/env bash
# Issue 15 §4: the methods screen with 36 samples per cell (single needle and multi-key x 3 depths x 6 seeds, 1K
# tokens), every registered method at 90 / 75 / 50 % compression, both modes; accuracy with Wilson 95 % intervals
# via scripts/wilson_table.py. The same samples and store as scripts/eval_agnostic.sh (its cells are reused).
# Runs seed by seed (a stopped run leaves every method with the same samples); WORKERS processes share the store.
# Usage: scripts/eval_screen.sh [STORE]      (resumable: rerun after an interruption)
#        table: .venv/bin/python scripts/wilson_table.py STORE --budgets 0.1,0.25,0.5 --modes agnostic,aware
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/screen36.sqlite}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
WORKERS=${WORKERS:-2}
METHODS=${METHODS:-all}
BUDGETS=${BUDGETS:-0.1,0.25,0.5}
MODES=${MODES:-agnostic,aware}
SEEDS=${SEEDS:-"0 1 2 3 4 5"}

for seed in $SEEDS; do
  for w in $(seq "$WORKERS"); do
    OMP_NUM_THREADS=1 "$TS" eval --store "$STORE" --threads 1 --quiet --methods "$METHODS" --budgets "$BUDGETS" \
      --tasks niah_single,niah_multikey --lengths 1k --depths 0.25,0.5,0.75 --seeds "$seed" --modes "$MODES" &
  done
  wait
done
