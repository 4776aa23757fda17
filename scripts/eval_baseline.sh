#!/usr/bin/env bash
# Full-cache baseline of the embedded model on every task at 512, 1K, 2K and 4K tokens (docs/EVALUATION.md).
# Installs the real text it needs (the King James Bible, Debian packages bible-kjv + bible-kjv-text) when missing.
# Usage: scripts/eval_baseline.sh [STORE] [REPORT_DIR]      (resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/baseline.sqlite}
OUT=${2:-docs/eval/baseline}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
THREADS=${THREADS:-1}

if ! command -v bible >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q bible-kjv bible-kjv-text;
  else sudo apt-get update -q && sudo apt-get install -y -q bible-kjv bible-kjv-text; fi
fi

# Tasks with a needle: 5 depths x 1 seed per length.
"$TS" eval --store "$STORE" --threads "$THREADS" --methods full --modes agnostic \
  --tasks passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery,qa \
  --lengths 512,1k,2k,4k --depths 0,0.25,0.5,0.75,1 --seeds 0 --text kjv
# Tasks without a depth: 5 seeds per length.
"$TS" eval --store "$STORE" --threads "$THREADS" --methods full --modes agnostic \
  --tasks vt,cwe,fwe,ppl --lengths 512,1k,2k,4k --seeds 0-4 --text kjv
"$TS" report "$STORE" --out "$OUT" --format md,html --title "Full-cache baseline, smollm2-135m"
