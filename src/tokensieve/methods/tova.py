"""TOVA: the current (last) query decides, one ranking per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..core.capabilities import Apply, Capabilities, Granularity, Phase
from ..core.context import LayerContext
from ..core.method import PrefillMethod
from ..core.registry import register
from ..scorers import last_query_scores


@register
@dataclass(frozen=True)
class TOVA(PrefillMethod):
    """TOVA: keep the tokens the last query attends to most, averaged over all heads (Oren et al., arXiv:2401.06104).

    Score: ``s_j = mean_{h ∈ all query heads} softmax(q_last,h Kᵀ/√D)_j`` — one ranking per layer, shared by every
    KV head (the paper's head-averaged policy). No protected tokens. At prefill this is the paper's rule applied
    once with the prompt's last query; decode-time TOVA (evict the lowest token at each step) is a decode policy.
    """

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Transformers are Multi-State RNNs (arXiv:2401.06104)"
    rule: ClassVar[str] = "s_j = mean over all heads of softmax(q_last K^T/sqrt(D))_j, one ranking per layer"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT, needs_attention=True, granularity=Granularity.LAYER
    )

    def score(self, ctx: LayerContext) -> Tensor:
        return last_query_scores(ctx)
