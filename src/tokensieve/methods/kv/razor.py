"""RazorAttention: retrieval heads keep everything; the other heads keep sinks, a local window and a
compensation token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext
from ...core.method import Compressed, PrefillMethod
from ...core.profiles import RetrievalHeads
from ...core.registry import register
from ...errors import ConfigError
from ...scorers import recency_scores
from ...selection import Selection
from ...selection.allocation import round_to_total
from ...selection.topk import topk_select


def razor_allocation(
    ranked: list[tuple[int, int]],
    count: int,
    n_tokens: int,
    budget: int,
    num_layers: int,
    num_heads: int,
    floor: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries per (layer, KV head) for one sequence, summing exactly to ``num_layers * num_heads * budget``.

    Retrieval heads (the first ``count`` of ``ranked``) keep all ``n_tokens``; if that leaves the other heads fewer
    than ``floor`` entries each, the lowest-ranked retrieval heads are demoted until it does not.

    Returns:
        ``(entries (L, H) long, is_retrieval (L, H) bool)``.
    """
    L, H = num_layers, num_heads
    total = L * H * budget
    r = min(count, len(ranked), L * H)
    while r > 0 and r * n_tokens + (L * H - r) * min(floor, n_tokens) > total:
        r -= 1
    is_ret = torch.zeros(L, H, dtype=torch.bool)
    for layer, head in ranked[:r]:
        is_ret[layer, head] = True
    entries = torch.full((L, H), n_tokens, dtype=torch.long)
    n_other = L * H - r
    if n_other:
        rest = total - r * n_tokens
        want = torch.full((1, n_other), rest / n_other, dtype=torch.float64)
        alloc = round_to_total(want, torch.tensor([rest]), lo=1, hi=n_tokens)[0]
        entries[~is_ret] = alloc
    return entries, is_ret


@register
@dataclass(frozen=True)
class RazorAttention(PrefillMethod):
    """RazorAttention: a few retrieval heads (echo and induction heads, found once per model without data) keep
    the whole cache; every other head keeps ``sink`` first tokens, a recent window, and one compensation token that
    stands for what it dropped (Tang et al., arXiv:2407.15891).

    Score: none at inference — the profile decides per head (recency for the window). Compensation token:
    ``k̂ = mean(dropped keys)``, ``v̂ = mean(dropped values)``.

    Choices (written down because the paper is silent or does not fit a fixed budget):
    - ``compensation="mass"`` (default) adds ``log n_dropped`` to the compensation token's logit, so it weighs as
      much as the ``n_dropped`` tokens it replaces would if their keys were equal; ``"plain"`` adds nothing
      (one ordinary token); ``"none"`` drops without compensation. The token is a stored entry and counts in the
      budget.
    - Budget: the same total number of entries as every method (``layers × kv_heads × b``). Retrieval heads keep
      all tokens; the remaining entries are spread evenly over the other heads. When the budget is too small for
      the profile's retrieval heads to keep everything while the others keep at least ``min_local`` entries, the
      lowest-ranked retrieval heads are treated as ordinary heads (the paper's fixed 15 % assumes ~70 % savings).
    - Positions are the original ones; the compensation token has none (it is position-free: its key is an
      average of already-rotated keys).
    """

    name: ClassVar[str] = "razor"
    paper: ClassVar[str] = "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (arXiv:2407.15891)"
    rule: ClassVar[str] = "retrieval heads (echo/induction profile) keep all; others sinks + window + mean token"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.MERGE,
        granularity=Granularity.HEAD,
        head_adaptive=True,
        layer_adaptive=True,
        profile="retrieval-heads",
    )
    sink: int = 4
    compensation: Literal["mass", "plain", "none"] = "mass"
    min_local: int = 16

    def __post_init__(self) -> None:
        if self.sink < 0 or self.min_local < 1:
            raise ConfigError("razor: sink must be >= 0 and min_local >= 1.")

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    def score(self, ctx: LayerContext) -> Tensor:
        return recency_scores(ctx)

    def _plan(self, ctx: LayerContext) -> Any:
        key = ("razor", self.sink, self.min_local, self.compensation)
        if key not in ctx.run.scratch:
            profile: RetrievalHeads = ctx.run.profile
            ranked = list(profile.ranked)
            comp = 0 if self.compensation == "none" else 1
            plans = [
                razor_allocation(
                    ranked,
                    profile.count,
                    int(n),
                    int(b),
                    ctx.num_layers,
                    ctx.num_kv_heads,
                    self.sink + self.min_local + comp,
                )
                for n, b in zip(ctx.run.n_tokens.tolist(), ctx.run.budget_tokens.tolist())
            ]
            ctx.run.scratch[key] = (
                torch.stack([p[0] for p in plans]),  # (B, L, H) entries
                torch.stack([p[1] for p in plans]),  # (B, L, H) retrieval
            )
        return ctx.run.scratch[key]

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        entries, _ = self._plan(ctx)
        counts = entries[:, ctx.layer_idx].clone()  # (B, H)
        n = ctx.selectable.sum(-1)[:, None]  # (B, 1)
        if self.compensation != "none":
            counts = torch.where(counts < n, counts - 1, counts)  # one entry goes to the compensation token
        return counts.clamp_min(0)

    def select(self, scores: Tensor, counts: Tensor, ctx: LayerContext) -> Selection:
        return topk_select(scores, counts, ctx.selectable, sink=ctx.run.sink, recent=0)

    def apply(self, selection: Selection, ctx: LayerContext, scores: Tensor) -> Compressed:
        if self.compensation == "none":
            return Compressed(selection)
        dropped = ctx.selectable[:, None, :] & ~selection.mask(ctx.length)  # (B, H, T)
        n_d = dropped.sum(-1)  # (B, H)
        w = dropped.to(ctx.keys.dtype)[..., None]  # (B, H, T, 1)
        denom = n_d.clamp_min(1).to(ctx.keys.dtype)[..., None]
        k_hat = (ctx.keys * w).sum(2) / denom  # (B, H, D)
        v_hat = (ctx.values * w).sum(2) / denom
        bias = (
            torch.log(n_d.clamp_min(1).to(ctx.keys.dtype))
            if self.compensation == "mass"
            else torch.zeros_like(denom[..., 0])
        )
        return Compressed(
            selection,
            extra_keys=k_hat[:, :, None],  # (B, H, 1, D)
            extra_values=v_hat[:, :, None],
            extra_bias=bias[:, :, None],  # (B, H, 1)
            extra_valid=(n_d > 0)[:, :, None],
        )
