"""Attention-based scorers (SnapKV, H2O, TOVA families)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.context import LayerContext

Pooling = Literal["avg", "max", "none"]


def pool1d(x: Tensor, kernel: int, kind: Pooling) -> Tensor:
    """1-D pooling along the last (token) axis with 'same' length: ``(..., T) -> (..., T)``."""
    if kind == "none" or kernel <= 1:
        return x
    if kernel % 2 == 0:
        raise ValueError(f"Pooling kernel must be odd, got {kernel}.")
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    if kind == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif kind == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"Unknown pooling {kind!r}; use avg, max or none.")
    return out.reshape(shape)


def observation_window_scores(
    ctx: LayerContext,
    window: int,
    *,
    pooling: Pooling = "max",
    kernel: int = 7,
    reduce: Literal["mean", "max"] = "mean",
    kept_tail: int = 0,
) -> Tensor:
    """SnapKV: attention of the last ``window`` queries, averaged over the window, pooled, per KV head.

    ``s_j = pool_k( mean_{i in window} softmax(q_i Kᵀ / √D)_j )`` for the keys *before* the window (the pooling
    never reads the window's own attention, as in the reference code), averaged over the query heads of each KV
    group. The window's keys keep their raw mean attention (they are protected by the methods that use this).
    ``kept_tail``: the caller keeps this many trailing keys whole even where fewer queries vote (a decode-time
    re-compression with a short query buffer); the pooling stops before them too.
    Returns ``(B, H_kv, T)``; padding scores are 0.
    """
    probs = ctx.window_attention(window)  # (B, H_q, W, T)
    s = probs.mean(2)  # (B, H_q, T)
    W = max(probs.shape[2], min(kept_tail, ctx.length))
    prefix = ctx.length - W
    if prefix > 0:
        s = torch.cat([pool1d(s[..., :prefix], kernel, pooling), s[..., prefix:]], dim=-1)
    s = ctx.to_kv_heads(s, reduce)  # (B, H_kv, T)
    return s.masked_fill(~ctx.valid[:, None, :], 0.0)


def accumulated_attention_scores(ctx: LayerContext, *, normalize: bool = False) -> Tensor:
    """H2O: attention each key receives from every query of the prompt, summed, per KV head.

    ``s_j = Σ_i A_ij`` (``normalize=True``: divided by the number of queries that can see ``j``).
    Returns ``(B, H_kv, T)``.
    """
    acc = ctx.accumulated_attention()  # (B, H_q, T)
    if normalize:
        seen_by = ctx.valid.long().flip(-1).cumsum(-1).flip(-1).clamp_min(1)  # real queries at or after j
        acc = acc / seen_by[:, None, :].to(acc.dtype)
    s = ctx.to_kv_heads(acc, "mean")
    return s.masked_fill(~ctx.valid[:, None, :], 0.0)


def last_query_scores(ctx: LayerContext) -> Tensor:
    """TOVA: attention of the last query, averaged over **all** query heads of the layer.

    One ranking per layer, shared by every KV head: ``s_j = mean_h softmax(q_last,h Kᵀ/√D)_j``.
    Returns ``(B, H_kv, T)`` (the same row repeated per KV head).
    """
    probs = ctx.window_attention(1)[:, :, 0]  # (B, H_q, T)
    s = probs.mean(1, keepdim=True)  # (B, 1, T)
    s = s.masked_fill(~ctx.valid[:, None, :], 0.0)
    return s.expand(ctx.batch, ctx.num_kv_heads, ctx.length).contiguous()


__all__ = ["accumulated_attention_scores", "last_query_scores", "observation_window_scores", "pool1d", "torch"]


def window_scores(ctx: LayerContext, window: int, kernel: int) -> Tensor:
    """CompressKV's per-query-head scores ``(B, H_q, T)``: window attention summed over the window, avg-pooled."""
    probs = ctx.window_attention(window)  # (B, H_q, W, T)
    return pool1d(probs.sum(2), kernel, "avg")
