"""SieveCache: compressed, possibly ragged, per-layer KV storage and the attention over it.

Data flow for one layer of one forward pass: the model's attention layer hands its post-RoPE queries, keys and
values to :meth:`SieveCache.attend` (through the attention hook of :mod:`tokensieve.adapters.hf`, the only code
that knows transformers), which dispatches — and does nothing else:

* a layer's first chunk goes to the cache's prefill mode (:mod:`tokensieve.cache.prefill`; the engine picks the mode:
  keep everything, compress in one pass, score every layer first, sparse prefill attention, chunk by chunk), which
  returns the attention output and what the layer stores;
* while a decode method runs, every later chunk goes to it (a bounded cache or sparse attention,
  :mod:`tokensieve.cache.decode`);
* otherwise a later chunk goes to the prefill mode again, which appends it and attends to the store.

The cache counts *logical* lengths (every token seen, so new tokens keep their true positions), while each
layer's store holds only what was kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..attention.dense import PLAIN, Modifiers
from ..core.budget import Budget
from ..core.context import LayerContext
from ..errors import CapabilityError, ConfigError
from .decode import DecodeLayer, DecodeMethod, DecodeRun
from .prefill import CacheStats, Chunk, Plan, PrefillMode, make_run
from .storage import DenseKV, KVStore


@dataclass
class LayerState:
    """One decoder layer's part of a SieveCache."""

    store: KVStore | None = None
    seen: int = 0  # logical tokens seen (padding included): what transformers calls the cache length
    seen_valid: Tensor | None = None  # (B,) real tokens seen per sequence
    decode: DecodeLayer | None = None  # the plan's decode method's view of this layer, once decoding started


