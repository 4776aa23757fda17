"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..core.context import LayerContext
from ..core.method import PrefillMethod
from ..core.registry import register
from ..scorers import recency_scores


@register
@dataclass(frozen=True)
class StreamingLLM(PrefillMethod):
    """StreamingLLM: keep the first ``sink`` tokens and the most recent ones (Xiao et al., arXiv:2309.17453).

    Score: ``s_j = position(j)`` — recency — with the first ``sink`` tokens protected, so a budget of ``b`` keeps
    ``sink`` sinks and the ``b − sink`` latest tokens.

    Choice: the original re-assigns positions by cache slot (keys re-rotated so the window is contiguous);
    tokensieve keeps every token's **original** position (RoPE already applied, nothing re-rotated), which is the
    natural choice when the window covers a prompt shorter than the model's context.
    """

    name: ClassVar[str] = "streaming_llm"
    paper: ClassVar[str] = "Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    rule: ClassVar[str] = "keep sink tokens + most recent tokens"
    sink: int = 4

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    def score(self, ctx: LayerContext) -> Tensor:
        return recency_scores(ctx)
