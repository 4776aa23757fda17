"""The cost of FlowCut's per-layer scoring at realistic sizes, on random tensors.

One vision-stage call at CLIP ViT-L/14-336 geometry (576 patches + CLS, 16 heads × 64): a pruning step (score, running
score, entropy count, top-k) and a scoring-only step (odd number of layers left), and one LLM-stage call at
LLaVA-NeXT-7B geometry (2,880 visual tokens, 32 heads × 128). Median over repeats, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_flowcut.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokensieve.core.budget import Budget
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup
from tokensieve.methods.visual.flowcut import FlowCut


def vision_ctx(n: int, heads: int, dim: int, step: int, steps: int, g: torch.Generator) -> VisualContext:
    side = int(n**0.5)
    return VisualContext(
        tokens=torch.randn(n, 1024, generator=g),
        groups=(VisualGroup(0, n, side, side),),
        stage=Stage.VISION,
        layer=step + 1,
        cls_attention=torch.softmax(torch.randn(heads, n + 1, generator=g), -1)[:, 1:],
        values=torch.randn(heads, n, dim, generator=g),
        anchor_value=torch.randn(heads, dim, generator=g),
        step=step,
        steps=steps,
        start=(n,),
        memory=None,  # a fresh running score per call (the first scored layer)
    )


def timed(fn: object, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    method = FlowCut()
    budget = Budget.tokens(64)
    rows = []
    # LLaVA-1.5: 22 steps; step 0 has 21 layers left (score only), step 1 has 20 (prunes)
    for label, step in (("vision, scoring step (576 tokens)", 0), ("vision, pruning step (576 tokens)", 1)):
        ctx = vision_ctx(576, 16, 64, step, 22, g)
        rows.append((label, timed(lambda ctx=ctx: method.prune(ctx, budget), args.repeats)))
    n, heads, dim = 2880, 32, 128
    llm = FlowCut(stage="llm")
    ctx = VisualContext(
        tokens=torch.randn(n, 8, generator=g),
        groups=(VisualGroup(0, n, 1, n),),
        stage=Stage.LLM,
        layer=2,
        text_attention=torch.softmax(torch.randn(heads, n + 40, generator=g), -1)[:, :n],
        values=torch.randn(heads, n, dim, generator=g),
        anchor_value=torch.randn(heads, dim, generator=g),
    )
    rows.append(("llm, layer-2 step (2,880 tokens, 32 x 128)", timed(lambda: llm.prune(ctx, Budget.tokens(160)), 50)))
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats} (llm: 50)")
    for label, ms in rows:
        print(f"{label:<45} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
