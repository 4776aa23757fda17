"""Decode-step kernels: attention of one query per head over a cache, returning the probabilities too."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_with_probs(
    q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scaling: float
) -> tuple[Tensor, Tensor]:
    """A decode step's attention over whole rows, returning the probabilities too.

    q ``(B, H_q, 1, D)``; keys, values ``(B, H_kv, n, D)``; mask ``None``, a bool mask or an additive bias
    broadcastable to ``(B, H_kv, G, n)`` → (output ``(B, H_q, 1, D)``, probabilities ``(B, H_kv, G, n)``).
    """
    B, Hq, _, D = q.shape
    H = keys.shape[1]
    G = Hq // H
    qg = q.reshape(B, H, G, D)  # (B, H_kv, G, D): the query heads of a group side by side
    logits = torch.matmul(qg, keys.transpose(-1, -2)) * scaling  # (B, H_kv, G, n)
    if mask is not None:
        logits = logits + mask if mask.dtype != torch.bool else logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, values)  # (B, H_kv, G, D)
    return out.reshape(B, Hq, 1, D), probs
