"""Frequency-chunk scorers (FASA): RoPE rotates query/key dimensions in pairs, each pair a frequency chunk.

With transformers' ``rotate_half`` layout the pair of chunk ``i`` is dimensions ``(i, i + D/2)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def chunk_scores(q: Tensor, k: Tensor) -> Tensor:
    """Per-chunk partial logits: q ``(..., D)``, k ``(..., n, D)`` → ``(..., n, D/2)``."""
    prod = q[..., None, :] * k  # (..., n, D)
    half = prod.shape[-1] // 2
    return prod[..., :half] + prod[..., half:]


def dominant_chunks(ca: Sequence[float], quantile: float, min_k: int, max_k: int) -> list[int]:
    """Chunks with ``CA ≥`` the head's ``quantile``, best first, clamped to ``[min_k, max_k]`` chunks.

    ``ca`` is one head's CA per chunk (any K slice flattened to a list).
    """
    t = torch.tensor(ca, dtype=torch.float64)
    order = t.argsort(descending=True, stable=True)
    n = int((t >= torch.quantile(t, quantile)).sum())
    n = max(min_k, min(max_k, n))
    return order[:n].tolist()
