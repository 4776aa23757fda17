"""Time the selection itself of the diversity methods (ToDRE stage 1, DivPrune) on random tensors of realistic size.

Each configuration times ``method.prune(ctx, budget)`` — the whole call the engine makes, pivot and greedy loop
included — on one image of N projected visual tokens of width D (LLaVA-1.5: 576; LLaVA-NeXT's five grids: 2,880;
D = 4,096 for 7B models), with a CLS row for ToDRE's pivot. Prints the median and the spread of the repeats.

Usage: OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_diversity.py [--threads 2] [--reps 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from tokensieve.core.budget import Budget
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup
from tokensieve.registry import create_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15, help="timed calls per configuration (after one warm-up)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--tokens", default="576,2880")
    ap.add_argument("--ratios", default="0.1,0.25")
    ap.add_argument("--methods", default="todre[relevance=false],todre[relevance=false;diversity=kcenter],divprune")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print("| method | N x D | kept | median ms | min-max ms |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(n, args.dim, generator=g)
        cls = torch.softmax(torch.randn(16, n, generator=g), dim=-1)
        side = round(n**0.5)
        group = VisualGroup(0, n, side, side) if side * side == n else VisualGroup(0, n, 1, n)
        ctx = VisualContext(tokens=x, groups=(group,), stage=Stage.PROJECTOR, cls_attention=cls)
        for spec in args.methods.split(","):
            name, _, params = spec.partition("[")
            kw = dict(p.split("=") for p in params.rstrip("]").split(";") if p)
            method = create_method(f"vis:{name}", **kw)
            for r in (float(v) for v in args.ratios.split(",")):
                budget = Budget.ratio(r)
                method.prune(ctx, budget)  # warm-up
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    kept = method.prune(ctx, budget)
                    times.append((time.perf_counter() - t0) * 1e3)
                print(
                    f"| {spec.replace(';', ',')} | {n} x {args.dim} | {kept.index.numel()} ({r:g}) | "
                    f"{statistics.median(times):.1f} | {min(times):.1f}-{max(times):.1f} |"
                )


if __name__ == "__main__":
    main()
