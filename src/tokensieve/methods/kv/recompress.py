"""Periodic re-compression: any prefill scorer keeps a generating cache within its budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...cache.decode import DecodeLayer, DecodeMethod, DecodeRun
from ...cache.storage import DenseKV
from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext, RunState
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from .snapkv import SnapKV


@register
@dataclass(frozen=True)
class Recompress(DecodeMethod):
    """Recompress: every ``interval`` decode steps, a prefill method re-scores the generating cache and evicts it
    back to the budget — bounded memory with any scorer (the SnapKV-style "compress again" policy, e.g. as used
    for long generations in the SnapKV and PyramidKV code bases).

    Score: the ``scorer`` method's own rule, applied to the stored entries with the queries of the last ``window``
    decode steps as its observation window (scorers that need all queries, like H2O's, see only those). Between
    re-compressions the cache grows by at most ``interval`` entries per row, so it stays within
    ``budget + interval`` (a prompt longer than that is re-compressed at the first step). The scorer must evict
    (not merge) and give every KV head the same count.
    """

    name: ClassVar[str] = "recompress"
    paper: ClassVar[str] = "decode-time use of a prefill scorer (e.g. SnapKV, arXiv:2404.14469)"
    rule: ClassVar[str] = "every `interval` steps: scorer(recent queries, stored keys) -> evict to the budget"
    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.DECODE}), apply=Apply.EVICT)
    scorer: PrefillMethod = field(default_factory=SnapKV)
    interval: int = 32
    window: int = 32

    def __post_init__(self) -> None:
        if self.interval < 1 or self.window < 1:
            raise ConfigError("recompress: interval and window must be >= 1.")
        inner = self.scorer
        if not isinstance(inner, PrefillMethod) or not inner.compresses or inner.capabilities.profile:
            raise ConfigError(f"recompress: scorer must be a profile-free prefill method, not '{self.scorer.name}'.")
        caps = inner.declared()
        if caps.apply.value != "evict" or caps.head_adaptive:
            raise ConfigError(f"recompress: scorer '{self.scorer.name}' must evict with the same count for every head.")
        if caps.deferred or not caps.rescorable:
            raise ConfigError(
                f"recompress: scorer '{self.scorer.name}' needs what only a prefill has (every prompt query at its "
                "true position, every layer at once, or the model's weights)."
            )

    def batch_refusal(self, budget: Budget, lengths: list[int]) -> str | None:
        if len(set(lengths)) > 1:
            return (
                "recompress re-compresses the whole batch at once, so prompts of different lengths "
                f"({sorted(set(lengths))} tokens) would be re-compressed at other steps than alone; run them one at "
                "a time or in batches of equal length."
            )
        return None

    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> dict[str, Any]:
        return {"queries": None}

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        store, state, run, scaling, layer_idx = layer.store, layer.state, layer.run, layer.scaling, layer.index
        out = store.attend(q, scaling)
        run.bytes_read += store.kv_bytes()
        buf = state.get("queries")
        buf = q if buf is None else torch.cat([buf, q], dim=2)[:, :, -self.window :]
        state["queries"] = buf
        budget = int(run.budget_tokens.max())
        if store.n > budget and ((run.step + 1) % self.interval == 0 or store.n > budget + self.interval):
            self._recompress(layer_idx, store, buf, budget, scaling, run)
        return out

    def _recompress(
        self, layer_idx: int, store: DenseKV, queries: Tensor, budget: int, scaling: float, run: DecodeRun
    ) -> None:
        B = store.keys.shape[0]
        valid = store.valid if store.valid is not None else torch.ones(B, store.n, dtype=torch.bool)
        rs = RunState(
            shape=run.shape,
            budget_tokens=torch.full((B,), budget, dtype=torch.long),
            n_tokens=valid.sum(-1),
            sink=self.scorer.protected()[0],
            recent=max(self.scorer.protected()[1], queries.shape[2]),
        )
        ctx = LayerContext(layer_idx, queries, store.keys, store.values, valid, scaling, rs)
        comp = self.scorer.compress(ctx)
        sel = comp.selection
        if comp.keys is not None or comp.extra_keys is not None or not sel.uniform:
            raise CapabilityError(f"recompress: scorer '{self.scorer.name}' did not give a plain, uniform eviction.")
        store.compact(sel.indices)
