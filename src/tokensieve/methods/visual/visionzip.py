"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity, per encoder grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ...errors import ConfigError
from .base import Stage, VisualContext, VisualKept, VisualMethod, split_counts, top_k


@register
@dataclass(frozen=True)
class VisionZip(VisualMethod):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
    arXiv:2412.04467; official code dvlab-research/VisionZip @3151f6d, read to check the details).

    Acts once, at the vision stage, after the encoder layer whose output the model reads (``layer = 0`` means that
    feature layer ``F``: LLaVA-1.5's 23rd CLIP layer; ``layer = l`` acts after layer ``l`` instead). Per grid with a
    budget of ``k`` tokens:

    * **dominant** ``D = k − C`` tokens: the highest CLS attention of that layer, summed over heads
      (``Σ_h A_h[CLS, j]``, the official code; the same ranking as the head mean);
    * **contextual** ``C = round(contextual · k)`` tokens (``contextual = 5/32``: 54 + 10 for 64 in the official README,
      108 + 20 for 128 and 162 + 30 for 192, the paper's settings as its summaries give them — the paper's text was
      not readable here): the ``R`` remaining tokens in original order, every ``max(1, ⌊R/C⌋)``-th
      of them (the first ``C``) become targets; every other remaining token joins the target whose head-mean key
      (``mean_h k_j^h``, L2-normalised) is most similar (cosine, argmax; ties to the earlier target);
      the contextual token is ``h_target + mean(h_joined)`` (``merge=add``, the official code; unchanged when
      nothing joined) or the size-weighted mean of the target and the joined tokens (``merge=mean``);
      its size is 1 + the tokens that joined.

    A merged token stands at its target's position (the representative index is the target token, itself one of the
    remaining patches). Works on LLaVA-1.5 and LLaVA-NeXT: the official code runs the selection on every CLIP image
    of the batch — the thumbnail and each crop — with the same counts, so each grid is zipped on its own; here an
    image's budget is split over its grids in proportion to their sizes (the thumbnail's patches and each crop's
    patches that survive the unpadding), and each grid's share is split into dominant + contextual. Not for encoders
    without a CLS token (Qwen2-VL: the adapter's CapabilityError).

    Choices where the paper/code are ambiguous:

    * The official LLaVA code keeps the CLS token among the dominant tokens (``dominant=54`` = CLS + 53 patches) and
      feeds it to the LM; LLaVA's feature selection drops CLS here, so all ``D`` dominant slots are patches and the
      budget counts patches only.
    * **Order and positions (LLaVA-1.5).** The official sequence is ``[CLS, dominant…, contextual…]`` (the contextual
      tokens appended after the dominant ones), and LLaVA's input preparation numbers it 0, 1, … (an ``arange`` over
      the shortened sequence): it renumbers. Here there is no CLS and every output is at its token's position
      (dominant tokens at their own, contextual at their target's), in original order; ``positions`` is
      ``"renumber"``, so the adapters' default ``positions="official"`` renumbers as the code does.
    * **LLaVA-NeXT order.** The official code does not unpad the crops and adds no ``image_newline`` token; an
      image's sequence is the thumbnail's ``[CLS, dominant…, contextual…]``, then the crops' dominant tokens in the
      crop mosaic's raster order, then each crop's CLS, then all the crops' contextual tokens. Here only the crop
      patches that survive the unpadding are candidates (the padding is invisible to the method), the image keeps
      its ``image_newline`` tokens (unpruned), there is no CLS, and every output stays in the image's own order —
      the thumbnail, then the unpadded mosaic in raster order with each contextual token at its target's place — so
      the language model sees the layout LLaVA-NeXT was trained with, and no budget goes to padding.
    * ``merge=add`` follows the code (``target + mean``, which doubles the target's scale); the paper's prose speaks
      of averaging, available as ``merge=mean``.
    * The LLaVA-NeXT split over thumbnail and crops is UNVERIFIED in the paper (the code gives every CLIP image the
      same counts); ours is proportional to the grids' sizes, remainders to the earlier grids.
    """

    name: ClassVar[str] = "visionzip"
    paper: ClassVar[str] = (
        "Yang et al. 2025, VisionZip: Longer is Better but Not Necessary in Vision Language Models (arXiv:2412.04467)"
    )
    rule: ClassVar[str] = (
        "after the feature layer: top (k-C) by head-summed CLS attention; the rest merged into C uniformly spaced "
        "targets by cosine of head-mean keys (C = round(5k/32))"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.MERGE,
        stages=frozenset({Stage.VISION}),
        signals=frozenset({"cls_attention", "keys"}),
    )
    layer: int = 0
    contextual: float = 0.15625
    merge: str = "add"

    def check_params(self) -> None:
        if int(self.layer) < 0:
            raise ConfigError(f"visionzip: layer must be >= 0 (0 = the feature layer); got {self.layer}.")
        if not 0.0 <= float(self.contextual) < 1.0:
            raise ConfigError(f"visionzip: contextual (share of the budget) must be in [0, 1); got {self.contextual}.")
        if self.merge not in ("add", "mean"):
            raise ConfigError(f"visionzip: merge must be 'add' (official code) or 'mean'; got {self.merge!r}.")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return (int(self.layer) if int(self.layer) > 0 else int(num_layers),)

    def split(self, k: int) -> tuple[int, int]:
        """``(dominant, contextual)`` counts for a grid budget of ``k``."""
        c = int(float(self.contextual) * k + 0.5)
        return k - c, c

    def score(self, ctx: VisualContext) -> Tensor:
        assert ctx.cls_attention is not None
        return ctx.cls_attention.float().sum(0)

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        dev = ctx.tokens.device
        if self.count(ctx, budget) >= ctx.n:
            return VisualKept(torch.arange(ctx.n, device=dev), sizes=ctx.sizes)
        images = sorted({g.image for g in ctx.groups})
        base = dict(zip(images, ctx.base))
        sizes = ctx.sizes.to(dev) if ctx.sizes is not None else torch.ones(ctx.n, dtype=torch.long, device=dev)
        index: list[Tensor] = []
        tokens: list[Tensor] = []
        out_sizes: list[Tensor] = []
        for image in images:
            gis = [gi for gi, g in enumerate(ctx.groups) if g.image == image]
            now = sum(ctx.groups[gi].size for gi in gis)
            k_img = min(budget.tokens_for(base[image], larger="clip"), now)
            for gi, k in zip(gis, split_counts(k_img, [ctx.groups[gi].size for gi in gis])):
                g = ctx.groups[gi]
                i, t, s = self.zip_group(ctx, g.start, g.end, k, sizes[g.start : g.end])
                index.append(i + g.start)
                tokens.append(t)
                out_sizes.append(s)
        return VisualKept(torch.cat(index), torch.cat(tokens), torch.cat(out_sizes))

    def zip_group(
        self, ctx: VisualContext, start: int, end: int, k: int, sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One grid ``[start, end)`` zipped to ``k`` tokens: local indices, states and sizes (index order)."""
        assert ctx.keys is not None
        h = ctx.tokens[start:end]
        n = end - start
        dev = h.device
        if k >= n:
            return torch.arange(n, device=dev), h, sizes
        n_dom, n_ctx = self.split(k)
        attention = self.score(ctx)[start:end]
        dominant = top_k(attention, n_dom)
        is_rest = torch.ones(n, dtype=torch.bool, device=dev)
        is_rest[dominant] = False
        rest = torch.nonzero(is_rest).flatten()  # original order
        states = {int(j): h[j] for j in dominant.tolist()}
        weight = {int(j): sizes[j] for j in dominant.tolist()}
        if n_ctx > 0 and rest.numel() > 0:
            step = max(1, int(rest.numel()) // n_ctx)
            pick = torch.arange(0, int(rest.numel()), step, device=dev)[:n_ctx]
            is_target = torch.zeros(int(rest.numel()), dtype=torch.bool, device=dev)
            is_target[pick] = True
            targets, others = rest[is_target], rest[~is_target]
            metric = ctx.keys[:, start:end].float().mean(0)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            assign = (metric[others] @ metric[targets].T).argmax(dim=1) if others.numel() else others
            for ti, j in enumerate(targets.tolist()):
                joined = others[assign == ti]
                size = sizes[j] + sizes[joined].sum()
                if joined.numel() == 0:
                    state = h[j]
                elif self.merge == "add":
                    state = (h[j].float() + h[joined].float().mean(0)).to(h.dtype)
                else:
                    w = sizes[torch.cat([targets[ti : ti + 1], joined])].to(torch.float32)
                    rows = h[torch.cat([targets[ti : ti + 1], joined])].float()
                    state = ((rows * w[:, None]).sum(0) / w.sum()).to(h.dtype)
                states[int(j)] = state
                weight[int(j)] = size
        order = sorted(states)
        return (
            torch.tensor(order, dtype=torch.long, device=dev),
            torch.stack([states[j] for j in order]),
            torch.stack([torch.as_tensor(weight[j]) for j in order]).to(device=dev, dtype=torch.long),
        )
