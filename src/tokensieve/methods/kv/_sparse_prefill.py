"""The base of prefill sparse-attention methods (A-shape, vertical-slash, FlexPrefill, HiP).

Such a method changes how the prompt's attention is *computed*, not what the cache keeps: each layer's prompt
attention reads only the key blocks the method chooses (score → select → apply, where apply is a FlexAttention
``BlockMask``; see :mod:`tokensieve.attention.flex`). The cache stays whole — unless the method is composed with an
eviction method through its ``evict`` parameter:

``flexprefill[evict=snapkv]:0.25`` — FlexPrefill's sparse attention while the prompt is prefilled, then SnapKV keeps
a quarter of the prompt's entries. The eviction method's scores are its own: SnapKV's observation window
``softmax(q_window Kᵀ)`` is computed densely, from the last window's queries and every key, whatever the sparse
attention read. The grammar is the one AdaKV's ``base`` uses (a parameter holding a method); the budget after ``:``
is the eviction's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...attention.dense import Modifiers
from ...attention.flex import block_sparse_attention, causal_block_grid, grid_valid
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext, ModelShape
from ...core.method import Compressed, Method, PrefillMethod
from ...errors import ConfigError
from ...selection import Selection
from .full import FullCache


@dataclass(frozen=True)
class BlockGrid:
    """One layer's prompt on the end-anchored block grid (see :mod:`tokensieve.attention.flex`).

    Attributes:
        q: ``(B, H_q, T_p, D)`` queries, front-padded with zeros to ``T_p = n · block``.
        k: ``(B, H_kv, T_p, D)`` keys, padded the same way.
        valid: ``(B, T_p)`` real tokens.
        block: block size; n: blocks per side; scaling: softmax scale; group: query heads per KV head.
        lengths: ``(B,)`` real tokens per sequence.
    """

    q: Tensor
    k: Tensor
    valid: Tensor
    block: int
    n: int
    scaling: float
    group: int
    lengths: Tensor
    layer_idx: int

    @property
    def causal(self) -> Tensor:
        return causal_block_grid(self.n, self.q.device)

    def kv_for_queries(self, x: Tensor) -> Tensor:
        """``(B, H_kv, ...)`` → ``(B, H_q, ...)``: each query head's KV head (``h // G``)."""
        return x.repeat_interleave(self.group, dim=1)

    def block_valid(self) -> Tensor:
        """``(B, n)`` count of real tokens per block."""
        return self.valid.view(self.valid.shape[0], self.n, self.block).sum(-1)


@dataclass(frozen=True)
class SparsePrefill(PrefillMethod):
    """A prefill sparse-attention method (abstract): subclasses implement :meth:`blocks`.

    Fields common to all: ``block`` (the block size in tokens) and ``evict`` (a prefill eviction method applied to
    the prompt once its attention is computed; ``full`` keeps everything).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.NONE, rescorable=False, own_attention=True
    )
    evict: Method = field(default_factory=FullCache)
    block: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or self.block < 1:
            raise ConfigError(f"{self.name}: block must be a whole number >= 1, got {self.block!r}.")
        e = self.evict
        if isinstance(e, FullCache):
            return
        if not isinstance(e, PrefillMethod) or not e.compresses or isinstance(e, SparsePrefill):
            raise ConfigError(f"{self.name}: evict must be a prefill eviction method such as snapkv, not {e!r}.")
        if e.declared().deferred or e.capabilities.profile:
            raise ConfigError(
                f"{self.name}: evict='{e.name}' "
                + ("selects after every layer is scored" if e.declared().deferred else "needs a profile")
                + "; a sparse prefill composes with eviction methods that select per layer and need no profile."
            )

    # -- eviction: the evict method's --------------------------------------------------------------------------
    def declared(self) -> Capabilities:
        """The sparse attention's own declaration; whether the prompt is compressed (and how) and whether auxiliary
        tokens are added are the ``evict`` method's."""
        evict = self.evict.declared()
        return replace(type(self).capabilities, apply=evict.apply, suffix=evict.suffix)

    def _evict(self) -> PrefillMethod:
        e = self.evict
        assert isinstance(e, PrefillMethod)
        return e

    def check(self, shape: ModelShape) -> None:
        self.evict.check(shape)

    def chunk_refusal(self) -> str | None:
        return (
            "its sparse attention pattern is chosen over a whole prompt's causal attention, while a chunked prefill "
            "attends each chunk densely to a bounded cache; use its evict method alone with a chunked prefill"
        )

    def protected(self) -> tuple[int, int]:
        return self.evict.protected()

    def prefill_suffix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        return self.evict.prefill_suffix(input_ids, attention_mask)

    def score(self, ctx: LayerContext) -> Tensor:
        return self._evict().score(ctx)

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        return self._evict().layer_counts(ctx)

    def select(self, scores: Tensor, counts: Tensor, ctx: LayerContext) -> Selection:
        return self._evict().select(scores, counts, ctx)

    def apply(self, selection: Selection, ctx: LayerContext, scores: Tensor) -> Compressed:
        return self._evict().apply(selection, ctx, scores)

    def compress(self, ctx: LayerContext) -> Compressed:
        return self._evict().compress(ctx)

    def choose(self, ctx: LayerContext, scores: Tensor) -> Compressed:
        return self._evict().choose(ctx, scores)

    # -- sparse attention ------------------------------------------------------------------------------------------
    def blocks(self, grid: BlockGrid, profile: Any) -> Tensor | None:
        """``(B, H_q, n, n)`` bool: which key blocks each query block reads (the diagonal is added, blocks above
        it ignored); None: dense attention for the whole layer."""
        raise NotImplementedError

    def prefill_attention(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        valid: Tensor | None,
        scaling: float,
        mods: Modifiers,
        profile: Any,
    ) -> Tensor | None:
        block = self.block
        B, Hq, T, _ = q.shape
        n = -(-T // block)
        if n < 2:
            return None  # one block: dense
        gv, pad = grid_valid(valid, B, T, block, q.device)
        pq = torch.nn.functional.pad(q, (0, 0, pad, 0))
        pk = torch.nn.functional.pad(k, (0, 0, pad, 0))
        grid = BlockGrid(pq, pk, gv, block, n, scaling, Hq // k.shape[1], gv.sum(-1), layer_idx)
        with torch.no_grad():
            chosen = self.blocks(grid, profile)
        if chosen is None:
            return None
        return block_sparse_attention(q, k, v, chosen, block, valid, scaling, mods)


def dense_rows(chosen: Tensor, lengths: Tensor, threshold: int) -> Tensor:
    """``chosen`` with every block of the sequences shorter than ``threshold`` tokens set (dense for them)."""
    short = (lengths <= threshold)[:, None, None, None]
    return chosen | short


def top_mass_count(p: Tensor, gamma: float) -> Tensor:
    """The smallest number of entries of each row of ``p`` (``(..., m)``, non-negative) whose sorted sum reaches
    ``gamma`` of the row's total (at least 1); with ``gamma >= 1`` every non-zero entry."""
    if gamma >= 1:
        return (p > 0).sum(-1).clamp(min=1)
    s = p.double().sort(dim=-1, descending=True).values
    c = s.cumsum(-1)
    total = c[..., -1:]
    return ((c < gamma * total).sum(-1) + 1).clamp(max=p.shape[-1])


def topn_mask(scores: Tensor, count: Tensor) -> Tensor:
    """Bool mask of the ``count[...]`` largest entries of each row of ``scores`` ``(..., m)``."""
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < count[..., None]


__all__ = ["BlockGrid", "SparsePrefill", "dense_rows", "top_mass_count", "topn_mask"]
