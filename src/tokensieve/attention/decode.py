"""Decode-step kernels shared by decode methods: attention with probabilities, eviction to a budget."""

from __future__ import annotations

import torch
from torch import Tensor

from ..cache.storage import DenseKV


def attention_with_probs(q: Tensor, store: DenseKV, scaling: float) -> tuple[Tensor, Tensor]:
    """A decode step's attention over the whole store, returning the probabilities too.

    q ``(B, H_q, 1, D)`` → (output ``(B, H_q, 1, D)``, probabilities ``(B, H_kv, G, n)``).
    """
    B, Hq, _, D = q.shape
    H = store.keys.shape[1]
    G = Hq // H
    qg = q.reshape(B, H, G, D)
    logits = torch.matmul(qg, store.keys.transpose(-1, -2)) * scaling  # (B, H, G, n)
    mask = store.attention_mask(1, G)
    if mask is not None:
        logits = logits + mask if mask.dtype != torch.bool else logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, store.values)  # (B, H, G, D)
    return out.reshape(B, Hq, 1, D), probs


def evict_to_budget(store: DenseKV, scores: Tensor, budget: int) -> None:
    """Evict the lowest-scored entries until every row holds ``budget`` slots.

    scores ``(B, H_kv, n)`` (``+inf`` protects an entry); padding slots go first. One eviction per row (the
    steady state of a bounded cache) is an O(1) slot swap; more (e.g. right after a long prefill) compact the rows.
    """
    excess = store.n - budget
    if excess <= 0:
        return
    s = scores.float()
    if store.valid is not None:
        s = s.masked_fill(~store.valid[:, None, :], float("-inf"))
    if excess == 1:
        store.swap_remove(s.argmin(-1))  # ties: the first slot, identical across heads for padding
        return
    order = s.argsort(dim=-1, descending=True, stable=True)[..., :budget]
    store.compact(order.sort(dim=-1).values)


def recent_mask(store: DenseKV, recent: int) -> Tensor:
    """``(B, H_kv, n)`` bool: the ``recent`` most recent entries of each row, by true position."""
    pos = store.positions.long()  # (B, H, n)
    newest = pos.amax(-1, keepdim=True)
    return pos > newest - recent


def sink_mask(store: DenseKV, sink: int) -> Tensor:
    """``(B, H_kv, n)`` bool: entries of the first ``sink`` positions."""
    pos = store.positions.long()
    return (pos >= 0) & (pos < sink)
