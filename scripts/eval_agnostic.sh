#!/usr/bin/env bash
# query-agnostic compression at 90 % (KV budget 0.1) on the single-needle and multi-key tasks at 1K
# tokens, 36 samples per method (2 tasks x 3 depths x 6 seeds), the methods the literature offers for keeping the
# needle without the question (KVzip's reconstruction scores, retrieval heads, chunks, key-only scores, TOVA) next
# to SnapKV and the random / recency floors. Target: >= 0.6 of the full cache's accuracy with one method.
# Runs seed by seed, so an interrupted run leaves a balanced slice; WORKERS processes share the store (claims).
# Usage: scripts/eval_agnostic.sh [STORE]      (resumable: rerun after an interruption)
#        table: .venv/bin/python scripts/wilson_table.py STORE --budgets 0.1 --modes agnostic
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/screen36.sqlite}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
WORKERS=${WORKERS:-2}
METHODS=${METHODS:-"kvzip,tova,knorm,razor,compresskv,chunkkv,expected_attention,keydiff,lagkv,snapkv,streaming_llm,random"}
LENGTHS=${LENGTHS:-1k}
SEEDS=${SEEDS:-"0 1 2 3 4 5"}

for seed in $SEEDS; do
  for w in $(seq "$WORKERS"); do
    OMP_NUM_THREADS=1 "$TS" eval --store "$STORE" --threads 1 --quiet --methods "$METHODS" --budgets 0.1 \
      --tasks niah_single,niah_multikey --lengths "$LENGTHS" --depths 0.25,0.5,0.75 --seeds "$seed" \
      --modes agnostic &
  done
  wait
done
