"""Random visual-token pruning: the control every visual-token method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from .base import Stage, VisualContext, VisualMethod


@register
@dataclass(frozen=True)
class RandomVisual(VisualMethod):
    """Random: keep a uniformly random subset of the visual tokens (a baseline, not a method to use).

    Benchmarks of visual-token pruning (UniPruneBench, VTC-Bench) find random selection a strong baseline, so every
    method is compared with it. Scores ``s_j ~ U(0, 1)`` from a generator seeded by ``seed`` and the sample's seed
    (``VisualContext.seed``, given by the caller), so a sample keeps the same tokens alone or in a batch; the
    ``k`` highest stay (per-image budgets summed, selection over the whole sample). Any stage; ``layer`` is the
    encoder layer (vision) or decoder layer K (llm) it acts at.
    """

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "baseline (no paper): uniform random visual-token selection"
    rule: ClassVar[str] = "s_j ~ U(0,1) seeded by (seed, sample seed); keep the top k"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset(Stage),
    )
    stage: str = "projector"
    layer: int = 2
    seed: int = 0

    def score(self, ctx: VisualContext) -> Tensor:
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(ctx.seed))
        return torch.rand(ctx.n, generator=g).to(ctx.tokens.device)
