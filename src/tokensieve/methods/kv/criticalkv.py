"""CriticalKV: correct any scorer by how far each entry's value would move the attention output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod, WrapperMethod
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...scorers.output import projected_value_norms
from ...selection import Selection
from ...selection.topk import protected_mask, topk_select
from .snapkv import SnapKV


@register
@dataclass(frozen=True)
class CriticalKV(WrapperMethod):
    """CriticalKV: attention weight alone ignores how much an entry moves the output; bound the output perturbation by
    attention × projected value norm and select in two stages (Feng et al., "CriticalKV: Optimizing KV Cache Eviction
    from an Output Perturbation Perspective", arXiv:2502.03805).

    Select, per row with budget ``b``: stage 1 keeps the protected tokens and the best ``⌊b·first_stage⌋`` by the
    base score ``s_j``; stage 2 fills the rest by ``s'_j = (s_j + ε) · mean_{h ∈ group} ‖v_j W_o^{(h)}‖₁``
    (``W_o^{(h)}``: query head ``h``'s slice of the layer's output projection).

    Choices (kvpress's defaults): base SnapKV, first_stage 0.5, ε 1e-4. The base method's protected tokens (SnapKV's
    window) are kept first and count inside stage 1, as everywhere in tokensieve (kvpress gives them the maximal base
    score, the same unless the window exceeds stage 1). Composes: ``adakv[base=criticalkv]`` is CriticalAdaKV — AdaKV
    shares the layer's budget across heads by the base scores, then the two stages run inside each head's budget.
    """

    name: ClassVar[str] = "criticalkv"
    paper: ClassVar[str] = (
        "CriticalKV: Optimizing KV Cache Eviction from an Output Perturbation Perspective (arXiv:2502.03805)"
    )
    rule: ClassVar[str] = "stage 1: top b/2 by base s_j; stage 2: top (s_j + eps) * mean_group ||v_j W_o^h||_1"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        needs_attention=True,
        rescorable=False,  # reads the model's output projections, which a decoding cache does not carry
    )
    base: PrefillMethod = field(default_factory=SnapKV)
    first_stage: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.first_stage <= 1.0 or self.epsilon < 0:
            raise ConfigError("criticalkv: first_stage must be in [0, 1] and epsilon >= 0.")
        self.check_base(uniform=True)

    def chunk_refusal(self) -> str | None:
        # not rescorable only for want of the output projections, which a chunked prefill carries (RunState.weights)
        return self.base.chunk_refusal()

    def select(self, scores: Tensor, counts: Tensor, ctx: LayerContext) -> Selection:
        weights = ctx.run.weights
        w_o = None if weights is None or ctx.layer_idx >= len(weights.out_proj) else weights.out_proj[ctx.layer_idx]
        if w_o is None:
            raise CapabilityError(
                "criticalkv needs the layer's attention output projection, which the model adapter did not find "
                f"(layer {ctx.layer_idx}); use the base method alone."
            )
        sink, recent = ctx.run.sink, ctx.run.recent
        sink_m, rec_m = protected_mask(ctx.selectable, sink, recent)
        n_prot = (sink_m | rec_m).sum(-1)[:, None].expand_as(counts)  # (B, H)
        first = torch.minimum(counts, torch.maximum(n_prot, torch.floor(counts * self.first_stage).long()))
        stage1 = topk_select(scores, first, ctx.selectable, sink=sink, recent=recent).mask(ctx.length)
        norms = projected_value_norms(ctx.values, w_o, ctx.num_q_heads).to(scores.device)
        corrected = (scores.float() + self.epsilon) * norms
        corrected = corrected.masked_fill(stage1, float("inf"))
        return topk_select(corrected, counts, ctx.selectable, sink=sink, recent=recent)
