"""Random eviction: the floor every scoring rule must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...scorers import random_scores


@register
@dataclass(frozen=True)
class RandomEviction(PrefillMethod):
    """Random: keep a uniformly random subset of tokens per KV head (a control, not a method to use).

    Score: ``s_j ~ U(0, 1)`` drawn from a generator seeded by ``(seed, layer)``, so runs are reproducible.
    No protected tokens unless the budget asks for them.
    """

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "baseline (no paper): uniform random eviction"
    rule: ClassVar[str] = "s_j ~ U(0,1), seeded per layer"
    seed: int = 0

    def score(self, ctx: LayerContext) -> Tensor:
        return random_scores(ctx, self.seed)
