"""H2O: heavy hitters (accumulated attention) plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...cache.decode import BoundedCacheMethod, DecodeLayer, recent_mask
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import ConfigError
from ...scorers import accumulated_attention_scores
from ...selection import Selection
from ...selection.topk import topk_select


@register
@dataclass(frozen=True)
class H2O(PrefillMethod, BoundedCacheMethod):
    """H2O: keep the heavy hitters — tokens with the largest accumulated attention — and the most recent tokens
    (Zhang et al., arXiv:2306.14048).

    Score: ``s_j = Σ_i A_ij`` over every query ``i`` of the prompt (causal), averaged over the query heads of each KV
    group; computed in query chunks, never a ``T × T`` matrix per head at once.
    Select: a share ``recent_ratio`` of each row's budget goes to the most recent tokens (the paper splits the
    budget evenly between heavy hitters and recent tokens), the rest to the top-scored tokens.

    While decoding (``decode="h2o"``) the accumulated attention keeps running: every step adds the new query's
    attention (mean over the KV group) to each stored entry, and once a row exceeds the budget the lowest-scored
    entry outside the recent window is evicted. Prompt entries start from their prefill accumulation.

    Choices: the paper's un-normalised sum is the default; ``normalize=True`` divides by the number of queries that
    can see each key (a prefill analogue that removes the bias towards early tokens).
    """

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (arXiv:2306.14048)"
    rule: ClassVar[str] = "s_j = sum_i A_ij (accumulated attention); budget split heavy hitters / recent"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL, Phase.DECODE}),
        apply=Apply.EVICT,
        needs_attention=True,
        prefill_queries=True,
        decode_probs=True,
    )
    recent_ratio: float = 0.5
    normalize: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ConfigError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio}.")

    def score(self, ctx: LayerContext) -> Tensor:
        return accumulated_attention_scores(ctx, normalize=self.normalize)

    def select(self, scores: Tensor, counts: Tensor, ctx: LayerContext) -> Selection:
        recent = torch.floor(counts.double() * self.recent_ratio).long()
        if ctx.run.recent:  # a budget's explicit recent count wins
            recent = torch.full_like(counts, ctx.run.recent)
        return topk_select(scores, counts, ctx.selectable, sink=ctx.run.sink, recent=recent)

    # -- decode ---------------------------------------------------------------------------------------------------
    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> None:
        store = layer.store
        init = None
        if ctx is not None:
            acc = ctx.to_kv_heads(ctx.accumulated_attention(), "mean")  # (B, H, T)
            pad = (ctx.length - ctx.valid.sum(-1))[:, None, None]  # chunk index = position + left padding
            pos = store.positions.long()
            idx = (pos + pad).clamp(0, ctx.length - 1)
            init = acc.gather(2, idx).masked_fill(pos < 0, 0.0)
        store.add_aux("h2o", init)

    def decode_scores(self, layer: DecodeLayer, probs: Tensor | None, budget: int) -> Tensor:
        assert probs is not None
        store = layer.store
        acc = store.aux["h2o"]
        acc[:, :, : store.n] += probs.mean(2)  # (B, H, n): this step's attention, mean over the group
        recent = max(1, int(budget * self.recent_ratio))
        return acc[:, :, : store.n].masked_fill(recent_mask(store.positions, recent), float("inf"))