class SieveCache:
    """A KV cache: one store per layer, filled by its prefill mode and, while decoding, its plan's decode method.

    Args:
        num_layers: decoder layers of the model.
        plan: the method, budget and decode method of the run; None keeps everything (the full-cache baseline).
        mode: how the cache takes a prompt (:class:`~tokensieve.cache.prefill.PrefillMode`, picked by the engine);
            default: keep every entry.
    """

    def __init__(self, num_layers: int, plan: Plan | None = None, mode: PrefillMode | None = None) -> None:
        self.layers = [LayerState() for _ in range(num_layers)]
        self.plan = plan
        self.mode = mode if mode is not None else PrefillMode(plan)
        self.stats = CacheStats()
        self.mode.stats = self.stats
        # Called as observer(layer_idx, q, store) after every appended chunk (profiling).
        self.observers: list[Callable[[int, Tensor, KVStore], None]] = []
        self.decode_run: DecodeRun | None = None
        self.front: Any = None  # the adapter's view of this cache for the model (created by adapters.hf)

    # ------------------------------------------------------------------------------------------------ queries
    def seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the layer has seen (padding included): the length the model's masks and positions follow."""
        return self.layers[layer_idx].seen

    def stores(self) -> list[KVStore]:
        return [layer.store for layer in self.layers if layer.store is not None]

    def kv_bytes(self) -> int:
        """Exact bytes of the stored keys and values (what the cache holds, headroom excluded)."""
        return sum(s.kv_bytes() for s in self.stores())

    def allocated_bytes(self) -> int:
        """Bytes of the key/value buffers, including headroom reserved for tokens still to come."""
        return sum(s.allocated_bytes() for s in self.stores())

    def meta_bytes(self) -> int:
        """Bookkeeping bytes: true positions of stored entries, logit biases, padding masks."""
        return sum(s.meta_bytes() for s in self.stores())

    def lengths(self) -> Tensor:
        """``(L, B, H_kv)`` number of stored entries per layer and row."""
        return torch.stack([s.lengths() for s in self.stores()])

    def stored_entries(self) -> int:
        return int(self.lengths().sum())

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens in every row (so decoding does not reallocate)."""
        for s in self.stores():
            s.reserve(extra)

    def checkpoint(self) -> list[tuple[Any, ...]]:
        """A mark to :meth:`rollback` to: the length of every layer's store (nothing is copied)."""
        marks = []
        for layer in self.layers:
            s = layer.store
            n: Any = None if s is None else (s.n if isinstance(s, DenseKV) else [r.n for r in s.rows])
            sv = None if layer.seen_valid is None else layer.seen_valid.clone()
            marks.append((s, n, None if s is None else s.evictions, layer.seen, sv))
        return marks

    def rollback(self, marks: list[tuple[Any, ...]]) -> None:
        """Forget the tokens appended since :meth:`checkpoint` — valid only if nothing was evicted meanwhile."""
        for layer, (store, n, evictions, seen, seen_valid) in zip(self.layers, marks):
            if store is not layer.store or (store is not None and store.evictions != evictions):
                raise ConfigError(
                    "Cannot roll back: entries were evicted or the store was rebuilt since the checkpoint; "
                    "use CachedContext.fork() before running a method that evicts while decoding."
                )
            if store is not None:
                store.truncate(n)
            layer.seen, layer.seen_valid = seen, seen_valid
        self._reset_decode()

    def reorder(self, rows: Tensor) -> None:
        """Keep sequence ``rows[i]`` as sequence ``i`` in every layer (beam search reorders its beams this way)."""
        if self.plan is not None and self.plan.decode is not None:
            raise CapabilityError(
                f"Beam search reorders the cache, and decode method '{self.plan.decode.name}' keeps per-sequence "
                "state that cannot follow; use greedy or sampling with it, or no decode method."
            )
        for layer in self.layers:
            if layer.store is not None:
                layer.store.reorder(rows)
            if layer.seen_valid is not None:
                layer.seen_valid = layer.seen_valid.index_select(0, rows)

    def set_decode(self, method: DecodeMethod | None, budget: Budget | None) -> None:
        """Attach (or replace, or remove) the decode method of a prefilled cache; its state starts afresh."""
        if self.plan is None:
            raise ConfigError("This cache has no plan; create it with Compressor.new_cache().")
        self.plan = replace(self.plan, decode=method, decode_budget=budget)
        self._reset_decode()

    def _reset_decode(self) -> None:
        """The decode method starts afresh: its run state and every layer's state are rebuilt at the next step."""
        self.decode_run = None
        for layer in self.layers:
            if layer.decode is not None:
                layer.decode = None

    # ------------------------------------------------------------------------------------------------ attention
    def attend(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        padding_mask: Tensor | None,
        scaling: float,
        positions: Tensor | None = None,
        mods: Modifiers = PLAIN,
        hidden: Tensor | None = None,
    ) -> Tensor:
        """Store this layer's new keys/values and return the attention output.

        q ``(B, H_q, L, D)``; k, v ``(B, H_kv, L, D)`` post-RoPE; padding_mask ``(B, seen + L)`` (1 = real token)
        or None; positions ``(B|1, L)``: the positions the model rotated the chunk with (None: counted from the
        real tokens seen); mods: the layer's sliding window and logit soft-capping; hidden ``(B, L, d)``: the hidden
        states the layer read (learned scorers read them; None: not captured). Returns ``(B, H_q, L, D)``.
        """
        out = self.take(self.chunk(layer_idx, q, k, v, padding_mask, scaling, positions, mods, hidden))
        assert out is not None
        return out

    def chunk(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        padding_mask: Tensor | None,
        scaling: float,
        positions: Tensor | None = None,
        mods: Modifiers = PLAIN,
        hidden: Tensor | None = None,
    ) -> Chunk:
        """The layer's chunk with its padding (``(B, L)`` or None) and true positions (-1 at padding)."""
        layer = self.layers[layer_idx]
        B, _, L, _ = k.shape
        valid: Tensor | None = None
        if padding_mask is not None:
            if padding_mask.dim() != 2:
                raise ValueError(
                    "tokensieve attention expects a 2-D padding mask (batch, tokens); custom 4-D masks are not "
                    "supported."
                )
            valid = padding_mask[:, -L:].to(torch.bool)
            if bool(valid.all()):
                valid = None
        seen_valid = layer.seen_valid
        if seen_valid is None:
            seen_valid = torch.zeros(B, dtype=torch.long, device=k.device)
        if positions is not None:
            pos = positions.long().expand(B, L)
        elif valid is None:
            pos = seen_valid[:, None] + torch.arange(L, device=k.device)
        else:
            pos = seen_valid[:, None] + valid.long().cumsum(-1) - 1
        if valid is not None:
            pos = torch.where(valid, pos, torch.full_like(pos, -1))
        return Chunk(layer_idx, q, k, v, valid, pos, scaling, mods, layer.seen, hidden)

    def take(self, c: Chunk, *, output: bool = True) -> Tensor | None:
        """Store one layer's chunk and return its attention output — ``output=False`` (a recorded prefill replayed
        into this fresh cache): the first chunk's attention is not computed and None is returned."""
        layer = self.layers[c.layer_idx]
        if layer.seen_valid is None:
            layer.seen_valid = torch.zeros(c.batch, dtype=torch.long, device=c.k.device)
        L = c.length
        decode = self.plan.decode if self.plan is not None else None
        counted = L  # tokens of this chunk that count as seen
        out: Tensor | None
        if layer.store is None:
            fresh = self.mode.fresh(c, output)
            layer.store, out, counted = fresh.store, fresh.out, fresh.counted
            if decode is not None and not fresh.pending:
                n_prompt = layer.seen_valid + (L if c.valid is None else c.valid.sum(-1)) - (L - counted)
                ctx = fresh.ctx if fresh.ctx is not None else self._prompt_context(c, decode)
                self._start_decode(decode, c.layer_idx, c.scaling, ctx, n_prompt)
        elif decode is not None:
            out = self._decode_step(layer, c, decode)
        else:
            out = self.mode.append(layer.store, c)
            if L == 1:
                self.stats.decode_bytes_read += layer.store.kv_bytes()
            for observe in self.observers:
                observe(c.layer_idx, c.q, layer.store)
        layer.store = self.mode.settle(c, layer.store)
        layer.seen += counted
        n_real = L if c.valid is None else c.valid.sum(-1)
        layer.seen_valid = layer.seen_valid + n_real - (L - counted)
        if self.mode.ready():
            self.finish_prefill()  # the forward pass went through every layer: the mode decides now
        return out

    def finish_prefill(self) -> None:
        """The prompt is in: the layers the prefill mode replaces now get their stores (a method that selects once
        every layer is scored), and a decode method starts on them."""
        done = self.mode.finish([layer.store for layer in self.layers])
        if self.plan is None or self.plan.decode is None:
            for layer_idx, (store, _) in done.items():
                self.layers[layer_idx].store = store
            return
        for layer_idx, (store, _) in sorted(done.items()):
            self.layers[layer_idx].store = store
        for layer_idx, (_, ctx) in sorted(done.items()):
            layer = self.layers[layer_idx]
            assert layer.seen_valid is not None
            assert ctx is not None
            self._start_decode(self.plan.decode, layer_idx, ctx.scaling, ctx, layer.seen_valid)

    def _prompt_context(self, c: Chunk, decode: DecodeMethod) -> LayerContext | None:
        """The whole prompt's context for a decode method that starts from its queries (the mode kept it whole)."""
        if not decode.declared().prefill_queries:
            return None
        assert self.plan is not None
        valid = c.real()
        run = make_run(replace(self.plan, budget=Budget.ratio(1.0)), valid.sum(-1))
        return LayerContext(c.layer_idx, c.q, c.k, c.v, valid, c.scaling, run, hidden=c.hidden)

    def _decode_step(self, layer: LayerState, c: Chunk, decode: DecodeMethod) -> Tensor:
        """A later chunk while a decode method runs: appended to its view of the layer; a single token is its step."""
        if not c.mods.plain:  # refused when the Compressor is built; this guards direct use
            raise CapabilityError(
                f"Decode method '{decode.name}' does not support sliding-window or soft-capped attention yet."
            )
        if layer.decode is None:  # the decode method was attached after the prefill
            assert layer.seen_valid is not None
            self._start_decode(decode, c.layer_idx, c.scaling, None, layer.seen_valid)
        dl = layer.decode
        assert dl is not None
        L = c.length
        dl.store.append(c.k, c.v, c.positions, c.valid)
        dl.hidden, dl.positions = c.hidden, c.positions
        t0 = time.perf_counter()  # the method's bookkeeping counts as attention time
        decode.on_append(dl, L)
        out = decode.step(dl, c.q) if L == 1 else dl.store.attend(c.q, c.scaling)
        self.stats.timed(L, t0)
        if L == 1 and c.layer_idx == len(self.layers) - 1:
            dl.run.step += 1
        return out

    def bytes_read(self) -> int:
        """KV (and page metadata) bytes read by decode-step attention so far, over all layers."""
        return self.stats.decode_bytes_read + (self.decode_run.bytes_read if self.decode_run is not None else 0)

    def _start_decode(
        self, method: DecodeMethod, layer_idx: int, scaling: float, ctx: LayerContext | None, n_prompt: Tensor
    ) -> None:
        """Hand a layer to the decode method, once per run: its store as equal-length rows, and the method's setup."""
        layer = self.layers[layer_idx]
        assert layer.store is not None
        dense = method.decode_store(layer.store)  # equal-length rows (ragged ones for a method that decodes from them)
        layer.store = dense
        layer.decode = DecodeLayer(layer_idx, dense, self._decode_run(n_prompt), scaling)  # type: ignore[arg-type]
        layer.decode.state = method.setup(layer.decode, ctx)

    def _decode_run(self, n_prompt: Tensor) -> DecodeRun:
        """The decode method's run state, created once; its budget is resolved from each prompt's length."""
        if self.decode_run is None:
            assert self.plan is not None
            assert self.plan.decode is not None
            budget = self.plan.decode_budget or Budget.ratio(1.0)
            tokens = [budget.tokens_for(max(1, int(n)), larger="keep") for n in n_prompt.tolist()]
            self.decode_run = DecodeRun(
                self.plan.shape, torch.tensor(tokens, dtype=torch.long), budget, profile=self.plan.decode_profile
            )
        return self.decode_run


__all__ = ["CacheStats", "Chunk", "LayerState", "Plan", "SieveCache", "make_run"]
