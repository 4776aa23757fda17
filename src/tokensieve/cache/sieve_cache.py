"""SieveCache: compressed, possibly ragged, per-layer KV storage and the attention over it.

Data flow for one layer of one forward pass: the model's attention layer hands its post-RoPE queries, keys and
values to :meth:`SieveCache.attend` (through the attention hook of :mod:`tokensieve.adapters.hf`, the only code
that knows transformers), which either compresses a freshly prefilled chunk (score → select → apply) or appends
the chunk to the layer's store and runs our attention kernel over it — or, while decoding, hands the step to the
plan's decode method.

The cache counts *logical* lengths (every token seen, so new tokens keep their true positions), while each
layer's store holds only what was kept.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..attention.dense import PLAIN, Modifiers, causal_attention
from ..core.budget import Budget
from ..core.context import LayerContext, LayerWeights, ModelShape, RunState
from ..core.method import AuxPass, Compressed, Method, PrefillMethod
from ..errors import CapabilityError, ConfigError, TokensieveWarning
from ..select.selection import Selection
from .decode import DecodeLayer, DecodeMethod, DecodeRun
from .storage import DenseKV, KVStore, as_dense, build_store


@dataclass(frozen=True)
class Plan:
    """What a cache does to the next prefilled chunk: method, budget, and the per-model profile it needs."""

    method: Method
    budget: Budget
    shape: ModelShape
    profile: Any = None
    reserve: int = 0  # headroom per row for tokens still to come (generated tokens, a question)
    decode: DecodeMethod | None = None  # acts at every decode step (bounded cache or sparse attention)
    decode_budget: Budget | None = None
    decode_profile: Any = None  # the decode method's profile contents, if it needs one
    tail: int = 0  # trailing auxiliary tokens of the compressed chunk (attended to, never stored nor counted as seen)
    weights: LayerWeights | None = None  # model weights some scorers read (CriticalKV's output projections)
    passes: bool = False  # auxiliary passes follow the prefill: a deferred method selects when they are done


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


@dataclass
class LayerState:
    """One decoder layer's part of a SieveCache."""

    store: KVStore | None = None
    seen: int = 0  # logical tokens seen (padding included): what transformers calls the cache length
    seen_valid: Tensor | None = None  # (B,) real tokens seen per sequence
    decode: DecodeLayer | None = None  # the plan's decode method's view of this layer, once decoding started


@dataclass(frozen=True)
class LayerChunk:
    """One layer's chunk as the model hands it to :meth:`SieveCache.attend` (a recorded fresh prefill is replayed by
    :meth:`SieveCache.replay`)."""

    layer_idx: int
    q: Tensor
    k: Tensor
    v: Tensor
    padding_mask: Tensor | None
    scaling: float
    positions: Tensor | None
    mods: Modifiers


@dataclass
class _Deferred:
    """A layer of a deferred method, scored and kept whole until every layer is scored (and auxiliary passes ran)."""

    ctx: LayerContext  # the prompt's keys, values and padding (queries only if the decode method needs them)
    scores: Tensor  # (B, H_kv, T), updated in place by auxiliary passes
    positions: Tensor  # (B, T) true positions of the chunk


