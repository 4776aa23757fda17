"""SparseVLM: visual tokens rated by the instruction tokens that relate to the image, pruned progressively at a few
decoder layers by a rank-adaptive count, the pruned ones partly recycled into a few merged tokens."""

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

#: the v1 code's ``pruning_loc = [2, 6, 15, 19]`` (its first commit; v1.5 has ``[2, 6, 15]``) are 0-based layers
#: whose attention rates the tokens and whose output is pruned, i.e. K = 3, 7, 16, 20 here (before 0-based layer K)
PAPER_LAYERS = (3, 7, 16, 20)


def select_raters(visual: Tensor, text: Tensor) -> Tensor:
    """The text raters: instruction tokens whose relevance to the image is above the mean relevance.

    Relevance of text token t: ``mean_v softmax_t(v · t)`` (each visual token's softmax over the instruction tokens,
    averaged over the visual tokens). All instruction tokens when none is above the mean (e.g. a single one)."""
    rel = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)  # (Q,)
    raters = torch.nonzero(rel > rel.mean()).flatten()
    return raters if raters.numel() else torch.arange(text.shape[0], device=text.device)


def recycled_counts(deleted: int, recycle: float, cluster: float) -> tuple[int, int]:
    """Of ``deleted`` pruned tokens, how many are recycled (``⌊recycle·d⌋ + 1``, the most relevant ones) and into how
    many merged tokens (``⌊cluster·m⌋ + 1``) — the official ``int(0.3·d) + 1`` and ``int(m/10) + 1``."""
    if deleted <= 0 or recycle <= 0:
        return 0, 0
    m = min(deleted, math.floor(recycle * deleted) + 1)
    return m, min(m, math.floor(cluster * m) + 1)


def dpc_knn(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-kNN, as the official ``cluster_and_merge``).

    ``d_ij = ‖x_i − x_j‖/√C``; density ``ρ_i = exp(−mean of d² to its ``clusters`` nearest tokens, itself
    included)``; ``δ_i`` = distance to the nearest denser token (the largest distance for the densest); the
    ``clusters`` tokens of highest ``ρ·δ`` are centres and every token joins its nearest centre (a centre joins
    itself). Ties: the official code breaks density ties with ``1e-6`` noise; here a tie counts the earlier token
    as denser, and centre/assignment ties go to the earlier in centre order (deterministic).

    Returns ``(centres, assign)``: centre indices (in centre order) and each token's position in ``centres``."""
    n, c = x.shape
    d = torch.cdist(x.float(), x.float()) / math.sqrt(c)
    knn = torch.topk(d, k=min(clusters, n), dim=-1, largest=False).values
    rho = torch.exp(-(knn**2).mean(dim=-1))
    idx = torch.arange(n, device=x.device)
    # denser[i, j]: token j is denser than token i (ties: the earlier token is denser)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    delta = torch.where(denser, d, torch.full_like(d, float(d.max()))).min(dim=-1).values
    score = delta * rho
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters]
    assign = d[centres].argmin(dim=0)  # first minimum: the earlier centre in centre order
    assign[centres] = torch.arange(centres.numel(), device=x.device)
    return centres, assign


def split_keep(n: int, total: int, recycle: float, cluster: float) -> tuple[int, int]:
    """``(kept, merged)`` so that ``kept + merged == total`` with ``merged`` the recycling rule's count for the
    ``n − kept`` deleted tokens, keeping as many of the tokens themselves as possible; when even deleting every
    token recycles more than ``total``, ``(0, total)``."""
    total = max(0, min(total, n))
    for kept in range(total, -1, -1):
        merged = recycled_counts(n - kept, recycle, cluster)[1]
        if kept + merged <= total:
            return kept, (total - kept if kept == 0 else merged)
    return 0, total


