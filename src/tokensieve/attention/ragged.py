"""Ragged attention kernels: attention over rows of different lengths without a Python loop over the rows.

A *row* is one (sequence, KV head) pair. The rows live in a shared **page pool** (vLLM's layout, Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with PagedAttention", arXiv:2309.06180): keys and
values in ``(pages, P, D)`` buffers, each page owned by one row (``page_row``), each row's pages in any order, a
row's last page possibly partly filled. A per-slot additive bias ``(pages, P)`` holds the entries' logit bias and
``-inf`` for the slots not filled yet.

Decode (one query per head): :func:`paged_decode` is split-K attention (flash-decoding's reduction, Dao et al.,
2023): every page computes its own partial softmax (its max, its sum, its weighted values) in one batched matmul
over all pages of all rows, and a segment reduction over ``page_row`` combines the pages of each row. It reads every
stored key and value once, in place (no gather of K or V, no padding to the longest row), so its cost follows the
bytes stored, however uneven the rows are.

Chunks (several queries, causal within the chunk, sliding windows, soft-capping): :func:`padded_attention` gathers
each row into a ``(R, n_max, D)`` block, masks the slots past each row's length, and runs one grouped attention.
It pays for the longest row, which a decode step must not, but a chunk's queries are few and rare.

Both are tested against :func:`tokensieve.attention.dense.reference_attention` on random ragged lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor


def paged_decode(
    qr: Tensor, kpages: Tensor, vpages: Tensor, page_row: Tensor, page_bias: Tensor, rows: int, scaling: float
) -> Tensor:
    """One decode step of attention over paged ragged rows.

    Args:
        qr: ``(R, G, D)`` the queries of each row (the query heads of its KV head's group).
        kpages, vpages: ``(N, P, D)`` the pages to read (a prefix of the pool: every page in use).
        page_row: ``(N,)`` long, the row owning each page.
        page_bias: ``(N, P)`` additive logit bias of each slot (``-inf`` where the slot is not filled).
        rows: ``R``.
        scaling: softmax scale.

    Returns:
        ``(R, G, D)``; a row with no page gets zeros.
    """
    N = kpages.shape[0]
    G, D = qr.shape[1], qr.shape[2]
    if N == 0:
        return qr.new_zeros(rows, G, D)
    qp = qr.index_select(0, page_row)  # (N, G, D): small, G queries per page
    s = torch.baddbmm(page_bias[:, None, :], qp, kpages.transpose(1, 2), alpha=scaling)  # (N, G, P)
    m = s.amax(-1).clamp_min(torch.finfo(s.dtype).min)  # (N, G); a page of dropped entries only: e = 0 below
    e = torch.exp(s - m[..., None])
    ssum = e.sum(-1)  # (N, G)
    o = torch.bmm(e, vpages)  # (N, G, D), unnormalised
    idx = page_row[:, None].expand(N, G)
    row_max = qr.new_full((rows, G), float("-inf")).scatter_reduce(0, idx, m, "amax", include_self=True)
    w = torch.exp(m - row_max.index_select(0, page_row))  # (N, G): rescale each page to its row's max
    num = qr.new_zeros(rows, G, D).index_add_(0, page_row, o * w[..., None])
    den = qr.new_zeros(rows, G).index_add_(0, page_row, ssum * w)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]  # rows without pages: 0 / tiny = 0


def gather_padded(buf: Tensor, slots: Tensor) -> Tensor:
    """``buf`` ``(S, ...)`` gathered at ``slots`` ``(R, m)`` (non-negative) → ``(R, m, ...)``."""
    return buf.index_select(0, slots.reshape(-1)).view(*slots.shape, *buf.shape[1:])


def padded_slots(row_slots: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Slots of each row padded to the longest: ``row_slots`` ``(R, m)`` flat slot of entry ``j`` of row ``r``
    (any value past the row's length) → (slots clamped to valid indices ``(R, m)``, ``(R, m)`` bool filled)."""
    m = row_slots.shape[1]
    filled = torch.arange(m, device=row_slots.device)[None, :] < lengths[:, None]
    return torch.where(filled, row_slots, torch.zeros_like(row_slots)), filled


__all__ = ["gather_padded", "padded_slots", "paged_decode"]
