#!/usr/bin/env bash
# Accuracy kept by the configurations of docs/BENCHMARKS.md: needle retrieval at 2K tokens with a 1/8 KV budget
# (entries kept for eviction methods, entries read per step for sparse decoding, cache size for decode-time H2O),
# query-aware, full cache alongside.
# Usage: scripts/eval_bench_configs.sh [STORE] [REPORT_DIR]      (resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/bench-accuracy.sqlite}
OUT=${2:-docs/eval/bench-configs}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
THREADS=${THREADS:-2}

"$TS" eval --store "$STORE" --threads "$THREADS" \
  --methods snapkv,streaming_llm,razor,adakv,full+h2o,quest,quest:page=32,tidaldecode,tokenselect \
  --budgets 0.125 --tasks passkey,niah_single --lengths 2k --depths 0.25,0.5,0.75 --seeds 0,1 --modes aware
"$TS" report "$STORE" --out "$OUT" --format md --title "Accuracy of the benchmarked configurations, smollm2-135m, 2K tokens"
