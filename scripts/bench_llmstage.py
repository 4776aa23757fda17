"""The cost of the progressive llm-stage methods' own work (SparseVLM, PyramidDrop, TransPrune) at LLaVA-1.5-7B
geometry, on random tensors: one call with 576 visual tokens, hidden size 4096, 32 heads and a
40-token instruction, at a budget of 11.1 % (64 of 576). The signals themselves (attention rows, states) are the
engine's work and are not timed. Median over repeats, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_llmstage.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokensieve.core.budget import Budget
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup
from tokensieve.registry import create_method

CASES = [
    ("pyramiddrop", 0, 3, "stage 1 of 3 (top-k of the last row)"),
    ("transprune", 1, 6, "an accumulation-only step (TTV of one layer)"),
    ("transprune", 0, 6, "a pruning step (TTV + IGA + top-k)"),
    ("sparsevlm", 0, 3, "first step (raters, rank of P, top-k, recycling into DPC-kNN clusters)"),
    ("sparsevlm", 2, 3, "last step (the budget split into kept + merged, recycling)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, dim, q, heads = 576, 4096, 40, 32
    rows = torch.rand(heads, q, n, generator=g) / n
    tokens = torch.randn(n, dim, generator=g)
    text = torch.randn(q, dim, generator=g)
    previous = torch.randn(n, dim, generator=g)
    print(f"torch {torch.__version__}, 1 thread; {n} visual tokens, D={dim}, {heads} heads, {q} instruction tokens")
    for name, step, steps, what in CASES:
        method = create_method(f"vis:{name}")
        times, out = [], 0
        for _ in range(args.repeats):
            ctx = VisualContext(
                tokens=tokens,
                groups=(VisualGroup(0, n, 24, 24),),
                stage=Stage.LLM,
                text_attention=rows[:, -1],
                text_rows=rows,
                text_tokens=text,
                previous=previous,
                step=step,
                steps=steps,
                start=(n,),
                memory={},
            )
            t0 = time.perf_counter()
            kept = method.prune(ctx, Budget.ratio(64 / 576))
            times.append(time.perf_counter() - t0)
            out = int(kept.index.numel())
        ms = statistics.median(times) * 1e3
        print(f"{name:12s} step {step + 1}/{steps}: {ms:7.2f} ms -> {out:3d} tokens  ({what})")


if __name__ == "__main__":
    main()
