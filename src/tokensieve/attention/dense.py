"""Dense attention paths: causal prefill over a fresh chunk, and the eager reference every kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compat import sdpa_supports_gqa


def causal_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scaling: float) -> Tensor:
    """Causal self-attention of a chunk with no past, GQA-aware, padding-masked.

    Args:
        q: ``(B, H_q, T, D)``; k, v: ``(B, H_kv, T, D)``; valid: ``(B, T)`` bool or None (no padding).

    Returns:
        ``(B, H_q, T, D)``. Rows of padding queries attend to themselves only (finite, never used).
    """
    Hq, T = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    gqa = Hq != Hkv
    if gqa and not sdpa_supports_gqa():  # pragma: no cover - old torch
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        gqa = False
    if valid is None or bool(valid.all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    idx = torch.arange(T, device=q.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    allowed = causal[None] & (valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=q.device)[None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scaling, enable_gqa=gqa)


def reference_attention(
    q: Tensor,
    keys: list[list[Tensor]],
    values: list[list[Tensor]],
    scaling: float,
    allowed: list[list[Tensor]] | None = None,
    bias: list[list[Tensor]] | None = None,
) -> Tensor:
    """Eager per-(sequence, KV head) attention, the ground truth for every kernel.

    Args:
        q: ``(B, H_q, L, D)``.
        keys, values: ``keys[b][h]`` is ``(n_bh, D)`` — any lengths.
        allowed: optional ``allowed[b][h]`` ``(L, n_bh)`` bool.
        bias: optional ``bias[b][h]`` ``(n_bh,)`` additive logit bias.

    Returns:
        ``(B, H_q, L, D)`` in float64-accurate arithmetic cast back to ``q.dtype``.
    """
    B, Hq, L, D = q.shape
    Hkv = len(keys[0])
    G = Hq // Hkv
    out = torch.zeros(B, Hq, L, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            K = keys[b][h].double()
            V = values[b][h].double()
            for g in range(G):
                s = q[b, h * G + g].double() @ K.T * scaling  # (L, n)
                if bias is not None:
                    s = s + bias[b][h].double()[None]
                if allowed is not None:
                    s = s.masked_fill(~allowed[b][h], float("-inf"))
                out[b, h * G + g] = torch.softmax(s, -1) @ V
    return out.to(q.dtype)
