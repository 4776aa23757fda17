"""DivPrune: keep the visual tokens that solve the max-min diversity problem greedily, before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ._diversity import Similarities, greedy_maxmin, images_of, most_isolated
from .base import Stage, VisualContext, VisualKept, VisualMethod


@register
@dataclass(frozen=True)
class DivPrune(VisualMethod):
    """DivPrune (Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
    Models", CVPR 2025, arXiv:2503.02175; code vbdi/divprune, read to check the details below).

    Token pruning as a Max-Min Diversity Problem: keep the ``k`` tokens whose smallest pairwise distance
    ``d(u, v) = 1 − cos(u, v)`` is as large as possible, solved greedily:

    * **first token**: the most isolated one, ``argmax_v min_{u ≠ v} d(v, u)`` (the official code takes, for every
      token, the second-smallest entry of its distance column — the smallest being its zero distance to itself —
      and the argmax of those); no attention, no CLS, no pivot parameter;
    * then ``k − 1`` times ``c = argmax_{v ∉ C} min_{u ∈ C} d(v, u)`` (farthest point). Chosen tokens are excluded
      explicitly (the official code relies on their zero self-distance, which can pick a token twice when
      duplicates exist);
    * **distance space**: the projected visual tokens, i.e. the language model's input embeddings of the image (the
      official code slices them out of the packed input embeddings before decoder layer 0), so the method acts at
      the ``projector`` stage only.

    Per image ``k = round(ratio · n)`` (the library's budget rounding, the same as the code's ``round``; the
    paper's main setting keeps 9.8 %, ``divprune:0.098``), the selection running over the whole image — LLaVA-NeXT's
    thumbnail and crops together, as the code does on the image's whole feature sequence; unlike the code,
    ``image_newline`` tokens are not candidates (they stay). Kept tokens keep their order (the code sorts the kept
    indices). Positions: the official code gathers the kept tokens out of the input embeddings and hands the model
    ``position_ids = None`` (LLaVA's generation passes none), so transformers numbers the shortened sequence
    0, 1, … — it renumbers in effect. Ours does the same under the adapters' default ``positions="official"``
    (``positions`` is ``"renumber"``); ``positions="keep"`` keeps the original positions instead. Ties go to the
    earlier token. Cost: one ``(n, n)`` similarity matrix (needed for the first token, then reused), then ``k``
    steps of ``O(n)``.
    """

    name: ClassVar[str] = "divprune"
    paper: ClassVar[str] = (
        "Alvar et al. 2025, DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models "
        "(CVPR 2025, arXiv:2503.02175)"
    )
    rule: ClassVar[str] = (
        "greedy max-min diversity over the projected visual tokens, d = 1 - cos, starting from the most isolated token"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.PROJECTOR}),
    )

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        dev = ctx.tokens.device
        kept: list[Tensor] = []
        for im in images_of(ctx):
            n = int(im.index.numel())
            k = min(budget.tokens_for(im.base, larger="clip"), n)
            if k >= n:
                kept.append(im.index)
                continue
            sim = Similarities(im.states, gram=True)  # the first pick reads every pair anyway: reuse the matrix
            kept.append(im.index[greedy_maxmin(im.states, most_isolated(sim), k, sim=sim)])
        if not kept:
            return VisualKept(torch.zeros(0, dtype=torch.long, device=dev))
        return VisualKept(torch.sort(torch.cat(kept)).values)
