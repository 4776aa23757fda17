"""Chunked: a long prompt is prefilled in chunks (``Compressor(..., chunk=N)``), and after every chunk each layer is
re-compressed to the budget of the *whole* prompt, scored with that chunk's queries — so a layer never holds more
than its budget plus one chunk.

Each chunk attends to what the earlier chunks kept and causally to itself, at its true positions. A dense store
grows by exactly one chunk when the chunk is appended and shrinks back to what it keeps once re-compressed, so at any
moment one layer holds its budget plus the chunk and every other layer its budget (the forward pass runs layer by
layer). A method must accept chunks (:meth:`~tokensieve.core.method.PrefillMethod.chunk_refusal`, asked by
:meth:`tokensieve.spec.Spec.why_not` before any work); the plan has no decode method (the engine attaches it once
the prompt is in). Without a compressing method, chunks are only appended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...cache.dense import DenseKV
from ...cache.prefill import Chunk, Fresh, Plan, PrefillMode, make_run
from ...cache.storage import KVStore, as_dense, build_store
from ...core.context import LayerContext, RunState
from ...core.method import PrefillMethod
from ...errors import CapabilityError


class Chunked(PrefillMode):
    """Append every chunk, then re-compress the layer to the whole prompt's budget.

    Args:
        plan: the run's plan without decode method; None: a plain cache whose chunks are only appended.
        n_tokens: ``(B,)`` real tokens of each prompt: the budgets are the whole prompt's.
    """

    name = "chunked"

    def __init__(self, plan: Plan | None, n_tokens: Tensor) -> None:
        super().__init__(plan)
        method = None if plan is None else plan.method
        self.method = method if isinstance(method, PrefillMethod) and method.compresses else None
        self.run: RunState | None = None  # the whole prompt's budgets (None: keep all)
        self.n_tokens = n_tokens
        self.started = False

    def fresh(self, c: Chunk, output: bool) -> Fresh:
        if not self.started:  # the first layer's first chunk: resolve the budgets of the whole prompt
            self.started = True
            if self.method is not None:
                assert self.plan is not None
                self.run = make_run(self.plan, self.n_tokens)
                self.stats.compressed_tokens = self.n_tokens.tolist()
                self.stats.budget_tokens = self.run.budget_tokens.tolist()
        return self.keep(c, self.timed_attention(c, output))  # dense causal attention over the first chunk

    def append(self, store: KVStore, c: Chunk) -> Tensor:
        if self.run is not None and type(store) is DenseKV:
            store.reserve(c.length)  # exactly one chunk of room (no growth slack); given back once compressed
        return super().append(store, c)

    def settle(self, c: Chunk, store: KVStore) -> KVStore:
        """Re-compress the layer: the kept entries of earlier chunks and the chunk itself, scored with the chunk's
        queries (they belong to the store's last slots, which hold the chunk), evicted to the layer's budget of the
        whole prompt."""
        run, method = self.run, self.method
        if run is None or method is None:
            return store
        t0 = time.perf_counter()
        dense = as_dense(store, method.name)  # ragged rows (prompts of different lengths) -> left-padded rows
        B, _, n, _ = dense.keys.shape
        valid = dense.valid if dense.valid is not None else torch.ones(B, n, dtype=torch.bool, device=c.q.device)
        ctx = LayerContext(c.layer_idx, c.q, dense.keys, dense.values, valid, c.scaling, run)
        comp = method.compress(ctx)
        if comp.keys is not None or comp.bias is not None or comp.extra_keys is not None:
            raise CapabilityError(f"'{method.name}' did not give a plain eviction of a chunk.")  # refused before
        sel = comp.selection
        evicts = bool((sel.counts < valid.sum(-1)[:, None]).any())
        if dense is store and evicts and not dense.has_padding and not dense.has_bias and sel.uniform:
            dense.compact(sel.indices)  # rows stay equal: in place, the buffers are reused by the next chunk
        elif evicts or dense.has_padding:
            store = build_store(dense.keys, dense.values, dense.positions, sel.indices, sel.counts,
                                reserve=self.reserve)  # fmt: skip
        if type(store) is DenseKV and store.capacity > store.n + self.reserve:  # give the chunk's room back
            store = DenseKV(store.keys, store.values, store.positions, valid=store.valid, bias=store.bias,
                            reserve=self.reserve)  # fmt: skip
        self.stats.compress_seconds += time.perf_counter() - t0
        return store

    def finish(self, stores: Sequence[KVStore | None]) -> dict[int, tuple[KVStore, LayerContext | None]]:
        """The prompt is in: a store compacted in place gives back the room its last chunk needed (keeping the
        plan's headroom)."""
        out: dict[int, tuple[KVStore, LayerContext | None]] = {}
        for layer_idx, s in enumerate(stores):
            if self.run is not None and type(s) is DenseKV and s.capacity > s.n + self.reserve:
                trimmed = DenseKV(s.keys, s.values, s.positions, valid=s.valid, bias=s.bias, reserve=self.reserve)
                out[layer_idx] = (trimmed, None)
        self.run = None  # later chunks (a question, decode steps) are appended uncompressed
        return out


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` column ranges of at most ``chunk`` tokens, counted from the end: every chunk but
    the first holds exactly ``chunk`` tokens. With left padding the last token of every row is in the last column,
    so a row is cut at the same places whether it is prefilled alone or in a batch."""
    first = length - (-(-length // chunk) - 1) * chunk
    bounds = [(0, first)]
    while bounds[-1][1] < length:
        s = bounds[-1][1]
        bounds.append((s, s + chunk))
    return bounds


def run_chunks(forward: Callable[[Tensor, Tensor, Tensor], Tensor], ids: Tensor, mask: Tensor, chunk: int) -> Tensor:
    """Prefill ``ids`` ``(B, T)`` (``mask`` its padding) in chunks of at most ``chunk`` tokens
    (:func:`chunk_bounds`): ``forward(ids, mask, positions)`` runs each through the cache. Returns the last
    chunk's next-token logits ``(B, V)``."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = mask.new_zeros(0)
    for s, e in chunk_bounds(int(ids.shape[1]), chunk):
        logits = forward(ids[:, s:e], mask[:, :e], positions[:, s:e])
    return logits


__all__ = ["Chunked", "chunk_bounds", "run_chunks"]
