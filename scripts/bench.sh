#!/usr/bin/env bash
# The benchmark of docs/BENCHMARKS.md: full cache vs eviction and sparse-decoding methods at 2K, 4K and 8K tokens,
# batch 1 and 4, on this machine. Resumable (rerun after an interruption).
# Usage: scripts/bench.sh [STORE] [REPORT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/bench.sqlite}
OUT=${2:-docs/bench}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
METHODS="full,snapkv:0.125,streaming_llm:0.125,razor:0.125,adakv:0.125,+quest:0.125,+quest[page=32]:0.125,\
+tidaldecode:0.125,+tokenselect:0.125,+h2o:0.125"

"$TS" bench --methods "$METHODS" --lengths 2048,4096,8000 --batch-sizes 1,4 --decode-tokens 32 --reps 2 \
  --threads 2 --store "$STORE" --report "$OUT"
