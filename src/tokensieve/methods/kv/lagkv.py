"""LagKV: each partition of the prompt is judged against the statistics of the partition after it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import ConfigError
from ...scorers.lagkv import lagkv_scores


@register
@dataclass(frozen=True)
class LagKV(PrefillMethod):
    """LagKV: no attention needed — a token matters when its key and value stand out against the next partition's
    per-channel range (Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
    Important", arXiv:2504.04704).

    Score: after ``sink`` tokens, partitions of ``lag`` tokens; partition ``p`` is min-max normalised per channel by
    partition ``p+1`` and ``s_j = ½ [softmax_p(std_ch((k_j − min) / (max − min))) + the same for v_j]``; a token's
    final score is its rank inside its partition ``/ lag``. The sinks and the tail (the last whole partition and the
    remainder, which have no reference yet) are kept first.

    Choices: kvpress's defaults (sink 4, lag 128; mean of the key and value scores — the paper's sum ranks the
    same); ranks inside a partition (kvpress's default, the paper's per-partition top-k: with one budget for the row
    every partition keeps about the same share; ties between partitions go to the earlier one); ``max − min`` is
    clamped at 1e-6 (a constant channel would divide by zero); a prompt shorter than ``sink + 2·lag`` has no
    reference: its latest tokens are kept (kvpress). The paper's recursive re-compression every ``lag`` generated
    tokens is not done (prefill only).
    """

    name: ClassVar[str] = "lagkv"
    paper: ClassVar[str] = (
        "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important (arXiv:2504.04704)"
    )
    rule: ClassVar[str] = "s_j = rank in partition of std_ch((x_j - min_next)/(max_next - min_next)), keys and values"
    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT)
    sink: int = 4
    lag: int = 128

    def __post_init__(self) -> None:
        if self.sink < 0 or self.lag < 2:
            raise ConfigError(f"lagkv: sink must be >= 0 and lag >= 2; got sink={self.sink}, lag={self.lag}.")

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    def score(self, ctx: LayerContext) -> Tensor:
        return lagkv_scores(ctx.keys, ctx.values, ctx.selectable, self.sink, self.lag)
