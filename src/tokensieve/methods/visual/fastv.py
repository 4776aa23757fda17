"""FastV: drop the visual tokens the last prompt token attends to least, after decoder layer K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from .base import Stage, VisualContext, VisualMethod


@register
@dataclass(frozen=True)
class FastV(VisualMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv:2403.06764).

    Score of visual token j: the attention probability from the **last prompt token** to j in decoder layer
    ``K − 1``, averaged over the query heads (the official code's ``mean(attention, dim=heads)[-1]``). The ``k``
    highest stay; the others are removed from the hidden states entering layer ``K`` and so from the KV cache of
    layers ``K …`` (layers before K keep every token). The paper's default is ``K = 2`` with half the visual tokens
    dropped (``R = 50 %``: budget 0.5). The attention row is computed for that one query only (the rest of the
    layer runs with SDPA). Selection is over the whole sample's visual tokens (all images together), as the paper
    ranks the one image span.

    Positions: the official code keeps every kept token at its original position (``position_ids = keep_indexs``),
    so ``positions`` is ``"keep"`` and the adapters' default ``positions="official"`` does the same (the layers
    from K see gaps where tokens were removed); ``positions="renumber"`` numbers them without gaps instead.
    """

    name: ClassVar[str] = "fastv"
    paper: ClassVar[str] = "Chen et al. 2024, An Image is Worth 1/2 Tokens After Layer 2 (arXiv:2403.06764)"
    rule: ClassVar[str] = "s_j = mean_h softmax(q_last k^T / sqrt(d))_j at layer K-1; keep the top k before layer K"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.LLM}),
        signals=frozenset({"text_attention"}),
    )
    positions: ClassVar[Literal["keep", "renumber"]] = "keep"  # the official code sets position_ids = keep_indexs
    layer: int = 2

    def score(self, ctx: VisualContext) -> Tensor:
        assert ctx.text_attention is not None
        return ctx.text_attention.float().mean(0)
