"""Dense attention paths: causal prefill over a fresh chunk, grouped attention over stored keys with the per-layer
modifiers transformers honours (sliding windows, logit soft-capping), and the eager reference every kernel is tested
against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compat import sdpa_supports_gqa


@dataclass(frozen=True)
class Modifiers:
    """Per-layer changes to plain softmax attention that the model's own attention applies.

    Attributes:
        window: sliding window — a query at position ``p`` sees a key at position ``k`` only if ``p - k < window``
            (transformers' rule); None: every earlier key.
        softcap: logit soft-capping (Gemma-2) — ``logits → softcap · tanh(logits / softcap)`` before the softmax.
    """

    window: int | None = None
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        return self.window is None and self.softcap is None


PLAIN = Modifiers()


def window_allowed(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """``(..., L, n)`` bool: keys within the sliding window of each query; q_pos ``(..., L)``, k_pos ``(..., n)``."""
    return (q_pos[..., :, None].long() - k_pos[..., None, :].long()) < window


def grouped_attention(
    qg: Tensor, k: Tensor, v: Tensor, scaling: float, mask: Tensor | None, softcap: float | None = None
) -> Tensor:
    """Attention of queries grouped per KV head: qg ``(B, H_kv, G*L, D)``, k/v ``(B, H_kv, n, D)``, mask a bool mask
    or additive bias broadcastable to ``(B, H_kv, G*L, n)`` → ``(B, H_kv, G*L, D)``. SDPA unless logits are
    soft-capped (then eager)."""
    if softcap is None:
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scaling)
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scaling  # (B, H_kv, G*L, n)
    logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return torch.matmul(torch.softmax(logits, dim=-1), v)


def plain_attention(
    q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None, scaling: float, mods: Modifiers = PLAIN
) -> Tensor:
    """Causal attention of a chunk's queries over keys that end with the chunk (a plain, uncompressed cache).

    q ``(B, H_q, L, D)``; k, v ``(B, H_kv, S, D)`` with the queries at the last ``L`` of the ``S`` positions;
    padding_mask ``(B, S)`` (1 = real token) or None → ``(B, H_q, L, D)``.
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qi = torch.arange(S - L, S, device=q.device)
    kj = torch.arange(S, device=q.device)
    allowed = (kj[None, :] <= qi[:, None])[None]  # (1, L, S)
    if mods.window is not None:
        allowed = allowed & window_allowed(qi, kj, mods.window)
    if padding_mask is not None:
        allowed = allowed & (padding_mask[:, None, -S:].bool() | (kj[None, :] == qi[:, None])[None])  # (B, L, S)
    G = Hq // Hkv
    mask = allowed[:, None, None].expand(allowed.shape[0], 1, G, L, S).reshape(allowed.shape[0], 1, G * L, S)
    out = grouped_attention(q.reshape(B, Hkv, G * L, D), k, v, scaling, mask, mods.softcap)
    return out.reshape(B, Hq, L, D)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scaling: float, mods: Modifiers = PLAIN
) -> Tensor:
    """Causal self-attention of a chunk with no past, GQA-aware, padding-masked, with the layer's modifiers.

    Args:
        q: ``(B, H_q, T, D)``; k, v: ``(B, H_kv, T, D)``; valid: ``(B, T)`` bool or None (no padding).

    Returns:
        ``(B, H_q, T, D)``. Rows of padding queries attend to themselves only (finite, never used).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if not mods.plain:
        idx = torch.arange(T, device=q.device)
        allowed = idx[None, :] <= idx[:, None]  # (T, T); left padding only: index gaps are position gaps
        if mods.window is not None:
            allowed = allowed & window_allowed(idx, idx, mods.window)
        allowed = allowed[None] & (
            torch.ones(B, 1, T, dtype=torch.bool, device=q.device)
            if valid is None
            else valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=q.device)[None]
        )  # (B, T, T)
        G = Hq // Hkv
        mask = allowed[:, None, None].expand(B, 1, G, T, T).reshape(B, 1, G * T, T)
        out = grouped_attention(q.reshape(B, Hkv, G * T, D), k, v, scaling, mask, mods.softcap)
        return out.reshape(B, Hq, T, D)
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
