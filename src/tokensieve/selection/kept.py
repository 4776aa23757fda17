"""Selections: which cached entries each (sequence, KV head) keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """Kept token indices per (sequence, KV head), possibly a different number per row.

    Attributes:
        indices: ``(B, H_kv, K)`` long; each row ascending, its first ``counts[b, h]`` entries valid and the rest
            set to -1. ``K`` is the largest count.
        counts: ``(B, H_kv)`` long — how many tokens each row keeps.
    """

    indices: Tensor
    counts: Tensor

    def __post_init__(self) -> None:
        if self.indices.dim() != 3 or self.counts.shape != self.indices.shape[:2]:
            raise ValueError(
                f"Selection needs indices (B, H, K) and counts (B, H); got {tuple(self.indices.shape)} and "
                f"{tuple(self.counts.shape)}."
            )

    @property
    def uniform(self) -> bool:
        """Every row keeps the same number of tokens (so the result can stay one dense tensor)."""
        return bool((self.counts == self.indices.shape[-1]).all())

    def row(self, b: int, h: int) -> Tensor:
        """Kept indices of one row, ``(counts[b, h],)``."""
        return self.indices[b, h, : int(self.counts[b, h])]

    def mask(self, length: int) -> Tensor:
        """``(B, H_kv, length)`` bool, True where kept."""
        B, H, _ = self.indices.shape
        m = torch.zeros(B, H, length + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.indices >= 0, self.indices, torch.full_like(self.indices, length))
        m.scatter_(2, idx, True)
        return m[..., :length]

    @classmethod
    def from_mask(cls, mask: Tensor) -> Selection:
        """Build from a ``(B, H_kv, T)`` bool mask."""
        counts = mask.sum(-1)
        K = int(counts.max()) if counts.numel() else 0
        T = mask.shape[-1]
        # Stable ordering: kept positions first in ascending order, then -1 padding.
        pos = torch.arange(T, device=mask.device).expand_as(mask)
        key = torch.where(mask, pos, pos + T)
        order = key.sort(dim=-1).values[..., :K]
        indices = torch.where(order < T, order, torch.full_like(order, -1))
        return cls(indices=indices.long(), counts=counts.long())

    @classmethod
    def keep_all(cls, batch: int, heads: int, length: int, valid: Tensor | None = None) -> Selection:
        """Keep every (valid) token."""
        if valid is None:
            idx = torch.arange(length).expand(batch, heads, length).contiguous()
            return cls(indices=idx, counts=torch.full((batch, heads), length, dtype=torch.long))
        return cls.from_mask(valid[:, None, :].expand(batch, heads, length))
