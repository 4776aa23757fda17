"""The decode-time write gate shared by the methods that decide each KV pair once, when it leaves a local window.

SP-KV (a learned utility against a threshold τ) and KVzap's threshold form (a surrogate's predicted KVzip+ score
against a threshold, the DMS inference rule) both follow one rule: a query at position ``t`` sees key ``j`` iff
``t − j < W`` (``j`` is still in the window) or ``j`` was kept when it left the window. Not a method itself: the
methods subclass :class:`WindowGate`, give each layer a :class:`GateState` in ``setup`` and say which of the tokens
leaving the window are dropped (:meth:`WindowGate.token_drops`).

The steady state of decoding — one token per sequence leaves the window, found at its known place in every row —
reads just that token and drops it in place (O(1) per row; slots reclaimed every :data:`COMPACT` drops per row);
anything else (the first step after another method's prefill, a question appended as a chunk) takes the general path
over each row's positions. Each (layer, KV head) keeps its own number of entries in a ragged store.

A gate that reads the hidden state of a token (KVzap's surrogate) can only score it while the layer reads it, so it
scores every token when it is appended and keeps the score by position (:class:`ScoreTable`) until the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...cache.decode import DecodeLayer, DecodeMethod
from ...cache.storage import KVStore, RaggedKV, as_ragged
from ...core.method import PrefillMethod

COMPACT = 32  # dropped-in-place entries per row (on average) before their slots are reclaimed


@dataclass
class GateState:
    """What a window gate keeps per layer while decoding.

    Attributes:
        window: ``W``: a query at ``t`` sees key ``j`` iff ``t − j < W`` or ``j`` was kept.
        decided: ``(B,)`` long: positions below this were decided (written or dropped) already.
        sink: the first ``sink`` positions are never decided (always kept).
        dropped: entries dropped while decoding (all rows).
    """

    window: int
    decided: Tensor
    sink: int = 0
    dropped: int = 0


class ScoreTable:
    """Scores of every token by position, per sequence and KV head: ``(B, H_kv, capacity)``, grown as needed."""

    def __init__(self, batch: int, heads: int, capacity: int = 0) -> None:
        self.scores = torch.zeros(batch, heads, max(1, capacity))

    def write(self, scores: Tensor, positions: Tensor) -> None:
        """Set the scores ``(B, H, L)`` of the tokens at ``positions`` ``(B, L)`` (-1: padding, skipped)."""
        if positions.numel() == 0:
            return
        top = int(positions.max()) + 1
        if top > self.scores.shape[-1]:
            grown = self.scores.new_zeros(*self.scores.shape[:2], max(top, 2 * self.scores.shape[-1]))
            grown[..., : self.scores.shape[-1]] = self.scores
            self.scores = grown
        b, t = (positions >= 0).nonzero(as_tuple=True)
        self.scores[b, :, positions[b, t]] = scores[b, :, t].to(self.scores.dtype)

    def read(self, seqs: Tensor, positions: Tensor) -> Tensor:
        """``(n, H, c)`` scores of sequences ``seqs`` ``(n,)`` at ``positions`` ``(n, c)``."""
        s = self.scores[seqs]  # (n, H, cap)
        return s.gather(2, positions[:, None, :].expand(-1, s.shape[1], -1).clamp_min(0))


class WindowGate(PrefillMethod, DecodeMethod):
    """Base of the window gates (not registered): the decode-time rule of the module docstring."""

    def decode_store(self, store: KVStore) -> RaggedKV:
        """The store a window gate decodes from: the prefill's ragged store as it is, or a dense one as ragged rows
        (the cache asks for it instead of converting to equal-length rows)."""
        return as_ragged(store)

    def token_drops(self, layer: DecodeLayer, st: Any, seqs: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Which of the tokens leaving the window are dropped: ``(n, H_kv, c)`` bool for the tokens at positions
        ``pos`` ``(n, c)`` of sequences ``seqs`` ``(n,)``, whose stored keys and values are ``k``, ``v``
        ``(n, H_kv, c, D)``."""
        raise NotImplementedError

    @staticmethod
    def newest(store: RaggedKV) -> Tensor:
        """``(B,)`` newest position stored per sequence (-1: none)."""
        pos = store.entry_positions().view(store.batch, store.heads, -1)
        return pos.amax(dim=(1, 2)) if pos.shape[-1] else torch.full((store.batch,), -1, dtype=torch.long)

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        self.write_gate(layer)
        store = layer.store
        layer.run.bytes_read += store.kv_bytes()
        return store.attend(q, layer.scaling)

    def write_gate(self, layer: DecodeLayer) -> int:
        """Decide every stored pair that has left the window since the last decision (:meth:`token_drops`).
        Returns the number of entries dropped."""
        st: GateState = layer.state
        store: RaggedKV = layer.store  # type: ignore[assignment]
        B, H = store.batch, store.heads
        sizes = store.sizes()
        if int(sizes.min()) == 0:
            return self._write_gate_rows(layer)
        R = B * H
        # one table lookup: each row's newest entry and the entry W + 1 from the end (the token leaving the window)
        idx = torch.stack([sizes - 1, (sizes - st.window - 1).clamp_min(0)], 1)  # (R, 2)
        slots = store.slots(torch.arange(R), idx)
        _, _, pos = store.take_at(slots[:, :1])
        limit = pos.view(B, H).amax(1) - st.window  # positions <= limit have left the window of the newest query
        if not bool((limit >= st.decided).any()):
            return 0
        one = (limit == st.decided) & (limit >= st.sink)  # exactly one token to decide
        if not bool(((limit < st.decided) | one | ((limit == st.decided) & (limit < st.sink))).all()):
            return self._write_gate_rows(layer)
        seqs = one.nonzero().flatten()
        dropped = 0
        if seqs.numel():
            rows = (seqs[:, None] * H + torch.arange(H)[None, :]).flatten()  # (m,)
            if bool((sizes[rows] - st.window - 1 < 0).any()):
                return self._write_gate_rows(layer)
            due = slots[rows, 1]
            k, v, pos = store.take_at(due)
            if not bool((pos.view(-1, H) == limit[seqs][:, None]).all()):  # an entry of the window is missing
                return self._write_gate_rows(layer)
            n = seqs.numel()
            drop = self.token_drops(
                layer, st, seqs, k.view(n, H, 1, -1), v.view(n, H, 1, -1), pos.view(n, H)[:, :1]
            ).reshape(-1)  # (m,) in the order of rows
            if bool(drop.any()):
                store.drop_at(rows[drop], due[drop])  # in place
                dropped = int(drop.sum())
                st.dropped += dropped
                if store.dead() >= COMPACT * R:
                    store.reclaim()
        st.decided = torch.maximum(st.decided, limit + 1)
        return dropped

    def _write_gate_rows(self, layer: DecodeLayer) -> int:
        """The general decision over each row's positions (any number of tokens per sequence, rows that differ)."""
        st: GateState = layer.state
        store: RaggedKV = layer.store  # type: ignore[assignment]
        B, H = store.batch, store.heads
        store.reclaim()  # positions in order, none DEAD
        pos = store.entry_positions().view(B, H, -1)  # (B, H, n), -1 past each row's length
        n = pos.shape[-1]
        if n == 0:
            return 0
        limit = pos.amax(dim=(1, 2)) - st.window
        if not bool((limit >= st.decided).any()):
            return 0
        keep = torch.ones(B, H, n, dtype=torch.bool)
        dropped = 0
        for b in range(B):
            lo, hi = max(int(st.decided[b]), st.sink), int(limit[b])
            if hi < lo:
                continue
            due = (pos[b] >= lo) & (pos[b] <= hi)  # (H, n)
            # a gate may read every KV head of a token: only tokens every head still holds can be decided (after
            # another method's prefill, pairs some heads already evicted stay as that prefill kept them)
            common = pos[b, 0][due[0]]
            for h in range(1, H):
                common = common[torch.isin(common, pos[b, h][due[h]])]
            if common.numel() == 0:
                continue
            ordered = torch.where(pos[b] >= 0, pos[b], torch.iinfo(torch.long).max)  # each row ascending
            idx = torch.searchsorted(ordered, common.expand(H, -1).contiguous())  # (H, c): the token in each row
            k, v, _ = store.take(torch.arange(b * H, (b + 1) * H), idx)
            drop = self.token_drops(layer, st, torch.tensor([b]), k[None], v[None], common[None])[0]  # (H, c)
            if bool(drop.any()):
                hh, cc = drop.nonzero(as_tuple=True)
                keep[b, hh, idx[hh, cc]] = False
                dropped += int(drop.sum())
        st.decided = torch.maximum(st.decided, limit + 1)
        if dropped:
            store.keep(keep.view(B * H, n))
            st.dropped += dropped
        return dropped


__all__ = ["COMPACT", "GateState", "ScoreTable", "WindowGate"]
