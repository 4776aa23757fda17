"""Capability declarations: what a method can do, checked against what a request asks for.

The runtime never uses ``isinstance`` chains to decide whether a method fits a request: each method declares its
capabilities and :meth:`Capabilities.check` explains, in words, why a request does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..errors import CapabilityError, ConfigError
from .context import ModelShape


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
    """What a method does and needs: its one declaration, read by the registry's listing and by every check that
    decides whether a run can use it (:meth:`tokensieve.core.method.Method.why_not`,
    :meth:`tokensieve.spec.Spec.why_not`) and by the engine, which picks how to prefill from it.

    Attributes:
        phases: the phases in which the method can act.
        apply: what happens to unselected tokens.
        granularity: the unit of selection.
        needs_attention: the scorer reads attention probabilities (not only q, k, v).
        batching: batch size > 1 is supported (left padding is never kept).
        head_adaptive: different KV heads may keep different numbers of tokens.
        layer_adaptive: different layers may keep different numbers of tokens.
        profile: name of a per-model profile the method needs (``None`` if none).
        deferred: it selects once every layer of the prompt is scored (its scores are pooled over layers).
        passes: it runs auxiliary forward passes over the prompt's full cache before selecting (deferred only;
            ``prefill_passes`` / ``observe_pass``).
        own_attention: it computes the prompt's attention itself (sparse prefill; ``prefill_attention``).
        suffix: it appends auxiliary tokens to the prompt while compressing it (``prefill_suffix``).
        rescorable: it can re-score entries from a few recent queries (a chunk's, a generating cache's); False for a
            method that needs every prompt query at its true position, every layer at once, or the model's weights.
        decodes_itself: it also acts at every decode step when it compresses the prompt (no ``+decode`` needed).
        own_prefill_scores: its decode rule reads what its own prefill computed, so it cannot follow another one.
        prefill_queries: as a decode method, it starts from the whole prompt's queries (``setup`` gets the prefill's
            ``LayerContext``).
        decode_probs: as a bounded cache, it reads every step's attention probabilities.
        stages: a visual method's stages (vision encoder, projector, language model).
        signals: what a visual method reads besides the tokens (CLS attention, text rows …), computed by the adapter
            only for the methods that name them.
    """

    phases: frozenset[Phase] = field(default_factory=lambda: frozenset({Phase.PREFILL}))
    apply: Apply = Apply.EVICT
    granularity: Granularity = Granularity.TOKEN
    needs_attention: bool = False
    batching: bool = True
    head_adaptive: bool = False
    layer_adaptive: bool = False
    profile: str | None = None
    deferred: bool = False
    passes: bool = False
    own_attention: bool = False
    suffix: bool = False
    rescorable: bool = True
    decodes_itself: bool = False
    own_prefill_scores: bool = False
    prefill_queries: bool = False
    decode_probs: bool = False
    stages: frozenset[Stage] = frozenset()
    signals: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.passes and not self.deferred:
            raise ValueError("A method that runs auxiliary passes selects after them: declare deferred=True too.")

    def check(self, *, method: str, phase: Phase | None = None, batch_size: int = 1) -> None:
        """Raise :class:`CapabilityError` with a readable reason if the request does not fit."""
        if phase is not None and phase not in self.phases:
            can = ", ".join(sorted(p.value for p in self.phases)) or "no phase"
            raise CapabilityError(f"Method '{method}' does not act during {phase.value} (it acts during: {can}).")
        if batch_size > 1 and not self.batching:
            raise CapabilityError(f"Method '{method}' does not support batch size > 1; run one prompt at a time.")

    @property
    def forward_change(self) -> str | None:
        """How the method changes the model's forward pass over a prompt (None: it does not, so a recorded full-cache
        prefill can be replayed into its cache)."""
        if self.own_attention:
            return "computes its own prefill attention"
        if self.suffix:
            return "adds auxiliary tokens to the prompt"
        return None

    def describe(self) -> str:
        bits = ["+".join(sorted(p.value for p in self.phases)), self.apply.value, self.granularity.value]
        flags = {
            "attention-rows": self.needs_attention,
            "head-adaptive": self.head_adaptive,
            "layer-adaptive": self.layer_adaptive,
            "all-layers": self.deferred,
            "passes": self.passes,
            "own-attention": self.own_attention,
            "suffix": self.suffix,
            "decodes-itself": self.decodes_itself,
            "bs=1 only": not self.batching,
        }
        bits += [name for name, on in flags.items() if on]
        if self.profile:
            bits.append(f"profile:{self.profile}")
        return ", ".join(bits)


@dataclass(frozen=True)
class Request:
    """What a run asks of a spec's methods, as far as it is known when the question is asked: the one input of
    :meth:`tokensieve.spec.Spec.why_not`, which every front door (the Compressor, the CLI, the evaluation, the
    benchmarks, the server) asks before any work.

    Attributes:
        shape: the model's shape (None: no model loaded yet; checks that need one are skipped).
        lengths: real tokens of each prompt of a batch (empty: not known yet).
        chunk: the prompt is prefilled in chunks of this many tokens (None: in one pass).
        replay: the prefill is replayed from a recorded full-cache prefill.
        images: a vision-language model's prompt with images (True), a text prompt (False), or not known (None).
    """

    shape: ModelShape | None = None
    lengths: tuple[int, ...] = ()
    chunk: int | None = None
    replay: bool = False
    images: bool | None = None

    @property
    def batch(self) -> int:
        return len(self.lengths) or 1
