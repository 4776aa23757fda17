"""Spatial pooling: average-pool each visual grid down to the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from .base import Stage, VisualContext, VisualKept, VisualMethod, split_counts


def pooled_grid(height: int, width: int, k: int) -> tuple[int, int]:
    """The output grid ``(a, b)`` for pooling a ``height × width`` grid to at most ``k`` tokens: ``a ≤ height``,
    ``b ≤ width``, ``a·b ≤ k`` as large as possible; among equals the aspect closest to the input's, then the taller."""
    k = max(1, k)
    best: tuple[int, float, int, int] | None = None
    for a in range(1, height + 1):
        b = min(width, k // a)
        if b < 1:
            break
        key = (a * b, -abs(math.log(a / b) - math.log(height / width)), a, b)
        if best is None or key[:3] > best[:3]:
            best = key
    assert best is not None
    return best[2], best[3]


def cell_starts(n_in: int, n_out: int) -> list[int]:
    """First input row (or column) of each output cell of adaptive average pooling: ``floor(i · n_in / n_out)``."""
    return [(i * n_in) // n_out for i in range(n_out)]


@register
@dataclass(frozen=True)
class Pool(VisualMethod):
    """Spatial pooling / downsampling: average-pool each image's token grid to the budget.

    The simplest structured baseline, and a strong one in published comparisons (VTC-Bench finds downsampling ahead
    of many attention-based methods; LLaVA-OneVision and Qwen2-VL pool or merge 2×2 by design). Per image the budget
    is split over its grids (LLaVA-NeXT's thumbnail and crops, Idefics3's tiles) in proportion to their sizes; each
    grid ``h × w`` with budget ``k`` becomes the largest ``a × b ≤ k`` grid (``a ≤ h``, ``b ≤ w``, aspect closest to
    ``h / w``), each output the mean of its adaptive-pooling cell (``torch.nn.functional.adaptive_avg_pool2d``:
    rows ``floor(i·h/a) … ceil((i+1)·h/a) − 1``). An output stands at its cell's top-left token: that token's
    position (1-D or M-RoPE 3-D) is the output's. So ``pool`` keeps at most the budget (``64`` of a 16 × 16 grid is
    8 × 8; ``28`` is 4 × 7). Acts at the vision stage (encoder hidden states) or the projector stage (default).
    """

    name: ClassVar[str] = "pool"
    paper: ClassVar[str] = (
        "baseline (no paper): spatial average pooling of the visual grid, the downsampling baseline of VTC-Bench"
    )
    rule: ClassVar[str] = "adaptive average pooling of each grid to the largest a x b <= budget"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.MERGE,
        stages=frozenset({Stage.VISION, Stage.PROJECTOR}),
    )
    stage: str = "projector"
    layer: int = 1

    def score(self, ctx: VisualContext) -> Tensor:  # pooling ranks nothing
        return torch.zeros(ctx.n, device=ctx.tokens.device)

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        if self.count(ctx, budget) >= ctx.n:  # every image whole: nothing pooled
            return VisualKept(torch.arange(ctx.n, device=ctx.tokens.device))
        per_image: dict[int, list[int]] = {}
        for gi, g in enumerate(ctx.groups):
            per_image.setdefault(g.image, []).append(gi)
        index: list[Tensor] = []
        tokens: list[Tensor] = []
        sizes: list[Tensor] = []
        for image in sorted(per_image):
            gis = per_image[image]
            n_img = sum(ctx.groups[i].size for i in gis)
            k_img = budget.tokens_for(n_img, larger="clip")
            for gi, k in zip(gis, split_counts(k_img, [ctx.groups[i].size for i in gis])):
                g = ctx.groups[gi]
                if k == 0:
                    continue
                a, b = pooled_grid(g.height, g.width, k)
                grid = ctx.tokens[g.start : g.end].reshape(g.height, g.width, -1).permute(2, 0, 1)
                pooled = F.adaptive_avg_pool2d(grid.float(), (a, b)).to(ctx.tokens.dtype)
                tokens.append(pooled.permute(1, 2, 0).reshape(a * b, -1))
                rows, cols = cell_starts(g.height, a), cell_starts(g.width, b)
                index.append(torch.tensor([g.start + r * g.width + c for r in rows for c in cols], dtype=torch.long))
                r_end = [-((-(i + 1) * g.height) // a) for i in range(a)]
                c_end = [-((-(j + 1) * g.width) // b) for j in range(b)]
                sizes.append(
                    torch.tensor([(re - r) * (ce - c) for r, re in zip(rows, r_end) for c, ce in zip(cols, c_end)])
                )
        dev = ctx.tokens.device
        if not index:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return VisualKept(empty, ctx.tokens[:0], empty)
        return VisualKept(torch.cat(index).to(dev), torch.cat(tokens), torch.cat(sizes).to(dev))
