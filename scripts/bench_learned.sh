#!/usr/bin/env bash
# Prefill time, decode tokens/s at 8K and peak memory of every configuration of the comparison
# (scripts/eval_learned_density.sh) at a 10 % budget, measured in one run against the full cache (interleaved repetitions,
# medians; 2 torch threads on the 2-core machine: run it alone). KVzap's threshold form decodes with its write gate
# (decoding=true); SP-KV and the retention gates always decode with theirs.
# KVzip prefills the context twice (the context, then its repetition), so on an 8K-context model it cannot run at 8K:
# a second run at 3,900 tokens times KVzip with the full cache, SnapKV and KVzap beside it (the prefill-time ratios).
# Usage: scripts/bench_learned.sh [REPORT_DIR]   (writes REPORT_DIR/bench.md, REPORT_DIR-4k/bench.md and plots; rows
#        also go to runs/learned.sqlite)
set -euo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-runs/bench-learned}
TS=${TOKENSIEVE:-.venv/bin/tokensieve}
THRESHOLD=${THRESHOLD:--4}
KVZAP="kvzap:0.1,kvzap[allocation=global]:0.1,kvzap[threshold=$THRESHOLD,decoding=true]:0.1"
SPECS="full,$KVZAP,spkv:0.1,retention:0.1,snapkv:0.1,streaming_llm:0.1,knorm:0.1,razor:0.1"
"$TS" bench --methods "$SPECS" --lengths 8000 --batch-sizes 1 --decode-tokens 64 --reps 2 --threads 2 \
  --report "$REPORT" --store runs/learned.sqlite
"$TS" bench --methods "full,kvzip:0.1,snapkv:0.1,$KVZAP" --lengths 3900 --batch-sizes 1 --decode-tokens 64 --reps 3 \
  --threads 2 --report "$REPORT-4k" --store runs/learned.sqlite
