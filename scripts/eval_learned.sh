#!/usr/bin/env bash
# the learned selectors (SP-KV's write gate, global retention gates) against StreamingLLM, H2O and SnapKV
# at equal density (KV budget 0.25), 1K tokens, both modes: single needle and multi-key (the cells of the methods
# screen, same store and samples: 36 per cell) and KJV QA (12 per cell). Resumable; WORKERS processes share the store.
# Usage: scripts/eval_learned.sh [STORE]
#        table: .venv/bin/python scripts/wilson_table.py STORE --budgets 0.25 --modes agnostic,aware
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/screen36.sqlite}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
WORKERS=${WORKERS:-2}
METHODS=${METHODS:-"spkv,retention,retention[allocation=uniform],snapkv,h2o,streaming_llm"}
SEEDS=${SEEDS:-"0 1 2 3 4 5"}

for seed in $SEEDS; do
  for w in $(seq "$WORKERS"); do
    OMP_NUM_THREADS=1 "$TS" eval --store "$STORE" --threads 1 --quiet --methods "$METHODS" --budgets 0.25 \
      --tasks niah_single,niah_multikey --lengths 1k --depths 0.25,0.5,0.75 --seeds "$seed" \
      --modes agnostic,aware &
  done
  wait
done
for w in $(seq "$WORKERS"); do
  OMP_NUM_THREADS=1 "$TS" eval --store "$STORE" --threads 1 --quiet --methods "$METHODS" --budgets 0.25 \
    --tasks qa --lengths 1k --depths 0.25,0.5,0.75 --seeds 0-3 --modes agnostic,aware &
done
wait
