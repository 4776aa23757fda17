"""Deferred: a method whose selection needs every layer's scores (its capabilities declare ``deferred``: KVzip pools
its scores over all layers and heads, SimLayerKV ranks layers, Retention takes a global top-k) scores each layer
during the forward pass and keeps the prompt whole; once every layer is scored it selects and applies for all of
them (:meth:`~tokensieve.core.method.PrefillMethod.choose`).

A method that also declares ``passes`` asks for auxiliary forward passes over the prompt's full cache first
(KVzip's "repeat the context"): :func:`run_passes` runs each with the prompt's positions continued, shows every
layer's pass queries and keys to the method (``observe_pass``), and forgets the pass's tokens (checkpoint and
rollback) — they are never kept nor counted. Then the selection runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...cache.dense import DenseKV
from ...cache.prefill import Chunk, Fresh, Plan
from ...cache.sieve_cache import SieveCache
from ...cache.storage import KVStore
from ...core.context import LayerContext
from ...core.method import AuxPass, Compressed
from ...errors import ConfigError
from ...selection import Selection
from .one_pass import OnePass, build


@dataclass
class _Pending:
    """A layer scored and kept whole until every layer is scored (and the auxiliary passes ran)."""

    ctx: LayerContext  # the prompt's keys, values and padding (queries only if the decode method needs them)
    scores: Tensor  # (B, H_kv, T), updated in place by auxiliary passes
    positions: Tensor  # (B, T) true positions of the chunk


class Deferred(OnePass):
    """Score every layer during the forward pass; select and apply for all of them once the last is scored (and,
    with ``passes``, once the engine ran the auxiliary passes and called :meth:`SieveCache.finish_prefill`)."""

    name = "deferred"

    def __init__(self, plan: Plan, passes: bool = False) -> None:
        super().__init__(plan)
        self.passes = passes
        self.pending: dict[int, _Pending] = {}
        self._aux: AuxPass | None = None  # the auxiliary pass being run, if any

    def compress(self, c: Chunk, ctx: LayerContext, out: Tensor | None) -> Fresh:
        """Score now, keep the prompt whole; select once every layer is scored."""
        assert self.plan is not None
        B, H, L = c.batch, int(c.k.shape[1]), c.length
        scores = self.method.score(ctx)
        decode = self.plan.decode
        keep_q = decode is not None and decode.declared().prefill_queries
        store = build(Compressed(Selection.keep_all(B, H, L, ctx.selectable)), c.k, c.v, c.positions, self.reserve)
        # the pending context reads the prompt's keys and values from the store: one copy of them, not two
        kk, vv = (store.keys, store.values) if isinstance(store, DenseKV) and store.n == L else (c.k, c.v)
        q = c.q if keep_q else c.q[:, :, :0]
        light = LayerContext(c.layer_idx, q, kk, vv, ctx.valid, c.scaling, ctx.run, tail=self.tail)
        self.pending[c.layer_idx] = _Pending(light, scores, c.positions)
        return Fresh(store, out, L - self.tail, ctx, pending=True)

    def append(self, store: KVStore, c: Chunk) -> Tensor:
        out = super().append(store, c)
        pending = self.pending.get(c.layer_idx)
        if self._aux is not None and pending is not None:
            self.method.observe_pass(pending.ctx, pending.scores, self._aux, c.q, c.k, c.real())
        return out

    def ready(self) -> bool:
        assert self.plan is not None
        return not self.passes and len(self.pending) == self.plan.shape.num_layers

    def finish(self, stores: Sequence[KVStore | None]) -> dict[int, tuple[KVStore, LayerContext | None]]:
        if not self.pending:
            return {}
        assert self.plan is not None
        if len(self.pending) != self.plan.shape.num_layers:
            raise RuntimeError("A deferred method's selection ran before every layer was scored.")
        pending, self.pending = self.pending, {}
        t0 = time.perf_counter()
        out: dict[int, tuple[KVStore, LayerContext | None]] = {}
        for layer_idx, rec in sorted(pending.items()):
            comp = self.method.choose(rec.ctx, rec.scores)
            out[layer_idx] = (build(comp, rec.ctx.keys, rec.ctx.values, rec.positions, self.reserve), rec.ctx)
        self.stats.compress_seconds += time.perf_counter() - t0
        return out

    @contextlib.contextmanager
    def observing(self, aux: AuxPass) -> Iterator[None]:
        """Within this block, every layer's appended chunk is an auxiliary pass shown to the method."""
        if not self.pending:
            raise ConfigError("An auxiliary pass needs a deferred method's prefill to observe.")
        self._aux = aux
        try:
            yield
        finally:
            self._aux = None


def run_passes(
    cache: SieveCache, mode: Deferred, forward: Callable[[Tensor, Tensor, Tensor], Any], mask: Tensor,
    passes: list[AuxPass],
) -> None:  # fmt: skip
    """The method's auxiliary passes over the prompt's full cache (``forward(ids, mask, positions)`` runs the model
    through ``cache``), each forgotten once its queries were shown to the method; then every layer is compressed."""
    t0 = time.perf_counter()
    start = mask.sum(-1, keepdim=True)  # each sequence's passes continue its own prompt
    for aux in passes:
        mark = cache.checkpoint()
        aux_mask = aux.attention_mask.to(mask.dtype)
        positions = start + (aux_mask.cumsum(-1) - 1).clamp_min(0)
        with mode.observing(aux):
            forward(aux.input_ids, torch.cat([mask, aux_mask], dim=1), positions)
        cache.rollback(mark)
    cache.stats.compress_seconds += time.perf_counter() - t0
    cache.finish_prefill()


__all__ = ["Deferred", "run_passes"]
