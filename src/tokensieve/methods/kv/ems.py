"""EMS: evict-then-merge with a global-local importance score, head-wise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import Compressed, PrefillMethod
from ...core.registry import register
from ...errors import ConfigError
from ...scorers import pool1d
from ...selection import Selection


def _normalise(x: Tensor, valid: Tensor) -> Tensor:
    """Scale each row of ``(B, H, T)`` to sum 1 over valid tokens."""
    x = x.masked_fill(~valid[:, None, :], 0.0)
    return x / x.sum(-1, keepdim=True).clamp_min(1e-12)


def merge_into_centres(
    keys: Tensor, values: Tensor, weight: Tensor, kept: Tensor, candidates: Tensor, tau: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold each candidate token into its most similar kept token when their keys are similar enough.

    Args (one sequence):
        keys, values: ``(H, T, D)``; weight: ``(H, T)`` importance (merge weights);
        kept: ``(H, T)`` bool, the class centres; candidates: ``(H, T)`` bool, tokens that may be merged;
        tau: ``(H,)`` cosine-similarity threshold per head.

    Returns:
        ``(keys, values, members, merged)``: updated ``(H, T, D)`` tensors (only centres change), ``members (H, T)``
        number of tokens each entry now stands for, and ``merged (H, T)`` bool for candidates folded in.
        A merged centre is the importance-weighted mean of its members; its key is rescaled to the weighted mean
        of the members' key norms, so averaging does not shrink its logits.
    """
    H, T, D = keys.shape
    kn = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = torch.einsum("htd,hsd->hts", kn, kn)  # (H, T, T)
    sim = sim.masked_fill(~kept[:, None, :], float("-inf"))
    best_sim, centre = sim.max(-1)  # (H, T)
    merged = candidates & (best_sim >= tau[:, None])
    w = weight.clamp_min(1e-12) * (merged | kept)  # (H, T) only centres and merged members contribute
    target = torch.where(merged, centre, torch.arange(T).expand(H, T))  # each contributor's centre
    target = torch.where(kept | merged, target, torch.full_like(target, T))  # others go to a discard slot
    wk = torch.zeros(H, T + 1, D, dtype=keys.dtype).scatter_add_(
        1, target[..., None].expand(H, T, D), w[..., None] * keys
    )
    wv = torch.zeros(H, T + 1, D, dtype=values.dtype).scatter_add_(
        1, target[..., None].expand(H, T, D), w[..., None] * values
    )
    wn = torch.zeros(H, T + 1, dtype=keys.dtype).scatter_add_(1, target, w * keys.norm(dim=-1))
    ws = torch.zeros(H, T + 1, dtype=keys.dtype).scatter_add_(1, target, w)
    members = torch.zeros(H, T + 1, dtype=keys.dtype).scatter_add_(1, target, (kept | merged).to(keys.dtype))
    wk, wv, wn, ws, members = wk[:, :T], wv[:, :T], wn[:, :T], ws[:, :T], members[:, :T]
    has = kept & (members > 1)
    mean_k = wk / ws.clamp_min(1e-12)[..., None]
    mean_k = mean_k / mean_k.norm(dim=-1, keepdim=True).clamp_min(1e-12) * (wn / ws.clamp_min(1e-12))[..., None]
    new_k = torch.where(has[..., None], mean_k, keys)
    new_v = torch.where(has[..., None], wv / ws.clamp_min(1e-12)[..., None], values)
    return new_k, new_v, members.clamp_min(1), merged


