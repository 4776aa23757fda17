"""Scorers that need no attention: key norm, recency, random."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.context import LayerContext


def key_norm_scores(ctx: LayerContext) -> Tensor:
    """KNorm: ``s_j = −‖k_j‖₂`` per KV head — keys with a *low* norm are kept. ``(B, H_kv, T)``."""
    return -ctx.keys.float().norm(dim=-1)


def recency_scores(ctx: LayerContext) -> Tensor:
    """StreamingLLM's window as a score: later tokens first, ``s_j = position(j)``. ``(B, H_kv, T)``."""
    pos = ctx.positions.float()  # (B, T), -1 at padding
    return pos[:, None, :].expand(ctx.batch, ctx.num_kv_heads, ctx.length).contiguous()


def random_scores(ctx: LayerContext, seed: int) -> Tensor:
    """Uniform random scores, reproducible per (seed, layer, KV head, true position) — so a sequence gets the same
    scores alone or in a padded batch. ``(B, H_kv, T)``."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + ctx.layer_idx)
    pos = ctx.positions.clamp_min(0)  # (B, T)
    table = torch.rand(int(pos.max()) + 1, ctx.num_kv_heads, generator=g).T.to(ctx.keys.device)  # (H_kv, P)
    return table[:, pos].permute(1, 0, 2).contiguous()  # (B, H_kv, T)
