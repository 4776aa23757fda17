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

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention.dense import PLAIN, Modifiers, chunk_allowed, grouped_attention, window_allowed
from ..attention.sparse import slot_mask
from ..errors import CapabilityError

GROW_MIN = 64  # smallest capacity step when a store has to grow


def _grow(n_needed: int) -> int:
    return n_needed + max(GROW_MIN, n_needed // 4)


class DenseKV:
    """All rows have the same length: keys/values in one ``(B, H_kv, capacity, D)`` block.

    Per-slot arrays (keys, values, positions, and optionally a logit bias and method-owned ``aux`` scores) share
    the slot axis, so appending, growing, evicting (:meth:`swap_remove`) and compacting (:meth:`compact`) keep them
    aligned.

    Attributes:
        valid: ``(B, capacity)`` bool or None — False for stored padding (only the uncompressed baseline stores
            padding, as transformers' own caches do). Padding slots are the same for every head of a sequence.
        bias: ``(B, H_kv, capacity)`` additive logit bias or None.
        aux: name → ``(B, H_kv, capacity)`` per-slot state owned by a decode method (e.g. accumulated attention).
    """

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        *,
        valid: Tensor | None = None,
        bias: Tensor | None = None,
        reserve: int = 0,
    ) -> None:
        B, H, n, D = keys.shape
        cap = n + max(0, reserve)
        # zeros, not garbage: sparse kernels may read (masked) slots past `n`, and 0 x NaN would poison them
        self._k = keys.new_zeros(B, H, cap, D)
        self._v = values.new_zeros(B, H, cap, D)
        self._pos = torch.zeros(B, H, cap, dtype=torch.int32, device=keys.device)
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._pos[:, :, :n] = positions.to(torch.int32)
        self._valid: Tensor | None = None
        if valid is not None and not bool(valid.all()):
            self._valid = torch.ones(B, cap, dtype=torch.bool, device=keys.device)
            self._valid[:, :n] = valid
        self._bias: Tensor | None = None
        if bias is not None:
            self._bias = keys.new_zeros(B, H, cap)
            self._bias[:, :, :n] = bias
        self.aux: dict[str, Tensor] = {}
        self.n = n
        # True while slot i of every row holds true position i (a full cache without padding): layers can then
        # share slot indices directly.
        self.identity_positions = False
        self.evictions = 0  # bumped by swap_remove / compact: a checkpoint cannot be restored across them

    # ------------------------------------------------------------------------------------------------ views
    @property
    def keys(self) -> Tensor:
        return self._k[:, :, : self.n]

    @property
    def values(self) -> Tensor:
        return self._v[:, :, : self.n]

    @property
    def positions(self) -> Tensor:
        return self._pos[:, :, : self.n]

    @property
    def valid(self) -> Tensor | None:
        return None if self._valid is None else self._valid[:, : self.n]

    @property
    def bias(self) -> Tensor | None:
        return None if self._bias is None else self._bias[:, :, : self.n]

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    @property
    def has_padding(self) -> bool:
        return self._valid is not None

    @property
    def has_bias(self) -> bool:
        return self._bias is not None

    @property
    def buffers(self) -> tuple[Tensor, Tensor]:
        """The whole key/value buffers ``(B, H_kv, capacity, D)`` (slots ``>= n`` are unused)."""
        return self._k, self._v

    def _per_slot(self) -> dict[str, Tensor]:
        """Every (B, H, capacity[, D]) per-slot array, by name."""
        arrays = {"k": self._k, "v": self._v, "pos": self._pos}
        if self._bias is not None:
            arrays["bias"] = self._bias
        for name, a in self.aux.items():
            arrays["aux:" + name] = a
        return arrays

    def _set_per_slot(self, arrays: dict[str, Tensor]) -> None:
        self._k, self._v, self._pos = arrays["k"], arrays["v"], arrays["pos"]
        if "bias" in arrays:
            self._bias = arrays["bias"]
        for name in list(self.aux):
            self.aux[name] = arrays["aux:" + name]

    def add_aux(self, name: str, init: Tensor | None = None) -> Tensor:
        """Register a per-slot state array ``(B, H_kv, capacity)`` (zeros, or ``init`` for the stored slots)."""
        B, H, cap, _ = self._k.shape
        a = self._k.new_zeros(B, H, cap)
        if init is not None:
            a[:, :, : self.n] = init
        self.aux[name] = a
        return a

    def lengths(self) -> Tensor:
        B, H = self._k.shape[:2]
        if self._valid is None:
            return torch.full((B, H), self.n, dtype=torch.long)
        return self._valid[:, : self.n].sum(-1)[:, None].expand(B, H).clone()

    def row(self, b: int, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """Stored (keys ``(n, D)``, values, positions) of one row, padding excluded."""
        sel = slice(None) if self._valid is None else self._valid[b, : self.n]
        return self.keys[b, h][sel], self.values[b, h][sel], self.positions[b, h][sel]

    # ------------------------------------------------------------------------------------------------ bytes
    def kv_bytes(self) -> int:
        return self.entry_bytes(self.n)

    def entry_bytes(self, entries_per_row: int, *, keys_only: bool = False) -> int:
        """Bytes of ``entries_per_row`` entries in every row (keys and values, or keys only)."""
        B, H, _, D = self._k.shape
        return (1 if keys_only else 2) * B * H * entries_per_row * D * self._k.element_size()

    def allocated_bytes(self) -> int:
        return 2 * self._k.numel() * self._k.element_size()

    def meta_bytes(self) -> int:
        total = self._pos.numel() * self._pos.element_size()
        if self._valid is not None:
            total += self._valid.numel()
        if self._bias is not None:
            total += self._bias.numel() * self._bias.element_size()
        total += sum(a.numel() * a.element_size() for a in self.aux.values())
        return total

    # ------------------------------------------------------------------------------------------------ growth
    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens without reallocating later."""
        need = self.n + extra
        if need <= self.capacity:
            return
        grown = {}
        for name, a in self._per_slot().items():
            b = a.new_zeros(*a.shape[:2], need, *a.shape[3:])
            b[:, :, : self.n] = a[:, :, : self.n]
            grown[name] = b
        self._set_per_slot(grown)
        if self._valid is not None:
            valid = torch.ones(self._k.shape[0], need, dtype=torch.bool, device=self._k.device)
            valid[:, : self.n] = self._valid[:, : self.n]
            self._valid = valid

    def truncate(self, n: int) -> None:
        """Forget every entry appended after the first ``n`` (nothing is copied)."""
        if not 0 <= n <= self.n:
            raise ValueError(f"cannot truncate {self.n} entries to {n}")
        self.n = n

    def align(self, multiple: int) -> None:
        """Round the capacity up to a multiple of ``multiple`` (so the buffers can be viewed as pages)."""
        if self.capacity % multiple:
            self.reserve(-(-self.capacity // multiple) * multiple - self.n)

    def pages(self, page: int) -> tuple[Tensor, Tensor]:
        """Key/value buffers viewed as pages, ``(B * H_kv * capacity / page, page, D)`` (capacity must be aligned)."""
        B, H, cap, D = self._k.shape
        return self._k.view(B * H * (cap // page), page, D), self._v.view(B * H * (cap // page), page, D)

    def append(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor | None) -> None:
        """Append a chunk: k, v ``(B, H_kv, L, D)``, positions ``(B, L)``, valid ``(B, L)`` or None.

        Padding of the chunk is stored (and masked) — this store keeps rows equal in length.
        """
        L = k.shape[2]
        if self.n + L > self.capacity:
            self.reserve(_grow(self.n + L) - self.n)
        s, e = self.n, self.n + L
        self._k[:, :, s:e] = k
        self._v[:, :, s:e] = v
        self._pos[:, :, s:e] = positions.to(torch.int32)[:, None, :]
        if valid is not None and not bool(valid.all()):
            if self._valid is None:
                self._valid = torch.ones(k.shape[0], self.capacity, dtype=torch.bool, device=k.device)
            self._valid[:, s:e] = valid
        elif self._valid is not None:
            self._valid[:, s:e] = True
        if self._bias is not None:
            self._bias[:, :, s:e] = 0
        for a in self.aux.values():
            a[:, :, s:e] = 0
        if valid is not None:
            self.identity_positions = False
        self.n = e

    # ------------------------------------------------------------------------------------------------ eviction
    def swap_remove(self, slots: Tensor) -> None:
        """Evict one entry per row: the last slot's entry moves into ``slots`` ``(B, H_kv)``; ``n`` shrinks by one.

        O(1) per row. Entry order changes, which attention does not care about (RoPE is already applied).
        If a row evicts a padding slot, every head of that sequence must evict the same slot.
        """
        last = self.n - 1
        B, H = slots.shape
        b_idx = torch.arange(B, device=slots.device)[:, None].expand(B, H)
        h_idx = torch.arange(H, device=slots.device)[None, :].expand(B, H)
        for a in self._per_slot().values():
            a[b_idx, h_idx, slots] = a[:, :, last]
        if self._valid is not None:
            self._valid[torch.arange(B), slots[:, 0]] = self._valid[:, last]
            if bool(self._valid[:, :last].all()):
                self._valid = None
        self.identity_positions = False
        self.evictions += 1
        self.n = last

    def compact(self, keep: Tensor) -> None:
        """Keep only slots ``keep`` ``(B, H_kv, k)`` (each row ascending), in that order; ``n`` becomes ``k``.

        Padding slots may be kept only if every head of the sequence keeps the same ones.
        """
        k = keep.shape[-1]
        for a in self._per_slot().values():
            idx = keep if a.dim() == 3 else keep[..., None].expand(*keep.shape, a.shape[-1])
            a[:, :, :k] = a.gather(2, idx)
        if self._valid is not None:
            self._valid[:, :k] = self._valid.gather(1, keep[:, 0])
            if bool(self._valid[:, :k].all()):
                self._valid = None
        self.identity_positions = False
        self.evictions += 1
        self.n = k

    # ------------------------------------------------------------------------------------------------ attend
    def attend(self, q: Tensor, scaling: float, mods: Modifiers = PLAIN) -> Tensor:
        """Attention of the last appended chunk's queries over the whole store, with the layer's modifiers.

        q: ``(B, H_q, L, D)`` with ``L`` the last chunk's length (its tokens are the last ``L`` slots)
        → ``(B, H_q, L, D)``.
        """
        B, Hq, L, D = q.shape
        H = self._k.shape[1]
        G = Hq // H
        qg = q.reshape(B, H, G * L, D)  # (B, H_kv, G*L, D): query heads of a group side by side
        mask = self.attention_mask(L, G, mods.window)
        out = grouped_attention(qg, self.keys, self.values, scaling, mask, mods.softcap)  # (B, H_kv, G*L, D)
        return out.reshape(B, Hq, L, D)

    def attention_mask(self, L: int, G: int, window: int | None = None) -> Tensor | None:
        """Mask/bias for queries of the last ``L`` slots, grouped ``G`` per KV head: None, a bool mask
        ``(B|1, 1|H_kv, G*L, n)``, or an additive float mask ``(B, H_kv, G*L|1, n)``. With a sliding ``window``,
        keys at least ``window`` positions older than a query are masked (by true positions)."""
        mask: Tensor | None = None
        if window is not None and self.n > 1:
            pos = self.positions  # (B, H, n)
            if int(pos[..., -1:].amax() - pos.clamp_min(0).amin()) >= window:  # some key is outside a window
                allowed = window_allowed(pos[..., self.n - L :], pos, window)  # (B, H, L, n)
                if L > 1 or self._valid is not None:
                    allowed = allowed & self._chunk_allowed(L)
                B, H = allowed.shape[:2]
                mask = allowed[:, :, None].expand(B, H, G, L, self.n).reshape(B, H, G * L, self.n)
                if self._bias is not None:
                    mask = torch.where(mask, self._bias[:, :, None, : self.n], float("-inf"))
                return mask
        if L > 1 or self._valid is not None:
            allowed = self._chunk_allowed(L)  # (B|1, 1, L, n)
            mask = allowed[:, :, None].expand(-1, -1, G, -1, -1).reshape(allowed.shape[0], 1, G * L, self.n)
        if self._bias is not None:
            bias = self._bias[:, :, None, : self.n]  # (B, H_kv, 1, n)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
        return mask

    def _chunk_allowed(self, L: int) -> Tensor:
        """``(B|1, 1, L, n)`` bool: causal within the last ``L`` slots, stored padding masked."""
        device = self._k.device
        chunk_pos = torch.full((self.n,), -1, dtype=torch.long, device=device)
        chunk_pos[self.n - L :] = torch.arange(L, device=device)
        key_valid = self.valid  # (B, n) or None
        if key_valid is None:
            return chunk_allowed(chunk_pos, L)[None, None]
        B = key_valid.shape[0]
        return chunk_allowed(chunk_pos.expand(B, -1), L, key_valid)[:, None]

    def reorder(self, rows: Tensor) -> None:
        """Keep sequence ``rows[i]`` as sequence ``i`` (beam search): ``rows`` ``(B',)`` long, repeats allowed."""
        self._set_per_slot({name: a.index_select(0, rows) for name, a in self._per_slot().items()})
        if self._valid is not None:
            self._valid = self._valid.index_select(0, rows)

    def slot_mask(self, slots: Tensor, keep: Tensor | None = None) -> Tensor | None:
        """Mask/bias ``(B, H_kv, 1, m)`` (or None) for attending to ``slots`` ``(B, H_kv, m)`` of this store."""
        return slot_mask(slots, self.n, self.valid, self.bias, keep)

    # ------------------------------------------------------------------------------------------------ misc
    def to_ragged(self) -> RaggedKV:
        B, H = self._k.shape[:2]
        rows = []
        for b in range(B):
            for h in range(H):
                k, v, p = self.row(b, h)
                bias = None
                if self._bias is not None:
                    keep = slice(None) if self._valid is None else self._valid[b, : self.n]
                    bias = self._bias[b, h, : self.n][keep]
                rows.append(Row.of(k, v, p, bias))
        return RaggedKV(rows, B, H)


@dataclass
class Row:
    """One (sequence, KV head) row of a ragged store."""

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


class RaggedKV:
    """Rows of different lengths, each in its own buffer (no padding to the longest row)."""

    def __init__(self, rows: list[Row], batch: int, heads: int) -> None:
        if len(rows) != batch * heads:
            raise ValueError(f"RaggedKV needs {batch * heads} rows, got {len(rows)}")
        self.rows = rows
        self.batch = batch
        self.heads = heads
        self._new: list[Tensor] = []  # per sequence: chunk indices of the tokens appended last
        self._new_pos: Tensor | None = None  # (B, L) true positions of the last chunk's tokens (-1 at padding)

    evictions = 0  # ragged stores are never evicted from while decoding

    def _row(self, b: int, h: int) -> Row:
        return self.rows[b * self.heads + h]

    def truncate(self, lengths: list[int]) -> None:
        """Forget every entry appended after the first ``lengths[row]`` of each row."""
        for r, n in zip(self.rows, lengths):
            if not 0 <= n <= r.n:
                raise ValueError(f"cannot truncate a row of {r.n} entries to {n}")
            r.n = n

    def lengths(self) -> Tensor:
        return torch.tensor([r.n for r in self.rows], dtype=torch.long).view(self.batch, self.heads)

    def reorder(self, rows: Tensor) -> None:
        """Keep sequence ``rows[i]`` as sequence ``i`` (beam search); a sequence kept twice is copied."""
        picked = [int(r) for r in rows.tolist()]
        seen: set[int] = set()
        new: list[Row] = []
        for b in picked:
            for h in range(self.heads):
                r = self._row(b, h)
                new.append(
                    r
                    if b not in seen
                    else Row(r.k.clone(), r.v.clone(), r.pos.clone(), None if r.bias is None else r.bias.clone(), r.n)
                )
            seen.add(b)
        self.rows, self.batch = new, len(picked)
        self._new = [self._new[b] for b in picked] if self._new else []
        if self._new_pos is not None:
            self._new_pos = self._new_pos.index_select(0, rows)

    def row(self, b: int, h: int) -> tuple[Tensor, Tensor, Tensor]:
        r = self._row(b, h)
        return r.k[: r.n], r.v[: r.n], r.pos[: r.n]

    def kv_bytes(self) -> int:
        return sum(2 * r.n * r.k.shape[1] * r.k.element_size() for r in self.rows)

    def allocated_bytes(self) -> int:
        return sum(2 * r.k.numel() * r.k.element_size() for r in self.rows)

    def meta_bytes(self) -> int:
        total = 0
        for r in self.rows:
            total += r.pos.numel() * r.pos.element_size()
            if r.bias is not None:
                total += r.bias.numel() * r.bias.element_size()
        return total

    def reserve(self, extra: int) -> None:
        for r in self.rows:
            r.reserve(extra)

    def append(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor | None) -> None:
        """Append a chunk; padding tokens of the chunk are not stored."""
        B, H, L, _ = k.shape
        self._new = []
        self._new_pos = positions if valid is None else torch.where(valid, positions, torch.full_like(positions, -1))
        for b in range(B):
            idx = torch.arange(L) if valid is None else valid[b].nonzero().flatten()
            self._new.append(idx)
            kb = k[b].index_select(1, idx) if valid is not None else k[b]
            vb = v[b].index_select(1, idx) if valid is not None else v[b]
            pb = positions[b].index_select(0, idx) if valid is not None else positions[b]
            for h in range(H):
                self._row(b, h).append(kb[h], vb[h], pb)

    def attend(self, q: Tensor, scaling: float, mods: Modifiers = PLAIN) -> Tensor:
        """Attention of the last appended chunk's queries: q ``(B, H_q, L, D)`` → ``(B, H_q, L, D)``."""
        B, Hq, L, D = q.shape
        G = Hq // self.heads
        out = q.new_empty(B, Hq, L, D)
        for b in range(B):
            new_idx = self._new[b] if self._new else torch.arange(L)
            for h in range(self.heads):
                r = self._row(b, h)
                k, v = r.k[: r.n], r.v[: r.n]
                mask: Tensor | None = None
                allowed: Tensor | None = None
                if L > 1:
                    chunk_pos = torch.full((r.n,), -1, dtype=torch.long)
                    chunk_pos[r.n - new_idx.numel() :] = new_idx
                    allowed = chunk_allowed(chunk_pos, L)  # (L, n)
                if mods.window is not None and self._new_pos is not None:
                    in_window = window_allowed(self._new_pos[b], r.pos[: r.n], mods.window)  # (L, n)
                    allowed = in_window if allowed is None else allowed & in_window
                if allowed is not None:
                    mask = allowed[None].expand(G, L, r.n).reshape(G * L, r.n)
                if r.bias is not None:
                    bias = r.bias[: r.n][None]
                    mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
                qg = q[b, h * G : (h + 1) * G].reshape(1, 1, G * L, D)
                m = None if mask is None else mask[None, None]
                o = grouped_attention(qg, k[None, None], v[None, None], scaling, m, mods.softcap)
                out[b, h * G : (h + 1) * G] = o.view(G, L, D)
        if L > 1 or mods.window is not None:
            out = torch.nan_to_num(out)  # padding queries before any stored key have empty rows
        return out


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


def bytes_per_entry(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one stored KV entry (one key and one value vector)."""
    return 2 * head_dim * torch.empty(0, dtype=dtype).element_size()


def mb(n_bytes: float) -> float:
    return n_bytes / 2**20


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


__all__ = ["DenseKV", "KVStore", "RaggedKV", "Row", "as_dense", "build_store", "bytes_per_entry"]
