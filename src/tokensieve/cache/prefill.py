"""Prefill modes: how a cache takes a prompt.

A :class:`~tokensieve.cache.sieve_cache.SieveCache` stores; its prefill mode decides what to store. For every layer
of every forward pass the cache hands the layer's chunk (:class:`Chunk`) to its mode and keeps what the mode returns:

* :meth:`PrefillMode.fresh` — the layer's first chunk (the prompt, or its first part): its attention output and the
  store the layer starts with;
* :meth:`PrefillMode.append` — a later chunk (a question, an auxiliary pass, the next part of a chunked prompt): the
  chunk is appended and attended to;
* :meth:`PrefillMode.settle` — after either, the store the layer keeps (a chunked prefill re-compresses here);
* :meth:`PrefillMode.finish` — once the prompt is in (after the forward pass, or after the auxiliary passes the
  engine runs), the layers whose store is replaced now (a method that selects once every layer is scored).

This module holds the protocol and the mode of a cache that keeps every entry (no method, or one that does not
compress: the full cache); the modes that compress are the engine's (:mod:`tokensieve.engine.prefill`), one file
each, and the Compressor picks one when it is built. A mode knows the plan and the stores, never the cache.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..attention.dense import Modifiers, causal_attention
from ..core.budget import Budget
from ..core.context import LayerContext, LayerWeights, ModelShape, RunState
from ..core.method import Method
from ..errors import TokensieveWarning
from .decode import DecodeMethod
from .dense import DenseKV
from .storage import KVStore


@dataclass(frozen=True)
class Plan:
    """What a cache does with a prompt: method, budget, and the per-model profile it needs."""

    method: Method
    budget: Budget
    shape: ModelShape
    profile: Any = None
    reserve: int = 0  # headroom per row for tokens still to come (generated tokens, a question)
    decode: DecodeMethod | None = None  # acts at every decode step (bounded cache or sparse attention)
    decode_budget: Budget | None = None
    decode_profile: Any = None  # the decode method's profile contents, if it needs one
    weights: LayerWeights | None = None  # model weights some scorers read (CriticalKV's output projections)


@dataclass
class CacheStats:
    compress_seconds: float = 0.0
    # Time inside attention for multi-token chunks (all layers): a fresh prefill's causal or sparse prefill attention,
    # the chunks of a chunked prefill, appended multi-token chunks (a question, auxiliary passes).
    prefill_attention_seconds: float = 0.0
    decode_attention_seconds: float = 0.0  # time inside attention for single-token steps (all layers)
    decode_attention_calls: int = 0
    decode_bytes_read: int = 0  # KV bytes read by dense attention in single-token steps (all layers)
    compressed_tokens: list[int] = field(default_factory=list)  # per sequence
    budget_tokens: list[int] = field(default_factory=list)  # per sequence, per (layer, KV head) on average

    def timed(self, L: int, t0: float) -> None:
        """Count the time since ``t0`` as attention time of an ``L``-token chunk (a decode step when ``L == 1``)."""
        if L == 1:
            self.decode_attention_seconds += time.perf_counter() - t0
            self.decode_attention_calls += 1
        else:
            self.prefill_attention_seconds += time.perf_counter() - t0


@dataclass(frozen=True)
class Chunk:
    """One layer's chunk as the model hands it to the cache (and the cache to its mode).

    Attributes:
        layer_idx: the decoder layer.
        q: ``(B, H_q, L, D)`` queries; k, v: ``(B, H_kv, L, D)`` keys and values (post-RoPE).
        valid: ``(B, L)`` bool, the real tokens; None when the chunk has no padding.
        positions: ``(B, L)`` true position of each token, -1 at padding.
        scaling: the softmax scale; mods: the layer's sliding window and logit soft-capping.
        seen: tokens the layer had seen before this chunk (padding included).
        hidden: ``(B, L, d)`` the hidden states the layer read (learned scorers read them), or None: not captured.
    """

    layer_idx: int
    q: Tensor
    k: Tensor
    v: Tensor
    valid: Tensor | None
    positions: Tensor
    scaling: float
    mods: Modifiers
    seen: int = 0
    hidden: Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.k.shape[2])

    @property
    def batch(self) -> int:
        return int(self.k.shape[0])

    def real(self) -> Tensor:
        """``(B, L)`` bool: the real tokens (all of them without padding)."""
        if self.valid is not None:
            return self.valid
        return torch.ones(self.batch, self.length, dtype=torch.bool, device=self.k.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.hidden) if t is not None)


@dataclass
class Fresh:
    """What a mode made of a layer's first chunk.

    Attributes:
        store: what the layer stores from now on.
        out: ``(B, H_q, L, D)`` the chunk's attention output (None when the caller did not ask for it: a replay).
        counted: tokens of the chunk that count as seen (trailing auxiliary tokens do not).
        ctx: the chunk's layer context when the mode compressed it (a decode method that starts from the prompt's
            queries reads it), else None.
        pending: the layer keeps the whole chunk until every layer is scored (:meth:`PrefillMode.finish` replaces its
            store): no decode method starts on it yet.
    """

    store: KVStore
    out: Tensor | None
    counted: int
    ctx: LayerContext | None = None
    pending: bool = False


class PrefillMode:
    """The mode of a cache that keeps every entry (the full cache), and the base of every mode.

    Args:
        plan: the cache's plan (its reserve is the headroom of every new store); None: a plain cache.
    """

    name = "full"

    def __init__(self, plan: Plan | None = None) -> None:
        self.plan = plan
        self.stats = CacheStats()  # the cache's statistics: a cache gives its mode its own object when created

    @property
    def reserve(self) -> int:
        return self.plan.reserve if self.plan is not None else 0

    # -------------------------------------------------------------------------------------------- the protocol
    def attention(self, c: Chunk) -> Tensor:
        """``(B, H_q, L, D)`` the first chunk's attention output: causal attention over the chunk itself."""
        return causal_attention(c.q, c.k, c.v, c.valid, c.scaling, c.mods)

    def fresh(self, c: Chunk, output: bool) -> Fresh:
        """A layer's first chunk: its attention output (``output=False``: not computed — a recorded prefill replayed)
        and what the layer stores. Here: every entry."""
        return self.keep(c, self.timed_attention(c, output))

    def append(self, store: KVStore, c: Chunk) -> Tensor:
        """A later chunk of a layer: appended to ``store`` and attended to (causally over the stored entries)."""
        store.append(c.k, c.v, c.positions, c.valid)
        t0 = time.perf_counter()
        out = store.attend(c.q, c.scaling, c.mods)
        self.stats.timed(c.length, t0)
        return out

    def settle(self, c: Chunk, store: KVStore) -> KVStore:
        """The store a layer keeps once a chunk (fresh or appended) is in. Here: the store as it is."""
        return store

    def ready(self) -> bool:
        """Whether :meth:`finish` is due now that a forward pass went through every layer (False: nothing waits, or
        the engine calls it after its auxiliary passes)."""
        return False

    def finish(self, stores: Sequence[KVStore | None]) -> dict[int, tuple[KVStore, LayerContext | None]]:
        """The layers whose store is replaced now that the prompt is in (``stores``: every layer's store), with the
        context a decode method starts from (``{layer: (store, ctx)}``). Here: none."""
        return {}

    # ---------------------------------------------------------------------------------------------- helpers
    def timed_attention(self, c: Chunk, output: bool) -> Tensor | None:
        t0 = time.perf_counter()
        out = self.attention(c) if output else None
        self.stats.prefill_attention_seconds += time.perf_counter() - t0
        return out

    def keep(self, c: Chunk, out: Tensor | None) -> Fresh:
        """Every entry of the chunk, as one dense block with the plan's headroom."""
        B, H, L = c.batch, int(c.k.shape[1]), c.length
        store = DenseKV(c.k, c.v, c.positions[:, None, :].expand(B, H, L), valid=c.valid, reserve=self.reserve)
        store.identity_positions = c.valid is None and c.seen == 0
        return Fresh(store, out, L)


def make_run(plan: Plan, n_tokens: Tensor) -> RunState:
    """Resolve the plan's budget for each sequence (``n_tokens`` ``(B,)`` real tokens being compressed)."""
    budget_tokens = torch.tensor([plan.budget.tokens_for(int(n)) for n in n_tokens.tolist()], dtype=torch.long)
    sink, recent = plan.method.protected()
    if plan.budget.sink is not None:
        sink = plan.budget.sink
    if plan.budget.recent is not None:
        recent = plan.budget.recent
    smallest = int(budget_tokens.min())
    if plan.method.compresses and sink + recent > smallest:
        warnings.warn(
            f"'{plan.method.name}' protects {sink} sink + {recent} recent tokens but the budget keeps {smallest} "
            "entries per head: part of the protected tokens is dropped. Lower sink/recent or raise the budget.",
            TokensieveWarning,
            stacklevel=2,
        )
    return RunState(
        shape=plan.shape,
        budget_tokens=budget_tokens,
        n_tokens=n_tokens.clone(),
        sink=sink,
        recent=recent,
        profile=plan.profile,
        weights=plan.weights,
    )


__all__ = ["CacheStats", "Chunk", "Fresh", "Plan", "PrefillMode", "make_run"]
