"""RaggedKV: rows of different lengths (head- or layer-adaptive budgets) in one shared page pool — nothing is padded
to the longest row, so the memory an uneven allocation saves is saved for real.

Layout (vLLM's paged KV cache, arXiv:2309.06180): keys and values of every (sequence, KV head) row of a layer live in
``(pages, P, D)`` buffers; each page belongs to one row (``page_row``), a row's pages are in pool order (a row only
ever takes the next free page), and only a row's last page may be partly filled. The pool's first ``used`` pages are
in use, the rest is headroom; it grows geometrically, so appends are amortised O(1) and a decode step appends one
token to every row with a handful of tensor operations. Attention reads the pool in place
(:func:`tokensieve.attention.ragged.paged_decode`): no Python loop over rows, no gather, no padding to the longest
row. Why this layout and not a packed buffer with a padded gather, nested tensors or FlexAttention:
docs/results/benchmarks.md ("Ragged decode kernel").

Bytes: ``kv_bytes`` counts the stored entries exactly; ``allocated_bytes`` the whole pool (every page, the unfilled
slots of each row's last page and the pool's headroom included: at most ``P - 1`` slots per row plus the headroom);
``meta_bytes`` the true positions, the per-slot logit bias / fill mask and the page-owner table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import fused
from ..attention.dense import PLAIN, Modifiers, chunk_allowed, grouped_attention, window_allowed
from ..attention.ragged import paged_decode
from .dense import _grow

DEAD = -2  # position of an entry dropped in place (RaggedKV.drop), until its slot is reclaimed
PAGE = 32  # slots per page of the pool (docs/results/benchmarks.md, "Ragged decode kernel": 16 / 32 / 64 measured)


@dataclass
class Row:
    """One (sequence, KV head) row: a standalone buffer (to build a :class:`RaggedKV` from), or a copy of a stored
    row (:attr:`RaggedKV.rows`)."""

    k: Tensor  # (capacity, D)
    v: Tensor  # (capacity, D)
    pos: Tensor  # (capacity,) int32
    bias: Tensor | None  # (capacity,) or None
    n: int

    @classmethod
    def of(cls, k: Tensor, v: Tensor, pos: Tensor, bias: Tensor | None = None, reserve: int = 0) -> Row:
        n, D = k.shape
        cap = n + max(0, reserve)
        kb = k.new_empty(cap, D)
        vb = v.new_empty(cap, D)
        pb = torch.empty(cap, dtype=torch.int32, device=k.device)
        kb[:n], vb[:n], pb[:n] = k, v, pos.to(torch.int32)
        bb = None
        if bias is not None:
            bb = k.new_zeros(cap)
            bb[:n] = bias
        return cls(kb, vb, pb, bb, n)

    def reserve(self, extra: int) -> None:
        need = self.n + extra
        if need <= self.k.shape[0]:
            return
        new = Row.of(
            self.k[: self.n],
            self.v[: self.n],
            self.pos[: self.n],
            None if self.bias is None else self.bias[: self.n],
            reserve=extra,
        )
        self.k, self.v, self.pos, self.bias = new.k, new.v, new.pos, new.bias

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        L = k.shape[0]
        if self.n + L > self.k.shape[0]:
            self.reserve(_grow(self.n + L) - self.n)
        s, e = self.n, self.n + L
        self.k[s:e], self.v[s:e], self.pos[s:e] = k, v, pos.to(torch.int32)
        if self.bias is not None:
            self.bias[s:e] = 0
        self.n = e


_FILL = {"_k": 0.0, "_v": 0.0, "_pos": -1, "_bias": float("-inf"), "_page_row": -1}  # pool arrays: empty value


class RaggedKV:
    """Rows of different lengths in one page pool (see the module docstring); no padding to the longest row.

    Args:
        rows: ``batch * heads`` rows (sequence-major), any lengths; their spare capacity becomes pool headroom.
        batch, heads: sequences and KV heads.
        page: slots per page.
    """

    def __init__(self, rows: list[Row], batch: int, heads: int, *, page: int = PAGE) -> None:
        if len(rows) != batch * heads:
            raise ValueError(f"RaggedKV needs {batch * heads} rows, got {len(rows)}")
        r0 = rows[0]
        D = r0.k.shape[1]
        lengths = torch.tensor([r.n for r in rows], dtype=torch.long)
        has_bias = any(r.bias is not None for r in rows)
        k = torch.cat([r.k[: r.n] for r in rows]) if rows else r0.k[:0]
        v = torch.cat([r.v[: r.n] for r in rows])
        pos = torch.cat([r.pos[: r.n] for r in rows])
        bias = None
        if has_bias:
            bias = torch.cat([r.bias[: r.n] if r.bias is not None else r.k.new_zeros(r.n) for r in rows])
        headroom = max([r.k.shape[0] - r.n for r in rows] + [0])
        self._init_pool(k.reshape(-1, D), v.reshape(-1, D), pos, bias, lengths, batch, heads, page, headroom)

    @classmethod
    def packed(
        cls,
        k: Tensor,
        v: Tensor,
        pos: Tensor,
        bias: Tensor | None,
        lengths: Tensor,
        batch: int,
        heads: int,
        *,
        reserve: int = 0,
        page: int = PAGE,
    ) -> RaggedKV:
        """A store from entries packed row after row: k, v ``(sum(lengths), D)``, pos ``(sum,)``, bias ``(sum,)``
        or None, lengths ``(batch * heads,)``; ``reserve``: room for that many more tokens in every row."""
        self = cls.__new__(cls)
        self._init_pool(k, v, pos, bias, lengths.long(), batch, heads, page, reserve)
        return self

    def _init_pool(
        self,
        k: Tensor,
        v: Tensor,
        pos: Tensor,
        bias: Tensor | None,
        lengths: Tensor,
        batch: int,
        heads: int,
        page: int,
        reserve: int,
    ) -> None:
        self.batch, self.heads, self.page = batch, heads, page
        self._new: list[Tensor] = []  # per sequence: chunk indices of the tokens appended last
        self._new_pos: Tensor | None = None  # (B, L) true positions of the last chunk's tokens (-1 at padding)
        self._has_bias = bias is not None
        R, P, D = batch * heads, page, k.shape[-1]
        device = k.device
        self._n = lengths.clone().to(device)  # (R,) entries per row, dropped ones (see `drop`) included
        self._dead = torch.zeros_like(self._n)  # (R,) entries dropped in place, not yet compacted away
        npages = (self._n + P - 1) // P  # (R,) pages per row
        used = int(npages.sum())
        extra = int(((self._n + reserve + P - 1) // P - npages).sum()) if reserve > 0 else 0
        cap = used + extra
        self._k = k.new_zeros(cap, P, D)
        self._v = v.new_zeros(cap, P, D)
        self._pos = torch.full((cap, P), -1, dtype=torch.int32, device=device)
        self._bias = k.new_full((cap, P), float("-inf"))  # logit bias of each slot; -inf: not filled
        self._page_row = torch.full((cap,), -1, dtype=torch.long, device=device)
        self._page_row[:used] = torch.repeat_interleave(torch.arange(R, device=device), npages)
        self._last = torch.full((R,), -1, dtype=torch.long, device=device)  # each row's last page (-1: none)
        first = torch.cumsum(npages, 0) - npages
        self._last = torch.where(npages > 0, first + npages - 1, self._last)
        self._used = used
        # entry j of row r sits in page first[r] + j // P, slot j % P
        row_of = torch.repeat_interleave(torch.arange(R, device=device), self._n)
        start = torch.cumsum(self._n, 0) - self._n
        j = torch.arange(int(self._n.sum()), device=device) - start[row_of]
        pg, sl = first[row_of] + j // P, j % P
        self._k[pg, sl] = k
        self._v[pg, sl] = v
        self._pos[pg, sl] = pos.to(torch.int32)
        self._bias[pg, sl] = 0.0 if bias is None else bias.to(self._bias.dtype)

    evictions = 0  # ragged stores are never evicted from while decoding

    # ------------------------------------------------------------------------------------------------ pages
    def _grow_pool(self, need: int) -> None:
        """Make room for ``need`` pages in use (geometric growth: amortised O(1) appends)."""
        cap = self._k.shape[0]
        if need <= cap:
            return
        new_cap = max(need, _grow(cap) if cap else need)
        P, D = self.page, self._k.shape[-1]
        u = self._used
        k = self._k.new_zeros(new_cap, P, D)
        v = self._v.new_zeros(new_cap, P, D)
        pos = torch.full((new_cap, P), -1, dtype=torch.int32, device=self._k.device)
        bias = self._k.new_full((new_cap, P), float("-inf"))
        page_row = torch.full((new_cap,), -1, dtype=torch.long, device=self._k.device)
        k[:u], v[:u], pos[:u], bias[:u], page_row[:u] = (
            self._k[:u], self._v[:u], self._pos[:u], self._bias[:u], self._page_row[:u],
        )  # fmt: skip
        self._k, self._v, self._pos, self._bias, self._page_row = k, v, pos, bias, page_row

    def _table(self) -> tuple[Tensor, Tensor]:
        """Block table: ``(R, max pages)`` page ids of each row in order (-1 past its pages), and pages per row."""
        R, u = self.batch * self.heads, self._used
        owners = self._page_row[:u]
        counts = torch.bincount(owners, minlength=R)
        order = torch.argsort(owners, stable=True)  # pages grouped by row, each row's in pool order
        width = int(counts.max()) if u else 0
        first = torch.cumsum(counts, 0) - counts
        j = torch.arange(u, device=owners.device) - first[owners[order]]
        table = torch.full((R, width), -1, dtype=torch.long, device=owners.device)
        table[owners[order], j] = order
        return table, counts

    def _row_slots(self) -> tuple[Tensor, Tensor]:
        """``(R, n_max)`` flat slot (page * P + offset) of every entry of each row (0 past its length) and the
        ``(R, n_max)`` bool of filled entries."""
        table, _ = self._table()
        P = self.page
        n_max = int(self._n.max()) if self._n.numel() else 0
        j = torch.arange(n_max, device=table.device)
        filled = j[None, :] < self._n[:, None]
        pages = table.gather(1, (j // P)[None, :].expand(table.shape[0], n_max).clamp(max=max(table.shape[1] - 1, 0)))
        slots = torch.where(filled, pages * P + j % P, torch.zeros_like(pages))
        return slots, filled

    # ------------------------------------------------------------------------------------------------ rows
    @property
    def rows(self) -> list[Row]:
        """Copies of the rows (sequence-major), for inspection; appending to them does not change the store."""
        out = []
        for b in range(self.batch):
            for h in range(self.heads):
                k, v, pos = self.row(b, h)
                r = self._flat_row(b * self.heads + h)
                bias = self._bias.view(-1)[r].clone() if self._has_bias else None
                out.append(Row(k, v, pos, bias, k.shape[0]))
        return out

    def _flat_row(self, r: int) -> Tensor:
        """Flat slots (page * P + offset) of row ``r``'s live entries, in order."""
        pages = (self._page_row[: self._used] == r).nonzero().flatten()
        P = self.page
        slots = (pages[:, None] * P + torch.arange(P, device=pages.device)).flatten()[: int(self._n[r])]
        return slots[self._pos.view(-1)[slots] != DEAD] if int(self._dead[r]) else slots

    def row(self, b: int, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """Stored (keys ``(n, D)``, values, positions) of one row."""
        s = self._flat_row(b * self.heads + h)
        D = self._k.shape[-1]
        return self._k.view(-1, D)[s], self._v.view(-1, D)[s], self._pos.view(-1)[s]

    def lengths(self) -> Tensor:
        """``(B, H)`` live entries per row (entries dropped in place are not counted)."""
        return (self._n - self._dead).view(self.batch, self.heads)

    def sizes(self) -> Tensor:
        """``(R,)`` entries per row as stored in order, dropped ones included: the index range of
        :meth:`entry_positions`, :meth:`take` and :meth:`keep`."""
        return self._n.clone()

    @property
    def lengths_list(self) -> list[int]:
        return [int(x) for x in self._n.tolist()]

    # ------------------------------------------------------------------------------------------------ bytes
    def kv_bytes(self) -> int:
        return 2 * int((self._n - self._dead).sum()) * self._k.shape[-1] * self._k.element_size()

    def allocated_bytes(self) -> int:
        return 2 * self._k.numel() * self._k.element_size()

    def decode_bytes(self) -> int:
        """Bytes a single-token decode step reads: keys, values and slot bias of every page in use (the unfilled
        slots of each row's last page included), and the page-owner table."""
        P, D, es = self.page, self._k.shape[-1], self._k.element_size()
        return self._used * (P * (2 * D + 1) * es + self._page_row.element_size())

    def meta_bytes(self) -> int:
        arrays = (self._pos, self._bias, self._page_row, self._n, self._last)
        return sum(a.numel() * a.element_size() for a in arrays)

    # ------------------------------------------------------------------------------------------------ changes
    def truncate(self, lengths: list[int]) -> None:
        """Forget every entry appended after the first ``lengths[row]`` of each row (pages left empty are freed)."""
        new = torch.tensor(lengths, dtype=torch.long, device=self._n.device)
        if new.shape != self._n.shape or bool(((new < 0) | (new > self._n)).any()):
            raise ValueError(f"cannot truncate rows of {self._n.tolist()} entries to {lengths}")
        P, u = self.page, self._used
        slots, filled = self._row_slots()
        drop = filled & (torch.arange(filled.shape[1], device=filled.device)[None, :] >= new[:, None])
        self._bias.view(-1)[slots[drop]] = float("-inf")
        self._pos.view(-1)[slots[drop]] = -1
        self._n = new
        if bool(self._dead.any()):  # count the dropped entries that remain
            slots, filled = self._row_slots()
            self._dead = ((self._pos.view(-1)[slots] == DEAD) & filled).sum(1)
        # keep the pages still holding an entry, in pool order (a row's pages stay in order)
        table, _ = self._table()
        npages = (new + P - 1) // P
        keep_mask = torch.zeros(u, dtype=torch.bool, device=table.device)
        cols = torch.arange(table.shape[1], device=table.device)[None, :]
        live = (cols < npages[:, None]) & (table >= 0)
        keep_mask[table[live]] = True
        self._compact_pages(keep_mask.nonzero().flatten())

    def entry_positions(self) -> Tensor:
        """``(R, n_max)`` true position of every stored entry, rows padded to the longest with -1; rows
        sequence-major (``r = b * heads + h``), each row's entries in the order they were stored (ascending
        positions); an entry dropped in place (:meth:`drop`) reads ``DEAD`` (-2) until the next :meth:`keep`.
        Cheap: reads positions only."""
        slots, filled = self._row_slots()
        pos = self._pos.view(-1)[slots.flatten()].view(slots.shape).long()
        return torch.where(filled, pos, torch.full_like(pos, -1))

    def slots(self, rows: Tensor, idx: Tensor) -> Tensor:
        """Flat pool slots ``(m, c)`` of the entries at indices ``idx`` ``(m, c)`` (in stored order, as
        :meth:`entry_positions`) of rows ``rows`` ``(m,)``; every index must be below its row's :meth:`sizes`."""
        if idx.shape[0] != rows.shape[0]:
            raise ValueError(f"slots: {idx.shape[0]} rows of indices for {rows.shape[0]} rows")
        if idx.numel() and bool(((idx < 0) | (idx >= self._n.index_select(0, rows)[:, None])).any()):
            raise ValueError("slots: an index outside its row")
        table, _ = self._table()
        P = self.page
        return table.index_select(0, rows).gather(1, idx // P) * P + idx % P

    def take(self, rows: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values ``(m, c, D)`` and positions ``(m, c)`` of the entries at indices ``idx`` ``(m, c)`` of
        rows ``rows`` ``(m,)`` (see :meth:`slots`). A copy."""
        return self.take_at(self.slots(rows, idx))

    def take_at(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values and positions at flat pool ``slots`` (any shape; from :meth:`slots`)."""
        D = self._k.shape[-1]
        flat = slots.flatten()
        k = self._k.view(-1, D).index_select(0, flat).view(*slots.shape, D)
        v = self._v.view(-1, D).index_select(0, flat).view(*slots.shape, D)
        return k, v, self._pos.view(-1).index_select(0, flat).view(slots.shape).long()

    def drop(self, rows: Tensor, idx: Tensor) -> None:
        """Drop the entries at indices ``idx`` ``(m,)`` of rows ``rows`` ``(m,)`` in place, O(m): they are masked
        from attention at once (logit bias ``-inf``, position ``DEAD``) and no longer counted as stored
        (:meth:`lengths`, :meth:`kv_bytes`); their slots stay taken until :meth:`reclaim` (or any :meth:`keep`),
        which a caller runs once enough have accumulated (:meth:`dead`). Indices stay those of
        :meth:`entry_positions` until then."""
        if rows.numel():
            self.drop_at(rows, self.slots(rows, idx[:, None])[:, 0])

    def drop_at(self, rows: Tensor, slots: Tensor) -> None:
        """:meth:`drop` by flat pool slots ``(m,)`` (from :meth:`slots`) of entries of rows ``rows`` ``(m,)``."""
        if rows.numel() == 0:
            return
        if bool((self._pos.view(-1)[slots] == DEAD).any()) or slots.unique().numel() != slots.numel():
            raise ValueError("drop: an entry dropped twice")
        self._bias.view(-1)[slots] = float("-inf")
        self._pos.view(-1)[slots] = DEAD
        self._dead.index_add_(0, rows, torch.ones_like(rows))
        self.evictions += 1  # a rollback past this point is refused

    def reclaim(self) -> int:
        """Reclaim the slots of the entries dropped in place (their rows packed again). Returns how many."""
        if not bool(self._dead.any()):
            return 0
        return self.keep(torch.ones(self._n.numel(), int(self._n.max()), dtype=torch.bool))

    def dead(self) -> int:
        """Entries dropped in place and not yet reclaimed."""
        return int(self._dead.sum())

    def keep(self, mask: Tensor) -> int:
        """Evict, in place and for every row at once, the entries ``mask`` leaves out: ``mask`` ``(R, n)`` bool
        over each row's entries in stored order (as :meth:`entry_positions`; ``n ≥`` the longest row, columns past
        a row's length ignored). The kept entries stay in order, packed into whole pages; the pool keeps its
        capacity; entries dropped in place (:meth:`drop`) go too. Returns the number of slots reclaimed."""
        slots, filled = self._row_slots()
        n_max = slots.shape[1]
        if mask.shape[0] != slots.shape[0] or mask.shape[1] < n_max:
            raise ValueError(f"keep: mask of shape {tuple(mask.shape)} for rows of {self._n.tolist()} entries")
        live = filled & (self._pos.view(-1)[slots.flatten()].view(slots.shape) != DEAD)
        kept = live & mask[:, :n_max].to(filled.device)
        dropped = int(filled.sum()) - int(kept.sum())  # entries dropped in place earlier are reclaimed too
        if dropped == 0:
            return 0
        D, P = self._k.shape[-1], self.page
        flat = slots[kept]  # row-major: each row's kept entries in order
        k = self._k.view(-1, D).index_select(0, flat)
        v = self._v.view(-1, D).index_select(0, flat)
        pos = self._pos.view(-1).index_select(0, flat)
        bias = self._bias.view(-1).index_select(0, flat) if self._has_bias else None
        lengths = kept.sum(1)
        cap_pages = self._k.shape[0]
        new, evictions = self._new, self.evictions
        new_pos = self._new_pos
        self._init_pool(k, v, pos, bias, lengths, self.batch, self.heads, P, 0)
        need = int(((lengths + P - 1) // P).sum())
        if cap_pages > need:
            self._grow_pool(cap_pages)  # the headroom the pool had: appends stay amortised O(1)
        self._new, self._new_pos = new, new_pos
        self.evictions = evictions + 1  # a rollback past this point is refused
        return dropped

    def _compact_pages(self, keep: Tensor) -> None:
        """Keep pages ``keep`` (ascending) as the pool's first pages, in that order."""
        m = keep.numel()
        for name, fill in _FILL.items():
            a = getattr(self, name)
            a[:m] = a.index_select(0, keep)
            a[m:] = fill
        self._used = m
        self._refresh_last()

    def _refresh_last(self) -> None:
        R = self.batch * self.heads
        last = torch.full((R,), -1, dtype=torch.long, device=self._n.device)
        u = self._used
        if u:
            last.scatter_reduce_(0, self._page_row[:u], torch.arange(u, device=last.device), "amax")
        self._last = last

    def reorder(self, rows: Tensor) -> None:
        """Keep sequence ``rows[i]`` as sequence ``i`` (beam search); a sequence kept twice is copied."""
        H = self.heads
        picked = rows.long()
        src_rows = (picked[:, None] * H + torch.arange(H, device=picked.device)[None, :]).flatten()  # (B'*H,)
        table, counts = self._table()
        t = table.index_select(0, src_rows)
        c = counts.index_select(0, src_rows)
        live = torch.arange(t.shape[1], device=t.device)[None, :] < c[:, None]
        pages = t[live]  # row-major: new row after new row
        new_owner = torch.repeat_interleave(torch.arange(src_rows.numel(), device=t.device), c)
        m = pages.numel()
        cap = max(m, self._k.shape[0])
        for name, fill in _FILL.items():
            a = getattr(self, name)
            b = a.new_full((cap, *a.shape[1:]), fill)
            b[:m] = a.index_select(0, pages)
            setattr(self, name, b)
        self._page_row[:m] = new_owner
        self._n = self._n.index_select(0, src_rows)
        self._dead = self._dead.index_select(0, src_rows)
        self._used, self.batch = m, int(picked.numel())
        self._refresh_last()
        self._new = [self._new[int(b)] for b in picked.tolist()] if self._new else []
        if self._new_pos is not None:
            self._new_pos = self._new_pos.index_select(0, rows)

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more tokens in every row without reallocating later."""
        if extra <= 0:
            return
        P = self.page
        have = (self._n + P - 1) // P
        need = int(((self._n + extra + P - 1) // P - have).sum())
        self._grow_pool(self._used + need)

    def append(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor | None) -> None:
        """Append a chunk: k, v ``(B, H_kv, L, D)``, positions ``(B, L)``, valid ``(B, L)`` or None — padding tokens
        of the chunk are not stored. Every row's tokens go to the free slots of its last page, then to new pages
        taken from the pool's headroom (all rows at once)."""
        B, H, L, D = k.shape
        P = self.page
        dev = k.device
        self._new_pos = positions if valid is None else torch.where(valid, positions, torch.full_like(positions, -1))
        if L == 1 and valid is None:  # a decode step: one token per row, into its last page or a new one
            self._append_one(k.reshape(B * H, D), v.reshape(B * H, D), positions.reshape(B, 1).expand(B, H))
            return
        if valid is None:
            self._new = [torch.arange(L, device=dev)] * B
            cnt = torch.full((B * H,), L, dtype=torch.long, device=dev)
            kf, vf = k.reshape(-1, D), v.reshape(-1, D)
            pf = positions[:, None, :].expand(B, H, L).reshape(-1)
            row_of = torch.arange(B * H, device=dev).repeat_interleave(L)
            j = torch.arange(L, device=dev).repeat(B * H)
        else:
            self._new = [valid[b].nonzero().flatten() for b in range(B)]
            m = valid[:, None, :].expand(B, H, L)
            cnt = m.sum(-1).flatten()
            kf, vf = k[m], v[m]
            pf = positions[:, None, :].expand(B, H, L)[m]
            row_of = torch.repeat_interleave(torch.arange(B * H, device=dev), cnt)
            j = torch.arange(int(cnt.sum()), device=dev) - (torch.cumsum(cnt, 0) - cnt)[row_of]
        n0 = self._n
        have = (n0 + P - 1) // P
        new_pages = (n0 + cnt + P - 1) // P - have  # (R,)
        total_new = int(new_pages.sum())
        base = self._used + torch.cumsum(new_pages, 0) - new_pages  # first new page of each row
        if total_new:
            self._grow_pool(self._used + total_new)
            self._page_row[self._used : self._used + total_new] = torch.repeat_interleave(
                torch.arange(B * H, device=dev), new_pages
            )
        s = n0[row_of] + j  # slot ordinal within the row
        pi = s // P  # page ordinal within the row
        hv = have[row_of]
        pg = torch.where(pi < hv, self._last[row_of], base[row_of] + pi - hv)
        sl = s % P
        self._k[pg, sl] = kf
        self._v[pg, sl] = vf
        self._pos[pg, sl] = pf.to(torch.int32)
        self._bias[pg, sl] = 0.0
        self._used += total_new
        self._n = n0 + cnt
        if total_new:
            self._last = torch.where(new_pages > 0, base + new_pages - 1, self._last)

    def _append_one(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """One token per row: k, v ``(R, D)``, pos ``(B, H)``."""
        P, R = self.page, k.shape[0]
        if not self._new or len(self._new) != self.batch or self._new[0].numel() != 1:
            self._new = [torch.zeros(1, dtype=torch.long, device=k.device)] * self.batch
        off = self._n % P
        fresh = off == 0  # the row's last page is full (or it has none): take the next free page
        n_fresh = int(fresh.sum())
        if n_fresh:
            self._grow_pool(self._used + n_fresh)
            ids = self._used + torch.cumsum(fresh, 0) - 1
            self._page_row[self._used : self._used + n_fresh] = torch.arange(R, device=k.device)[fresh]
            self._last = torch.where(fresh, ids, self._last)
            self._used += n_fresh
        slot = self._last * P + off
        D = k.shape[1]
        self._k.view(-1, D).index_copy_(0, slot, k)
        self._v.view(-1, D).index_copy_(0, slot, v)
        self._pos.view(-1).index_copy_(0, slot, pos.reshape(R).to(torch.int32))
        self._bias.view(-1).index_fill_(0, slot, 0.0)
        self._n = self._n + 1

    # ------------------------------------------------------------------------------------------------ attend
    def attend(self, q: Tensor, scaling: float, mods: Modifiers = PLAIN) -> Tensor:
        """Attention of the last appended chunk's queries: q ``(B, H_q, L, D)`` → ``(B, H_q, L, D)``.

        A single-token step without modifiers reads the pool in place, every row at once (the fused kernel of
        :mod:`tokensieve.attention.fused` where it is built, else :func:`~tokensieve.attention.ragged.paged_decode`);
        a chunk, a sliding window or soft-capping gathers the
        rows padded to the longest and runs one masked grouped attention.
        """
        B, Hq, L, D = q.shape
        H = self.heads
        G = Hq // H
        if L == 1 and mods.plain:
            u = self._used
            if fused.kernels() is not None:  # every row's pages read in place, one pass (attention.fused)
                table = fused.owner_table(self._page_row[:u], B * H)  # (R, 1, W)
                out, _ = fused.paged_attention(q.reshape(B * H, G, D), self._k[:u], self._v[:u], table, scaling,
                                               bias=self._bias[:u])  # fmt: skip
                return out.view(B, Hq, 1, D)
            out = paged_decode(
                q.reshape(B * H, G, D), self._k[:u], self._v[:u], self._page_row[:u], self._bias[:u], B * H, scaling
            )
            return out.view(B, Hq, 1, D)
        return self._attend_padded(q, scaling, mods)

    def _attend_padded(self, q: Tensor, scaling: float, mods: Modifiers) -> Tensor:
        B, Hq, L, D = q.shape
        H = self.heads
        G = Hq // H
        slots, filled = self._row_slots()  # (R, n_max)
        n_max = slots.shape[1]
        K = self._k.view(-1, D).index_select(0, slots.flatten()).view(B, H, n_max, D)
        V = self._v.view(-1, D).index_select(0, slots.flatten()).view(B, H, n_max, D)
        allowed = filled.view(B, H, 1, n_max)
        if L > 1:
            # key j of row r is token (j - (n_r - m_b)) of the chunk's m_b stored tokens, if that is >= 0
            dev = q.device
            m_b = torch.tensor([int(x.numel()) for x in self._new], dtype=torch.long, device=dev)  # (B,)
            new_idx = torch.full((B, max(1, int(m_b.max()))), -1, dtype=torch.long, device=dev)
            for b, idx in enumerate(self._new):
                new_idx[b, : idx.numel()] = idx
            ordinal = torch.arange(n_max, device=dev)[None, :] - (self._n - m_b.repeat_interleave(H))[:, None]
            ordinal = ordinal.view(B, H, n_max)
            chunk_pos = torch.where(
                (ordinal >= 0) & filled.view(B, H, n_max),
                new_idx.gather(1, ordinal.clamp(0, new_idx.shape[1] - 1).view(B, -1)).view(B, H, n_max),
                torch.full_like(ordinal, -1),
            )
            allowed = allowed & chunk_allowed(chunk_pos, L)  # (B, H, L, n_max)
        if mods.window is not None and self._new_pos is not None:
            kpos = self._pos.view(-1).index_select(0, slots.flatten()).view(B, H, n_max)
            allowed = allowed & window_allowed(self._new_pos[:, None, :].expand(B, H, L), kpos, mods.window)
        allowed = allowed.expand(B, H, L, n_max)
        mask = allowed[:, :, None].expand(B, H, G, L, n_max).reshape(B, H, G * L, n_max)
        if self._has_bias:
            bias = self._bias.view(-1).index_select(0, slots.flatten()).view(B, H, 1, n_max)
            mask = torch.where(mask, bias, float("-inf"))
        out = grouped_attention(q.reshape(B, H, G * L, D), K, V, scaling, mask, mods.softcap)
        return torch.nan_to_num(out.reshape(B, Hq, L, D))  # queries (or rows) with no visible key: zeros
