"""SnapKV: an observation window of the last queries votes for the tokens to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import ConfigError
from ...scorers import observation_window_scores


@register
@dataclass(frozen=True)
class SnapKV(PrefillMethod):
    """SnapKV: the last ``window`` queries' attention, pooled, picks the tokens to keep (Li et al., arXiv:2404.14469).

    Score: ``s_j = pool_k( mean_{i ∈ last W} softmax(q_i Kᵀ/√D)_j )``, averaged over the query heads of each KV
    group (query head ``h`` → KV head ``h // G``, as transformers' ``repeat_kv``). The window's own tokens are kept
    (protected as recent tokens) and count inside the budget; if the budget is smaller than the window, the newest
    window tokens are kept.

    Choices: softmax over all keys (window keys included); window mean (the reference sums, the same ranking);
    max pooling with kernel 7 and W = 32, the configuration of the official LongBench and needle experiments (the
    code's class defaults are average pooling, kernel 5); pooling over the keys before the window only, as the
    reference (the window is kept whole); GQA: scores averaged over the query heads of each KV head, one selection
    per KV head (the reference predates GQA).
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "SnapKV: LLM Knows What You are Looking for Before Generation (arXiv:2404.14469)"
    rule: ClassVar[str] = "s_j = pool(mean_{i in window} softmax(q_i K^T/sqrt(D))_j), mean over the KV group"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT, needs_attention=True
    )
    window: int = 32
    kernel: int = 7
    pooling: Literal["avg", "max", "none"] = "max"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError(f"{self.name}: window must be >= 1, got {self.window}.")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"{self.name}: kernel must be an odd number >= 1, got {self.kernel}.")

    def protected(self) -> tuple[int, int]:
        return 0, self.window

    def score(self, ctx: LayerContext) -> Tensor:
        # the whole window is protected (kept) even when fewer queries vote (a decode-time re-compression): pool
        # only the keys before it
        return observation_window_scores(
            ctx, self.window, pooling=self.pooling, kernel=self.kernel, kept_tail=self.window
        )
