"""The method base classes: a method is a small frozen dataclass naming a scorer, a selector and an applier.

``PrefillMethod.compress`` runs the three steps for one layer:

1. :meth:`PrefillMethod.score` — importance ``(B, H_kv, T)`` from the :class:`LayerContext` (pure tensors);
2. :meth:`PrefillMethod.layer_counts` + :meth:`PrefillMethod.select` — how many entries each row keeps and which;
3. :meth:`PrefillMethod.apply` — what happens to the rest (evict by default; merge methods override).

Subclasses usually override ``score`` only; layer- and head-adaptive methods override ``layer_counts`` or
``select``; merge methods override ``apply``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..select.selection import Selection
from ..select.topk import topk_select
from .capabilities import Apply, Capabilities, Phase
from .context import LayerContext, ModelShape


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


@dataclass(frozen=True)
class Method:
    """Base of every registered method. Class attributes describe it; dataclass fields are its parameters."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # "Title (arXiv:NNNN.NNNNN)"
    rule: ClassVar[str] = ""  # the scoring rule in one line
    capabilities: ClassVar[Capabilities] = Capabilities()

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"

    def check(self, shape: ModelShape) -> None:
        """Validate against a model before any work starts (e.g. a needed profile exists)."""

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
        return self.capabilities.apply is not Apply.NONE


@dataclass(frozen=True)
class PrefillMethod(Method):
    """A method that compresses the KV cache once, when a prompt (or a reusable context) is prefilled."""

    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT)

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
        scores = self.score(ctx)
        if scores.shape != (ctx.batch, ctx.num_kv_heads, ctx.length):
            raise RuntimeError(
                f"{self.name}.score returned {tuple(scores.shape)}; expected "
                f"(B, H_kv, T) = {(ctx.batch, ctx.num_kv_heads, ctx.length)}."
            )
        counts = self.layer_counts(ctx)
        return self.apply(self.select(scores, counts, ctx), ctx, scores)


__all__ = ["Compressed", "Method", "PrefillMethod"]
