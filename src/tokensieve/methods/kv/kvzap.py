"""KVzap: KVzip's query-agnostic scores predicted in one pass by a tiny surrogate of each layer's hidden state."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ...cache.decode import DecodeLayer
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import Compressed
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...selection import Selection
from ...selection.allocation import pooled_counts
from ...selection.topk import protected_mask
from ._window_gate import GateState, ScoreTable, WindowGate
from .kvzap_surrogate import FORMS, KIND, KVzapSurrogate

DMS_WINDOW = 128  # kvpress DMSPress's sliding_window_size


@dataclass
class _ZapState(GateState):
    """Per layer while decoding: the window gate's state, and every token's predicted score by position."""

    table: ScoreTable | None = None
    surrogate: KVzapSurrogate | None = None
    threshold: float = 0.0


@register
@dataclass(frozen=True)
class KVzap(WindowGate):
    """KVzap (Jégou, Jeblick; "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning", arXiv:2601.07891; NVIDIA kvpress
    ``KVzapPress`` + ``DMSPress``): a surrogate per layer (:mod:`tokensieve.methods.kv.kvzap_surrogate`, trained by
    ``tokensieve train kvzap``) reads the hidden state ``h_j`` each token enters the layer's attention with and
    predicts, per KV head, the log of its KVzip+ score — KVzip's "how much does repeating the context need this pair",
    without KVzip's second pass over the context, so it also scores tokens while decoding.

    Score: ``s_j = f_ℓ(h_j)`` (``surrogate="mlp"``, the official default: ``W₂ gelu(W₁ h + b₁) + b₂``; ``"linear"``:
    ``W h + b``). Two budget forms:

    * **fixed ratio** (no ``threshold``; kvpress's ``ScorerPress`` top-k): each KV head keeps its ``b`` highest scores
      (``allocation="uniform"``); ``allocation="global"`` (ours) keeps the ``L · H_kv · b`` highest scores of the whole
      model instead — the threshold rule at the threshold that gives exactly this density on this prompt. ``window``
      (default 0, as ``ScorerPress``) recent tokens are kept inside the budget. Compresses the prompt only.
    * **threshold** (``kvzap[threshold=-4]``, the paper's form; kvpress's ``DMSPress``): a query at ``t`` sees key
      ``j`` iff ``t − j ≤ w`` or ``s_j ≥ threshold`` — every pair is decided once, when it leaves the window of the
      ``w`` most recent tokens (default 128, ``DMSPress``'s), so the density follows the text. At the end of the
      prompt the positions ``< n − w`` are decided; with ``decoding=true`` (``DMSPress``'s ``decoding``, default
      False as there) every generated token is scored when it is written and decided when it leaves the window.
      Each (layer, KV head) keeps its own number of entries (ragged store), so the memory saved is saved for real
      (kvpress masks the pruned pairs instead).

    Choices: the hidden state is the attention module's input (after the input normalisation), as the official
    collector and press read it; prefill attention is dense (the official ``DMSPress`` is the dense-prefill version of
    DMS); a chunk appended after the prompt (a question) attends to every stored entry, and its tokens are scored when
    appended. Scores are float32. Decoding runs only after this method's own prefill (the prompt's scores come from
    it); a chunked prefill is refused (the hidden states of earlier chunks are gone).
    """

    name: ClassVar[str] = "kvzap"
    paper: ClassVar[str] = "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning (arXiv:2601.07891)"
    rule: ClassVar[str] = (
        "s_j = f_l(h_j) per KV head (a surrogate's predicted log KVzip+ score); top-b per head, or keep j while "
        "t - j <= w, then iff s_j >= threshold"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL, Phase.DECODE}),
        apply=Apply.EVICT,
        head_adaptive=True,
        layer_adaptive=True,
        profile=KIND,
        rescorable=False,  # scores come from each token's hidden state
        own_prefill_scores=True,  # its decode rule reads the scores its prefill computed
    )

    threshold: float | None = None
    window: int | None = None
    decoding: bool = False
    surrogate: Literal["mlp", "linear"] = "mlp"
    allocation: Literal["uniform", "global"] = "uniform"

    def __post_init__(self) -> None:
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"kvzap: threshold must be a finite number (a log score, e.g. -4), got {self.threshold}.")
        if self.window is not None and self.window < 0:
            raise ConfigError(f"kvzap: window must be >= 0, got {self.window}.")
        if self.surrogate not in FORMS:
            raise ConfigError(f"kvzap: surrogate must be one of {', '.join(FORMS)}, got {self.surrogate!r}.")
        if self.allocation not in ("uniform", "global"):
            raise ConfigError(f"kvzap: allocation must be 'uniform' or 'global', got {self.allocation!r}.")
        if self.decoding and self.threshold is None:
            raise ConfigError(
                "kvzap: decoding=true evicts with the threshold rule (DMS); give a threshold, e.g. "
                "kvzap[threshold=-4,decoding=true]. The fixed-ratio form compresses the prompt only."
            )
        if self.allocation == "global" and self.threshold is not None:
            raise ConfigError("kvzap: allocation applies to the fixed-ratio form; a threshold decides per entry.")

    # -- what kind of run ---------------------------------------------------------------------------------------------
    @property
    def uses_budget(self) -> bool:
        return self.threshold is None  # a threshold decides what is kept; the budget then plays no part

    def declared(self) -> Capabilities:
        """The class's declaration, with what the parameters decide: ``decoding=true`` also runs it while decoding,
        and the global top-k of the fixed-ratio form needs every layer's scores (the deferred prefill mode)."""
        return replace(
            type(self).capabilities,
            decodes_itself=self.decoding,
            deferred=self.threshold is None and self.allocation == "global",
        )

    @property
    def recent(self) -> int:
        """The protected window: ``window``, or the form's official default (``DMSPress`` 128, ``ScorerPress`` 0)."""
        if self.window is not None:
            return self.window
        return DMS_WINDOW if self.threshold is not None else 0

    def protected(self) -> tuple[int, int]:
        return 0, self.recent if self.threshold is None else 0

    def chunk_refusal(self) -> str | None:
        return "it scores each token from the hidden state the layer reads, which is gone for earlier chunks"

    @staticmethod
    def _surrogate(profile: Any) -> KVzapSurrogate:
        if not isinstance(profile, KVzapSurrogate):
            raise CapabilityError(
                "kvzap needs its trained surrogate (a 'kvzap' profile); make it with `tokensieve train kvzap`."
            )
        return profile

    def scores_of(self, profile: Any, layer: int, hidden: Tensor | None) -> Tensor:
        """``(B, H_kv, L)`` predicted log KVzip+ scores of hidden states ``(B, L, d)``."""
        if hidden is None:
            raise CapabilityError(
                "kvzap reads the hidden state each attention layer receives, and this run did not capture it (the "
                "model's attention modules were not found, or a recorded prefill without hidden states was replayed)."
            )
        return self._surrogate(profile).scores(self.surrogate, layer, hidden).permute(0, 2, 1)

    # -- prefill ----------------------------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> Tensor:
        s = self.scores_of(ctx.run.profile, ctx.layer_idx, ctx.hidden)
        ctx.run.scratch[(KIND, ctx.layer_idx)] = s
        return s

    def compress(self, ctx: LayerContext) -> Compressed:
        if self.threshold is None:
            return super().compress(ctx)
        s = self.score(ctx)  # (B, H, T)
        pos = ctx.positions  # (B, T), -1 at padding
        recent = (pos >= 0) & (pos >= ctx.run.n_tokens[:, None] - self.recent)  # the last w prompt tokens
        keep = (recent[:, None, :] | (s >= self.threshold)) & ctx.selectable[:, None, :]
        return Compressed(Selection.from_mask(keep))

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        if not self.declared().deferred:
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
                total = min(L * H * int(ctx.run.budget_tokens[b]), int((s > float("-inf")).sum()))
                rows.append(pooled_counts(s.reshape(L * H, -1), total).reshape(L, H))
            ctx.run.scratch[key] = torch.stack(rows)  # (B, L, H)
        return ctx.run.scratch[key][:, ctx.layer_idx].clone()

    # -- decode (threshold form with decoding=true) ------------------------------------------------------------------
    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> _ZapState:
        scores = None if ctx is None else ctx.run.scratch.get((KIND, layer.index))
        if ctx is None or scores is None or self.threshold is None:
            raise CapabilityError(
                "kvzap evicts while decoding with the scores its own prefill gave the prompt; run it alone "
                "(e.g. 'kvzap[threshold=-4,decoding=true]'), not after another prefill method."
            )
        B, H, T = scores.shape
        table = ScoreTable(B, H, T + 64)
        table.write(scores, ctx.positions)
        decided = (ctx.run.n_tokens - self.recent).clamp_min(0)  # the prefill decided the older prompt tokens
        surrogate = self._surrogate(layer.run.profile)
        # the window gate's W: a query at t sees j iff t - j < W, i.e. t - j <= w
        return _ZapState(self.recent + 1, decided, 0, 0, table, surrogate, float(self.threshold))

    def on_append(self, layer: DecodeLayer, n_new: int) -> None:
        st: _ZapState = layer.state
        assert st.table is not None
        s = self.scores_of(st.surrogate, layer.index, layer.hidden)  # (B, H, n_new)
        assert layer.positions is not None
        st.table.write(s, layer.positions)

    def token_drops(self, layer: DecodeLayer, st: Any, seqs: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Drop the tokens whose predicted score (kept since they were written) is below the threshold."""
        return st.table.read(seqs, pos) < st.threshold


__all__ = ["DMS_WINDOW", "KVzap"]