@register
@dataclass(frozen=True)
class SparseVLM(VisualMethod):
    """SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
    Inference", ICML 2025, arXiv:2410.04417; v1 with token recycling; official code github.com/Gumpest/SparseVLMs).

    1. **Text raters** (official code, once per sample): relevance of instruction token t to the image
       ``r_t = mean_v softmax_t(h_v · h_t)``; the raters are the tokens with ``r_t`` above the mean of ``r``.
    2. **Rating** at a pruning layer: ``P`` = the raters' attention rows to the image's visual tokens, averaged over
       heads (``ctx.text_rows``, layer K − 1: the layer whose attention the official code reads and whose output it
       prunes); a visual token's score is its column mean of ``P``.
    3. **Adaptive count** (v1 code ``attn_postprocess_rank``): when ``rank(P) < N`` the layer keeps the
       ``⌊scale·rank(P) + bias⌋`` best tokens (at most ``N − 1``); when ``rank(P) = N`` it prunes nothing. (The
       paper's text, as summarised, ties the deleted count to ``N − rank P`` times a factor — UNVERIFIED, the full
       text was not readable here; the released v1 code, followed here, parametrises the kept count as above with
       ``scale = 13.5, bias = 0`` by default, tuned per benchmark. Later releases replaced it by fixed per-layer
       lists.)
    4. **Recycling**: of the ``d`` deleted tokens the ``⌊0.3·d⌋ + 1`` best-scored are clustered by DPC-kNN into
       ``⌊m/10⌋ + 1`` clusters (``recycle``, ``cluster``) and each cluster is replaced by its members' average
       state (uniform weights, as the official code), placed at its centre token's position, ``sizes`` = the
       members' sizes summed. Merged tokens are ordinary candidates at the next layers.

    Choices:

    * **budget = the visual tokens each image has after the last pruning layer** (kept + merged). The rank rule
      decides the earlier layers but never goes below the budget; the last layer lands exactly on it, splitting it
      between kept and merged tokens with the recycling rule (as many kept as possible). The v1 code has no budget:
      its final count follows from ``scale``/``bias``; the ``RETAIN_TOKN`` lists of later releases count a layer
      average. Use ``scale=0`` to prune straight to the budget at the first layer.
    * **layers**: the v1 code we follow (its first commit, with the rank rule above) prunes at the 0-based
      ``pruning_loc = [2, 6, 15, 19]`` — the layers *after* which tokens go, so K = 3, 7, 16, 20 here, the default
      (``at=3-7-16-20``). The v1.5 code's default ``[2, 6, 15]`` drops the last one: ``at=3-7-16``. ``at`` names the
      decoder layers K; without it they are scaled to the model's ``L`` layers as ``⌊K·L/32 + ½⌋`` in
      ``1 … L − 1`` (coinciding layers merge).
    * **raters from the first pruning layer's states**: the official code chooses them from the decoder's *input*
      embeddings; the adapters give the instruction and visual states entering the pruning layer
      (``ctx.text_tokens``, ``ctx.tokens``), so the raters are chosen there at the first step and reused
      (``ctx.memory``); the instruction tokens are never pruned, so their indices stay valid.
    * **per image**: rank, counts and recycling run per image (the official code has one image per sample), so
      merged tokens never mix images; raters are chosen over all the sample's visual tokens.
    * **order and positions**: the official code inserts the merged tokens right after the kept visual tokens,
      before the text, and renumbers (it truncates the position ids to the shortened length, so positions run 0, 1,
      … without gaps); here each merged token sits at its cluster centre's place among the kept visual tokens (kept
      and merged tokens in index order, so an image's tokens stay together), and ``positions`` is ``"renumber"``: the
      adapters' default ``positions="official"`` renumbers as the code does (``positions="keep"`` gives each token,
      a merged one at its centre's, its original position).
    """

    name: ClassVar[str] = "sparsevlm"
    paper: ClassVar[str] = "Zhang et al. 2025, SparseVLM (ICML 2025, arXiv:2410.04417)"
    rule: ClassVar[str] = (
        "raters = text tokens with mean_v softmax_t(v.t) above the mean; s_j = mean over raters of mean_h attention "
        "(layer K-1); keep floor(scale*rank(P)+bias) (>= budget, = budget at the last layer); recycle the top 30% of "
        "the deleted into m/10+1 DPC-kNN clusters"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.MERGE,
        stages=frozenset({Stage.LLM}),
        signals=frozenset({"text_rows", "text_tokens"}),
    )
    at: str = ""
    scale: float = 13.5
    bias: float = 0.0
    recycle: float = 0.3
    cluster: float = 0.1

    @property
    def at_layer(self) -> int:
        return parse_layers(self.at, self.name)[0] if self.at.strip() else PAPER_LAYERS[0]

    def check_params(self) -> None:
        if self.at.strip():
            parse_layers(self.at, self.name)
        if float(self.scale) < 0:
            raise ConfigError(f"{self.name}: scale must be >= 0; got {self.scale}.")
        if not 0.0 <= float(self.recycle) <= 1.0:
            raise ConfigError(
                f"{self.name}: recycle (share of deleted tokens recycled) must be in [0, 1]; got {self.recycle}."
            )
        if not 0.0 <= float(self.cluster) <= 1.0:
            raise ConfigError(
                f"{self.name}: cluster (merged tokens per recycled token) must be in [0, 1]; got {self.cluster}."
            )
        super().check_params()

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(k for k, _ in schedule(PAPER_LAYERS, self.at, num_layers, self.name))

    def raters(self, ctx: VisualContext) -> Tensor:
        memory = ctx.memory
        if memory is not None and "raters" in memory:
            return memory["raters"]
        assert ctx.text_tokens is not None
        raters = select_raters(ctx.tokens, ctx.text_tokens)
        if memory is not None:
            memory["raters"] = raters
        return raters

    def adaptive_keep(self, p: Tensor) -> int:
        """The rank rule's kept count for a rater × token matrix ``P`` (``N`` when ``rank(P) = N``)."""
        n = int(p.shape[1])
        rank = int(torch.linalg.matrix_rank(p.float()))
        if rank >= n:
            return n
        return max(0, min(n - 1, math.floor(float(self.scale) * rank + float(self.bias))))

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        assert ctx.text_rows is not None
        raters = self.raters(ctx).to(ctx.text_rows.device)
        rows = ctx.text_rows.float().mean(0)[raters]  # (R, N): head-averaged rater rows
        device = ctx.tokens.device
        sizes = ctx.sizes.to(device) if ctx.sizes is not None else torch.ones(ctx.n, dtype=torch.long, device=device)
        index: list[Tensor] = []
        states: list[Tensor] = []
        out_sizes: list[Tensor] = []
        merged_any = False
        for (a, b), final in zip(image_spans(ctx), image_targets(ctx, budget)):
            n = b - a
            p = rows[:, a:b]
            scores = p.mean(0)
            if final >= n:
                kept, merged = n, 0
            elif ctx.last_step:
                kept, merged = split_keep(n, final, float(self.recycle), float(self.cluster))
            else:
                kept = self.adaptive_keep(p)
                merged = recycled_counts(n - kept, float(self.recycle), float(self.cluster))[1]
                if kept + merged < final:
                    kept, merged = split_keep(n, final, float(self.recycle), float(self.cluster))
            if kept >= n:
                index.append(torch.arange(a, b, device=device))
                states.append(ctx.tokens[a:b])
                out_sizes.append(sizes[a:b])
                continue
            keep = top_k(scores, kept)
            mask = torch.ones(n, dtype=torch.bool, device=scores.device)
            mask[keep] = False
            deleted = torch.nonzero(mask).flatten()
            img_index = [keep]
            img_states = [ctx.tokens[a:b][keep]]
            img_sizes = [sizes[a:b][keep]]
            if merged > 0 and deleted.numel() > 0:
                m = recycled_counts(deleted.numel(), float(self.recycle), float(self.cluster))[0]
                m = max(m, merged)
                recycled = deleted[top_k(scores[deleted], m)]
                centres, assign = dpc_knn(ctx.tokens[a:b][recycled], merged)
                x = ctx.tokens[a:b][recycled].float()
                total = torch.zeros(merged, x.shape[1], device=device).index_add_(0, assign, x)
                count = torch.zeros(merged, device=device).index_add_(0, assign, torch.ones_like(x[:, 0]))
                img_index.append(recycled[centres])
                img_states.append((total / count[:, None]).to(ctx.tokens.dtype))
                member = sizes[a:b][recycled]
                img_sizes.append(torch.zeros(merged, dtype=sizes.dtype, device=device).index_add_(0, assign, member))
                merged_any = True
            order = torch.sort(torch.cat(img_index)).indices
            index.append(torch.cat(img_index)[order] + a)
            states.append(torch.cat(img_states)[order])
            out_sizes.append(torch.cat(img_sizes)[order])
        if not index:
            return VisualKept(torch.zeros(0, dtype=torch.long, device=device))
        return VisualKept(
            torch.cat(index),
            torch.cat(states) if merged_any else None,
            torch.cat(out_sizes) if merged_any or ctx.sizes is not None else None,
        )
