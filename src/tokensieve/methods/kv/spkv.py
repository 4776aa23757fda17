"""SP-KV: a learned write gate decides, per layer and KV head, which KV pairs outlive the local window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...cache.decode import DecodeLayer
from ...cache.ragged import RaggedKV
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext, ModelShape, Rope
from ...core.method import Compressed
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...selection import Selection
from ._window_gate import COMPACT, GateState, ScoreTable, WindowGate
from .spkv_gate import KIND, SPKVGates, gate_features

_PREFILLED = "spkv:prefilled"  # RunState.scratch marker: the prompt was already decided by SP-KV's prefill


@dataclass
class _LayerState(GateState):
    """What SP-KV keeps per layer while decoding (besides the window gate's state)."""

    gates: SPKVGates | None = None
    rope: Rope | None = None
    tau: Tensor | None = None  # (B,) threshold per sequence
    table: ScoreTable | None = None  # a hidden-state gate: every token's utility, kept from when it was written


@register
@dataclass(frozen=True)
class SPKV(WindowGate):
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
        rescorable=False,  # decides each pair once, from its own keys and values
        decodes_itself=True,  # the Compressor also runs it while decoding (no '+decode' needed)
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
        self,
        gates: SPKVGates,
        layer: int,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        rope: Rope | None,
        hidden: Tensor | None = None,
    ) -> Tensor:
        """``(B, H_kv, T)`` utility of every entry: keys/values ``(B, H_kv, T, D)``, positions ``(B, T)``; hidden
        ``(B, T, d)`` the hidden states the layer read (what a hidden-state gate reads)."""
        if gates.input == "hidden":
            if hidden is None:
                raise CapabilityError(
                    "This spkv gate reads the hidden state each attention layer receives, which this run did not "
                    "capture (or the token was written before SP-KV's own prefill); use a gate trained with --input kv."
                )
            return gates.utility(layer, hidden).permute(0, 2, 1)
        feats = gate_features(keys, values, positions, rope)
        return gates.utility(layer, feats).permute(0, 2, 1)

    # -- prefill --------------------------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> Tensor:
        gates = self._gates(ctx.run.profile)
        rope = ctx.run.shape.rope_of(ctx.layer_idx)
        return self.utilities(gates, ctx.layer_idx, ctx.keys, ctx.values, ctx.positions, rope, ctx.hidden)

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
    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> _LayerState:
        gates = self._gates(layer.run.profile)
        store: RaggedKV = layer.store  # type: ignore[assignment]  # decode_store made it ragged
        lengths_seen = self.newest(store) + 1  # (B,) real tokens seen per sequence
        w = self.window_for(gates)
        if ctx is not None and ctx.run.scratch.get(_PREFILLED):
            tau = self.thresholds(gates, ctx.run.n_tokens, ctx.run.budget_tokens)
            decided = (lengths_seen - w + 1).clamp_min(0)  # SP-KV's prefill decided the older prompt tokens
        else:  # after another prefill: every stored prompt token is decided at the first step
            tau = self.thresholds(gates, lengths_seen, layer.run.budget_tokens)
            decided = torch.zeros_like(lengths_seen)
        rope = layer.run.shape.rope_of(layer.index)
        table = None
        if gates.input == "hidden":  # the prompt's utilities now, while its hidden states are at hand
            if ctx is None or not ctx.run.scratch.get(_PREFILLED) or ctx.hidden is None:
                raise CapabilityError(
                    "This spkv gate reads hidden states, which only its own prefill sees for the prompt: run spkv "
                    "alone (e.g. 'spkv:0.25'), or use a gate trained with --input kv after another prefill."
                )
            u = self.utilities(gates, layer.index, ctx.keys, ctx.values, ctx.positions, rope, ctx.hidden)
            table = ScoreTable(int(u.shape[0]), int(u.shape[1]), int(u.shape[2]) + 64)
            table.write(u, ctx.positions)
        return _LayerState(w, decided, self.sink, 0, gates, rope, tau, table)

    def on_append(self, layer: DecodeLayer, n_new: int) -> None:
        st: _LayerState = layer.state
        if st.table is not None and st.gates is not None:  # a hidden-state gate scores each token as it is written
            assert layer.positions is not None
            none = torch.empty(0)  # a hidden-state gate reads no keys or values
            u = self.utilities(st.gates, layer.index, none, none, layer.positions, st.rope, layer.hidden)
            st.table.write(u, layer.positions)

    def token_drops(self, layer: DecodeLayer, st: Any, seqs: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Drop the tokens whose utility (from their stored keys and values, or kept from when a hidden-state gate
        scored them) is below the sequence's τ."""
        if st.table is not None:
            u = st.table.read(seqs, pos)
        else:
            u = self.utilities(st.gates, layer.index, k, v, pos, st.rope)  # (n, H, c)
        return u < st.tau[seqs][:, None, None]


def achieved_density(cache: Any, n_tokens: int) -> float:
    """Stored entries / full cache (``L · H_kv · n_tokens``) of a single-sequence cache."""
    lengths = cache.lengths()  # (L, B, H)
    return float(lengths.sum()) / (lengths.shape[0] * lengths.shape[2] * n_tokens)


__all__ = ["COMPACT", "SPKV", "achieved_density"]
