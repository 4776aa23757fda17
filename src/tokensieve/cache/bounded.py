"""The applier of bounded caches: decode methods that keep every row within a budget while generating."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..attention.decode import attention_with_probs, evict_to_budget
from ..core.capabilities import Apply, Capabilities, Phase
from ..core.context import DecodeRun
from ..core.method import DecodeMethod
from .storage import DenseKV


@dataclass(frozen=True)
class BoundedCacheMethod(DecodeMethod):
    """Score the cached entries at every decode step and evict the lowest until the row fits the budget.

    The budget is one number for the whole batch: an absolute token count, or a ratio of the *longest* prompt.
    The new token is stored first and attended to, then the cache shrinks back to the budget, so the cache never
    holds more than ``budget + 1`` entries per row.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.DECODE}), apply=Apply.EVICT)
    needs_probs: ClassVar[bool] = False

    def decode_scores(
        self, layer_idx: int, store: DenseKV, state: Any, probs: Tensor | None, run: DecodeRun, budget: int
    ) -> Tensor:
        """``(B, H_kv, n)`` importance of every stored entry (``+inf`` = protected); higher is kept."""
        raise NotImplementedError

    def step(self, layer_idx: int, q: Tensor, store: DenseKV, state: Any, run: DecodeRun, scaling: float) -> Tensor:
        probs: Tensor | None = None
        run.bytes_read += store.kv_bytes()
        if self.needs_probs:
            out, probs = attention_with_probs(q, store, scaling)
        else:
            out = store.attend(q, scaling)
        budget = int(run.budget_tokens.max())
        if store.n > budget:
            evict_to_budget(store, self.decode_scores(layer_idx, store, state, probs, run, budget), budget)
        return out
