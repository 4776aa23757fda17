"""PyramidKV: SnapKV scores with budgets that shrink from the bottom layers to the top."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.registry import register
from ...errors import ConfigError
from ...selection.allocation import round_to_total
from .snapkv import SnapKV


def pyramid_schedule(budget: int, n_tokens: int, num_layers: int, window: int, beta: float) -> list[int]:
    """Per-layer entry counts, linearly decreasing with depth, summing exactly to ``num_layers * budget``.

    Follows the PyramidKV schedule: ``base = b − w``, ``min = base/β``, ``max = 2·base − min`` (if ``max ≥ T − w``:
    ``max = T − w``, ``min = 2·base − max``), ``b_l = max − l·(max − min)/(L − 1) + w``. ``w`` is the kept window,
    ``min(window, b // 2)`` — our choice so that budgets smaller than the window still give a pyramid.
    """
    L = num_layers
    w = min(window, budget // 2)
    base = budget - w
    mn = base / beta
    mx = 2 * base - mn
    if mx >= n_tokens - w:
        mx = n_tokens - w
        mn = 2 * base - mx
    step = (mx - mn) / (L - 1) if L > 1 else 0.0
    raw = torch.tensor([[mx - i * step + w for i in range(L)]], dtype=torch.float64)
    total = torch.tensor([L * budget])
    return round_to_total(raw, total, lo=1, hi=n_tokens)[0].tolist()


@register
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scoring with a pyramid of layer budgets — more entries in lower layers, fewer in upper ones
    (Cai et al., arXiv:2406.02069).

    Score: SnapKV's (observation-window attention, pooled, mean over the KV group).
    Layer budgets: ``b_l = max − l·(max − min)/(L − 1) + w`` with ``min = (b − w)/β``, ``max = 2(b − w) − min``
    (β = 20), rounded so that ``Σ_l b_l = L·b`` exactly: the same total as every other method at that budget.

    Choices: the defaults of the authors' experiments (KVCache-Factory): observation window 8, max pooling with
    kernel 7.
    """

    name: ClassVar[str] = "pyramidkv"
    paper: ClassVar[str] = (
        "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (arXiv:2406.02069)"
    )
    rule: ClassVar[str] = "SnapKV scores; b_l falls linearly with depth (beta=20), sum_l b_l = L*b"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT, needs_attention=True, layer_adaptive=True
    )
    window: int = 8  # the window of the PyramidKV / KVCache-Factory experiments (SnapKV's own default is 32)
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 1:
            raise ConfigError(f"pyramidkv: beta must be > 1, got {self.beta}.")

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        key = ("pyramid", self.window, self.beta)
        if key not in ctx.run.scratch:
            rows = [
                pyramid_schedule(int(b), int(n), ctx.num_layers, self.window, self.beta)
                for b, n in zip(ctx.run.budget_tokens.tolist(), ctx.run.n_tokens.tolist())
            ]
            ctx.run.scratch[key] = torch.tensor(rows, dtype=torch.long)  # (B, L)
        per_layer = ctx.run.scratch[key][:, ctx.layer_idx]  # (B,)
        return per_layer[:, None].expand(ctx.batch, ctx.num_kv_heads).clone()
