"""HiPrune: anchors and their buffers from a middle encoder layer's attention, registers from the feature layer's."""

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
from .base import Stage, VisualContext, VisualGroup, VisualKept, VisualMethod, split_counts, top_k


def neighbours(j: int, g: VisualGroup) -> list[int]:
    """The 4-neighbours of offset ``j`` in a ``height × width`` grid (left, right, up, down; no wrap-around)."""
    r, c = divmod(j, g.width)
    out = []
    if c > 0:
        out.append(j - 1)
    if c + 1 < g.width:
        out.append(j + 1)
    if r > 0:
        out.append(j - g.width)
    if r + 1 < g.height:
        out.append(j + g.width)
    return out


@register
@dataclass(frozen=True)
class HiPrune(VisualMethod):
    """HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
    Vision-Language Models", arXiv:2508.00553).

    The encoder's middle layers attend to the main objects, its deep layers to tokens carrying global context. Per
    grid with budget ``k``: **anchors** — the ``round(α·k / 5)`` tokens with the highest attention at the *object
    layer* ``l`` (default 9 of CLIP-L's 24, the paper's setting for LLaVA-1.5 and LLaVA-NeXT); **buffers** — the
    anchors' spatial 4-neighbours; **registers** — the remaining ``k − |anchors ∪ buffers|`` tokens with the highest
    attention at the deep layer (the feature layer ``F``, LLaVA's ``vision_feature_layer``), among the tokens not
    yet chosen. ``α = 0.1`` (the paper's default). The rest are dropped after layer ``F``.

    Progressive on the engine: ``layers(F) = (l, F)``. At layer ``l`` nothing is pruned: anchors and buffers are
    chosen (while the grids are still whole) and kept in ``ctx.memory``; at layer ``F`` the registers complete the
    budget. ``l = F`` is one step with both from layer ``F``; an explicit ``l > F`` is refused. ``object_layer=0``
    (the default) is the paper's layer 9 of LLaVA's 23 encoder layers scaled to the tower: ``max(1, round(9·F/23))``
    — 9 on CLIP-L/336 (F = 23), 2 on the embedded VLM's tower (F = 5).

    Choices (from the paper and the official code):

    * **Attention**: the attention each token *receives* — the head-averaged attention map averaged over every
      query, CLS included (the official code's "global attention"; its CLS-row variant is commented out). So no
      CLS token is needed (the ``mean_attention`` signal); the authors' README says register tokens "receive" the
      top attention, and the paper stresses that HiPrune needs no CLS token.
    * **Buffers**: true 4-neighbours inside the grid. The official code adds ``±1`` and ``±side`` to the flat
      index and clamps it, so a token at a row's end takes the next row's first token as a neighbour; we do not wrap.
    * **Budget over grids**: LLaVA-NeXT's thumbnail and crops are scored separately; the image's budget is split
      over its grids in proportion to their sizes (equal grids: equal shares — the official code gives each
      ``⌊N′ / grids⌋``; we hand the remainder to the first grids so the image keeps exactly its budget).
    * **Overflow**: if anchors and buffers exceed ``k`` (only when ``α`` is large and ``k`` tiny), the anchors stay
      and the buffers are taken by their object-layer attention until ``k``. Ties go to the earlier token.
    * **LLaVA-NeXT layout**: the official NeXT path hard-codes the ``'spatial'`` merge: the crops are not unpadded,
      no ``image_newline`` token is added, and the padding patches are candidates like any other. Here the adapter
      unpads: only the crop patches that survive the unpadding are candidates (the budget is split over the
      thumbnail and those), and the image keeps its ``image_newline`` tokens, unpruned — the layout LLaVA-NeXT was
      trained with, and no budget spent on padding.
    """

    name: ClassVar[str] = "hiprune"
    paper: ClassVar[str] = (
        "Liu et al. 2025, HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in "
        "Vision-Language Models (arXiv:2508.00553)"
    )
    rule: ClassVar[str] = (
        "anchors = top round(alpha k/5) by attention received at the object layer, buffers = their 4-neighbours, "
        "registers = top rest by attention received at the feature layer"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.VISION}),
        signals=frozenset({"mean_attention"}),
    )
    alpha: float = 0.1
    object_layer: int = 0

    def check_params(self) -> None:
        check_vision_only(self)
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"hiprune: alpha (the anchors' and buffers' share) must be in [0, 1]; got {self.alpha}.")
        if int(self.object_layer) < 0:
            raise ConfigError(
                f"hiprune: object_layer is an encoder layer >= 1 (0: scaled from the paper's 9 of 23); "
                f"got {self.object_layer}."
            )

    def layers(self, num_layers: int) -> tuple[int, ...]:
        layer = int(self.object_layer) or max(1, round(9 * num_layers / 23))
        if layer > num_layers:
            raise ConfigError(
                f"hiprune: object_layer={layer} is past the encoder's feature layer ({num_layers}); "
                f"choose object_layer <= {num_layers}, e.g. hiprune[object_layer={max(1, num_layers // 2)}]."
            )
        return (num_layers,) if layer == num_layers else (layer, num_layers)

    def score(self, ctx: VisualContext) -> Tensor:
        assert ctx.mean_attention is not None
        return ctx.mean_attention.float().mean(0)

    def group_budgets(self, ctx: VisualContext, budget: Budget) -> list[int]:
        out = [0] * len(ctx.groups)
        per_image = image_budgets(ctx, budget)
        for image, gis in image_groups(ctx).items():
            for gi, k in zip(gis, split_counts(per_image[image], [ctx.groups[gi].size for gi in gis])):
                out[gi] = k
        return out

    def anchors_and_buffers(self, ctx: VisualContext, budget: Budget) -> list[list[int]]:
        """Per group: the chosen anchors and buffers (offsets in the group), from the object layer's scores."""
        obj = self.score(ctx)
        out = []
        for g, k in zip(ctx.groups, self.group_budgets(ctx, budget)):
            s = obj[g.start : g.end]
            n_anchor = round(k * float(self.alpha) / 5)
            anchors = top_k(s, n_anchor).tolist()
            buffers = sorted({b for a in anchors for b in neighbours(a, g)} - set(anchors))
            if len(anchors) + len(buffers) > k:
                order = sorted(buffers, key=lambda j: (-float(s[j]), j))
                buffers = order[: max(0, k - len(anchors))]
                anchors = anchors[:k]
            out.append(sorted(set(anchors) | set(buffers)))
        return out

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        dev = ctx.tokens.device
        memory = memory_of(ctx, self.name)
        if ctx.steps > 1 and ctx.step == 0:  # the object layer: choose anchors and buffers, keep everything
            memory["hiprune_chosen"] = self.anchors_and_buffers(ctx, budget)
            memory["hiprune_sizes"] = [g.size for g in ctx.groups]
            return VisualKept(torch.arange(ctx.n, device=dev))
        chosen = memory.get("hiprune_chosen") if ctx.steps > 1 else self.anchors_and_buffers(ctx, budget)
        if ctx.steps > 1 and memory.get("hiprune_sizes") != [g.size for g in ctx.groups]:
            raise ConfigError("hiprune: the grids changed between its object layer and its feature layer.")
        assert isinstance(chosen, list)
        if self.count(ctx, budget) >= ctx.n:
            return VisualKept(torch.arange(ctx.n, device=dev))
        deep = self.score(ctx)
        index = []
        for g, k, ab in zip(ctx.groups, self.group_budgets(ctx, budget), chosen):
            s = deep[g.start : g.end].clone()
            taken = torch.zeros(g.size, dtype=torch.bool, device=dev)
            if ab:
                taken[torch.tensor(ab, dtype=torch.long, device=dev)] = True
            s[taken] = float("-inf")
            registers = top_k(s, max(0, k - len(ab)))
            picked = torch.cat([torch.tensor(ab, dtype=torch.long, device=dev), registers])
            index.append(torch.sort(picked).values + g.start)
        return VisualKept(torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=dev))
