"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...cache.decode import BoundedCacheMethod, DecodeLayer, sink_mask
from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import ConfigError
from ...scorers import recency_scores


@register
@dataclass(frozen=True)
class StreamingLLM(PrefillMethod, BoundedCacheMethod):
    """StreamingLLM: keep the first ``sink`` tokens and the most recent ones (Xiao et al., arXiv:2309.17453).

    Score: ``s_j = position(j)`` — recency — with the first ``sink`` tokens protected, so a budget of ``b`` keeps
    ``sink`` sinks and the ``b − sink`` latest tokens.

    While decoding (``decode="streaming_llm"``) it is a rolling window: once a row exceeds the budget, the oldest
    non-sink entry is evicted at every step, so generation runs in bounded memory.

    Choice: the original re-assigns positions by cache slot (keys re-rotated so the window is contiguous);
    tokensieve keeps every token's **original** position (RoPE already applied, nothing re-rotated), which is the
    natural choice when the window covers a prompt shorter than the model's context.
    """

    name: ClassVar[str] = "streaming_llm"
    paper: ClassVar[str] = "Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    rule: ClassVar[str] = "keep sink tokens + most recent tokens"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL, Phase.DECODE}), apply=Apply.EVICT
    )
    sink: int = 4

    def __post_init__(self) -> None:
        if self.sink < 0:
            raise ConfigError(f"streaming_llm: sink must be >= 0, got {self.sink}.")

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    def batch_refusal(self, budget: Budget, lengths: list[int]) -> str | None:
        """Besides the batch rule of every bounded cache: a decode budget that holds no more than the sink tokens
        keeps no recent token (each new token would be evicted at once) — refused; a ratio budget is checked
        against each prompt's length, a token budget at once (``lengths`` may be empty)."""
        why = super().batch_refusal(budget, lengths)
        if why is not None:
            return why
        sizes = [int(budget.value)] if budget.kind == "tokens" else [budget.tokens_for(n) for n in lengths if n > 0]
        if sizes and min(sizes) <= self.sink:
            return (
                f"streaming_llm keeps sink={self.sink} first tokens, and a decode budget of {min(sizes)} tokens leaves "
                "no room for recent ones: every new token would be evicted at once. Give a budget above "
                f"{self.sink} tokens or lower sink."
            )
        return None

    def score(self, ctx: LayerContext) -> Tensor:
        return recency_scores(ctx)

    def decode_scores(self, layer: DecodeLayer, probs: Tensor | None, budget: int) -> Tensor:
        positions = layer.store.positions
        score = positions.float()  # the oldest entry goes first
        return score.masked_fill(sink_mask(positions, self.sink), float("inf"))
