"""RaggedKV: rows of different lengths (head- or layer-adaptive budgets), each in its own buffer — nothing is padded
to the longest row, so the memory an uneven allocation saves is saved for real."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention.dense import PLAIN, Modifiers, chunk_allowed, grouped_attention, window_allowed
from .dense import _grow


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