@register
@dataclass(frozen=True)
class EMS(PrefillMethod):
    """EMS: evict-then-merge — a global-local score picks the tokens to keep, and of the rest each head merges
    the redundant ones into the kept tokens and evicts the others (arXiv:2412.08521).

    Score: ``s = λ·ĝ + (1 − λ)·l̂`` where ``g_j = Σ_i A_ij`` is the attention accumulated over every query (global,
    biased towards early tokens) and ``l_j`` the mean attention of the last ``window`` queries (local, biased towards
    recent tokens), each normalised to sum 1 per head so the two biases cancel; averaged over each KV group.
    Select: top-budget per KV head, the local window protected. Apply, per head: a dropped token merges into the
    kept token whose key is most similar (cosine) when that similarity reaches ``τ_h = τ + (1 − τ)·ρ_h``, where
    ``ρ_h`` is the share of the head's importance kept — concentrated (sparse) heads merge less, diffuse (redundant)
    ones more; every other dropped token is evicted (the paper's "zero class").

    Choices (only the abstract and secondary descriptions are available; every concrete rule here is ours):
    λ = 0.5, τ = 0.5; merged centres are importance-weighted means of their members, keys rescaled to the members'
    weighted mean norm; a centre standing for ``m`` tokens gets a logit bias ``log m`` (``mass_bias``) so it keeps
    roughly the attention mass its members had. Merging changes no entry count: the budget is met exactly. The
    global-local score is max-pooled (kernel 7) over the keys before the window, as the SnapKV family's official
    configurations do — not from the EMS paper.

    Measured on the embedded model (single needle and multi-key, 1K tokens, query-aware, 50 % budget, the 36 samples
    of the methods screen in docs/EVALUATION.md): EMS answers 1/36, random's level, where SnapKV answers 29/36. The
    global term is the cause: with ``lam=0`` (the local window score alone, merging on) EMS answers 29/36, with
    ``lam=1`` (accumulated attention alone) 0/36, and without merging (``tau=1``) 2/36. Attention accumulated over
    every query favours the early tokens and the filler, as H2O's does (0/36 in the same cells), and half of it in
    the score is enough to push the needle's digits out. λ stays 0.5 (our reading of the paper's balance);
    ``ems[lam=0]`` is the setting that keeps the needle on this model.
    """

    name: ClassVar[str] = "ems"
    paper: ClassVar[str] = (
        "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local "
        "Importance (arXiv:2412.08521)"
    )
    rule: ClassVar[str] = "s = lam*norm(sum_i A_ij) + (1-lam)*norm(window attention); evict, then merge similar keys"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.MERGE, needs_attention=True
    )
    window: int = 32
    lam: float = 0.5
    tau: float = 0.5
    mass_bias: bool = True
    kernel: int = 7
    pooling: Literal["avg", "max", "none"] = "max"

    def __post_init__(self) -> None:
        if self.window < 1 or not 0 <= self.lam <= 1 or not -1 <= self.tau <= 1:
            raise ConfigError("ems: window >= 1, 0 <= lam <= 1 and -1 <= tau <= 1 are required.")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"ems: kernel must be an odd number >= 1, got {self.kernel}.")

    def protected(self) -> tuple[int, int]:
        return 0, self.window

    def score(self, ctx: LayerContext) -> Tensor:
        g = _normalise(ctx.accumulated_attention(), ctx.valid)  # (B, H_q, T)
        loc = _normalise(ctx.window_attention(self.window).mean(2), ctx.valid)
        s = self.lam * g + (1 - self.lam) * loc  # (B, H_q, T)
        prefix = ctx.length - min(self.window, ctx.length)  # the window is kept whole: pool the keys before it
        if prefix > 0:
            s = torch.cat([pool1d(s[..., :prefix], self.kernel, self.pooling), s[..., prefix:]], dim=-1)
        s = ctx.to_kv_heads(s, "mean")
        return s.masked_fill(~ctx.valid[:, None, :], 0.0)

    def apply(self, selection: Selection, ctx: LayerContext, scores: Tensor) -> Compressed:
        kept = selection.mask(ctx.length)  # (B, H, T)
        dropped = ctx.selectable[:, None, :] & ~kept
        keys, values = ctx.keys.clone(), ctx.values.clone()
        bias = torch.zeros(scores.shape, dtype=keys.dtype)
        for b in range(ctx.batch):
            if not bool(dropped[b].any()):
                continue
            rho = (scores[b] * kept[b]).sum(-1) / scores[b].sum(-1).clamp_min(1e-12)  # (H,)
            tau = self.tau + (1 - self.tau) * rho
            k, v, members, _ = merge_into_centres(keys[b], values[b], scores[b], kept[b], dropped[b], tau)
            keys[b], values[b] = k, v
            if self.mass_bias:
                bias[b] = torch.log(members)
        return Compressed(selection, keys=keys, values=values, bias=bias if self.mass_bias else None)
