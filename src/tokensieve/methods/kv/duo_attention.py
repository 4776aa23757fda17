"""DuoAttention: retrieval heads keep the whole cache, streaming heads keep sinks and a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.profiles import DuoGates
from ...core.registry import register
from ...errors import ConfigError
from ...scorers import recency_scores
from ...selection.allocation import full_or_window_counts


@register
@dataclass(frozen=True)
class DuoAttention(PrefillMethod):
    """DuoAttention: a per-model profile labels each KV head — a *retrieval* head keeps the whole cache, a *streaming*
    head keeps ``sink`` first and ``recent`` latest tokens (Xiao et al., "DuoAttention: Efficient Long-Context LLM
    Inference with Retrieval and Streaming Heads", arXiv:2410.10819).

    Score: none at inference; the profile's gates ``α_{l,h} ∈ [0, 1]`` (optimised so that ``α·full + (1 − α)·streaming``
    attention reproduces the full model, ``tokensieve profile duo``) rank the heads, most retrieval-like first.

    Choices: the paper fixes the share of streaming heads; here the budget does (every method stores the same number
    of entries): all heads keep the streaming window, then heads are promoted to retrieval heads in order of
    decreasing ``α`` while the budget allows, and the next head keeps what is left as a longer recent window; if the
    windows alone do not fit, every head keeps the same share. Window 64 sinks + 256 recent tokens (the paper's
    deployment example; ``tokensieve profile duo`` trains with the same by default). Prefill attention stays dense
    (the paper also makes streaming heads' prefill attention Λ-shaped; kvpress does not).
    """

    name: ClassVar[str] = "duo_attention"
    paper: ClassVar[str] = (
        "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads (arXiv:2410.10819)"
    )
    rule: ClassVar[str] = "profile gates rank heads: retrieval heads keep all, streaming heads sink + recent window"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        granularity=Granularity.HEAD,
        head_adaptive=True,
        layer_adaptive=True,
        profile="duo",
    )
    sink: int = 64
    recent: int = 256

    def __post_init__(self) -> None:
        if self.sink < 0 or self.recent < 1:
            raise ConfigError(f"duo_attention: sink must be >= 0 and recent >= 1; got {self.sink}, {self.recent}.")

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    def score(self, ctx: LayerContext) -> Tensor:
        return recency_scores(ctx)

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        key = ("duo_attention", self.sink, self.recent)
        if key not in ctx.run.scratch:
            profile: DuoGates = ctx.run.profile
            L, H = ctx.num_layers, ctx.num_kv_heads
            gates = torch.tensor(profile.gates, dtype=torch.float64).reshape(-1)  # (L·H,), layer-major
            order = torch.sort(-gates, stable=True).indices.tolist()  # most retrieval-like first
            rows = [
                full_or_window_counts(order, int(n), self.sink + self.recent, L * H * int(b)).reshape(L, H)
                for n, b in zip(ctx.run.n_tokens.tolist(), ctx.run.budget_tokens.tolist())
            ]
            ctx.run.scratch[key] = torch.stack(rows)  # (B, L, H)
        return ctx.run.scratch[key][:, ctx.layer_idx].clone()
