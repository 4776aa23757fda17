"""ToMe: merge similar tokens in every encoder block by bipartite soft matching on the attention keys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ._vit import check_vision_only, image_budgets, image_groups, memory_of
from .base import Stage, VisualContext, VisualKept, VisualMethod, split_counts


def bipartite_merge(x: Tensor, metric: Tensor, sizes: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One round of ToMe's bipartite soft matching on one group's tokens (in index order).

    Tokens at even offsets form set B, odd offsets set A (the encoder sequence with CLS at position 0, split as
    ``x[::2]`` / ``x[1::2]`` with CLS in A and never merged, as in the official implementation). Each A token's edge
    goes to its most cosine-similar B token (by ``metric``; the first B on ties); the ``r`` A tokens with the most
    similar edges (stable order: the earlier A on ties) are merged into their B tokens by a size-weighted average;
    ``metric`` is merged the same way (used only if the step needs a second round).

    Returns ``(kept, x, sizes, metric)``: the kept offsets (sorted: B tokens stand at their own offsets) and their
    new states, sizes and metric.
    """
    n = int(x.shape[0])
    r = max(0, min(r, n // 2))
    keep_all = torch.arange(n, device=x.device)
    if r == 0:
        return keep_all, x, sizes, metric
    b_idx = torch.arange(0, n, 2, device=x.device)
    a_idx = torch.arange(1, n, 2, device=x.device)
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = m[a_idx] @ m[b_idx].T  # (|A|, |B|)
    best, match = sim.max(dim=-1)
    order = torch.sort(best, descending=True, stable=True).indices
    src = order[:r]  # merged A tokens (positions in A)
    dst = match[src]  # their B tokens (positions in B)
    s = sizes.to(torch.float32)
    a_src = a_idx[src]
    s_b, s_a = s[b_idx, None], s[a_src, None]
    acc_x = (x[b_idx].float() * s_b).index_add(0, dst, x[a_src].float() * s_a)
    acc_m = (metric[b_idx].float() * s_b).index_add(0, dst, metric[a_src].float() * s_a)
    acc_s = s[b_idx].index_add(0, dst, s[a_src])
    new_x, new_m, new_s = x.float().clone(), metric.float().clone(), s.clone()
    new_x[b_idx] = acc_x / acc_s[:, None]
    new_m[b_idx] = acc_m / acc_s[:, None]
    new_s[b_idx] = acc_s
    gone = torch.zeros(n, dtype=torch.bool, device=x.device)
    gone[a_src] = True
    kept = keep_all[~gone]
    return kept, new_x[kept].to(x.dtype), new_s[kept].to(sizes.dtype), new_m[kept]


@register
@dataclass(frozen=True)
class ToMe(VisualMethod):
    """ToMe — Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv:2210.09461).

    After every encoder block before the feature layer (``layers(F) = 1 … F − 1``, so the feature layer runs on
    the budget's count; with ``F = 1`` the one step follows layer 1), ``r`` tokens of each grid are merged by
    **bipartite soft matching**: the grid's current tokens alternate between sets A and B, each A token is linked
    to its most similar B token by the cosine similarity of the block's attention **keys averaged over heads**, the
    ``r`` most similar links are merged (several A tokens may join one B token) and the rest stay. A merged token is
    the **size-weighted average** ``Σ s_i x_i / Σ s_i`` of the tokens it joins (``s`` = original tokens each stands
    for, ``ctx.sizes``), and its size is ``Σ s_i``. ``proportional = True``: later encoder layers add ``log s`` to
    each key's attention logit (proportional attention), done by the engine. The CLS token is never merged (it is
    not among the context's tokens and stays to the end).

    Choices (the paper is about a plain ViT with a fixed ``r``; here the budget sets it):

    * **r per layer**: each grid (LLaVA-NeXT's thumbnail and each crop separately) has a target — its image's
      budget split over the image's grids in proportion to their sizes at the first step (at least 1 each) — and
      at step ``t`` of ``T`` merges ``⌈(n − target) / (T − t)⌉`` tokens: a constant ``r`` with the remainder at the
      first layers. A round merges at most ``⌊n / 2⌋`` (the size of A); earlier steps clip to that and later steps
      catch up; when the last step still needs more (few layers, small budgets: 16 → 4 tokens in one step), it
      runs further rounds of matching on the merged tokens, with the merged keys (size-weighted, like the states).
    * **A/B split**: the official implementation splits the sequence with CLS at position 0 as ``x[::2]`` (A, CLS
      included and protected) and ``x[1::2]`` (B); so a grid's patches at even offsets are B, odd offsets A.
    * **Order and position**: after each step the tokens stay in **index (spatial) order** — a merged token takes
      the place of its **B token** (its original index is the B token's), unmerged tokens keep theirs — where the
      official code moves the unmerged A tokens before the B tokens; the next step's alternation is over this
      index order. Ties: the first B for an A token, the earlier A among equal links.
    * **Where in the block**: ToMe merges between a block's attention and its MLP; the engine acts after whole
      blocks, so the merge follows the block's MLP (its keys are still that block's).
    * **Groups**: LLaVA-NeXT's crops run through the encoder separately, so tokens merge only within their grid.
    """

    name: ClassVar[str] = "tome"
    paper: ClassVar[str] = "Bolya et al. 2023, Token Merging: Your ViT But Faster (ICLR 2023, arXiv:2210.09461)"
    rule: ClassVar[str] = (
        "every block: A/B alternate, A->most cosine-similar B by mean-head keys, merge the r best edges by "
        "size-weighted average; proportional attention"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.MERGE,
        stages=frozenset({Stage.VISION}),
        signals=frozenset({"keys"}),
    )
    proportional: ClassVar[bool] = True

    def check_params(self) -> None:
        check_vision_only(self)

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(1, num_layers)) if num_layers > 1 else (1,)

    def targets(self, ctx: VisualContext, budget: Budget) -> list[int]:
        """Each group's token count at the feature layer (the image budget split over its grids by size)."""
        out = [0] * len(ctx.groups)
        per_image = image_budgets(ctx, budget)
        for image, gis in image_groups(ctx).items():
            sizes = [ctx.groups[gi].size for gi in gis]
            k = per_image[image]
            # at least one token per grid (a grid cannot merge into nothing)
            counts = [c + 1 for c in split_counts(max(0, k - len(gis)), [s - 1 for s in sizes])]
            for gi, c in zip(gis, counts):
                out[gi] = min(c, ctx.groups[gi].size)
        return out

    def score(self, ctx: VisualContext) -> Tensor:  # merging ranks no tokens
        return torch.zeros(ctx.n, device=ctx.tokens.device)

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        assert ctx.keys is not None
        memory = memory_of(ctx, self.name)
        targets = memory.get("tome_targets")
        if not isinstance(targets, list) or len(targets) != len(ctx.groups):
            targets = self.targets(ctx, budget)
            memory["tome_targets"] = targets
        dev = ctx.tokens.device
        steps_left = max(1, ctx.steps - ctx.step)
        if all(g.size <= t for g, t in zip(ctx.groups, targets)):
            keep = torch.arange(ctx.n, device=dev)
            return VisualKept(keep, None, None if ctx.sizes is None else ctx.sizes)
        metric = ctx.keys.float().mean(0)  # (N, d): keys averaged over heads
        sizes = ctx.sizes if ctx.sizes is not None else torch.ones(ctx.n, dtype=torch.long, device=dev)
        index, tokens, new_sizes = [], [], []
        for g, target in zip(ctx.groups, targets):
            pos = torch.arange(g.start, g.end, device=dev)
            x, m, s = ctx.tokens[g.start : g.end], metric[g.start : g.end], sizes[g.start : g.end]
            need = max(0, g.size - target)
            r = math.ceil(need / steps_left)
            while r > 0:
                kept, x, s, m = bipartite_merge(x, m, s, r)
                done = int(pos.shape[0]) - int(kept.shape[0])
                pos = pos[kept]
                r -= done
                if not ctx.last_step or done == 0:
                    break  # earlier steps merge at most one round; later steps catch up
            index.append(pos)
            tokens.append(x)
            new_sizes.append(s)
        return VisualKept(torch.cat(index), torch.cat(tokens), torch.cat(new_sizes))
