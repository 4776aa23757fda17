"""AdaKV: head-adaptive budgets on top of any scorer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod, WrapperMethod
from ...core.registry import register
from ...errors import ConfigError
from ...selection import Selection
from ...selection.allocation import round_to_total
from ...selection.topk import protected_mask
from .snapkv import SnapKV


def adaptive_head_counts(scores: Tensor, counts: Tensor, valid: Tensor, protected: Tensor, alpha: float) -> Tensor:
    """Redistribute a layer's budget across KV heads by a global top-k over all heads' scores.

    Args:
        scores: ``(B, H, T)``; counts: ``(B, H)`` the base (uniform) allocation; valid ``(B, T)``;
        protected: ``(B, H, T)`` bool, tokens every head keeps anyway.
        alpha: safeguard share — each head gets at least ``alpha`` of its uniform share of the free budget.

    Returns:
        ``(B, H)`` counts with the same row sums as ``counts``.
    """
    B, H, T = scores.shape
    n_prot = torch.minimum(protected.sum(-1), counts)  # (B, H); a budget below the protected set keeps part of it
    free = counts - n_prot  # (B, H) uniform free budget per head
    avail = (valid[:, None, :] & ~protected).sum(-1)  # (B, H) candidates per head
    s = scores.float().masked_fill(~valid[:, None, :] | protected, float("-inf")).reshape(B, H * T)
    out = torch.empty_like(counts)
    for b in range(B):
        total = int(free[b].sum())
        n_h = torch.zeros(H, dtype=torch.float64)
        if total > 0:
            top = s[b].topk(min(total, H * T)).indices
            top = top[torch.isfinite(s[b, top])]
            n_h = torch.bincount(top // T, minlength=H).double()
        cap = n_h * (1 - alpha) + alpha * free[b].double()
        alloc = round_to_total(cap[None], torch.tensor([total]), lo=0, hi=avail[b][None])[0]
        out[b] = alloc + n_prot[b]
    return out


@register
@dataclass(frozen=True)
class AdaKV(WrapperMethod):
    """AdaKV: heads that concentrate their attention get fewer entries, diffuse heads more (Feng et al.,
    arXiv:2407.11550).

    Score: the base method's (``base``, SnapKV by default). Allocation: the layer's total ``H_kv · b_l`` is shared
    by a global top-k over all heads' scores (``n_h`` winners per head), softened by a safeguard
    ``cap_h = n_h (1 − α) + α · b_l`` (α = 0.2, as kvpress; the official logs also used 0.5); protected tokens are
    kept by every head and counted first; inside each head's budget the base method's own selection rule runs (top-k
    for most; CriticalKV's two stages, so ``adakv[base=criticalkv]`` is CriticalAdaKV). The cache stores each head's
    entries with its own length, so the uneven allocation saves memory for real. When the protected window (the base
    method's, 32 tokens for SnapKV) fills the whole budget, nothing is left to allocate and every head keeps the same
    recent tokens: the window is not shrunk, a :class:`~tokensieve.errors.TokensieveWarning` says so.
    """

    name: ClassVar[str] = "adakv"
    paper: ClassVar[str] = "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (arXiv:2407.11550)"
    rule: ClassVar[str] = "base scores; per-head budgets from a global top-k across heads, safeguard alpha"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT, needs_attention=True, head_adaptive=True
    )
    base: PrefillMethod = field(default_factory=SnapKV)
    alpha: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"adakv: alpha must be in [0, 1], got {self.alpha}.")
        self.check_base(uniform=False)

    def select(self, scores: Tensor, counts: Tensor, ctx: LayerContext) -> Selection:
        sink_m, rec_m = protected_mask(ctx.selectable, ctx.run.sink, ctx.run.recent)
        prot = (sink_m | rec_m)[:, None, :].expand(scores.shape)
        head_counts = adaptive_head_counts(scores, counts, ctx.selectable, prot, self.alpha)
        return self.base.select(scores, head_counts, ctx)  # the base's own rule inside each head's budget
