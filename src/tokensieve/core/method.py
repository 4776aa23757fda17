"""The method base classes: a method is a small frozen dataclass naming a scorer, a selector and an applier.

``PrefillMethod.compress`` runs the three steps for one layer:

1. :meth:`PrefillMethod.score` — importance ``(B, H_kv, T)`` from the :class:`LayerContext` (pure tensors);
2. :meth:`PrefillMethod.layer_counts` + :meth:`PrefillMethod.select` — how many entries each row keeps and which;
3. :meth:`PrefillMethod.apply` — what happens to the rest (evict by default; merge methods override).

Subclasses usually override ``score`` only; layer- and head-adaptive methods override ``layer_counts`` or
``select``; merge methods override ``apply``.

A method whose selection needs every layer's scores (KVzip's allocation across layers, SimLayerKV's lazy layers)
declares ``deferred`` in its capabilities: the cache then scores each layer during the forward pass, keeps the
prompt whole, and selects and applies (:meth:`PrefillMethod.choose`) for all layers once every layer is scored —
and, for a method that asks for auxiliary forward passes (:meth:`PrefillMethod.prefill_passes`, KVzip's context
reconstruction), once those passes have shown it their queries (:meth:`PrefillMethod.observe_pass`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor

from ..attention.dense import Modifiers
from ..errors import ConfigError
from ..selection import Selection
from ..selection.topk import topk_select
from .capabilities import Apply, Capabilities, Phase
from .context import LayerContext, ModelShape

KV = "kv"  # the family of methods that act on the KV cache and attention of a language model
VISUAL = "visual"  # the family of methods that act on an image's tokens in a vision-language model
DIT = "dit"  # the family of methods that sparsify the attention of a diffusion transformer (image and video)
FAMILIES = (KV, VISUAL, DIT)


@dataclass(frozen=True)
class Compressed:
    """What an applier hands to the cache for one layer.

    Attributes:
        selection: which of the chunk's entries stay.
        keys, values: ``(B, H_kv, T, D)`` replacement tensors when kept entries were modified (merging); None
            means the chunk's own keys/values.
        bias: ``(B, H_kv, T)`` additive logit bias per entry (log of the mass an entry stands for), or None.
        extra_keys, extra_values: ``(B, H_kv, E, D)`` synthetic entries appended to every row (e.g. a
            compensation token), or None.
        extra_bias: ``(B, H_kv, E)`` their logit bias, or None.
        extra_valid: ``(B, H_kv, E)`` bool — which rows actually get each extra entry (None: all rows).
    """

    selection: Selection
    keys: Tensor | None = None
    values: Tensor | None = None
    bias: Tensor | None = None
    extra_keys: Tensor | None = None
    extra_values: Tensor | None = None
    extra_bias: Tensor | None = None
    extra_valid: Tensor | None = None


class PromptText(Protocol):
    """The model's text side, for methods that write words into a prompt (KVzip's "repeat" instruction).

    ``encode`` turns text into the model's token ids (no special tokens added); ``reply_header`` is what the chat
    template puts between the end of a user turn's content and the start of the assistant's reply (``[]`` without a
    template). Both return None when the model's tokenizer cannot be found.
    """

    def encode(self, text: str) -> list[int] | None: ...

    def reply_header(self) -> list[int] | None: ...


@dataclass(frozen=True)
class AuxPass:
    """An auxiliary forward pass over the full cache of a prompt, run before the prompt is compressed; its tokens are
    attended to and then forgotten (never kept, never counted as seen).

    Attributes:
        input_ids, attention_mask: ``(B, N)``, left-padded; positions continue each sequence's own prompt.
        info: the method's own description of the pass (e.g. which prompt tokens it reconstructs, per sequence).
    """

    input_ids: Tensor
    attention_mask: Tensor
    info: Any = None


@dataclass(frozen=True)
class Method:
    """Base of every registered method. Class attributes describe it; dataclass fields are its parameters.

    ``family`` says what the method acts on: ``"kv"`` — the KV cache and attention of a language model (this module's
    :class:`PrefillMethod`, the decode methods of :mod:`tokensieve.cache.decode`) — or ``"visual"`` — an image's
    tokens in a vision-language model (:class:`tokensieve.methods.visual.base.VisualMethod`). One registry holds both
    families and one spec names them together (``todre:0.1/snapkv:0.25``)."""

    family: ClassVar[str] = KV
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # "Title (arXiv:NNNN.NNNNN)"
    rule: ClassVar[str] = ""  # the scoring rule in one line
    capabilities: ClassVar[Capabilities] = Capabilities()

    @classmethod
    def summary(cls) -> str:
        """What the method declares, in a few words (``tokensieve methods``, docs/METHODS.md)."""
        return cls.capabilities.describe()

    def declared(self) -> Capabilities:
        """This instance's capabilities: its class's one declaration (:attr:`capabilities`), which a method whose
        parameter holds another method completes with that method's where it decides (a sparse prefill's ``evict``
        decides whether the prompt is compressed and whether auxiliary tokens are added)."""
        return type(self).capabilities

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"

    def check(self, shape: ModelShape) -> None:
        """Validate against a model before any work starts (e.g. a needed profile exists)."""

    def refusal(self, shape: ModelShape) -> str | None:
        """Why these parameters would make the method silently do nothing, or less than it promises, on a model of
        this shape (every layer left dense, a page longer than the model's context …), as a sentence that says what
        to change; None when they would not. Methods nested in this one (a ``base``, an ``evict``) are asked too.

        :meth:`tokensieve.spec.Spec.why_not` asks it whenever the model is known, so every front door (library, CLI,
        evaluation, benchmarks, server) refuses the same specs with the same reason."""
        for f in dataclasses.fields(self):
            inner = getattr(self, f.name)
            if isinstance(inner, Method) and (why := inner.refusal(shape)) is not None:
                return why
        return None

    def protected(self) -> tuple[int, int]:
        """Default protected (sink, recent) token counts; a budget may override them."""
        return 0, 0

    def prefill_suffix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        """Auxiliary tokens ``(B, N)`` to append to a prompt while it is compressed (attended to, never kept).

        Default: none. DapQ uses this for its position-aware pseudo queries.
        """
        return None

    @property
    def compresses(self) -> bool:
        return self.declared().apply is not Apply.NONE

    @property
    def uses_budget(self) -> bool:
        """Whether what this method keeps depends on its budget (a compressing method's does, unless a parameter
        decides instead, e.g. SP-KV's threshold ``tau``). A run of such a method without a budget is refused."""
        return self.compresses


def dense_layers_refusal(method: str, dense_layers: int, shape: ModelShape) -> str | None:
    """The :meth:`Method.refusal` of a method that leaves its first ``dense_layers`` layers dense: all of them."""
    if dense_layers < shape.num_layers:
        return None
    return (
        f"{method} keeps its first dense_layers={dense_layers} layers dense and the model has {shape.num_layers}, so "
        f"no layer would be sparse; use dense_layers < {shape.num_layers}."
    )


@dataclass(frozen=True)
class PrefillMethod(Method):
    """A method that compresses the KV cache once, when a prompt (or a reusable context) is prefilled."""

    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT)

    # -- chunked prefill ------------------------------------------------------------------------------------------
    def chunk_refusal(self) -> str | None:
        """Why this method cannot compress a prompt chunk by chunk, or None when it can.

        A chunked prefill (``Compressor.prefill(..., chunk=N)``) re-scores, after every chunk, the entries kept from
        the earlier chunks together with the new chunk, using the new chunk's queries only, and evicts back to the
        budget of the whole prompt. That needs a method that selects per layer (not ``deferred``), evicts with the
        same count in every KV head of a sequence (the re-scored keys form one ``(B, H_kv, T)`` tensor with one
        padding mask per sequence), keeps plain entries (merged entries carry a logit bias that a later selection
        would have to merge again), adds no auxiliary tokens after the whole prompt, and can score entries from the
        queries of their last chunk (``rescorable``; a method needing every prompt query refuses). Methods override
        this to give their own reason (or to accept when ``rescorable`` is False for a reason that does not apply).
        """
        caps = self.declared()
        if caps.apply is Apply.NONE:
            return None
        if caps.deferred:
            return "it selects once every layer of the whole prompt is scored (and may run passes over its full cache)"
        if caps.suffix:
            return "it appends auxiliary tokens after the whole prompt to score it"
        if caps.apply is not Apply.EVICT:
            return (
                f"it {caps.apply.value}s entries instead of evicting them; a later chunk's selection "
                "would have to re-merge merged entries"
            )
        if caps.head_adaptive:
            return (
                "it gives the KV heads of a sequence different counts, and a chunk is re-scored over keys that share "
                "one padding mask per sequence (not supported yet)"
            )
        if not caps.rescorable:
            return "it scores a prompt from all of its queries at their true positions, not from a chunk's"
        return None

    # -- auxiliary passes (deferred methods) ----------------------------------------------------------------------
    def prefill_passes(self, input_ids: Tensor, attention_mask: Tensor, text: PromptText | None) -> list[AuxPass]:
        """Forward passes to run over the prompt's full cache before it is compressed (``deferred`` methods only).

        Default: none. KVzip returns its "repeat the context" passes.
        """
        return []

    def observe_pass(
        self, ctx: LayerContext, scores: Tensor, aux: AuxPass, queries: Tensor, keys: Tensor, valid: Tensor
    ) -> None:
        """Update this layer's ``scores`` ``(B, H_kv, T)`` in place from one auxiliary pass.

        ``ctx`` is the layer's prompt context (keys, values, padding; no queries); ``queries`` ``(B, H_q, N, D)`` and
        ``keys`` ``(B, H_kv, N, D)`` are the pass tokens' (post-RoPE), ``valid`` ``(B, N)`` marks its real tokens.
        """

    # -- prefill attention ----------------------------------------------------------------------------------------
    def prefill_attention(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        valid: Tensor | None,
        scaling: float,
        mods: Modifiers,
        profile: Any,
    ) -> Tensor | None:
        """The attention output ``(B, H_q, T, D)`` of a fresh prompt chunk (q ``(B, H_q, T, D)``, k/v
        ``(B, H_kv, T, D)``, valid ``(B, T)`` or None), when the method computes it itself — sparse prefill attention
        (FlexPrefill, MInference). Default None: dense causal attention. ``profile`` is the plan's profile contents."""
        return None

    # -- score --------------------------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> Tensor:
        """Importance of every cached token per KV head, ``(B, H_kv, T)``; higher is kept first."""
        raise NotImplementedError

    # -- select -------------------------------------------------------------------------------------------------
    def layer_counts(self, ctx: LayerContext) -> Tensor:
        """Entries each row of this layer keeps, ``(B, H_kv)`` long. Default: the average budget everywhere."""
        return ctx.run.budget_tokens[:, None].expand(ctx.batch, ctx.num_kv_heads).clone()

    def select(self, scores: Tensor, counts: Tensor, ctx: LayerContext) -> Selection:
        return topk_select(scores, counts, ctx.selectable, sink=ctx.run.sink, recent=ctx.run.recent)

    # -- apply --------------------------------------------------------------------------------------------------
    def apply(self, selection: Selection, ctx: LayerContext, scores: Tensor) -> Compressed:
        """Evict everything not selected (merge methods override this and may use the scores)."""
        return Compressed(selection)

    # -- the recipe ---------------------------------------------------------------------------------------------
    def compress(self, ctx: LayerContext) -> Compressed:
        return self.choose(ctx, self.score(ctx))

    def choose(self, ctx: LayerContext, scores: Tensor) -> Compressed:
        """Select and apply, given the layer's scores (a deferred method's second step)."""
        if scores.shape != (ctx.batch, ctx.num_kv_heads, ctx.length):
            raise RuntimeError(
                f"{self.name}.score returned {tuple(scores.shape)}; expected "
                f"(B, H_kv, T) = {(ctx.batch, ctx.num_kv_heads, ctx.length)}."
            )
        counts = self.layer_counts(ctx)
        return self.apply(self.select(scores, counts, ctx), ctx, scores)


@dataclass(frozen=True)
class WrapperMethod(PrefillMethod):
    """A prefill method built on another one, ``base`` (composition by objects: ``AdaKV(base=SnapKV(window=64))``):
    it scores, budgets its layers and protects tokens as ``base`` does, and changes the selection or the apply."""

    base: PrefillMethod

    def check_base(self, *, uniform: bool) -> None:
        """Refuse a ``base`` that is not a scoring prefill method (with ``uniform``: one that needs a profile, or does
        not evict the same number of entries in every head)."""
        base = self.base
        if (
            not isinstance(base, PrefillMethod)
            or not base.compresses
            or base.declared().deferred
            or isinstance(base, type(self))
        ):
            raise ConfigError(f"{self.name}: base must be a prefill scoring method, not {base!r}.")
        if uniform and (
            base.capabilities.profile or base.capabilities.apply is not Apply.EVICT or base.capabilities.head_adaptive
        ):
            raise ConfigError(
                f"{self.name}: base '{base.name}' must be profile-free and evict the same count in every head."
            )

    def chunk_refusal(self) -> str | None:
        return super().chunk_refusal() or self.base.chunk_refusal()

    def protected(self) -> tuple[int, int]:
        return self.base.protected()

    def score(self, ctx: LayerContext) -> Tensor:
        return self.base.score(ctx)

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        return self.base.layer_counts(ctx)


__all__ = [
    "DIT",
    "FAMILIES",
    "KV",
    "VISUAL",
    "AuxPass",
    "Compressed",
    "Method",
    "PrefillMethod",
    "PromptText",
    "WrapperMethod",
    "dense_layers_refusal",
]
