"""FASA's scorer used once, at prefill, to evict (a variant; the paper's method is ``fasa``, at decode time)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.profiles import FrequencyChunks
from ...core.registry import register
from ...errors import ConfigError
from ...scorers.frequency import dominant_chunks


def chunk_dim_mask(
    profile: FrequencyChunks, budget: int, head_dim: int, quantile: float, min_k: int, max_k: int
) -> Tensor:
    """``(L, H_kv, D)`` 0/1 mask of the dominant chunks' dimensions, from the CA slice whose K is nearest the budget."""
    ks = profile.ks
    ki = min(range(len(ks)), key=lambda i: abs(math.log(ks[i]) - math.log(max(1, budget))))
    ca = profile.ca[ki]  # [L][H][D/2]
    half = head_dim // 2
    mask = torch.zeros(len(ca), len(ca[0]), head_dim)
    for layer, heads in enumerate(ca):
        for h, row in enumerate(heads):
            for c in dominant_chunks(row, quantile, min_k, max_k):
                mask[layer, h, c] = 1.0
                mask[layer, h, c + half] = 1.0
    return mask


@register
@dataclass(frozen=True)
class FASAPrefill(PrefillMethod):
    """FASA-prefill: FASA's dominant-chunk score used once, at prefill, to evict — a variant of ours, not the
    paper's method (which is registered as ``fasa`` and acts at every decode step, evicting nothing); based on
    Wang et al., arXiv:2602.03152, ICLR 2026.

    Score: ``s_j = Σ_{i ∈ I_dom(l, h)} q^{[i]} · k_j^{[i]}`` — a raw partial dot product (no scaling, no softmax)
    over the dominant chunks ``I_dom`` of the layer's KV head, for the last ``window`` queries (mean), averaged over
    the KV head's query heads. Plain top-budget per KV head; no protected tokens.

    Profile (``tokensieve profile fasa``): per (layer, KV head) the contextual agreement of every chunk with the full
    logits' top-K on calibration text; the dominant chunks are those with CA ≥ the head's ``quantile`` (0.8),
    clamped to ``[min_chunks, max_chunks]`` (8 of 32 chunks = a quarter of the dimensions, the paper's 16-of-64
    ratio), taken from the CA slice whose K is nearest the budget.

    Choices: a frequency chunk is the RoPE rotation pair ``(i, i + D/2)`` of transformers' layout (the paper's
    definition); chunks are chosen per KV head (aggregating the group) so each cached head is read with one set of
    dimensions — the official code copies keys to every query head instead. This is the prefill-eviction form, with
    the prompt's last query standing in for the decoding query; layer 0 is compressed like the others so that
    every method stores the same number of entries.
    """

    name: ClassVar[str] = "fasa_prefill"
    paper: ClassVar[str] = "FASA: Frequency-Aware Sparse Attention (arXiv:2602.03152) — prefill-eviction variant"
    rule: ClassVar[str] = "s_j = sum over dominant RoPE chunks i of q^[i].k_j^[i] (last query, mean over the group)"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT, profile="fasa"
    )
    window: int = 1
    quantile: float = 0.8
    min_chunks: int = 8
    max_chunks: int = 8

    def __post_init__(self) -> None:
        if self.window < 1 or not 0 < self.quantile < 1 or not 1 <= self.min_chunks <= self.max_chunks:
            raise ConfigError(
                "fasa_prefill: window >= 1, 0 < quantile < 1 and 1 <= min_chunks <= max_chunks are required."
            )

    def _mask(self, ctx: LayerContext, budget: int) -> Tensor:
        key = ("fasa", budget)
        if key not in ctx.run.scratch:
            D = ctx.keys.shape[-1]
            ctx.run.scratch[key] = chunk_dim_mask(
                ctx.run.profile, budget, D, self.quantile, self.min_chunks, self.max_chunks
            )
        return ctx.run.scratch[key][ctx.layer_idx]  # (H_kv, D)

    def score(self, ctx: LayerContext) -> Tensor:
        B, H, T, D = ctx.keys.shape
        W = min(self.window, T)
        q = ctx.queries[:, :, T - W :].float().mean(2)  # (B, H_q, D)
        qg = q.view(B, H, ctx.group, D)  # (B, H_kv, G, D)
        out = torch.empty(B, H, T, device=ctx.keys.device)
        for b, budget in enumerate(ctx.run.budget_tokens.tolist()):
            qm = qg[b] * self._mask(ctx, int(budget))[:, None, :]  # (H_kv, G, D) only the dominant dims
            out[b] = torch.einsum("hgd,htd->ht", qm, ctx.keys[b].float()) / ctx.group
        return out
