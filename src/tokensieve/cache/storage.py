"""Per-layer KV storage: one dense block when every row has the same length, ragged rows otherwise.

A *row* is one (sequence, KV head) pair. Rows are stored per KV head — never expanded to query heads — and, once a
head- or layer-adaptive method has given rows different lengths, the rows share one page pool
(:class:`~tokensieve.cache.ragged.RaggedKV`): nothing is padded to the longest head. Byte counts are exact:
``kv_bytes`` is the size of the stored keys and values, ``allocated_bytes`` the size of the buffers that hold them
(stored entries, the unfilled slots of each row's last page, the headroom reserved for tokens still to come), and
``meta_bytes`` the bookkeeping (true positions, per-entry logit biases, page tables). A decode method sees a
head-adaptive store as a :class:`RowPaddedKV` (rows left-padded to the longest; the padding is allocated, not
stored).

Attention over a store (``attend``) builds the store's mask and calls the kernels of :mod:`tokensieve.attention`;
it is tested against :func:`tokensieve.attention.dense.reference_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CapabilityError
from .dense import DenseKV
from .ragged import RaggedKV, Row

KVStore = DenseKV | RaggedKV


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x ``(B, H, T, D)``, idx ``(B, H, K)`` (non-negative) → ``(B, H, K, D)``."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def build_store(
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    indices: Tensor,
    counts: Tensor,
    *,
    bias: Tensor | None = None,
    extra_keys: Tensor | None = None,
    extra_values: Tensor | None = None,
    extra_bias: Tensor | None = None,
    extra_valid: Tensor | None = None,
    reserve: int = 0,
) -> KVStore:
    """Keep the selected entries (plus optional extra, synthetic entries) of a compressed chunk.

    Args:
        keys, values: ``(B, H_kv, T, D)``; positions ``(B, T)``, or ``(B, H_kv, T)`` when the rows already hold
            different tokens (a store re-compressed by a chunked prefill).
        indices, counts: a selection (``(B, H_kv, K)`` ascending, -1 padded; ``(B, H_kv)``).
        bias: optional ``(B, H_kv, T)`` logit bias of the entries (log of the mass they stand for).
        extra_keys, extra_values: optional ``(B, H_kv, E, D)`` entries appended to every row (positions -1).
        extra_bias: ``(B, H_kv, E)`` their logit bias.
        extra_valid: ``(B, H_kv, E)`` bool, which rows get each extra entry (None: every row).
        reserve: headroom per row for tokens still to come.
    """
    B, H, T, _ = keys.shape
    K = indices.shape[-1]
    has_extra = extra_keys is not None and extra_keys.shape[2] > 0
    safe = indices.clamp_min(0)
    pos_bh = positions if positions.dim() == 3 else positions[:, None, :].expand(B, H, T)
    if extra_valid is not None and bool(extra_valid.all()):
        extra_valid = None
    if bool((counts == K).all()) and extra_valid is None:
        k = gather_rows(keys, safe)
        v = gather_rows(values, safe)
        p = pos_bh.gather(2, safe)
        bb = None if bias is None else bias.gather(2, safe)
        if has_extra:
            assert extra_keys is not None
            assert extra_values is not None
            E = extra_keys.shape[2]
            k = torch.cat([k, extra_keys], 2)
            v = torch.cat([v, extra_values], 2)
            p = torch.cat([p, p.new_full((B, H, E), -1)], 2)
            eb = extra_bias if extra_bias is not None else keys.new_zeros(B, H, E)
            bb = torch.cat([bb if bb is not None else keys.new_zeros(B, H, K), eb], 2)
        return DenseKV(k, v, p, bias=bb, reserve=reserve)
    # ragged: every row's kept entries (and its extra entries), packed row after row into the page pool
    D = keys.shape[-1]
    keep = torch.arange(K, device=keys.device)[None, None, :] < counts[..., None]  # (B, H, K)
    k = gather_rows(keys, safe)
    v = gather_rows(values, safe)
    p = pos_bh.gather(2, safe)
    bb = None if bias is None else bias.gather(2, safe)
    if has_extra:
        assert extra_keys is not None
        assert extra_values is not None
        E = extra_keys.shape[2]
        ev = extra_valid if extra_valid is not None else torch.ones(B, H, E, dtype=torch.bool, device=keys.device)
        keep = torch.cat([keep, ev], 2)
        k = torch.cat([k, extra_keys], 2)
        v = torch.cat([v, extra_values], 2)
        p = torch.cat([p, p.new_full((B, H, E), -1)], 2)
        eb = extra_bias if extra_bias is not None else keys.new_zeros(B, H, E)
        bb = torch.cat([bb if bb is not None else keys.new_zeros(B, H, K), eb], 2)
    lengths = keep.sum(-1).flatten()
    return RaggedKV.packed(
        k[keep].view(-1, D), v[keep].view(-1, D), p[keep], None if bb is None else bb[keep], lengths, B, H,
        reserve=reserve,
    )  # fmt: skip


class RowPaddedKV(DenseKV):
    """A head-adaptive store seen by a decode method: rows of different lengths, each left-padded to the longest.

    Row ``(b, h)`` holds its entries in slots ``[row_pad[b, h], n)``: the newest token of every row is in slot
    ``n - 1``, as in a :class:`DenseKV`, so decode methods append and page alike; the padding slots carry a ``-inf``
    logit bias (never attended) and position -1, and methods that select (Quest, TidalDecode, TokenSelect) select
    within each row's own entries (``row_pad``) with each row's own budget. ``kv_bytes`` counts the stored entries
    only; ``allocated_bytes`` the whole padded buffers, padding included — this is what the layout costs.
    """

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor, bias: Tensor, row_pad: Tensor,
                 reserve: int = 0) -> None:  # fmt: skip
        super().__init__(keys, values, positions, bias=bias, reserve=reserve)
        self.row_pad = row_pad  # (B, H_kv) long

    def lengths(self) -> Tensor:
        return self.n - self.row_pad

    def kv_bytes(self) -> int:
        D = self._k.shape[-1]
        return 2 * int(self.lengths().sum()) * D * self._k.element_size()

    def row(self, b: int, h: int) -> tuple[Tensor, Tensor, Tensor]:
        p = int(self.row_pad[b, h])
        return self.keys[b, h, p:], self.values[b, h, p:], self.positions[b, h, p:]

    def reorder(self, rows: Tensor) -> None:
        super().reorder(rows)
        self.row_pad = self.row_pad.index_select(0, rows)

    def compact(self, keep: Tensor) -> None:  # pragma: no cover - eviction methods are refused on these stores
        raise CapabilityError("A head-adaptive store does not evict while decoding.")

    def swap_remove(self, slots: Tensor) -> None:  # pragma: no cover - eviction methods are refused on these stores
        raise CapabilityError("A head-adaptive store does not evict while decoding.")


def as_dense(store: KVStore, method: str) -> DenseKV:
    """The store as a :class:`DenseKV` (decode methods work on rows that end in the same slot).

    A ragged store whose KV heads of a sequence hold the same number of entries becomes a :class:`DenseKV`
    (sequences of different lengths are left-padded with masked slots); a head-adaptive store becomes a
    :class:`RowPaddedKV` (every row left-padded to the longest; padding masked by a ``-inf`` bias).
    """
    if isinstance(store, DenseKV):
        return store
    lengths = store.lengths()  # (B, H)
    B, H = store.batch, store.heads
    n = int(lengths.max())
    slots, filled = store._row_slots()  # (R, m) right-padded
    D = store._k.shape[-1]
    R, m = slots.shape
    pad = (n - lengths).view(R)  # left padding of each row
    target = (torch.arange(R)[:, None] * n + pad[:, None] + torch.arange(m)[None, :])[filled]  # flat dense slot
    src = slots[filled]
    k = store._k.new_zeros(R * n, D)
    v = store._v.new_zeros(R * n, D)
    pos = torch.full((R * n,), -1, dtype=torch.int32)
    k[target] = store._k.view(-1, D)[src]
    v[target] = store._v.view(-1, D)[src]
    pos[target] = store._pos.view(-1)[src]
    headroom = (store._k.shape[0] - store._used) * store.page // max(1, R)
    k, v, pos = k.view(B, H, n, D), v.view(B, H, n, D), pos.view(B, H, n)
    bias = store._k.new_full((R * n,), float("-inf"))
    bias[target] = store._bias.view(-1)[src]
    if bool((lengths != lengths[:, :1]).any()):
        return RowPaddedKV(k, v, pos, bias.view(B, H, n), pad.view(B, H), reserve=headroom)
    valid = torch.arange(n)[None, :] >= (n - lengths[:, 0])[:, None]  # (B, n)
    has_bias = store._has_bias
    bb = bias.view(B, H, n).masked_fill(~valid[:, None, :], 0.0) if has_bias else None
    return DenseKV(k, v, pos, valid=valid, bias=bb, reserve=headroom)


def as_ragged(store: KVStore, reserve: int = 16) -> RaggedKV:
    """The store as a :class:`RaggedKV` (methods that evict different entries from each KV head while decoding,
    such as SP-KV and the retention gates, decode from ragged rows): a ragged store as it is; a dense one's real
    entries (stored padding and a :class:`RowPaddedKV`'s left padding left out), per-entry logit biases kept, with
    room for ``reserve`` more tokens per row."""
    if isinstance(store, RaggedKV):
        return store
    keys, values, positions = store.keys, store.values, store.positions  # (B, H, n, D), (B, H, n)
    B, H, n, _ = keys.shape
    real = torch.ones(B, H, n, dtype=torch.bool, device=keys.device)
    if store.valid is not None:
        real &= store.valid[:, None, :n]
    if isinstance(store, RowPaddedKV):
        real &= torch.arange(n, device=keys.device)[None, None, :] >= store.row_pad[..., None]
    bias = None if store.bias is None else store.bias[real]
    lengths = real.sum(-1).flatten()
    return RaggedKV.packed(keys[real], values[real], positions[real], bias, lengths, B, H, reserve=reserve)


__all__ = ["DenseKV", "KVStore", "RaggedKV", "Row", "RowPaddedKV", "as_dense", "as_ragged", "build_store"]
