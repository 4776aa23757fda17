"""Decode-time methods: the protocol between a cache and a method that acts at every decode step.

A decode method either keeps the cache bounded (it evicts while generating: :class:`BoundedCacheMethod`) or
attends sparsely to a whole cache (Quest, TokenSelect, TidalDecode). The cache drives it through one object per
layer, a :class:`DecodeLayer` (the layer's store, the method's state for that layer, the run-wide
:class:`DecodeRun` and the softmax scale), in three calls:

1. :meth:`DecodeMethod.setup` — **once per run and layer**, when the layer's store is first decoded from (right
   after the prefill, or after a decode method was attached to a prefilled context). It may adapt the store
   (align it to pages, register a per-slot array) and returns the layer's state. A method that declares
   ``prefill_queries`` in its capabilities also sees the prefill chunk's :class:`LayerContext`.
2. :meth:`DecodeMethod.on_append` — after every appended chunk (``n_new`` entries), to keep metadata in sync.
3. :meth:`DecodeMethod.step` — every single-token step: the attention output, possibly evicting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from ..attention.decode import attention_with_probs
from ..core.budget import Budget
from ..core.capabilities import Apply, Capabilities, Phase
from ..core.context import LayerContext, ModelShape
from ..core.method import Method
from ..errors import CapabilityError
from .storage import DenseKV, KVStore, RowPaddedKV, as_dense


@dataclass
class DecodeRun:
    """State shared by all layers while a decode method runs (one per cache).

    Attributes:
        shape: the model's attention geometry.
        budget_tokens: ``(B,)`` decode-time budget per sequence, in tokens (cache size for eviction policies,
            tokens attended per step for sparse methods — see each method).
        budget: the decode :class:`Budget` itself, for methods whose budget follows the cache length.
        profile: the method's per-model profile contents, if it declares one.
        step: decode steps taken so far (incremented once per forward pass, at the last layer).
        bytes_read: KV (and metadata) bytes the method's attention read, summed over steps and layers.
        scratch: free space shared across layers within and across steps (e.g. TidalDecode's positions).
    """

    shape: ModelShape
    budget_tokens: Tensor
    budget: Budget | None = None
    profile: Any = None  # the decode method's per-model profile contents (core.profiles), if it needs one
    step: int = 0
    bytes_read: int = 0
    scratch: dict[Any, Any] = field(default_factory=dict)

    def tokens_for(self, n: int) -> int:
        """Tokens a sparse method attends to over a cache of ``n`` entries (a ratio follows the cache length)."""
        if self.budget is None:
            return int(self.budget_tokens.max())
        return self.budget.tokens_for(n, larger="clip")  # a budget above the cache length covers it all


@dataclass
class DecodeLayer:
    """What a decode method sees of one layer, for the whole run.

    Attributes:
        index: the decoder layer.
        store: the layer's KV store: rows that end in the same slot, left padding masked — per sequence, or per
            (sequence, KV head) row after a head-adaptive prefill (a :class:`RowPaddedKV`: a method that declares
            ``capabilities.head_adaptive`` selects within each row's own entries, ``store.row_pad``).
        run: the run-wide state.
        scaling: the softmax scale of this layer's attention.
        state: the method's own state for this layer (whatever :meth:`DecodeMethod.setup` returned).
        hidden: ``(B, L, d)`` the hidden states the layer read for the chunk just appended (a decode step: ``L = 1``),
            or None where they were not captured; set before :meth:`DecodeMethod.on_append` and ``step``.
        positions: ``(B, L)`` the true positions of that chunk (-1 at padding), set with ``hidden``.
    """

    index: int
    store: DenseKV
    run: DecodeRun
    scaling: float
    state: Any = None
    hidden: Tensor | None = None
    positions: Tensor | None = None


@dataclass(frozen=True)
class DecodeMethod(Method):
    """A method that acts at every decode step: a bounded cache (eviction) or sparse attention over a whole cache.

    See the module docstring for the protocol (``setup`` once, ``on_append`` per chunk, ``step`` per token).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.DECODE}), apply=Apply.SPARSE)

    def batch_refusal(self, budget: Budget, lengths: list[int]) -> str | None:
        """Why this method cannot decode a batch of prompts of these ``lengths`` (empty: not known yet) at ``budget``
        exactly as it would decode each prompt alone — a sentence saying what to do — or None. Asked by
        :meth:`tokensieve.spec.Spec.why_not` before any work. Default: every batch is fine."""
        return None

    def decode_store(self, store: KVStore) -> KVStore:
        """The layer's store as this method decodes from it, made once when decoding starts: rows that end in the same
        slot (a ragged store is padded on the left). A method that decodes from ragged rows overrides this."""
        return as_dense(store, self.name)

    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> Any:
        """Prepare ``layer.store`` for this method (once per run) and return the layer's state."""
        return None

    def on_append(self, layer: DecodeLayer, n_new: int) -> None:
        """Keep per-layer metadata in sync with ``n_new`` entries just appended to ``layer.store``."""

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        """Attention output ``(B, H_q, 1, D)`` of a decode step whose token was just appended to ``layer.store``."""
        raise NotImplementedError


