"""Per-layer KV storage: one dense block when every row has the same length, ragged rows otherwise.

A *row* is one (sequence, KV head) pair. Rows are stored per KV head — never expanded to query heads — and, once a
head- or layer-adaptive method has given rows different lengths, each row is its own buffer: nothing is padded to
the longest head. Byte counts are exact: ``kv_bytes`` is the size of the stored keys and values, ``allocated_bytes``
the size of the buffers that hold them (stored entries plus the headroom reserved for tokens still to come), and
``meta_bytes`` the bookkeeping (true positions, per-entry logit biases).

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
        keys, values: ``(B, H_kv, T, D)``; positions ``(B, T)``.
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
    pos_bh = positions[:, None, :].expand(B, H, T)
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
    rows = []
    for b in range(B):
        for h in range(H):
            idx = indices[b, h, : int(counts[b, h])]
            k = keys[b, h].index_select(0, idx)
            v = values[b, h].index_select(0, idx)
            p = positions[b].index_select(0, idx)
            rb = None if bias is None else bias[b, h].index_select(0, idx)
            if has_extra:
                assert extra_keys is not None
                assert extra_values is not None
                keep = slice(None) if extra_valid is None else extra_valid[b, h]
                ek = extra_keys[b, h][keep]
                E = ek.shape[0]
                k = torch.cat([k, ek])
                v = torch.cat([v, extra_values[b, h][keep]])
                p = torch.cat([p, p.new_full((E,), -1)])
                eb = extra_bias[b, h][keep] if extra_bias is not None else keys.new_zeros(E)
                rb = torch.cat([rb if rb is not None else keys.new_zeros(idx.numel()), eb])
            rows.append(Row.of(k, v, p, rb, reserve=reserve))
    return RaggedKV(rows, B, H)


def as_dense(store: KVStore, method: str) -> DenseKV:
    """The store as a :class:`DenseKV` (decode methods work on equal-length rows).

    A ragged store converts when every KV head of a sequence holds the same number of entries (sequences may
    differ: shorter ones are left-padded with masked slots). Head-adaptive stores cannot convert.
    """
    if isinstance(store, DenseKV):
        return store
    lengths = store.lengths()  # (B, H)
    if bool((lengths != lengths[:, :1]).any()):
        raise CapabilityError(
            f"'{method}' needs every KV head of a sequence to hold the same number of entries, but the prefill "
            "method gave heads different lengths (head-adaptive). Use a uniform prefill method with it."
        )
    B, H = store.batch, store.heads
    n = int(lengths.max())
    k0, v0, _ = store.row(0, 0)
    D = k0.shape[1]
    k = k0.new_zeros(B, H, n, D)
    v = v0.new_zeros(B, H, n, D)
    pos = torch.full((B, H, n), -1, dtype=torch.int32)
    valid = torch.zeros(B, n, dtype=torch.bool)
    has_bias = any(r.bias is not None for r in store.rows)
    bias = k0.new_zeros(B, H, n) if has_bias else None
    for b in range(B):
        m = int(lengths[b, 0])
        valid[b, n - m :] = True
        for h in range(H):
            r = store.rows[b * H + h]
            k[b, h, n - m :], v[b, h, n - m :], pos[b, h, n - m :] = r.k[:m], r.v[:m], r.pos[:m]
            if bias is not None and r.bias is not None:
                bias[b, h, n - m :] = r.bias[:m]
    cap = max(r.k.shape[0] for r in store.rows)
    return DenseKV(k, v, pos, valid=valid, bias=bias, reserve=max(0, cap - n))


__all__ = ["DenseKV", "KVStore", "RaggedKV", "Row", "as_dense", "build_store"]
