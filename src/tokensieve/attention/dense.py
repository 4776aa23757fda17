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


def chunk_allowed(key_chunk_pos: Tensor, n_new_queries: int, key_valid: Tensor | None = None) -> Tensor:
    """Which keys each query of a newly appended chunk may see.

    Args:
        key_chunk_pos: ``(..., n)`` long: -1 for keys stored before this chunk, else the key's index in the chunk.
        n_new_queries: chunk length ``L``.
        key_valid: optional ``(..., n)`` bool: False for stored padding keys.

    Returns:
        ``(..., L, n)`` bool. A query sees all earlier valid keys, and the chunk's keys up to itself (itself always,
        so that a padding query never has an empty row).
    """
    qi = torch.arange(n_new_queries, device=key_chunk_pos.device)
    kp = key_chunk_pos[..., None, :]  # (..., 1, n)
    old = kp < 0
    new_ok = (kp >= 0) & (kp <= qi[:, None])
    if key_valid is not None:
        kv = key_valid[..., None, :]
        return (old & kv) | (new_ok & (kv | (kp == qi[:, None])))
    return old | new_ok


def grouped_sdpa(qg: Tensor, k: Tensor, v: Tensor, scaling: float, mask: Tensor | None) -> Tensor:
    """SDPA for queries grouped per KV head: qg ``(B, H_kv, G*L, D)``, k/v ``(B, H_kv, n, D)``."""
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scaling)


def grouped_logits(q: Tensor, k: Tensor, scaling: float) -> Tensor:
    """``q kᵀ * scaling`` under GQA without expanding keys to query heads.

    q: ``(B, H_q, L, D)``, k: ``(B, H_kv, T, D)`` → ``(B, H_q, L, T)``.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * L, D)  # (B, H_kv, G*L, D)
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scaling  # (B, H_kv, G*L, T)
    return logits.reshape(B, Hq, L, k.shape[2])