def evict_to_budget(store: DenseKV, scores: Tensor, budget: int) -> None:
    """Evict the lowest-scored entries until every row holds ``budget`` slots.

    scores ``(B, H_kv, n)`` (``+inf`` protects an entry); padding slots go first. One eviction per row (the
    steady state of a bounded cache) is an O(1) slot swap; more (e.g. right after a long prefill) compact the rows.
    """
    excess = store.n - budget
    if excess <= 0:
        return
    s = scores.float()
    if store.valid is not None:
        s = s.masked_fill(~store.valid[:, None, :], float("-inf"))
    if excess == 1:
        store.swap_remove(s.argmin(-1))  # ties: the first slot, identical across heads for padding
        return
    order = s.argsort(dim=-1, descending=True, stable=True)[..., :budget]
    store.compact(order.sort(dim=-1).values)


@dataclass(frozen=True)
class BoundedCacheMethod(DecodeMethod):
    """Score the cached entries at every decode step and evict the lowest until the row fits the budget.

    The budget is one number for the whole batch: an absolute token count, or a ratio of the *longest* prompt.
    The new token is stored first and attended to, then the cache shrinks back to the budget, so the cache never
    holds more than ``budget + 1`` entries per row.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.DECODE}), apply=Apply.EVICT)

    def decode_scores(self, layer: DecodeLayer, probs: Tensor | None, budget: int) -> Tensor:
        """``(B, H_kv, n)`` importance of every stored entry (``+inf`` = protected); higher is kept."""
        raise NotImplementedError

    def batch_refusal(self, budget: Budget, lengths: list[int]) -> str | None:
        if budget.kind == "ratio" and len(set(lengths)) > 1:
            return (
                f"'{self.name}' keeps one cache size for the whole batch, so a ratio budget over prompts of different "
                f"lengths ({sorted(set(lengths))} tokens) cannot equal each prompt alone. Give a token budget "
                "(e.g. decode_budget=512) or run the prompts one at a time."
            )
        return None

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        store, run = layer.store, layer.run
        if isinstance(store, RowPaddedKV):  # refused when the Compressor is built; this guards direct use
            raise CapabilityError(
                f"'{self.name}' evicts to one cache size per row, which a head-adaptive prefill's rows of different "
                "lengths do not have; use a uniform prefill method with it."
            )
        probs: Tensor | None = None
        run.bytes_read += store.kv_bytes()
        if self.declared().decode_probs:
            mask = store.attention_mask(1, int(q.shape[1]) // int(store.keys.shape[1]))
            out, probs = attention_with_probs(q, store.keys, store.values, mask, layer.scaling)
        else:
            out = store.attend(q, layer.scaling)
        budget = int(run.budget_tokens.max())
        if store.n > budget:
            evict_to_budget(store, self.decode_scores(layer, probs, budget), budget)
        return out


def recent_mask(positions: Tensor, recent: int) -> Tensor:
    """``(B, H_kv, n)`` bool: the ``recent`` most recent entries of each row, by true position ``(B, H_kv, n)``."""
    pos = positions.long()
    newest = pos.amax(-1, keepdim=True)
    return pos > newest - recent


def sink_mask(positions: Tensor, sink: int) -> Tensor:
    """``(B, H_kv, n)`` bool: entries of the first ``sink`` positions."""
    pos = positions.long()
    return (pos >= 0) & (pos < sink)


__all__ = [
    "BoundedCacheMethod",
    "DecodeLayer",
    "DecodeMethod",
    "DecodeRun",
    "evict_to_budget",
    "recent_mask",
    "sink_mask",
]
