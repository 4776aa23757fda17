"""Selections and selectors: which entries stay — :class:`Selection` (kept indices per (sequence, KV head), rows of
different lengths), top-k with protected sink/recent tokens (:mod:`.topk`), allocations that sum exactly
(:mod:`.allocation`). Pure tensors: no model, no cache."""

from .kept import Selection

__all__ = ["Selection"]