class SieveCache:
    """A KV cache that compresses the next prefilled chunk according to a :class:`Plan`.

    Args:
        num_layers: decoder layers of the model.
        plan: what to do with the next prefilled chunk; None keeps everything (the full-cache baseline).
    """

    def __init__(self, num_layers: int, plan: Plan | None = None) -> None:
        self.layers = [LayerState() for _ in range(num_layers)]
        self.plan = plan
        self.armed = plan is not None and plan.method.compresses
        self.run: RunState | None = None
        self.stats = CacheStats()
        self._compressed_layers = 0
        # Called as observer(layer_idx, q, store) after every appended chunk (profiling).
        self.observers: list[Callable[[int, Tensor, KVStore], None]] = []
        self.decode_run: DecodeRun | None = None
        self._deferred: dict[int, _Deferred] = {}  # layers scored by a deferred method, not yet selected
        self._aux: AuxPass | None = None  # the auxiliary pass being run, if any
        self.chunking = False  # a chunked prefill is running: every chunk is re-compressed once appended
        self._chunk_run: RunState | None = None  # its budgets, resolved from the whole prompt (None: keep all)

        self.front: Any = None  # the adapter's view of this cache for the model (created by adapters.hf)
        # While not None, every layer's fresh prefill is recorded here, to be replayed into other caches.
        self.recording: list[LayerChunk] | None = None

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

    def arm(self, plan: Plan | None = None) -> None:
        """Compress the next prefilled chunk (again) with ``plan`` (default: the current plan)."""
        if plan is not None:
            self.plan = plan
        if self.plan is None:
            raise ConfigError("Cannot arm a SieveCache without a plan.")
        self.armed = self.plan.method.compresses
        self.run = None
        self._compressed_layers = 0

    # ------------------------------------------------------------------------------------------ chunked prefill
    def begin_chunks(self, n_tokens: Tensor) -> None:
        """Start a chunked prefill of prompts with ``n_tokens`` ``(B,)`` real tokens: from now on every prefilled
        chunk is appended (attending to what the earlier chunks kept, and causally to itself) and then each layer is
        re-compressed to the budget of the *whole* prompt, scored with that chunk's queries. A layer therefore never
        holds more than its budget plus one chunk. Without a compressing plan, chunks are only appended.

        The method must accept chunks (:meth:`PrefillMethod.chunk_refusal`); the plan must have no decode method
        and no auxiliary tail (the pipeline attaches the decode method once the prompt is in).

        Memory: a dense store grows by exactly one chunk when the chunk is appended and shrinks back to what it keeps
        once re-compressed, so at any moment one layer holds its budget plus the chunk and every other layer its
        budget (the forward pass runs layer by layer)."""
        plan = self.plan
        if plan is not None and (plan.decode is not None or plan.tail or plan.passes):
            raise ConfigError("A chunked prefill starts on a plan without decode method, auxiliary tail or passes.")
        method = None if plan is None else plan.method
        if isinstance(method, PrefillMethod) and (why := method.chunk_refusal()) is not None:
            raise CapabilityError(f"'{method.name}' cannot compress a prompt chunk by chunk: {why}.")
        if any(layer.store is not None for layer in self.layers):
            raise ConfigError("A chunked prefill starts on an empty cache.")
        self.chunking = True
        self.armed = False
        self._chunk_run = None
        if plan is not None and method is not None and method.compresses:
            self._chunk_run = make_run(plan, n_tokens)
            self.stats.compressed_tokens = n_tokens.tolist()
            self.stats.budget_tokens = self._chunk_run.budget_tokens.tolist()

    def end_chunks(self) -> None:
        """The chunked prefill is over: later chunks (questions, decode steps) are appended uncompressed. A store
        compacted in place gives back the room its last chunk needed (keeping the plan's headroom)."""
        reserve = self.plan.reserve if self.plan is not None else 0
        for layer in self.layers:
            s = layer.store
            if self._chunk_run is not None and type(s) is DenseKV and s.capacity > s.n + reserve:
                layer.store = DenseKV(s.keys, s.values, s.positions, valid=s.valid, bias=s.bias, reserve=reserve)
        self.chunking = False
        self._chunk_run = None

    def _compress_chunk(self, layer_idx: int, q: Tensor, scaling: float) -> None:
        """Re-compress one layer after a chunk: the kept entries of earlier chunks and the chunk itself, scored with
        the chunk's queries ``q`` (they belong to the store's last slots, which hold the chunk), evicted to the
        layer's budget of the whole prompt."""
        run, plan = self._chunk_run, self.plan
        layer = self.layers[layer_idx]
        assert run is not None
        assert plan is not None
        assert layer.store is not None
        method = plan.method
        assert isinstance(method, PrefillMethod)
        t0 = time.perf_counter()
        store = as_dense(layer.store, method.name)  # ragged rows (prompts of different lengths) -> left-padded rows
        B, _, n, _ = store.keys.shape
        valid = store.valid if store.valid is not None else torch.ones(B, n, dtype=torch.bool, device=q.device)
        ctx = LayerContext(layer_idx, q, store.keys, store.values, valid, scaling, run)
        comp = method.compress(ctx)
        if comp.keys is not None or comp.bias is not None or comp.extra_keys is not None:
            raise CapabilityError(f"'{method.name}' did not give a plain eviction of a chunk.")  # refused before
        sel = comp.selection
        evicts = bool((sel.counts < valid.sum(-1)[:, None]).any())
        if store is layer.store and evicts and not store.has_padding and not store.has_bias and sel.uniform:
            store.compact(sel.indices)  # rows stay equal: in place, the buffers are reused by the next chunk
        elif evicts or store.has_padding:
            layer.store = build_store(
                store.keys, store.values, store.positions, sel.indices, sel.counts, reserve=plan.reserve
            )
        s = layer.store
        if type(s) is DenseKV and s.capacity > s.n + plan.reserve:  # give the chunk's room back
            layer.store = DenseKV(s.keys, s.values, s.positions, valid=s.valid, bias=s.bias, reserve=plan.reserve)
        self.stats.compress_seconds += time.perf_counter() - t0

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
    ) -> Tensor:
        """Store this layer's new keys/values (compressing a fresh prefill) and return the attention output.

        q ``(B, H_q, L, D)``; k, v ``(B, H_kv, L, D)`` post-RoPE; padding_mask ``(B, seen + L)`` (1 = real token)
        or None; positions ``(B|1, L)``: the positions the model rotated the chunk with (None: counted from the
        real tokens seen); mods: the layer's sliding window and logit soft-capping. Returns ``(B, H_q, L, D)``.
        """
        chunk = LayerChunk(layer_idx, q, k, v, padding_mask, scaling, positions, mods)
        if self.recording is not None and self.layers[layer_idx].store is None:
            self.recording.append(chunk)
        out = self._attend(chunk, output=True)
        assert out is not None
        return out

    def replay(self, layers: list[LayerChunk]) -> None:
        """Store (and compress) a prefill recorded by another cache, layer by layer, without running the model: what
        :meth:`attend` does with a fresh prefill, except the attention output, which the recording forward pass
        already used. Valid for a plan whose method attends densely at prefill (the recording's attention) and adds
        no auxiliary tokens to the prompt; the caller (:meth:`tokensieve.pipeline.Compressor.prefill`) checks that.
        Each layer's tensors are copied first, so a method cannot alter the recording for the next replay."""
        for r in layers:
            if self.layers[r.layer_idx].store is not None:
                raise RuntimeError(f"Layer {r.layer_idx} already holds a prefill; a replay needs a fresh cache.")
            self._attend(replace(r, q=r.q.clone(), k=r.k.clone(), v=r.v.clone()), output=False)

    def _attend(self, chunk: LayerChunk, *, output: bool) -> Tensor | None:
        """:meth:`attend` of one layer's chunk; with ``output=False`` (a replayed prefill) the fresh prefill's
        attention is skipped and None returned."""
        layer_idx, q, k, v = chunk.layer_idx, chunk.q, chunk.k, chunk.v
        padding_mask, scaling, positions, mods = chunk.padding_mask, chunk.scaling, chunk.positions, chunk.mods
        layer = self.layers[layer_idx]
        B, _, L, _ = k.shape
        valid_new: Tensor | None = None
        if padding_mask is not None:
            if padding_mask.dim() != 2:
                raise ValueError(
                    "tokensieve attention expects a 2-D padding mask (batch, tokens); custom 4-D masks are not "
                    "supported."
                )
            valid_new = padding_mask[:, -L:].to(torch.bool)
            if bool(valid_new.all()):
                valid_new = None
        if layer.seen_valid is None:
            layer.seen_valid = torch.zeros(B, dtype=torch.long, device=k.device)
        if positions is not None:
            pos_new = positions.long().expand(B, L)
        elif valid_new is None:
            pos_new = layer.seen_valid[:, None] + torch.arange(L, device=k.device)
        else:
            pos_new = layer.seen_valid[:, None] + valid_new.long().cumsum(-1) - 1
        if valid_new is not None:
            pos_new = torch.where(valid_new, pos_new, torch.full_like(pos_new, -1))

        plan = self.plan
        decode = plan.decode if plan is not None else None
        stored = L  # tokens of this chunk that count as seen
        out: Tensor | None = None
        if layer.store is None:
            t0 = time.perf_counter()
            if output:
                own = (
                    plan.method.prefill_attention(layer_idx, q, k, v, valid_new, scaling, mods, plan.profile)
                    if plan is not None and isinstance(plan.method, PrefillMethod) and L > 1 and not self.chunking
                    else None
                )  # sparse prefill attention (FlexPrefill, MInference, ...) or None: dense
                out = causal_attention(q, k, v, valid_new, scaling, mods) if own is None else own
            self.stats.prefill_attention_seconds += time.perf_counter() - t0
            ctx: LayerContext | None = None
            compressing = self.armed and plan is not None and L > 1
            tail = plan.tail if compressing and plan is not None else 0  # auxiliary tokens: never kept nor seen
            if compressing:
                layer.store, ctx = self._compress(layer_idx, q, k, v, valid_new, pos_new, scaling)
                stored = L - tail
            else:
                H = k.shape[1]
                reserve = plan.reserve if plan is not None else 0
                layer.store = DenseKV(k, v, pos_new[:, None, :].expand(B, H, L), valid=valid_new, reserve=reserve)
                layer.store.identity_positions = valid_new is None and layer.seen == 0
                if decode is not None and decode.declared().prefill_queries:
                    assert plan is not None
                    valid = valid_new if valid_new is not None else torch.ones(B, L, dtype=torch.bool)
                    run = make_run(replace(plan, budget=Budget.ratio(1.0)), valid.sum(-1))
                    ctx = LayerContext(layer_idx, q, k, v, valid, scaling, run)
            if decode is not None and layer_idx not in self._deferred:
                n_prompt = layer.seen_valid + (L if valid_new is None else valid_new.sum(-1)) - tail
                self._start_decode(decode, layer_idx, scaling, ctx, n_prompt)
        elif decode is not None:
            if not mods.plain:  # refused when the Compressor is built; this guards direct use
                raise CapabilityError(
                    f"Decode method '{decode.name}' does not support sliding-window or soft-capped attention yet."
                )
            if layer.decode is None:  # the decode method was attached after the prefill
                self._start_decode(decode, layer_idx, scaling, None, layer.seen_valid)
            dl = layer.decode
            assert dl is not None
            dl.store.append(k, v, pos_new, valid_new)
            t0 = time.perf_counter()  # the method's bookkeeping counts as attention time
            decode.on_append(dl, L)
            out = decode.step(dl, q) if L == 1 else dl.store.attend(q, scaling)
            self._timed(L, t0)
            if L == 1 and layer_idx == len(self.layers) - 1:
                dl.run.step += 1
        else:
            if self._chunk_run is not None and type(layer.store) is DenseKV:
                layer.store.reserve(L)  # exactly one chunk of room (no growth slack); given back once compressed
            layer.store.append(k, v, pos_new, valid_new)
            t0 = time.perf_counter()
            out = layer.store.attend(q, scaling, mods)
            self._timed(L, t0)
            if L == 1:
                self.stats.decode_bytes_read += layer.store.kv_bytes()
            for observe in self.observers:
                observe(layer_idx, q, layer.store)
            pending = self._deferred.get(layer_idx)
            if self._aux is not None and pending is not None:
                assert plan is not None
                assert isinstance(plan.method, PrefillMethod)
                aux_valid = torch.ones(B, L, dtype=torch.bool, device=k.device) if valid_new is None else valid_new
                plan.method.observe_pass(pending.ctx, pending.scores, self._aux, q, k, aux_valid)
        if self._chunk_run is not None:
            self._compress_chunk(layer_idx, q, scaling)
        layer.seen += stored
        n_real = L if valid_new is None else valid_new.sum(-1)
        layer.seen_valid = layer.seen_valid + n_real - (L - stored)
        if self._deferred and not self.armed and plan is not None and not plan.passes:
            self.finish_compression()  # the forward pass scored every layer: select and apply now
        return out

    @contextlib.contextmanager
    def observing(self, aux: AuxPass) -> Iterator[None]:
        """Within this block, every layer's appended chunk is an auxiliary pass shown to the deferred method."""
        if not self._deferred:
            raise ConfigError("An auxiliary pass needs a deferred method's prefill to observe.")
        self._aux = aux
        try:
            yield
        finally:
            self._aux = None

    def finish_compression(self) -> None:
        """Select and apply for every layer a deferred method scored (once all are scored): each layer's whole prompt
        is replaced by what the method keeps, and a decode method starts on it."""
        if not self._deferred:
            return
        assert self.plan is not None
        assert isinstance(self.plan.method, PrefillMethod)
        if len(self._deferred) != len(self.layers):
            raise RuntimeError("A deferred method's selection ran before every layer was scored.")
        method, plan = self.plan.method, self.plan
        pending, self._deferred = self._deferred, {}
        t0 = time.perf_counter()
        for layer_idx, rec in sorted(pending.items()):
            comp = method.choose(rec.ctx, rec.scores)
            layer = self.layers[layer_idx]
            layer.store = self._build(comp, rec.ctx.keys, rec.ctx.values, rec.positions, plan.reserve)
        self.stats.compress_seconds += time.perf_counter() - t0
        if plan.decode is not None:
            for layer_idx, rec in sorted(pending.items()):
                layer = self.layers[layer_idx]
                assert layer.seen_valid is not None
                self._start_decode(plan.decode, layer_idx, rec.ctx.scaling, rec.ctx, layer.seen_valid)

    def bytes_read(self) -> int:
        """KV (and page metadata) bytes read by decode-step attention so far, over all layers."""
        return self.stats.decode_bytes_read + (self.decode_run.bytes_read if self.decode_run is not None else 0)

    def _timed(self, L: int, t0: float) -> None:
        if L == 1:
            self.stats.decode_attention_seconds += time.perf_counter() - t0
            self.stats.decode_attention_calls += 1
        else:
            self.stats.prefill_attention_seconds += time.perf_counter() - t0

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

    def _compress(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        valid_new: Tensor | None,
        pos_new: Tensor,
        scaling: float,
    ) -> tuple[KVStore, LayerContext]:
        assert self.plan is not None
        plan = self.plan
        method = plan.method
        if not isinstance(method, PrefillMethod):
            raise ConfigError(f"Method '{method.name}' does not compress at prefill.")
        t0 = time.perf_counter()
        B, _, L, _ = k.shape
        valid = valid_new if valid_new is not None else torch.ones(B, L, dtype=torch.bool, device=k.device)
        if plan.tail >= L:
            raise ConfigError(f"The auxiliary tail ({plan.tail} tokens) is not shorter than the chunk ({L}).")
        n_tokens = valid[:, : L - plan.tail].sum(-1)
        if self.run is None:
            self.run = make_run(plan, n_tokens)
            self.stats.compressed_tokens = n_tokens.tolist()
            self.stats.budget_tokens = self.run.budget_tokens.tolist()
        ctx = LayerContext(
            layer_idx=layer_idx, queries=q, keys=k, values=v, valid=valid, scaling=scaling, run=self.run, tail=plan.tail
        )
        if method.declared().deferred:  # score now, keep the prompt whole; select once every layer is scored
            scores = method.score(ctx)
            decode = plan.decode
            keep_q = decode is not None and decode.declared().prefill_queries
            store = self._build(Compressed(Selection.keep_all(B, k.shape[1], L, ctx.selectable)), k, v, pos_new,
                                plan.reserve)  # fmt: skip
            # the pending context reads the prompt's keys and values from the store: one copy of them, not two
            kk, vv = (store.keys, store.values) if isinstance(store, DenseKV) and store.n == L else (k, v)
            light = LayerContext(
                layer_idx, q if keep_q else q[:, :, :0], kk, vv, valid, scaling, self.run, tail=plan.tail
            )
            self._deferred[layer_idx] = _Deferred(light, scores, pos_new)
        else:
            store = self._build(method.compress(ctx), k, v, pos_new, plan.reserve)
        self._compressed_layers += 1
        if self._compressed_layers == len(self.layers):
            self.armed = False
        self.stats.compress_seconds += time.perf_counter() - t0
        return store, ctx

    @staticmethod
    def _build(comp: Compressed, k: Tensor, v: Tensor, positions: Tensor, reserve: int) -> KVStore:
        sel = comp.selection
        return build_store(
            comp.keys if comp.keys is not None else k,
            comp.values if comp.values is not None else v,
            positions,
            sel.indices,
            sel.counts,
            bias=comp.bias,
            extra_keys=comp.extra_keys,
            extra_values=comp.extra_values,
            extra_bias=comp.extra_bias,
            extra_valid=comp.extra_valid,
            reserve=reserve,
        )


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
