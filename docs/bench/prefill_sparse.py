"""Prefill sparse attention benchmark (docs/PREFILL.md): compile time, then time-to-first-token and peak prefill
memory of dense SDPA vs the sparse prefill methods, interleaved, medians, same-run ratios.

    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/prefill_sparse.py --lengths 2048,4096 --reps 3

Phase 1 compiles FlexAttention once (one prefill per sparse spec at 1024 tokens) and reports the time of the calls
that compiled a graph apart from the rest. Phase 2 is `tokensieve bench` (tokensieve.bench.runner.run_bench: the
order of configurations rotates between repetitions, medians; TTFT = prefill + first argmax; peak RSS while
prefilling, weights included). Phase 3 prefills each sparse spec once more per length to read the block density.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokensieve.adapters.models import load_model
from tokensieve.attention import flex
from tokensieve.bench.config import BenchConfig
from tokensieve.bench.runner import bench_prompts, run_bench
from tokensieve.engine import compress
from tokensieve.spec import Spec, parse_specs

DEFAULT = "full,ashape,flexprefill,snapkv:0.25,flexprefill[evict=snapkv]:0.25"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    specs = parse_specs(args.methods)
    model, tok = load_model("smollm2-135m")
    sparse = [s for s in specs if hasattr(s.method, "blocks")]

    # phase 1: compilation (once per process; dynamic shapes: no recompilation per length)
    flex.STATS.reset()
    ids = bench_prompts(tok, 1024, 1)
    first: dict[str, float] = {}
    for s in sparse:
        t0 = time.perf_counter()
        with torch.inference_mode():
            compress(model, **s.compressor_kwargs()).prefill(ids)
        first[s.label] = time.perf_counter() - t0
    compile_info = {
        "compile_seconds": flex.STATS.compile_seconds,
        "graphs": flex.STATS.compiles,
        "first_prefill_seconds": first,
    }
    print(json.dumps(compile_info))

    # phase 2: TTFT and peak memory, interleaved
    cfg = BenchConfig(specs=tuple(specs), lengths=lengths, decode_tokens=2, repetitions=args.reps, threads=1)
    before = flex.STATS.compiles
    rows, info = run_bench(cfg, model_and_tokenizer=(model, tok))
    recompiles = flex.STATS.compiles - before

    # phase 3: block density per spec and length
    density: dict[tuple[str, int], float] = {}
    for n in lengths:
        ids = bench_prompts(tok, n, 1)
        for s in sparse:
            flex.STATS.reset()
            with torch.inference_mode():
                compress(model, **s.compressor_kwargs()).prefill(ids)
            density[(s.label, n)] = flex.STATS.density

    table = []
    for n in lengths:
        base = statistics.median(r.ttft_s for r in rows if r.length == n and r.label == "full")
        for s in specs:
            rs = [r for r in rows if r.length == n and r.label == Spec.parse(s).label]
            if not rs:
                continue
            ttft = statistics.median(r.ttft_s for r in rs)
            table.append({
                "spec": s.label, "length": n, "ttft_s": round(ttft, 3),
                "ttft_each": [round(r.ttft_s, 3) for r in rs],
                "speedup_vs_full": round(base / ttft, 2),
                "peak_rss_mb": round(statistics.median(r.prefill_peak_rss for r in rs) / 2**20),
                "density": round(density.get((s.label, n), 1.0), 3),
            })  # fmt: skip
    out = {"compile": compile_info, "recompiles_during_bench": recompiles, "machine": info, "table": table}
    print(json.dumps(out, indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print("| spec | length | TTFT s (median) | × full | peak RSS MB | block density |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| `{r['spec']}` | {r['length']} | {r['ttft_s']} | {r['speedup_vs_full']} | {r['peak_rss_mb']} "
            f"| {r['density']} |"
        )


if __name__ == "__main__":
    main()
