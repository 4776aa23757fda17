"""Capability declarations: what a method can do, checked against what a request asks for.

The runtime never uses ``isinstance`` chains to decide whether a method fits a request: each method declares its
capabilities and :meth:`Capabilities.check` explains, in words, why a request does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..errors import CapabilityError, ConfigError


class Phase(str, Enum):
    """When a method acts."""

    PREFILL = "prefill"  # once, on the prompt (or the context to be reused)
    DECODE = "decode"  # while generating, step by step


class Apply(str, Enum):
    """What happens to the tokens a method does not select (see ARCHITECTURE: score → select → apply)."""

    NONE = "none"  # nothing: the full cache
    EVICT = "evict"  # removed from the KV cache for good
    MERGE = "merge"  # folded into kept entries
    SPARSE = "sparse"  # the cache stays whole; attention reads a subset
    DROP = "drop"  # removed from the hidden-state sequence


class Stage(str, Enum):
    """Where a visual-token method acts in a vision-language model."""

    VISION = "vision"  # inside the vision encoder, after one of its layers
    PROJECTOR = "projector"  # after the projector, before the language model
    LLM = "llm"  # inside the language model, before one of its decoder layers

    @classmethod
    def parse(cls, value: str | Stage) -> Stage:
        if isinstance(value, Stage):
            return value
        aliases = {"a": cls.VISION, "b": cls.PROJECTOR, "c": cls.LLM}
        key = str(value).strip().lower()
        if key in aliases:
            return aliases[key]
        try:
            return cls(key)
        except ValueError:
            raise ConfigError(f"Unknown stage {value!r}: use 'vision' (a), 'projector' (b) or 'llm' (c).") from None


class Granularity(str, Enum):
    TOKEN = "token"
    PAGE = "page"
    HEAD = "head"
    LAYER = "layer"


@dataclass(frozen=True)
class Capabilities:
    """What a method supports.

    Attributes:
        phases: the phases in which the method can act.
        apply: what happens to unselected tokens.
        granularity: the unit of selection.
        needs_attention: the scorer reads attention probabilities (not only q, k, v).
        batching: batch size > 1 is supported (left padding is never kept).
        head_adaptive: different KV heads may keep different numbers of tokens.
        layer_adaptive: different layers may keep different numbers of tokens.
        profile: name of a per-model profile the method needs (``None`` if none).
    """

    phases: frozenset[Phase] = field(default_factory=lambda: frozenset({Phase.PREFILL}))
    apply: Apply = Apply.EVICT
    granularity: Granularity = Granularity.TOKEN
    needs_attention: bool = False
    batching: bool = True
    head_adaptive: bool = False
    layer_adaptive: bool = False
    profile: str | None = None

    def check(self, *, method: str, phase: Phase | None = None, batch_size: int = 1) -> None:
        """Raise :class:`CapabilityError` with a readable reason if the request does not fit."""
        if phase is not None and phase not in self.phases:
            can = ", ".join(sorted(p.value for p in self.phases)) or "no phase"
            raise CapabilityError(f"Method '{method}' does not act during {phase.value} (it acts during: {can}).")
        if batch_size > 1 and not self.batching:
            raise CapabilityError(f"Method '{method}' does not support batch size > 1; run one prompt at a time.")

    def describe(self) -> str:
        bits = ["+".join(sorted(p.value for p in self.phases)), self.apply.value, self.granularity.value]
        if self.needs_attention:
            bits.append("attention-rows")
        if self.head_adaptive:
            bits.append("head-adaptive")
        if self.layer_adaptive:
            bits.append("layer-adaptive")
        if not self.batching:
            bits.append("bs=1 only")
        if self.profile:
            bits.append(f"profile:{self.profile}")
        return ", ".join(bits)
