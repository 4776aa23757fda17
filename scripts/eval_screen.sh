#!/usr/bin/env bash
# the methods screen with 36 samples per cell (single needle and multi-key x 3 depths x 6 seeds, 1K
# tokens), every registered method at 90 / 75 / 50 % compression, both modes; accuracy with Wilson 95 % intervals
# via scripts/wilson_table.py. The same samples and store as scripts/eval_agnostic.sh (its cells are reused).
# Runs seed by seed (a stopped run leaves every method with the same samples); WORKERS processes share the store.
# The methods: every registered one that evicts, selects or decodes sparsely, so not the sparse prefill methods
# (ashape, flexprefill, hip, minference: they keep the whole cache; docs/results/benchmarks.md measures them) nor
# duo_attention (it needs a profile of the model's heads, which the embedded model has not). With the shared prefill
# (docs/EVALUATION.md) a seed takes about 20 minutes with two 1-thread workers on a 2-core machine.
# Usage: scripts/eval_screen.sh [STORE]      (resumable: rerun after an interruption)
#        table: .venv/bin/python scripts/wilson_table.py STORE --budgets 0.1,0.25,0.5 --modes agnostic,aware
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/screen36.sqlite}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
WORKERS=${WORKERS:-2}
SCREEN="adakv,chunkkv,compresskv,criticalkv,dapq,ems,expected_attention,+fasa,fasa_prefill,h2o,keydiff,knorm,kvzip"
SCREEN+=",lagkv,pyramidkv,+quest,random,razor,+recompress,retention,simlayerkv,snapkv,spkv,streaming_llm,+tidaldecode"
SCREEN+=",+tokenselect,tova"
METHODS=${METHODS:-$SCREEN}
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
