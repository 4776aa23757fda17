"""HiRED: split an any-resolution image's budget over its thumbnail and crops by early CLS attention, then keep each
grid's tokens with the highest final-layer CLS attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ...errors import ConfigError
from ._vit import check_vision_only, image_budgets, image_groups, memory_of
from .base import Stage, VisualContext, VisualKept, VisualMethod, top_k


def weighted_counts(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split ``total`` over parts in proportion to ``weights`` (equal parts if they are all zero), each part at most
    its cap: floors first, then the largest remainders (earlier part on ties); a capped part's excess goes to the
    others in proportion again."""
    total = max(0, min(total, sum(caps)))
    out = [0] * len(caps)
    open_ = [i for i, c in enumerate(caps) if c > 0]
    while total > 0 and open_:
        w = [max(0.0, float(weights[i])) for i in open_]
        if sum(w) <= 0:
            w = [1.0] * len(open_)
        exact = [total * x / sum(w) for x in w]
        add = [min(int(e), caps[i] - out[i]) for i, e in zip(open_, exact)]
        rest = total - sum(add)
        order = sorted(range(len(open_)), key=lambda j: (-(exact[j] - int(exact[j])), j))
        for j in order:
            if rest == 0:
                break
            if out[open_[j]] + add[j] < caps[open_[j]]:
                add[j] += 1
                rest -= 1
        for j, i in enumerate(open_):
            out[i] += add[j]
        total = rest
        open_ = [i for i in open_ if out[i] < caps[i]]
    return out


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive chunks of ``[0, n)``: chunk ``i`` is ``[⌊i·n/parts⌋, ⌊(i+1)·n/parts⌋)``."""
    return [((i * n) // parts, ((i + 1) * n) // parts) for i in range(parts)]


@register
@dataclass(frozen=True)
class HiRED(VisualMethod):
    """HiRED — High-Resolution Early Dropping (Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient
    Inference of High-Resolution Vision-Language Models", AAAI 2025, arXiv:2408.10945).

    For an any-resolution image (LLaVA-NeXT: a thumbnail, the "full image", then its crops, the "sub-images"), the
    image's budget ``k`` is split first, then each grid keeps its own top tokens:

    1. **Budget distribution** (after the *early* layer, default 1 — the official code's layer index 0): the
       thumbnail gets ``min(⌊α·k⌋, its size)`` (``α = 0.5``, the paper's setting), the crops the rest. The crops'
       share follows their visual content: the thumbnail's early-layer CLS attention (summed over heads) marks its
       top ``⌊(1 − α)·n_thumb⌋`` tokens, and each crop's weight is how many of them fall in its part of the
       thumbnail.
    2. **Token selection** (after the *final* layer — the feature layer ``F``, the official layer index 22 of
       CLIP-L's 24 with ``vision_feature_layer = −2``): each grid keeps its budget's tokens with the highest CLS
       attention summed over heads (the CLS row of the grid's own run through the encoder).

    An image with one grid (LLaVA-1.5) keeps its top ``k`` by the final layer's CLS attention — the official
    single-partition version. Progressive on the engine: ``layers(F) = (early, F)`` (one step when ``early >= F``,
    both from layer ``F``); the first step keeps every token and stores the split in ``ctx.memory``.

    Choices:

    * **The crops' weights** follow the official code (a count of the thumbnail's top early-layer tokens, not a sum
      of attention). The paper's own formula for the "visual content score" was not available to us in full:
      UNVERIFIED against the paper's text (its summary: initial-layer CLS attention scores each partition).
    * **A crop's part of the thumbnail**: the region of the image the crop covers. With the crops' arrangement
      (``ctx.crop_grid = (R, C)``, which the LLaVA-NeXT adapter passes), crop ``(r, c)`` counts the marked tokens
      in rows ``⌊r·h/R⌋ … ⌊(r+1)·h/R⌋ − 1`` and columns ``⌊c·w/C⌋ … ⌊(c+1)·w/C⌋ − 1`` of the thumbnail's
      ``h × w`` grid. The official code instead reshapes the raster-order mask into ``rows × cols × (n / crops)``,
      i.e. consecutive raster chunks (horizontal bands: the same for a one-column layout, not for 2 × 2); that is
      our fallback when the arrangement is unknown: chunk ``i`` is ``[⌊i·n/C⌋, ⌊(i+1)·n/C⌋)``.
    * **Rounding**: the official code truncates every crop's share (``int``), keeping fewer than the budget; we
      split the crops' share by largest remainders so the image keeps exactly ``k`` (a crop's share is capped at
      its size, the excess going to the others). All weights zero: equal shares.
    * **Budget base**: ``k`` is the budget of the image's tokens at the first step — the thumbnail's patches and the
      crops' patches that survive the unpadding (the official base is ``⌊grids · 576 · rate⌋``, the crops' full
      grids; the same when nothing is unpadded).
    * **LLaVA-NeXT layout**: the official code selects over each crop's full 576 patches *before* the unpadding and
      packs the image with ``image_newline=None`` (no newline tokens), so selected patches that fall in the padding
      are lost. Here only the crop patches that survive the unpadding are candidates (every selected patch reaches
      the language model) and the image keeps its ``image_newline`` tokens, unpruned — the layout LLaVA-NeXT was
      trained with.
    * Ties go to the earlier token.
    """

    name: ClassVar[str] = "hired"
    paper: ClassVar[str] = (
        "Arif et al. 2025, HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution "
        "Vision-Language Models (AAAI 2025, arXiv:2408.10945)"
    )
    rule: ClassVar[str] = (
        "thumbnail gets alpha k; crops share the rest by the thumbnail's early-layer CLS-attention top tokens in "
        "their part; each grid keeps its top tokens by final-layer CLS attention (sum over heads)"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.VISION}),
        signals=frozenset({"cls_attention"}),
    )
    alpha: float = 0.5
    early: int = 1

    def check_params(self) -> None:
        check_vision_only(self)
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(
                f"hired: alpha (the thumbnail's share of the budget) must be in [0, 1]; got {self.alpha}."
            )
        if int(self.early) < 1:
            raise ConfigError(f"hired: early is an encoder layer >= 1; got {self.early}.")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return (num_layers,) if self.early >= num_layers else (self.early, num_layers)

    def score(self, ctx: VisualContext) -> Tensor:
        assert ctx.cls_attention is not None
        return ctx.cls_attention.float().sum(0)

    def split(self, ctx: VisualContext, budget: Budget) -> list[int]:
        """Each group's share of its image's budget, from this (early) layer's CLS attention."""
        early = self.score(ctx)
        out = [0] * len(ctx.groups)
        per_image = image_budgets(ctx, budget)
        for image, gis in image_groups(ctx).items():
            k = per_image[image]
            thumb = ctx.groups[gis[0]]
            if len(gis) == 1:
                out[gis[0]] = k
                continue
            crops = gis[1:]
            caps = [ctx.groups[gi].size for gi in crops]
            k_thumb = min(int(float(self.alpha) * k), thumb.size)
            k_thumb = max(k_thumb, k - sum(caps))  # the crops cannot hold more than their tokens
            n = thumb.size
            marked = torch.zeros(n, dtype=torch.bool, device=early.device)
            marked[top_k(early[thumb.start : thumb.end], int((1.0 - float(self.alpha)) * n))] = True
            grid = ctx.crop_grid
            if grid is not None and grid[0] * grid[1] == len(crops) and thumb.height * thumb.width == n:
                # crop (r, c) covers rows r/R … (r+1)/R and columns c/C … (c+1)/C of the thumbnail's grid
                m2 = marked.view(thumb.height, thumb.width)
                weights = [
                    float(m2[r0:r1, c0:c1].sum())
                    for r0, r1 in chunk_bounds(thumb.height, grid[0])
                    for c0, c1 in chunk_bounds(thumb.width, grid[1])
                ]
            else:  # layout unknown: consecutive raster chunks, as the official code
                weights = [float(marked[a:b].sum()) for a, b in chunk_bounds(n, len(crops))]
            out[gis[0]] = k_thumb
            for gi, c in zip(crops, weighted_counts(k - k_thumb, weights, caps)):
                out[gi] = c
        return out

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        dev = ctx.tokens.device
        memory = memory_of(ctx, self.name)
        if ctx.steps > 1 and ctx.step == 0:  # the early layer: split the budget, keep everything
            memory["hired_split"] = self.split(ctx, budget)
            memory["hired_sizes"] = [g.size for g in ctx.groups]
            return VisualKept(torch.arange(ctx.n, device=dev))
        shares = memory.get("hired_split") if ctx.steps > 1 else self.split(ctx, budget)
        if ctx.steps > 1 and memory.get("hired_sizes") != [g.size for g in ctx.groups]:
            raise ConfigError("hired: the grids changed between its early layer and its final layer.")
        assert isinstance(shares, list)
        if self.count(ctx, budget) >= ctx.n:
            return VisualKept(torch.arange(ctx.n, device=dev))
        final = self.score(ctx)
        index = [top_k(final[g.start : g.end], k) + g.start for g, k in zip(ctx.groups, shares)]
        return VisualKept(torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=dev))
