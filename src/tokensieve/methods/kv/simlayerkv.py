"""SimLayerKV: "lazy" layers, which attend almost only to the first and the latest tokens, keep only those."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import ConfigError
from ...scorers import recency_scores
from ...scorers.laziness import sink_recent_mass
from ...selection.allocation import full_or_window_counts


@register
@dataclass(frozen=True)
class SimLayerKV(PrefillMethod):
    """SimLayerKV: a layer whose last query puts nearly all its attention on the first ``sink`` and the last
    ``recent`` tokens is lazy and keeps only those; the other layers keep everything — decided per input (Zhang et
    al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction", arXiv:2410.13846).

    Score (laziness of layer ``l``): ``m_l = Σ_{j ∈ first sink ∪ last recent} mean_h A_{last,j}`` (the last prompt
    query, every query head of the layer, itself included — the official decode-time rule, applied at the last prompt
    token). Layers are lazy in order of decreasing ``m_l``.

    Choices: the paper's threshold δ (model-specific, 0.65–0.9) is replaced by the budget, because every method here
    stores the same number of entries: all layers keep ``sink + recent`` (4 + 1024, the paper's) and the least lazy
    layers are promoted to the full prompt while the budget allows; the first layer that cannot be promoted whole keeps
    what is left as a longer recent window. If the windows alone do not fit, every layer keeps the same share (sinks
    and the latest tokens). One decision per sequence (kvpress averages over the batch). The decision needs every
    layer's score, so the prompt is kept whole during the forward pass and cut once all layers are scored.
    """

    name: ClassVar[str] = "simlayerkv"
    paper: ClassVar[str] = "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction (arXiv:2410.13846)"
    rule: ClassVar[str] = "m_l = attention of the last query on first sink + last recent tokens; lazy layers keep those"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        needs_attention=True,
        granularity=Granularity.LAYER,
        layer_adaptive=True,
        deferred=True,
        rescorable=False,
    )
    sink: int = 4
    recent: int = 1024

    def __post_init__(self) -> None:
        if self.sink < 0 or self.recent < 1:
            raise ConfigError(f"simlayerkv: sink must be >= 0 and recent >= 1; got {self.sink}, {self.recent}.")

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    def score(self, ctx: LayerContext) -> Tensor:
        ctx.run.scratch[("simlayerkv", ctx.layer_idx)] = sink_recent_mass(ctx, self.sink, self.recent)
        return recency_scores(ctx)

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        key = ("simlayerkv", "plan")
        if key not in ctx.run.scratch:
            L = ctx.num_layers
            mass = torch.stack([ctx.run.scratch[("simlayerkv", layer)] for layer in range(L)], dim=1)  # (B, L)
            rows = []
            for b in range(ctx.batch):
                order = torch.sort(mass[b], stable=True).indices.tolist()  # least lazy first
                n, budget = int(ctx.run.n_tokens[b]), int(ctx.run.budget_tokens[b])
                rows.append(full_or_window_counts(order, n, self.sink + self.recent, L * budget))
            ctx.run.scratch[key] = torch.stack(rows)  # (B, L)
        return ctx.run.scratch[key][:, ctx.layer_idx, None].expand(ctx.batch, ctx.num_kv_heads).clone()
