"""DenseKV: every row of a layer has the same length — keys and values in one ``(B, H_kv, capacity, D)`` block.

Padding of a left-padded batch is stored (and masked); eviction keeps rows equal (O(1) slot swaps, compaction).
Byte counts are exact. Attention builds the store's mask and calls :mod:`tokensieve.attention`'s kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention.dense import PLAIN, Modifiers, chunk_allowed, grouped_attention, window_allowed
from ..attention.sparse import slot_mask

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
