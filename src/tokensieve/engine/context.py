"""CachedContext: a prefilled (and possibly compressed) context — the cache, the padding mask, the next-token logits
and, for a vision-language prompt, its layout after visual-token pruning."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..cache.sieve_cache import SieveCache


@dataclass
class CachedContext:
    """A prefilled (and possibly compressed) context: the cache, its padding mask and the next-token logits.

    Attributes:
        cache: the SieveCache.
        mask: ``(B, seen)`` 1 for real tokens, 0 for padding, over every token the cache has seen.
        logits: ``(B, V)`` next-token logits after the last prefilled token.
        prefill_seconds: wall time of the prefill (compression included).
        compress_seconds: the part of it spent scoring, selecting and applying.
    """

    cache: SieveCache
    mask: Tensor
    logits: Tensor
    prefill_seconds: float = 0.0
    compress_seconds: float = 0.0
    vision: Any = None  # a VLM prompt's layout after visual-token pruning (adapters.vision.VisionState), else None

    @property
    def kept(self) -> dict[str, Any]:
        """A VLM prompt's visual tokens kept at each stage that ran (per sample); {} for a text prompt."""
        return {} if self.vision is None else self.vision.kept

    @property
    def visual_tokens(self) -> dict[str, list[int]]:
        """A VLM prompt's visual tokens per sample at the language model's input and after each pruning step."""
        return {} if self.vision is None else self.vision.visual_tokens

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    def next_positions(self) -> Tensor:
        """``(B,)`` true position of the next token of each sequence."""
        return self.mask.sum(-1)

    def fork(self) -> CachedContext:
        """An independent copy, to answer another question from the same compressed context."""
        return copy.deepcopy(self)

    def checkpoint(self) -> Any:
        """A mark to come back to with :meth:`rollback` — cheaper than :meth:`fork` (nothing is copied)."""
        return (self.cache.checkpoint(), self.mask, self.logits, self.prefill_seconds)

    def rollback(self, mark: Any) -> None:
        """Forget every token appended since ``mark`` (a question and its answer, say) to reuse the context.

        Works as long as nothing was evicted meanwhile (a bounded decode method evicts: use :meth:`fork`)."""
        cache_mark, self.mask, self.logits, self.prefill_seconds = mark
        self.cache.rollback(cache_mark)


__all__ = ["CachedContext"]
