"""Global retention gates ("Make Each Token Count"): one eviction policy ranks the entries of every layer and KV head
against one memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ...cache.decode import DecodeLayer, DecodeMethod, DecodeRun
from ...cache.storage import KVStore, RaggedKV, as_ragged
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext, Rope
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...selection.allocation import pooled_counts
from ...selection.topk import protected_mask
from .retention_gate import KIND, RetentionGates
from .spkv_gate import gate_features


def log_retention_score(log_beta: Tensor, age: Tensor, lookahead: int = 1) -> Tensor:
    """``log G = log Σ_{k<n} β^{age+k} = age · log β + log(1 − β^n) − log(1 − β)`` (``n = lookahead``; ``n = 1``
    gives ``age · log β``, the geometric retention ``β^age``). ``log_beta`` and ``age`` broadcast."""
    s = age.to(log_beta.dtype) * log_beta
    if lookahead == 1:
        return s
    lb = log_beta.clamp(max=-1e-12)  # log(1 − e^x) for x < 0, computed stably
    return s + _log1mexp(lookahead * lb) - _log1mexp(lb)


def _log1mexp(x: Tensor) -> Tensor:
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class _DecodeLayerState:
    """Per layer while decoding: the log-retention of every stored entry, row by row in stored order."""

    gates: RetentionGates
    rope: Rope | None
    log_beta: Tensor  # (R, capacity): entry j of row r; the first known[r] are set
    known: Tensor  # (R,) long: entries whose log β is known (those appended since are scored at the next eviction)


@dataclass
class _DecodeShared:
    """Shared by the layers of one run: every layer (the policy is global) and each sequence's memory."""

    layers: dict[int, DecodeLayer]
    memory: Tensor  # (B,) long: M, the average entries per (layer, KV head) a sequence may keep
    active: Tensor  # (B,) bool: False where the budget covers the whole prompt (nothing is ever evicted)
    evictions: int = 0


