"""TOVA: the current (last) query decides, one ranking per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...cache.decode import BoundedCacheMethod, DecodeLayer
from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...scorers import last_query_scores


@register
@dataclass(frozen=True)
class TOVA(PrefillMethod, BoundedCacheMethod):
    """TOVA: keep the tokens the last query attends to most, averaged over all heads (Oren et al., arXiv:2401.06104).

    Score: ``s_j = mean_{h ∈ all query heads} softmax(q_last,h Kᵀ/√D)_j`` — one ranking per layer, shared by every
    KV head (the paper's head-averaged policy). No protected tokens. At prefill this is the paper's rule applied
    once with the prompt's last query. While decoding (``decode="tova"``), once a row exceeds the budget the entry
    with the lowest head-averaged attention of the current query is evicted at every step — the same slot for
    every KV head of the layer.
    """

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Transformers are Multi-State RNNs (arXiv:2401.06104)"
    rule: ClassVar[str] = "s_j = mean over all heads of softmax(q_last K^T/sqrt(D))_j, one ranking per layer"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL, Phase.DECODE}),
        apply=Apply.EVICT,
        needs_attention=True,
        granularity=Granularity.LAYER,
        decode_probs=True,
    )

    def score(self, ctx: LayerContext) -> Tensor:
        return last_query_scores(ctx)

    def decode_scores(self, layer: DecodeLayer, probs: Tensor | None, budget: int) -> Tensor:
        assert probs is not None
        store = layer.store
        s = probs.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1, n): mean over every query head of the layer
        return s[:, :, 0].expand(probs.shape[0], probs.shape[1], store.n)
