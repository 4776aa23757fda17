#!/usr/bin/env bash
# The benchmark of docs/results/benchmarks.md, with the accuracy of the same configurations, in one results store:
#   1. speed and memory: full cache vs eviction and sparse-decoding methods at 2K, 4K and 8K tokens, batch 1 and 4;
#   2. accuracy: needle retrieval at 2K tokens (passkey, niah_single; 3 depths x 2 seeds; query-aware);
#   3. one report with accuracy and speed side by side for every configuration (same spec, same label).
# Resumable (rerun after an interruption).
# Usage: scripts/bench.sh [STORE] [REPORT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/bench.sqlite}
OUT=${2:-docs/bench}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
THREADS=${THREADS:-2}
SPECS="full,snapkv:0.125,streaming_llm:0.125,razor:0.125,adakv:0.125,+quest:0.125,+quest[page=32]:0.125,\
+tidaldecode:0.125,+tokenselect:0.125,+h2o:0.125"

"$TS" bench --methods "$SPECS" --lengths 2048,4096,8000 --batch-sizes 1,4 --decode-tokens 32 --reps 2 \
  --threads "$THREADS" --store "$STORE" --report "$OUT"
"$TS" eval --methods "$SPECS" --tasks passkey,niah_single --lengths 2k --depths 0.25,0.5,0.75 --seeds 0,1 \
  --modes aware --threads "$THREADS" --store "$STORE"
"$TS" report "$STORE" --out "$OUT" --format md --title "Speed, memory and accuracy kept, smollm2-135m"