@register
@dataclass(frozen=True)
class Retention(PrefillMethod, DecodeMethod):
    """Global retention gates — "Make Each Token Count: Towards Improving Long-Context Performance with KV Cache
    Eviction" (Bui, Nguyen, Cohan, Ying; arXiv:2605.09649): lightweight gates give every KV entry a query-agnostic
    retention ``β ∈ (0, 1)`` per layer and KV head when its token is created; its importance decays geometrically
    with its age, and a final projection shared by all layers (:mod:`tokensieve.methods.kv.retention_gate`) puts every
    layer's and head's scores on one scale, so that **one** global policy keeps the best entries of the whole model
    under one memory budget — each (layer, KV head) ends with its own number of entries (ragged cache).

    Rule at the end of the prompt (``n`` tokens; entry ``i`` of age ``a = n + 1 − i``, as the authors' cache computes
    it after the prefill: ``q_idx − position`` with ``q_idx`` = tokens seen + 1): ``log G_i = a · log β_i``
    (``lookahead = 1``, the code's default; ``lookahead = m`` scores the retention summed over the next ``m`` steps,
    ``β^a (1 − β^m) / (1 − β)``), then keep the ``L · H_kv · b`` highest ``log G`` of
    the whole model (``b`` = the run's per-head budget: the same total as a uniform method at that budget), protected
    tokens first. ``allocation="uniform"`` keeps the top ``b`` of each head instead (per-head budgets, i.e. the
    earlier TRIM-KV policy, for comparison).

    The authors' options (``DynamicBudgetTrimKVCache.compress``): ``floor`` (their ``floor_budget_ratio``) reserves
    ``int(floor · b)`` entries for every head — the global top-k then picks ``int(L · H_kv · b · (1 − floor))``
    entries and each head keeps its share plus the floor, its own best (at most all it holds); ``threshold`` (their
    ``alpha_threshold`` with the ``alpha_threshold`` strategy) replaces the budget: every entry whose ``G = β^age``
    is below it is evicted, at the end of the prompt and after every decode step (``retention[threshold=0.01]``;
    the density follows the text, the budget plays no part).

    Choices: ``sink`` and ``window`` (tokens always kept at the start / end) default to 0 as in the authors' code;
    the gate learns whether to keep the first token. The paper trains the gates with a KL loss to the full model
    and a capacity penalty; ours regress an attention oracle on the frozen model (``tokensieve train retention``,
    docs/SPKV.md). Prefill attention is the model's dense causal attention; the selection shapes what is stored.

    Decoding (the authors' ``DynamicBudgetTrimKVCache``): every generated token is stored in every layer and head
    with its own ``log β``; once a sequence holds more than ``L · H_kv · (M + buffer)`` entries (``M`` = the
    per-head budget of its prompt), all its entries are re-scored with their current age and the global top
    ``L · H_kv · M`` kept — the policy of the prefill, amortised over ``buffer`` steps (the authors' model cards use
    32). The check runs after the last layer of each step attended (as the authors' cache compresses after the
    forward pass), with ages ``t + 2 − p`` for the token written at step ``t`` (seen ``t + 1``). A budget that
    covers the whole prompt evicts nothing, prompt or generated (keep-all = the full cache). The decode rule runs
    only after this method's own prefill (the ``log β`` of the stored prompt entries come from it).
    """

    name: ClassVar[str] = "retention"
    paper: ClassVar[str] = (
        "Make Each Token Count: Towards Improving Long-Context Performance with KV Cache Eviction (arXiv:2605.09649)"
    )
    rule: ClassVar[str] = (
        "log beta = gate_l(k_i, v_i) with a final projection shared by all layers; keep the global top-k of "
        "(n - i) * log beta over every layer and KV head"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL, Phase.DECODE}),
        apply=Apply.EVICT,
        head_adaptive=True,
        layer_adaptive=True,
        profile=KIND,
        deferred=True,
        rescorable=False,
        decodes_itself=True,
        own_prefill_scores=True,
    )

    sink: int = 0
    window: int = 0
    lookahead: int = 1
    allocation: Literal["global", "uniform"] = "global"
    buffer: int = 32
    floor: float = 0.0
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 0:
            raise ConfigError(f"retention: sink and window must be >= 0, got {self.sink}, {self.window}.")
        if self.lookahead < 1:
            raise ConfigError(f"retention: lookahead must be >= 1, got {self.lookahead}.")
        if self.buffer < 1:
            raise ConfigError(f"retention: buffer must be >= 1, got {self.buffer}.")
        if self.allocation not in ("global", "uniform"):
            raise ConfigError(f"retention: allocation must be 'global' or 'uniform', got {self.allocation!r}.")
        if not 0.0 <= self.floor < 1.0:
            raise ConfigError("retention: floor (the share of each head's budget reserved to it) must be in [0, 1).")
        if self.floor and self.allocation != "global":
            raise ConfigError("retention: floor reserves part of a global budget; it needs allocation=global.")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"retention: threshold is a retention G = beta^age in [0, 1], got {self.threshold}.")
        if self.threshold is not None and self.floor:
            raise ConfigError(
                "retention: the threshold strategy has no budget to reserve a floor of (the authors too)."
            )

    @property
    def uses_budget(self) -> bool:
        return self.threshold is None  # a threshold decides what is kept; the budget then plays no part

    def _log_threshold(self) -> float:
        assert self.threshold is not None
        return math.log(self.threshold) if self.threshold > 0 else float("-inf")

    def protected(self) -> tuple[int, int]:
        return self.sink, self.window

    @staticmethod
    def _gates(profile: Any) -> RetentionGates:
        if not isinstance(profile, RetentionGates):
            raise CapabilityError(
                "retention needs its trained gates (a 'retention' profile); see `tokensieve train retention`."
            )
        return profile

    # -- score: log G of every entry --------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> Tensor:
        gates = self._gates(ctx.run.profile)
        rope = ctx.run.shape.rope_of(ctx.layer_idx)
        feats = gate_features(ctx.keys, ctx.values, ctx.positions, rope)  # (B, T, F)
        log_beta = gates.log_beta(ctx.layer_idx, feats).permute(0, 2, 1)  # (B, H, T)
        pos = ctx.positions
        newest = pos.max(-1, keepdim=True).values  # (B, 1): the last real token
        age = (newest + 2 - pos).clamp_min(1)[:, None, :]  # the authors' q_idx - position, q_idx = seen + 1
        scores = log_retention_score(log_beta, age, self.lookahead)
        ctx.run.scratch[(KIND, ctx.layer_idx)] = scores
        ctx.run.scratch[(KIND, "log_beta", ctx.layer_idx)] = log_beta  # what decoding re-scores with later ages
        return scores

    # -- allocate: one global top-k over layers, heads and tokens ------------------------------------------------------
    def layer_counts(self, ctx: LayerContext) -> Tensor:
        if self.allocation == "uniform" and self.threshold is None:
            return super().layer_counts(ctx)
        key = (KIND, "plan")
        if key not in ctx.run.scratch:
            L, H = ctx.num_layers, ctx.num_kv_heads
            sink_m, recent_m = protected_mask(ctx.selectable, ctx.run.sink, ctx.run.recent)
            rows = []
            for b in range(ctx.batch):
                s = torch.stack([ctx.run.scratch[(KIND, layer)][b] for layer in range(L)]).float()  # (L, H, T)
                s = s.masked_fill(sink_m[b] | recent_m[b], float("inf"))  # protected tokens first
                s = s.masked_fill(~ctx.selectable[b], float("-inf"))
                rows.append(self._counts(s.reshape(L * H, -1), int(ctx.run.budget_tokens[b])).reshape(L, H))
            ctx.run.scratch[key] = torch.stack(rows)  # (B, L, H)
        return ctx.run.scratch[key][:, ctx.layer_idx].clone()

    def _counts(self, s: Tensor, memory: int) -> Tensor:
        """``(R,)`` entries each of the ``R`` rows of one sequence keeps, from the scores ``s`` ``(R, n)`` (``+inf``:
        protected, ``-inf``: not an entry) and the per-head budget ``memory``: the threshold's count, the global
        top-k, or the global top-k of the budget less the floors plus each head's floor (``floor``)."""
        held = (s > float("-inf")).sum(-1)
        if self.threshold is not None:
            return (s >= self._log_threshold()).sum(-1)
        if memory >= int(held.max()):  # the budget covers every entry: keep all (the floor's rounding would not)
            return held
        R = s.shape[0]
        reserve = int(memory * self.floor)
        total = min(int(R * memory * (1.0 - self.floor)) if self.floor else R * memory, int(held.sum()))
        return torch.minimum(pooled_counts(s, total) + reserve, held)

    # -- decode: the same global policy, amortised over `buffer` steps ------------------------------------------------
    def decode_store(self, store: KVStore) -> RaggedKV:
        """Ragged rows: every (layer, KV head) row keeps its own entries while decoding."""
        return as_ragged(store)

    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> _DecodeLayerState:
        log_beta = None if ctx is None else ctx.run.scratch.get((KIND, "log_beta", layer.index))
        if ctx is None or log_beta is None:
            raise CapabilityError(
                "retention evicts while decoding with the retention its own prefill gave every prompt entry; run it "
                "alone (e.g. 'retention:0.25'), not after another prefill method."
            )
        gates = self._gates(layer.run.profile)
        store: RaggedKV = layer.store  # type: ignore[assignment]
        B, H = store.batch, store.heads
        pos = store.entry_positions()  # (R, n)
        n = pos.shape[1]
        table = torch.zeros(B * H, n + self.buffer + 1)
        for b in range(B):
            real = ctx.positions[b] >= 0
            lut = torch.full((int(ctx.positions[b].max()) + 2,), -1, dtype=torch.long)
            lut[ctx.positions[b][real]] = real.nonzero().flatten()  # position -> prompt token index
            rows = pos[b * H : (b + 1) * H]  # (H, n)
            t = lut[rows.clamp_min(0).clamp_max(lut.numel() - 1)]
            if bool(((t < 0) & (rows >= 0)).any()):
                raise CapabilityError("retention: a stored entry is not among the prompt it scored.")
            lb = log_beta[b].float().gather(1, t.clamp_min(0))  # (H, n)
            table[b * H : (b + 1) * H, :n] = torch.where(rows >= 0, lb, torch.zeros_like(lb))
        shared = layer.run.scratch.get((KIND, "decode"))
        if shared is None:
            memory = layer.run.budget_tokens.clone()
            active = memory < ctx.run.n_tokens if self.threshold is None else torch.ones_like(memory, dtype=torch.bool)
            shared = _DecodeShared({}, memory, active)
            layer.run.scratch[(KIND, "decode")] = shared
        shared.layers[layer.index] = layer
        return _DecodeLayerState(gates, layer.run.shape.rope_of(layer.index), table, store.sizes())

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        store = layer.store
        layer.run.bytes_read += store.kv_bytes()
        out = store.attend(q, layer.scaling)
        if layer.index == layer.run.shape.num_layers - 1:
            self.evict(layer.run)  # every layer attended with the new token: compress after the step, as the authors
        return out

    def evict(self, run: DecodeRun) -> int:
        """Keep, for every sequence over ``L · H_kv · (M + buffer)`` entries, the global top ``L · H_kv · M`` by
        ``log G`` at the current step (protected sinks and window first; with ``floor``, the global top of the budget
        less the floors and each head's floor; with ``threshold``, at every step, the entries with ``G`` at or above
        it). Returns the number of entries evicted."""
        shared: _DecodeShared = run.scratch[(KIND, "decode")]
        layers = [shared.layers[i] for i in sorted(shared.layers)]
        stores: list[RaggedKV] = [dl.store for dl in layers]  # type: ignore[misc]
        H, L = stores[0].heads, len(layers)
        totals = torch.stack([s.lengths().sum(-1) for s in stores]).sum(0)  # (B,)
        due = shared.active.clone()
        if self.threshold is None:
            due &= totals > L * H * (shared.memory + self.buffer)
        if not bool(due.any()):
            return 0
        positions = [s.entry_positions() for s in stores]  # (R, n_l) each
        for dl, pos in zip(layers, positions):
            self._score_new(dl, pos, due)
        keep = [torch.ones_like(p, dtype=torch.bool) for p in positions]
        evicted = 0
        for b in due.nonzero().flatten().tolist():
            rows = slice(b * H, (b + 1) * H)
            newest = max(int(p[rows].max()) for p in positions)
            scores = []
            for dl, pos in zip(layers, positions):
                p = pos[rows]
                st: _DecodeLayerState = dl.state
                s = log_retention_score(st.log_beta[rows, : p.shape[1]], (newest + 2 - p).clamp_min(1), self.lookahead)
                s = s.masked_fill((p >= 0) & ((p < self.sink) | (p > newest - self.window)), float("inf"))
                scores.append(s.masked_fill(p < 0, float("-inf")).flatten())
            flat = torch.cat(scores)
            if self.threshold is None and not self.floor:
                total = L * H * int(shared.memory[b])
                order = torch.sort(flat, descending=True, stable=True).indices[:total]
                chosen = torch.zeros_like(flat, dtype=torch.bool)
                chosen[order] = True
            else:
                chosen = self._chosen(scores, H, int(shared.memory[b]))
            start = 0
            for li, pos in enumerate(positions):
                size = pos[rows].numel()
                keep[li][rows] = chosen[start : start + size].view(H, -1)
                start += size
        for dl, k in zip(layers, keep):
            st = dl.state
            store = dl.store
            filled = torch.arange(k.shape[1])[None, :] < st.known[:, None]
            kept = k & filled
            evicted += store.keep(k)  # type: ignore[attr-defined]
            order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices  # kept entries first, in order
            st.log_beta[:, : k.shape[1]] = st.log_beta[:, : k.shape[1]].gather(1, order)
            st.known = kept.sum(1)
        shared.evictions += 1
        return evicted

    def _chosen(self, scores: list[Tensor], H: int, memory: int) -> Tensor:
        """The entries one sequence keeps (flattened as ``scores``, one ``(H · n_l,)`` block per layer) under the
        threshold or the floor: each (layer, head) row keeps its count (:meth:`_counts`) of its best entries."""
        widths = [x.numel() // H for x in scores]
        n = max(widths)
        rows = torch.cat([torch.nn.functional.pad(x.view(H, w), (0, n - w), value=float("-inf"))
                          for x, w in zip(scores, widths)])  # (L * H, n)  # fmt: skip
        counts = self._counts(rows, memory)
        order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(rows, dtype=torch.bool)
        keep.scatter_(1, order, torch.arange(n)[None, :] < counts[:, None])
        return torch.cat([keep[i * H : (i + 1) * H, :w].flatten() for i, w in enumerate(widths)])

    def _score_new(self, dl: DecodeLayer, pos: Tensor, due: Tensor) -> None:
        """Give the entries stored since the last eviction (every KV head of a sequence holds them) their log β."""
        st: _DecodeLayerState = dl.state
        store: RaggedKV = dl.store  # type: ignore[assignment]
        H = store.heads
        lengths = store.sizes()
        if st.log_beta.shape[1] < pos.shape[1]:  # grow the table geometrically
            grown = st.log_beta.new_zeros(st.log_beta.shape[0], 2 * pos.shape[1])
            grown[:, : st.log_beta.shape[1]] = st.log_beta
            st.log_beta = grown
        for b in due.nonzero().flatten().tolist():
            rows = torch.arange(b * H, (b + 1) * H)
            start, c = st.known[rows], lengths[rows] - st.known[rows]
            if bool((c != c[0]).any()):
                raise RuntimeError("retention: the KV heads of a sequence received different tokens while decoding.")
            m = int(c[0])
            if m == 0:
                continue
            idx = start[:, None] + torch.arange(m)[None, :]  # (H, m)
            k, v, _ = store.take(rows, idx)
            p = pos[b * H].gather(0, idx[0])  # the same tokens in every head
            feats = gate_features(k[None], v[None], p[None], st.rope)
            st.log_beta[rows[:, None], idx] = st.gates.log_beta(dl.index, feats)[0].T.to(st.log_beta.dtype)
            st.known[rows] = lengths[rows]


__all__ = ["Retention", "log_retention_score"]
