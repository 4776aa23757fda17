"""Running a model while watching every layer: the tool profiles are built with.

A :class:`Probe` is a prefill "method" that is never registered: it hands each layer's :class:`LayerContext` to a
callback and keeps every token, so the model runs exactly as with the full cache. Decode-time observation uses the
cache's ``observers`` hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.capabilities import Apply, Capabilities, Phase
from ..core.context import LayerContext
from ..core.method import Compressed, PrefillMethod
from ..selection import Selection


@dataclass(frozen=True)
class Probe(PrefillMethod):
    """Observe every layer's context at prefill; keep the full cache (not a registered method)."""

    name: ClassVar[str] = "probe"
    paper: ClassVar[str] = "internal"
    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT)
    callback: Callable[[LayerContext], None] = field(default=lambda ctx: None, compare=False)

    def compress(self, ctx: LayerContext) -> Compressed:
        with torch.no_grad():
            self.callback(ctx)
        return Compressed(Selection.keep_all(ctx.batch, ctx.num_kv_heads, ctx.length, ctx.selectable))


def probe_prefill(model: Any, input_ids: Tensor, callback: Callable[[LayerContext], None], **kw: Any) -> Any:
    """Prefill ``input_ids`` with the full cache, calling ``callback(ctx)`` for every layer. Returns the context."""
    from ..engine import Compressor

    press = Compressor(model, Probe(callback=callback), 1.0, **kw)
    return press, press.prefill(input_ids)
