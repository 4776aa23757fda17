#!/usr/bin/env bash
# Retrain SP-KV's gate with the trainer's defaults (64 + 8 sequences of 1,024 tokens from the training
# parts of every text source) and its options, then keep what wins on held-out text: each candidate gate is installed
# in a private TOKENSIEVE_HOME (the shipped profile is untouched) and measured on the `prose` task (held-out prose,
# 36 seeds, KL / top-1 to the full model) at 25 % and 10 %; scripts/fidelity_table.py compares them, paired.
# Candidates (CANDIDATES, space-separated names):
#   attention  --input kv     --target attention   (the defaults)
#   kvzip      --input kv     --target kvzip+      (KVzip+ scores as the oracle)
#   hidden     --input hidden --target attention   (the paper's predictor input)
#   hidden-kvzip --input hidden --target kvzip+
#   <name>-hard: the same plus the hard-gate stage (--hard-steps HARD_STEPS), e.g. kvzip-hard
# Resumable (rerun: finished trainings and evaluation cells are kept). Ship the winner afterwards with the same
# training command and --ship (it resumes, then copies the gate), e.g.
#   .venv/bin/tokensieve train spkv --out runs/spkv-kvzip --target kvzip+ --ship
# Usage: scripts/spkv_candidates.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
PY=${PYTHON:-.venv/bin/python}
CANDIDATES=${CANDIDATES:-"attention kvzip"}
HARD_STEPS=${HARD_STEPS:-64}
THREADS=${THREADS:-2}
MODELS=$("$PY" -c "from tokensieve.paths import cache_home; print(cache_home() / 'models')")
stores=()
for name in $CANDIDATES; do
  base=${name%-hard}
  case "$base" in
    attention) flags=(--input kv --target attention) ;;
    kvzip) flags=(--input kv --target kvzip+) ;;
    hidden) flags=(--input hidden --target attention) ;;
    hidden-kvzip) flags=(--input hidden --target kvzip+) ;;
    *) echo "unknown candidate $name" >&2; exit 2 ;;
  esac
  [[ "$name" == *-hard ]] && flags+=(--hard-steps "$HARD_STEPS")
  out=runs/spkv-$name
  OMP_NUM_THREADS=$THREADS "$TS" train spkv --out "$out" --threads "$THREADS" --no-progress "${flags[@]}"
  home=$out/home
  mkdir -p "$home/profiles/smollm2-135m"
  ln -sfn "$MODELS" "$home/models"
  cp "$out/final/spkv.json" "$home/profiles/smollm2-135m/spkv.json"
  TOKENSIEVE_HOME=$home OMP_NUM_THREADS=1 "$TS" eval --store "runs/spkv-$name.sqlite" --threads 1 --quiet \
    --methods spkv --budgets 0.25,0.1 --tasks prose --lengths 1k --seeds 0-35 --modes agnostic
  stores+=("runs/spkv-$name.sqlite")
done
"$PY" scripts/fidelity_table.py "${stores[@]}" --budgets 0.25,0.1
