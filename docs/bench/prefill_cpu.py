"""Prefill CPU time (process time of one thread) of dense SDPA vs sparse prefill methods: a measure of the work done
that a machine shared with other jobs does not distort the way it distorts wall time (docs/PREFILL.md).

    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/prefill_cpu.py --lengths 2048,4096 --reps 2

Compilation (the first sparse prefill) is reported apart; then every (length, repetition) prefills each spec once,
in an order rotated between repetitions; medians of CPU seconds and of wall seconds, ratios against `full` of the
same length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokensieve.adapters.models import load_model
from tokensieve.attention import flex
from tokensieve.bench.runner import bench_prompts
from tokensieve.engine import compress
from tokensieve.spec import parse_specs

DEFAULT = "full,ashape,flexprefill,flexprefill[evict=snapkv]:0.25"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = parse_specs(args.methods)
    model, tok = load_model("smollm2-135m")
    flex.STATS.reset()
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        compress(model, "ashape").prefill(bench_prompts(tok, 512, 1))
    print(json.dumps({"compile_cpu_s": round(time.process_time() - c0, 1),
                      "compile_wall_s": round(time.perf_counter() - w0, 1), "graphs": flex.STATS.compiles}),
          flush=True)  # fmt: skip
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = bench_prompts(tok, n, 1)
        for rep in range(args.reps):
            order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
            for s in order:
                press = compress(model, **s.compressor_kwargs())
                flex.STATS.reset()
                c0, w0 = time.process_time(), time.perf_counter()
                with torch.inference_mode():
                    press.prefill(ids)
                rows.append({"spec": s.label, "length": n, "rep": rep, "cpu_s": time.process_time() - c0,
                             "wall_s": time.perf_counter() - w0, "density": flex.STATS.density,
                             "compiles": flex.STATS.compiles})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    print("| spec | length | prefill CPU s (median) | x full (CPU) | wall s (median) | block density |")
    print("|---|---|---|---|---|---|")
    for n in sorted({r["length"] for r in rows}):
        base = statistics.median(r["cpu_s"] for r in rows if r["length"] == n and r["spec"] == "full")
        for s in specs:
            rs = [r for r in rows if r["length"] == n and r["spec"] == s.label]
            cpu = statistics.median(r["cpu_s"] for r in rs)
            wall = statistics.median(r["wall_s"] for r in rs)
            print(
                f"| `{s.label}` | {n} | {cpu:.2f} | {base / cpu:.2f} | {wall:.1f} "
                f"| {statistics.median(r['density'] for r in rs):.2f} |"
            )


if __name__ == "__main__":
    main()
