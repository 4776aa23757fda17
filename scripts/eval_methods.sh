#!/usr/bin/env bash
# Every registered method at two KV budgets on needle retrieval at 1K tokens, query-agnostic and query-aware,
# with the full cache alongside (docs/EVALUATION.md, "Methods at a glance").
# Usage: scripts/eval_methods.sh [STORE] [REPORT_DIR]      (resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/methods.sqlite}
OUT=${2:-docs/eval/methods}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
THREADS=${THREADS:-2}

"$TS" eval --store "$STORE" --threads "$THREADS" --methods all --budgets 0.1,0.25,0.5 \
  --tasks passkey,niah_single --lengths 1k --depths 0.25,0.5,0.75 --seeds 0 --modes agnostic,aware
"$TS" report "$STORE" --out "$OUT" --format md --title "Methods at a glance, smollm2-135m, 1K tokens"
