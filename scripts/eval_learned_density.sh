#!/usr/bin/env bash
# One comparison of the learned selectors (KVzap, SP-KV, retention gates) against KVzip and the
# heuristics (SnapKV, StreamingLLM, KNorm, RazorAttention) at equal density, 25 % and 10 % of the KV cache, 1K tokens:
#   1. the needle screen — single needle and multi-key x 3 depths x 6 seeds = 36 samples per cell, both modes
#      (the samples of scripts/eval_screen.sh, in a new store: the learned profiles changed);
#   2. natural-text fidelity — the `prose` task (held-out prose, 36 seeds), query-agnostic, KL and top-1 agreement
#      to the full model over 128 teacher-forced tokens.
# KVzap's threshold form (the paper's) keeps a density that follows the text: it runs at the thresholds whose
# held-out density (the installed surrogate's calibration table) gives 25 % and 10 % of a 1K prompt with a 32-token
# window (DMSPress's 128 would alone hold 12.5 % of a 1K prompt); its rows carry the budget they aim at, and the
# tables' density column is what they measured.
# Resumable (rerun after an interruption; WORKERS 1-thread processes share the store). Run after the profiles are
# installed (tokensieve train kvzap --ship, tokensieve train spkv --ship).
# METHODS, BUDGETS, SEEDS (needles), PROSE_SEEDS and WORKERS override the defaults below; THRESHOLD=0 leaves out
# KVzap's threshold form (e.g. to rerun one retrained method beside the heuristics it is paired with).
# Usage: scripts/eval_learned_density.sh [STORE]
# Tables:
#   .venv/bin/python scripts/wilson_table.py STORE --budgets 0.25,0.1 --modes agnostic,aware \
#       --paired agnostic:0.1 --paired aware:0.1 --paired agnostic:0.25 --paired aware:0.25 --kl 0.1
#   .venv/bin/python scripts/fidelity_table.py STORE --budgets 0.25,0.1
#   .venv/bin/tokensieve report STORE
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${1:-runs/learned.sqlite}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
PY=${PYTHON:-.venv/bin/python}
WORKERS=${WORKERS:-2}
METHODS=${METHODS:-"kvzip,kvzap,kvzap[allocation=global],spkv,retention,snapkv,streaming_llm,knorm,razor"}
BUDGETS=${BUDGETS:-0.25,0.1}
SEEDS=${SEEDS:-"0 1 2 3 4 5"}
PROSE_SEEDS=${PROSE_SEEDS:-0-35}
THRESHOLD=${THRESHOLD:-1}
mkdir -p "$(dirname "$STORE")"

# the threshold form's specs, from the installed surrogate's calibration table
if [ "$THRESHOLD" != 0 ]; then
THRESHOLD_SPECS=$("$PY" - "$BUDGETS" <<'PYEOF'
import sys

import tokensieve as ts
from tokensieve.adapters.models import model_shape
from tokensieve.adapters.profiles import load_profile

model, _ = ts.load_model("smollm2-135m")
prof = load_profile("kvzap", model_shape(model))
if prof is None:
    sys.exit("no kvzap profile installed: run `tokensieve train kvzap --ship` first")
cal = prof.data["calibration"]["mlp"]
n, window = 1000, 32
specs = []
for b in (float(x) for x in sys.argv[1].split(",")):
    want = (b - window / n) / (1 - window / n)  # the share of out-of-window entries to keep
    t = next((t for t, d in zip(cal["threshold"], cal["density"]) if d <= want), cal["threshold"][-1])
    specs.append(f"kvzap[threshold={t},window={window}]:{b}")
print(",".join(specs))
PYEOF
)
echo "threshold form: $THRESHOLD_SPECS"
SPECS="$METHODS,$THRESHOLD_SPECS"
else
SPECS="$METHODS"
fi

for seed in $SEEDS; do
  for w in $(seq "$WORKERS"); do
    OMP_NUM_THREADS=1 "$TS" eval --store "$STORE" --threads 1 --quiet --methods "$SPECS" \
      --budgets "$BUDGETS" --tasks niah_single,niah_multikey --lengths 1k --depths 0.25,0.5,0.75 --seeds "$seed" \
      --modes agnostic,aware &
  done
  wait
done
for w in $(seq "$WORKERS"); do
  OMP_NUM_THREADS=1 "$TS" eval --store "$STORE" --threads 1 --quiet --methods "$SPECS" \
    --budgets "$BUDGETS" --tasks prose --lengths 1k --seeds "$PROSE_SEEDS" --modes agnostic &
done
wait
"$PY" scripts/wilson_table.py "$STORE" --budgets "$BUDGETS" --modes agnostic,aware --tasks niah_single,niah_multikey \
  --paired agnostic:0.1 --paired aware:0.1 --paired agnostic:0.25 --paired aware:0.25 --kl 0.1
"$PY" scripts/fidelity_table.py "$STORE" --budgets "$BUDGETS"
