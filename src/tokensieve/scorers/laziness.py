"""SimLayerKV's layer statistic: how much of the last query's attention goes to the first and the latest tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.context import LayerContext


def sink_recent_mass(ctx: LayerContext, sink: int, recent: int, n_last: int = 1) -> Tensor:
    """``Σ_{j ∈ first sink ∪ last recent} A_last,j`` — the attention of the last ``n_last`` queries on the first
    ``sink`` and the last ``recent`` real tokens (the queries themselves included), averaged over the queries and every
    query head of the layer. ``(B,)``; close to 1 for a "lazy" layer."""
    probs = ctx.window_attention(n_last)  # (B, H_q, W, T)
    a = probs.mean(dim=(1, 2))  # (B, T)
    first = ctx.valid.long().cumsum(-1)
    last = ctx.selectable.long().flip(-1).cumsum(-1).flip(-1)
    keep = ctx.valid & ((first <= sink) | ((last <= recent) & ctx.selectable))
    return (a * keep.to(a.dtype)).sum(-1)


__all__ = ["sink_recent_mass", "torch"]
