"""Global retention gates ("Make Each Token Count"): one eviction policy ranks the entries of every layer and KV head
against one memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..core.capabilities import Apply, Capabilities, Phase
from ..core.context import LayerContext
from ..core.method import PrefillMethod
from ..core.registry import register
from ..errors import CapabilityError, ConfigError
from ..select.allocation import pooled_counts
from ..select.topk import protected_mask
from .retention_gate import KIND, RetentionGates
from .spkv_gate import gate_features


def log_retention_score(log_beta: Tensor, age: Tensor, lookahead: int = 1) -> Tensor:
    """``log G = log Σ_{k<n} β^{age+k} = age · log β + log(1 − β^n) − log(1 − β)`` (``n = lookahead``; ``n = 1``
    gives ``age · log β``, the geometric retention ``β^age``). ``log_beta`` and ``age`` broadcast."""
    s = age.to(log_beta.dtype) * log_beta
    if lookahead == 1:
        return s
    lb = log_beta.clamp(max=-1e-12)  # log(1 − e^x) for x < 0, computed stably
    return s + _log1mexp(lookahead * lb) - _log1mexp(lb)


def _log1mexp(x: Tensor) -> Tensor:
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register
@dataclass(frozen=True)
class Retention(PrefillMethod):
    """Global retention gates — "Make Each Token Count: Towards Improving Long-Context Performance with KV Cache
    Eviction" (Bui, Nguyen, Cohan, Ying; arXiv:2605.09649): lightweight gates give every KV entry a query-agnostic
    retention ``β ∈ (0, 1)`` per layer and KV head when its token is created; its importance decays geometrically
    with its age, and a final projection shared by all layers (:mod:`tokensieve.methods.retention_gate`) puts every
    layer's and head's scores on one scale, so that **one** global policy keeps the best entries of the whole model
    under one memory budget — each (layer, KV head) ends with its own number of entries (ragged cache).

    Rule at the end of the prompt (the next query at position ``n``; entry ``i`` of age ``a = n − i``):
    ``log G_i = a · log β_i`` (``lookahead = 1``, the code's default; ``lookahead = m`` scores the retention summed
    over the next ``m`` steps, ``β^a (1 − β^m) / (1 − β)``), then keep the ``L · H_kv · b`` highest ``log G`` of
    the whole model (``b`` = the run's per-head budget: the same total as a uniform method at that budget), protected
    tokens first. ``allocation="uniform"`` keeps the top ``b`` of each head instead (per-head budgets, i.e. the
    earlier TRIM-KV policy, for comparison).

    Choices: ``sink`` and ``window`` (tokens always kept at the start / end) default to 0 as in the authors' code;
    the gate learns whether to keep the first token. The paper trains the gates with a KL loss to the full model
    and a capacity penalty; ours regress an attention oracle on the frozen model (``tokensieve train retention``,
    docs/SPKV.md). Prefill attention is the model's dense causal attention; the selection shapes what is stored.

    Decoding: the authors' cache also evicts while generating (globally, when the total exceeds the budget plus a
    buffer); that is **not implemented** here — after this prefill, decoded tokens are appended to every head and
    nothing more is evicted, and ``retention`` is not a decode method (``decode="retention"`` is refused).
    """

    name: ClassVar[str] = "retention"
    paper: ClassVar[str] = (
        "Make Each Token Count: Towards Improving Long-Context Performance with KV Cache Eviction (arXiv:2605.09649)"
    )
    rule: ClassVar[str] = (
        "log beta = gate_l(k_i, v_i) with a final projection shared by all layers; keep the global top-k of "
        "(n - i) * log beta over every layer and KV head"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        head_adaptive=True,
        layer_adaptive=True,
        profile=KIND,
    )
    deferred: ClassVar[bool] = True  # the global top-k needs every layer's scores
    rescorable: ClassVar[bool] = False  # scores come from each entry's own keys and values and its age

    sink: int = 0
    window: int = 0
    lookahead: int = 1
    allocation: Literal["global", "uniform"] = "global"

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 0:
            raise ConfigError(f"retention: sink and window must be >= 0, got {self.sink}, {self.window}.")
        if self.lookahead < 1:
            raise ConfigError(f"retention: lookahead must be >= 1, got {self.lookahead}.")
        if self.allocation not in ("global", "uniform"):
            raise ConfigError(f"retention: allocation must be 'global' or 'uniform', got {self.allocation!r}.")

    def protected(self) -> tuple[int, int]:
        return self.sink, self.window

    @staticmethod
    def _gates(profile: Any) -> RetentionGates:
        if not isinstance(profile, RetentionGates):
            raise CapabilityError(
                "retention needs its trained gates (a 'retention' profile); see `tokensieve train retention`."
            )
        return profile

    # -- score: log G of every entry --------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> Tensor:
        gates = self._gates(ctx.run.profile)
        shape = ctx.run.shape
        rope = shape.rope[ctx.layer_idx] if shape.rope else None
        feats = gate_features(ctx.keys, ctx.values, ctx.positions, rope)  # (B, T, F)
        log_beta = gates.log_beta(ctx.layer_idx, feats).permute(0, 2, 1)  # (B, H, T)
        pos = ctx.positions
        newest = pos.max(-1, keepdim=True).values  # (B, 1): the last real token; the next query is one later
        age = (newest + 1 - pos).clamp_min(1)[:, None, :]
        scores = log_retention_score(log_beta, age, self.lookahead)
        ctx.run.scratch[(KIND, ctx.layer_idx)] = scores
        return scores

    # -- allocate: one global top-k over layers, heads and tokens ------------------------------------------------------
    def layer_counts(self, ctx: LayerContext) -> Tensor:
        if self.allocation == "uniform":
            return super().layer_counts(ctx)
        key = (KIND, "plan")
        if key not in ctx.run.scratch:
            L, H = ctx.num_layers, ctx.num_kv_heads
            sink_m, recent_m = protected_mask(ctx.selectable, ctx.run.sink, ctx.run.recent)
            rows = []
            for b in range(ctx.batch):
                s = torch.stack([ctx.run.scratch[(KIND, layer)][b] for layer in range(L)]).float()  # (L, H, T)
                s = s.masked_fill(sink_m[b] | recent_m[b], float("inf"))  # protected tokens first
                s = s.masked_fill(~ctx.selectable[b], float("-inf"))
                total = min(L * H * int(ctx.run.budget_tokens[b]), int((s > float("-inf")).sum()))
                rows.append(pooled_counts(s.reshape(L * H, -1), total).reshape(L, H))
            ctx.run.scratch[key] = torch.stack(rows)  # (B, L, H)
        return ctx.run.scratch[key][:, ctx.layer_idx].clone()


__all__ = ["Retention", "log_retention_score"]
