"""PyramidDrop: keep a shrinking share of the visual tokens at several decoder layers, ranked by the last instruction
token's attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ...errors import ConfigError
from ._llmstage import image_spans, image_targets, parse_layers, schedule
from .base import Stage, VisualContext, VisualKept, VisualMethod, top_k

PAPER_LAYERS = (8, 16, 24)


def stage_counts(n0: int, final: int, stages: int, lam: float = 0.0) -> list[int]:
    """Tokens an image of ``n0`` keeps after each of ``stages`` stages, ending at ``final``.

    ``lam = 0``: the geometric schedule through the budget, ``λ = (final/n0)^(1/S)`` and ``⌊n0·λ^s + ½⌋`` after
    stage ``s`` (``final`` after the last); ``lam > 0``: ``⌊n0·lam^s + ½⌋`` before the last stage, never under
    ``final``. Each count is at most the previous one."""
    if n0 <= 0:
        return [0] * stages
    ratio = lam if lam > 0 else (final / n0) ** (1.0 / stages)
    out = []
    prev = n0
    for s in range(1, stages + 1):
        c = final if s == stages else max(final, math.floor(n0 * ratio**s + 0.5))
        prev = min(prev, c)
        out.append(prev)
    return out


@register
@dataclass(frozen=True)
class PyramidDrop(VisualMethod):
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction", CVPR 2025, arXiv:2410.17247; official code github.com/Cooperx521/PyramidDrop).

    The decoder is split into stages at layers ``8, 16, 24`` (of LLaVA-1.5-7B's 32); at the end of stage ``s`` each
    image keeps ``λ^s`` of its visual tokens (λ = 0.5 in the paper: 50 %, 25 %, 12.5 % of 576), the ones the **last
    instruction token** attends to most: the attention row of the last prompt token, averaged over the query heads,
    restricted to the image's visual tokens (``ctx.text_attention``; the official code computes the same row,
    ``mean over heads`` of ``softmax(q_last·Kᵀ/√d)`` over the whole prefix, and ranks with ``topk``).

    Choices (the paper fixes λ and the layers for LLaVA-7B; this library gives every method one budget):

    * **budget = the visual tokens each image keeps after the last stage** (what reaches the decoder's last
      layers, like every other method's budget); the per-stage ratio is derived from it: ``λ = (k/n0)^(1/S)`` for
      ``S`` stages, ``k`` the budget's tokens of an image of ``n0``. ``pyramiddrop:0.125`` is therefore exactly the
      paper's default (λ = 0.5 over 3 stages: 576 → 288 → 144 → 72). Stage counts are rounded half up (the
      official ``int(n0·ratio)`` floors; both give 288/144/72). ``lam=0.5`` fixes λ instead: stages keep
      ``⌊n0·λ^s + ½⌋`` (never fewer than the budget) and the last stage keeps the budget.
    * **layers**: ``at=8-16-24`` names the decoder layers K (0-based: the pruning happens before layer K, after
      the official ``layer_list`` entry K, which counts layers run). Without ``at`` the paper's 8/16/24 are scaled
      to the model's ``L`` layers as ``⌊K·L/32 + ½⌋`` in ``1 … L − 1`` (Qwen2-VL-7B's 28 → 7, 14, 21; layers that
      coincide on a shallow decoder merge into one stage that keeps the later stage's share).
    * **which layer's attention**: the official code ranks with the *next* layer's query/key projections applied
      to the hidden states entering layer K; here the row comes from layer ``K − 1`` (the layer just run, as in
      FastV), the signal the adapters provide without an extra projection.
    * **per image**: each image keeps its own count (the official code has one image per sample); LLaVA-NeXT's
      thumbnail and crops of one image are ranked together.
    * **positions**: the official code renumbers the kept tokens after each stage (the next stage's positions run
      0, 1, … over the shortened sequence, and the decoding positions are lowered by the tokens each stage removed);
      ``positions`` is ``"renumber"``, so the adapters' default ``positions="official"`` does the same per segment
      (``positions="keep"`` keeps the original positions).
    """

    name: ClassVar[str] = "pyramiddrop"
    paper: ClassVar[str] = "Xing et al. 2025, PyramidDrop (CVPR 2025, arXiv:2410.17247)"
    rule: ClassVar[str] = (
        "at layers 8/16/24 of 32: keep the top lambda^s of each image's visual tokens by mean_h attention of the last "
        "instruction token (layer K-1); lambda = budget^(1/S)"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.LLM}),
        signals=frozenset({"text_attention"}),
    )
    at: str = ""
    lam: float = 0.0

    @property
    def at_layer(self) -> int:
        return parse_layers(self.at, self.name)[0] if self.at.strip() else PAPER_LAYERS[0]

    def check_params(self) -> None:
        if self.at.strip():
            parse_layers(self.at, self.name)
        if not 0.0 <= float(self.lam) < 1.0:
            raise ConfigError(f"{self.name}: lam must be in [0, 1) (0: derived from the budget); got {self.lam}.")
        super().check_params()

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(k for k, _ in schedule(PAPER_LAYERS, self.at, num_layers, self.name))

    def score(self, ctx: VisualContext) -> Tensor:
        assert ctx.text_attention is not None
        return ctx.text_attention.float().mean(0)

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        scores = self.score(ctx)
        keep: list[Tensor] = []
        for (a, b), n0, final in zip(image_spans(ctx), ctx.base, image_targets(ctx, budget)):
            k = stage_counts(n0, final, ctx.steps, float(self.lam))[min(ctx.step, ctx.steps - 1)]
            keep.append(top_k(scores[a:b], min(k, b - a)) + a)
        index = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
        return VisualKept(index.to(ctx.tokens.device))
