"""SP-KV: a learned write gate decides, per layer and KV head, which KV pairs outlive the local window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...cache.decode import DecodeLayer, DecodeMethod
from ...cache.storage import KVStore, RaggedKV, as_ragged
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext, ModelShape, Rope
from ...core.method import Compressed, PrefillMethod
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...selection import Selection
from .spkv_gate import KIND, SPKVGates, gate_features

_PREFILLED = "spkv:prefilled"  # RunState.scratch marker: the prompt was already decided by SP-KV's prefill


@dataclass
class _LayerState:
    """What SP-KV keeps per layer while decoding."""

    gates: SPKVGates
    rope: Rope | None
    tau: Tensor  # (B,) threshold per sequence
    window: int
    decided: Tensor  # (B,) long: positions below this were decided (written or dropped) already
    dropped: int = 0  # entries dropped while decoding (all rows)


@register
@dataclass(frozen=True)
class SPKV(PrefillMethod, DecodeMethod):
    """SP-KV — Self-Pruned Key-Value Attention (Szilvasy, Faysse, Lomeli, Douze, Mazaré, Cabannes, Yih, Jégou;
    arXiv:2605.14037): a light predictor scores every KV pair's future utility ``u ∈ (0, 1)`` per layer and KV
    head; the pair is always visible while it is among the ``w`` most recent tokens, and when it leaves that window
    it is written to the long-term cache only if ``u ≥ τ`` — otherwise it is dropped for good.

    Rule: a query at position ``t`` sees key ``j`` iff ``t − j < w`` or ``u_j ≥ τ`` (or ``j < sink``). The decision
    is made once per pair: at prefill for every prompt token already older than the window at the end of the prompt
    (the next query is at position ``n``, so positions ``≤ n − w`` are decided), and while decoding for each token
    as it leaves the window. Each (layer, KV head) keeps its own number of entries in a ragged store, so the memory
    the gate saves is saved for real; compression is not fixed but follows the input.

    Threshold: ``tau`` when given; otherwise the run's budget is read as a **target density** (stored entries /
    full cache, averaged over layers and heads) and ``τ`` is calibrated from the gate's table of out-of-window
    density against threshold, measured on held-out text when the gate was trained: ``spkv:0.25`` aims at a quarter
    of the entries (the achieved density varies with the prompt), and the whole-prompt budget (``spkv:1.0``) keeps
    everything; without ``tau`` a budget is required. ``window`` defaults to the window the gate was trained for.

    The predictor (:mod:`tokensieve.methods.kv.spkv_gate`) is trained on the frozen model (``tokensieve train spkv``,
    docs/SPKV.md) and shipped as the ``spkv`` profile of the embedded model. Our reconstruction departs from the
    paper where it must: the paper trains the LLM jointly with the gate; here the LLM is frozen and the gate learns
    an oracle (the largest attention weight a key receives from queries beyond the window). Prefill attention is
    the model's dense causal attention (the decisions are applied when the prompt's cache is stored); a multi-token
    chunk after the prefill (a question appended to a compressed context) attends to every stored entry, and the
    tokens that left the window during it are decided at the next decode step.
    """

    name: ClassVar[str] = "spkv"
    paper: ClassVar[str] = (
        "Self-Pruned Key-Value Attention: Learning When to Write by Predicting Future Utility (arXiv:2605.14037)"
    )
    rule: ClassVar[str] = (
        "u = sigmoid(gate_l(k_j, v_j)) per (layer, KV head); keep j while t - j < w, then iff u_j >= tau"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL, Phase.DECODE}),
        apply=Apply.EVICT,
        head_adaptive=True,
        layer_adaptive=True,
        profile=KIND,
        rescorable=False,
        decodes_itself=True,
    )

    tau: float | None = None
    window: int | None = None
    sink: int = 0

    def __post_init__(self) -> None:
        if self.tau is not None and not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"spkv: tau must be in [0, 1], got {self.tau}.")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"spkv: window must be >= 1, got {self.window}.")
        if self.sink < 0:
            raise ConfigError(f"spkv: sink must be >= 0, got {self.sink}.")

    @property
    def uses_budget(self) -> bool:
        return self.tau is None  # a threshold decides what is kept; the budget then plays no part

    def check(self, shape: ModelShape) -> None:
        if shape.modified:
            raise CapabilityError(
                f"spkv decides while decoding, and its decode kernel does not apply the sliding windows or "
                f"soft-capping of model '{shape.key}' yet."
            )

    # -- the gate -------------------------------------------------------------------------------------------------
    @staticmethod
    def _gates(profile: Any) -> SPKVGates:
        if not isinstance(profile, SPKVGates):
            raise CapabilityError("spkv needs its trained gate (an 'spkv' profile); see `tokensieve train spkv`.")
        return profile

    def window_for(self, gates: SPKVGates) -> int:
        return self.window if self.window is not None else gates.window

    def thresholds(self, gates: SPKVGates, n_tokens: Tensor, budget_tokens: Tensor) -> Tensor:
        """``(B,)`` threshold of each sequence: ``tau``, or calibrated from the budget read as a target density."""
        B = int(n_tokens.shape[0])
        if self.tau is not None:
            return torch.full((B,), float(self.tau))
        w = self.window_for(gates)
        out = []
        for n, k in zip(n_tokens.tolist(), budget_tokens.tolist()):
            if k >= n:
                out.append(float("-inf"))  # the whole prompt: keep everything
                continue
            protected = min(n, w - 1 + self.sink)  # the window at the end of the prompt, and the sinks
            candidates = n - protected
            share = 1.0 if candidates <= 0 else (k - protected) / candidates
            out.append(gates.tau_for(share))
        return torch.tensor(out, dtype=torch.float32)

    def utilities(
        self, gates: SPKVGates, layer: int, keys: Tensor, values: Tensor, positions: Tensor, rope: Rope | None
    ) -> Tensor:
        """``(B, H_kv, T)`` utility of every entry: keys/values ``(B, H_kv, T, D)``, positions ``(B, T)``."""
        feats = gate_features(keys, values, positions, rope)
        return gates.utility(layer, feats).permute(0, 2, 1)

    # -- prefill --------------------------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> Tensor:
        gates = self._gates(ctx.run.profile)
        rope = ctx.run.shape.rope_of(ctx.layer_idx)
        return self.utilities(gates, ctx.layer_idx, ctx.keys, ctx.values, ctx.positions, rope)

    def compress(self, ctx: LayerContext) -> Compressed:
        gates = self._gates(ctx.run.profile)
        u = self.score(ctx)  # (B, H, T)
        tau = self.thresholds(gates, ctx.run.n_tokens, ctx.run.budget_tokens)
        w = self.window_for(gates)
        pos = ctx.positions  # (B, T), -1 at padding
        n = ctx.run.n_tokens[:, None]
        protected = (pos > n - w) | ((pos >= 0) & (pos < self.sink))  # the window at the end of the prompt, sinks
        keep = (protected[:, None, :] | (u >= tau[:, None, None])) & ctx.selectable[:, None, :]
        ctx.run.scratch[_PREFILLED] = True
        return Compressed(Selection.from_mask(keep))

    # -- decode ---------------------------------------------------------------------------------------------------
    def decode_store(self, store: KVStore) -> RaggedKV:
        """The store SP-KV decodes from: the prefill's ragged store as it is, or a dense one as ragged rows (the
        cache asks for it instead of converting to equal-length rows)."""
        return as_ragged(store)

    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> _LayerState:
        gates = self._gates(layer.run.profile)
        store: RaggedKV = layer.store  # type: ignore[assignment]  # decode_store made it ragged
        lengths_seen = self._newest(store) + 1  # (B,) real tokens seen per sequence
        w = self.window_for(gates)
        if ctx is not None and ctx.run.scratch.get(_PREFILLED):
            tau = self.thresholds(gates, ctx.run.n_tokens, ctx.run.budget_tokens)
            decided = (lengths_seen - w + 1).clamp_min(0)  # SP-KV's prefill decided the older prompt tokens
        else:  # after another prefill: every stored prompt token is decided at the first step
            tau = self.thresholds(gates, lengths_seen, layer.run.budget_tokens)
            decided = torch.zeros_like(lengths_seen)
        return _LayerState(gates, layer.run.shape.rope_of(layer.index), tau, w, decided)

    @staticmethod
    def _newest(store: RaggedKV) -> Tensor:
        """``(B,)`` newest position stored per sequence (-1: none)."""
        pos = store.entry_positions().view(store.batch, store.heads, -1)
        return pos.amax(dim=(1, 2)) if pos.shape[-1] else torch.full((store.batch,), -1, dtype=torch.long)

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        self.write_gate(layer)
        store = layer.store
        layer.run.bytes_read += store.kv_bytes()
        return store.attend(q, layer.scaling)

    def write_gate(self, layer: DecodeLayer) -> int:
        """Decide every stored pair that has left the window since the last decision: keep it if ``u ≥ τ``, drop
        it otherwise. Returns the number of entries dropped.

        The steady state of decoding — one token per sequence leaves the window, found at its known place in every
        row — reads just that token and drops it in place (O(1) per row; slots reclaimed every ``COMPACT`` drops
        per row); anything else (the first step after another method's prefill, a question appended as a chunk)
        takes the general path over each row's positions."""
        st: _LayerState = layer.state
        store: RaggedKV = layer.store  # type: ignore[assignment]
        B, H = store.batch, store.heads
        sizes = store.sizes()
        if int(sizes.min()) == 0:
            return self._write_gate_rows(layer)
        R = B * H
        # one table lookup: each row's newest entry and the entry w + 1 from the end (the token leaving the window)
        idx = torch.stack([sizes - 1, (sizes - st.window - 1).clamp_min(0)], 1)  # (R, 2)
        slots = store.slots(torch.arange(R), idx)
        _, _, pos = store.take_at(slots[:, :1])
        limit = pos.view(B, H).amax(1) - st.window  # positions <= limit have left the window of the newest query
        if not bool((limit >= st.decided).any()):
            return 0
        one = (limit == st.decided) & (limit >= self.sink)  # exactly one token to decide
        if not bool(((limit < st.decided) | one | ((limit == st.decided) & (limit < self.sink))).all()):
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
            u = self.utilities(
                st.gates, layer.index, k.view(n, H, 1, -1), v.view(n, H, 1, -1), pos.view(n, H)[:, :1], st.rope
            ).reshape(-1)  # (m,) in the order of rows
            drop = u < st.tau[seqs].repeat_interleave(H)
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
        st: _LayerState = layer.state
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
            lo, hi = max(int(st.decided[b]), self.sink), int(limit[b])
            if hi < lo:
                continue
            due = (pos[b] >= lo) & (pos[b] <= hi)  # (H, n)
            # the gate reads every KV head of a token: only tokens every head still holds can be decided (after
            # another method's prefill, pairs some heads already evicted stay as that prefill kept them)
            common = pos[b, 0][due[0]]
            for h in range(1, H):
                common = common[torch.isin(common, pos[b, h][due[h]])]
            if common.numel() == 0:
                continue
            ordered = torch.where(pos[b] >= 0, pos[b], torch.iinfo(torch.long).max)  # each row ascending
            idx = torch.searchsorted(ordered, common.expand(H, -1).contiguous())  # (H, c): the token in each row
            k, v, _ = store.take(torch.arange(b * H, (b + 1) * H), idx)
            u = self.utilities(st.gates, layer.index, k[None], v[None], common[None], st.rope)[0]  # (H, c)
            drop = u < st.tau[b]
            if bool(drop.any()):
                hh, cc = drop.nonzero(as_tuple=True)
                keep[b, hh, idx[hh, cc]] = False
                dropped += int(drop.sum())
        st.decided = torch.maximum(st.decided, limit + 1)
        if dropped:
            store.keep(keep.view(B * H, n))
            st.dropped += dropped
        return dropped


COMPACT = 32  # dropped-in-place entries per row (on average) before their slots are reclaimed


def achieved_density(cache: Any, n_tokens: int) -> float:
    """Stored entries / full cache (``L · H_kv · n_tokens``) of a single-sequence cache."""
    lengths = cache.lengths()  # (L, B, H)
    return float(lengths.sum()) / (lengths.shape[0] * lengths.shape[2] * n_tokens)


__all__ = ["SPKV", "achieved_density"]
