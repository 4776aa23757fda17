"""One grammar for "what to run": visual-token methods of a vision-language model, a prefill method with its budget,
then optionally a decode method with its budget.

::

    spec     := visual { '/' visual } [ '/' kv ]  |  kv
    visual   := [ 'vis:' ] call ':' budget                 a method of the visual family, at most one per stage
    kv       := prefill [ '+' decode ]  |  '+' decode
    prefill  := call [ ':' budget ]
    decode   := call [ ':' budget ]
    call     := name [ '[' param { ',' param } ']' ]
    param    := key '=' ( call | value )
    budget   := ratio (0.25, 25%) | token count (256)

``full``, ``snapkv:0.25``, ``snapkv[window=64]:0.25+quest[page=32]:0.125``,
``adakv[base=snapkv[window=64]]:0.1+quest[page=32]:0.125``, ``+h2o:512`` (full prefill, H2O while decoding),
``todre:0.1/snapkv:0.25`` (ToDRE keeps a tenth of each image's visual tokens, then SnapKV a quarter of the cache),
``pool:64/fastv[layer=2]:0.5``. A method that acts only while decoding, written alone, runs after a full prefill:
``quest:0.125`` is ``+quest:0.125``. A visual budget counts visual tokens per image. A part is visual when its method
is a visual one (``vis:`` names the visual method where a KV method has the same name: ``vis:random:0.11``). Keys may
be written with ``-`` for ``_``. docs/CONCEPTS.md documents the grammar.

A :class:`Spec` holds method *instances* (a nested method is an object, e.g. ``AdaKV(base=SnapKV(window=64))``), so
a spec built in Python and one parsed from a string are the same value. It has one canonical :attr:`Spec.label`
(re-rendered from the objects: defaults dropped, parameters sorted, budgets in one notation) and one
:meth:`Spec.key` (a hash of every resolved parameter and the workload) shared by every tool that records results.

This module is part of the library: it imports only the errors, the core concepts, the registry and the visual
methods' base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .cache.decode import DecodeMethod
from .core.budget import Budget
from .core.capabilities import Phase, Request, Stage
from .core.context import ModelShape
from .core.method import DIT, KV, VISUAL, Method, PrefillMethod
from .errors import CapabilityError, ConfigError
from .methods.dit import grammar as dit_grammar
from .methods.dit.base import DiTMethod
from .methods.visual.base import VisualMethod
from .registry import DIT_PREFIX, VIS_PREFIX, check_fields, create_method, dit_refusal, get_method_class, method_names

FULL = "full"
SEPARATOR = "/"  # between the visual parts of a spec and its KV part
MAX_NESTING = 8  # methods nested in methods (adakv[base=snapkv[...]] is 2 deep); deeper is refused, not recursed into
GRAMMAR = (
    "[visual:budget/...]prefill[:budget][+decode[:budget]], e.g. snapkv[window=64]:0.25+quest[page=32]:0.125 or "
    "todre:0.1/snapkv:0.25"
)


def _full() -> Method:
    return create_method(FULL)


# ---------------------------------------------------------------------------------------------------- checks
def _check_kv(method: Method, part: str) -> None:
    if method.family == DIT:
        raise ConfigError(dit_refusal(method.name))
    if method.family != KV:
        raise ConfigError(
            f"'{method.name}' is a {method.family} method: write it before the KV part with its budget "
            f"('{method.name}:0.25{SEPARATOR}snapkv:0.25'), not as the {part} method."
        )


def _check_prefill(method: Any) -> None:
    if not isinstance(method, Method):
        raise ConfigError(f"A spec's prefill method must be a Method instance (or a name), not {method!r}.")
    _check_kv(method, "prefill")
    if Phase.PREFILL not in method.capabilities.phases and Phase.DECODE in method.capabilities.phases:
        raise ConfigError(
            f"Method '{method.name}' does not act during prefill; it acts while decoding: write '+{method.name}' "
            "(a full prefill, then it) or put it after a prefill method and '+'."
        )
    method.capabilities.check(method=method.name, phase=Phase.PREFILL)


def _check_decode(method: Any) -> None:
    if not isinstance(method, Method):
        raise ConfigError(f"A spec's decode method must be a Method instance (or a name), not {method!r}.")
    _check_kv(method, "decode")
    method.capabilities.check(method=method.name, phase=Phase.DECODE)
    if not method.compresses:
        raise ConfigError(
            f"Method '{method.name}' keeps the whole cache while decoding: it is no decode method. "
            f"Drop '+{method.name}'."
        )


def _budget(value: Any) -> Budget | None:
    return None if value is None else Budget.parse(value)


# ---------------------------------------------------------------------------------------------- visual parts
def _render(value: Any) -> str:
    """A visual method's parameter as its label writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def visual_budget_text(budget: Budget) -> str:
    """A visual budget as a label writes it: ``0.11``, ``1.0`` (a ratio, never ``1``, which reads as one token),
    ``64`` (tokens per image)."""
    if budget.kind != "ratio":
        return str(int(budget.value))
    text = f"{float(budget.value):g}"
    return text if any(c in text for c in ".e") else f"{text}.0"


@dataclass(frozen=True)
class VisualSpec:
    """One visual-token method and its budget (visual tokens per image: a ratio of each image's tokens that reach the
    method's stage, or a token count per image)."""

    method: VisualMethod
    budget: Budget

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            name = self.method.strip()
            object.__setattr__(self, "method", create_method(name if name.lower().startswith(VIS_PREFIX) else
                                                              VIS_PREFIX + name))  # fmt: skip
        if not isinstance(self.method, VisualMethod):
            raise ConfigError(f"A visual part names a visual-token method, not {self.method!r}.")
        object.__setattr__(self, "budget", Budget.parse(self.budget))
        check_fields(self.method)

    @classmethod
    def parse(cls, text: str) -> VisualSpec:
        """``name[key=value,...]:budget`` (``vis:`` optional) — one visual part of the spec grammar."""
        return _Parser(text).visual_alone()

    @property
    def stage(self) -> Stage:
        return self.method.where

    @property
    def label(self) -> str:
        """Canonical text: defaults dropped, parameters sorted, the budget as :func:`visual_budget_text` writes it
        except a whole ratio (``1``)."""
        changed = []
        for f in sorted(dataclasses.fields(self.method), key=lambda f: f.name):
            default = f.default if f.default is not dataclasses.MISSING else None
            value = getattr(self.method, f.name)
            if value != default:
                changed.append(f"{f.name}={_render(value)}")
        params = f"[{','.join(changed)}]" if changed else ""
        budget = f"{float(self.budget.value):g}" if self.budget.kind == "ratio" else str(int(self.budget.value))
        return f"{self.method.name}{params}:{budget}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class VisualPlan:
    """At most one visual spec per stage, run in stage order (vision, projector, llm); each budget applies to the
    visual tokens that reach its stage. :meth:`of` adds the companions a method brings along (``todre:0.1`` is ToDRE's
    projector stage and its llm stage)."""

    specs: tuple[VisualSpec, ...] = ()

    def __post_init__(self) -> None:
        order = [Stage.VISION, Stage.PROJECTOR, Stage.LLM]
        seen: set[Stage] = set()
        for s in self.specs:
            if s.stage in seen:
                raise ConfigError(f"Two visual methods at the {s.stage.value} stage: one per stage.")
            seen.add(s.stage)
        object.__setattr__(self, "specs", tuple(sorted(self.specs, key=lambda s: order.index(s.stage))))

    @classmethod
    def of(cls, specs: Iterable[VisualSpec]) -> VisualPlan:
        """The plan of ``specs`` with the companions they bring along at stages none of them names."""
        named_specs = list(specs)
        stages = {s.stage for s in named_specs}
        extra: list[VisualSpec] = []
        for s in named_specs:
            for method, budget in s.method.companions(s.budget):
                if method.where not in stages:
                    extra.append(VisualSpec(method, budget))
                    stages.add(method.where)
        return cls(tuple(named_specs + extra))

    @classmethod
    def parse(cls, parts: Iterable[str] | str) -> VisualPlan:
        """The plan of visual parts (a list of ``name[params]:budget`` texts, or one such text)."""
        items = [parts] if isinstance(parts, str) else list(parts)
        return cls.of(VisualSpec.parse(p) for p in items if p.strip())

    def at(self, stage: Stage) -> VisualSpec | None:
        for s in self.specs:
            if s.stage is stage:
                return s
        return None

    @property
    def is_empty(self) -> bool:
        return not self.specs

    @property
    def named(self) -> tuple[VisualSpec, ...]:
        """The specs without the companions another of them brings along (``todre:0.1`` names its llm stage
        implicitly, so ``todre:0.1`` and ``todre:0.1/todre[stage=llm]:1`` are one configuration)."""
        implied = [(m, b) for s in self.specs for m, b in s.method.companions(s.budget)]
        return tuple(s for s in self.specs if (s.method, s.budget) not in implied)

    @property
    def label(self) -> str:
        """Every spec's label, companions included, joined by ``/``."""
        return SEPARATOR.join(s.label for s in self.specs)

    def canonical(self, *, budgets: bool = True) -> str:
        """The canonical label of the plan as a spec writes it: ``full`` for none, else each named spec's label in
        stage order, joined by ``/``, written ``vis:name`` where a KV method has the same name; ``budgets=False``:
        without budgets. Two texts of one configuration give one label (``11%`` and ``0.11``; parameters in any
        order; a companion written out)."""
        named = self.named
        if not named:
            return FULL
        kv = set(method_names(KV))
        parts = []
        for s in named:
            text = s.label.rsplit(":", 1)[0] + (f":{visual_budget_text(s.budget)}" if budgets else "")
            parts.append(f"{VIS_PREFIX}{text}" if s.method.name in kv else text)
        return SEPARATOR.join(parts)

    def to_list(self) -> list[dict[str, Any]]:
        """Every spec (companions included) with its stage, resolved parameters and budget, JSON-ready."""
        return [{"stage": s.stage.value, "method": method_dict(s.method), "budget": budget_dict(s.budget)}
                for s in self.specs]  # fmt: skip


def _plan(value: Any) -> VisualPlan:
    if value is None:
        return VisualPlan()
    if isinstance(value, VisualPlan):
        return value
    if isinstance(value, VisualSpec):
        return VisualPlan.of([value])
    if isinstance(value, (list, tuple)):
        return VisualPlan.of(v if isinstance(v, VisualSpec) else VisualSpec.parse(v) for v in value)
    raise ConfigError(f"A spec's visual part is a VisualPlan (or visual specs), not {value!r}.")


# ------------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class Spec:
    """What to run: the visual-token methods of a vision-language model, a prefill method and its budget, and
    optionally a decode method and its budget.

    Args:
        method: the method that compresses the prompt (``full`` keeps it whole).
        budget: its budget; ``None`` for a method that does not compress, or while unresolved (see
            :meth:`with_budget`). A budget of the whole prompt (ratio 1.0) on a non-compressing method is dropped.
        decode: a method that acts at every decode step (bounded cache or sparse attention), or ``None``.
        decode_budget: its budget; defaults to ``budget`` when the prefill method has one.
        visual: the visual-token methods that act on a prompt's images before the KV method sees its cache (a
            :class:`VisualPlan`; empty for a text model).

    ``Spec(AdaKV(base=SnapKV(window=64)), Budget.ratio(0.1), Quest(page=32), Budget.ratio(0.125))`` equals
    ``Spec.parse("adakv[base=snapkv[window=64]]:0.1+quest[page=32]:0.125")``.
    """

    method: Method = field(default_factory=_full)
    budget: Budget | None = None
    decode: Method | None = None
    decode_budget: Budget | None = None
    visual: VisualPlan = field(default_factory=VisualPlan)

    def __post_init__(self) -> None:
        object.__setattr__(self, "visual", _plan(self.visual))
        if isinstance(self.method, str):  # a convenience for untyped callers: Spec("snapkv", 0.25)
            object.__setattr__(self, "method", create_method(self.method))
        if isinstance(self.decode, str):
            object.__setattr__(self, "decode", create_method(self.decode))
        object.__setattr__(self, "budget", _budget(self.budget))
        object.__setattr__(self, "decode_budget", _budget(self.decode_budget))
        _check_prefill(self.method)
        check_fields(self.method)
        if self.budget is not None and not self.method.compresses:
            if not self.budget.is_full:
                raise ConfigError(
                    f"Method '{self.method.name}' keeps every prompt token: it takes no budget "
                    f"(write '{self.method.name}', or '+decode:budget' for a decode method after a full prefill)."
                )
            object.__setattr__(self, "budget", None)
        if self.decode is None:
            if self.decode_budget is not None:
                raise ConfigError("A decode budget without a decode method: write prefill:budget+decode:budget.")
            return
        _check_decode(self.decode)
        check_fields(self.decode)
        if self.decode_budget is None and self.budget is not None:
            object.__setattr__(self, "decode_budget", self.budget)
        if isinstance(self.decode, DecodeMethod) and self.decode_budget is not None:
            # what a budget alone can tell (a token budget below the sinks …)
            why = self.decode.batch_refusal(self.decode_budget, [])
            if why is not None:
                raise CapabilityError(why)

    # ---------------------------------------------------------------------------------------------- requests
    @property
    def decoder(self) -> Method | None:
        """The method that acts while decoding: the decode method, else a prefill method that decodes itself."""
        if self.decode is not None:
            return self.decode
        return self.method if self.method.declared().decodes_itself else None

    def why_not(self, request: Request) -> str | None:
        """Why this spec cannot serve ``request`` — a sentence that says what to do — or None. The one rule every
        front door asks before any work (the Compressor when it is built and at every prefill, the CLI, the
        evaluation and the benchmarks before loading a model, the server for every request): each method's own
        reasons (:meth:`Method.why_not`: batching, :meth:`Method.refusal` on the model), then what the methods ask
        of each other and of the request — a decode method after a prefill method, a chunked or replayed prefill,
        visual methods and a prompt with or without images."""
        label = self.label
        shape = request.shape
        for m in (*(s.method for s in self.visual.specs), self.method, self.decode):
            if m is None:
                continue
            if request.batch > 1 and not m.declared().batching:
                return f"Method '{m.name}' does not support batch size > 1; run one prompt at a time."
            if shape is not None and (why := m.refusal(shape)) is not None:
                return f"'{label}' on model '{shape.key}': {why}"
        method, decode = self.method, self.decoder
        caps = method.declared()
        if decode is not None and decode is not method:
            why = _composition_refusal(method, decode, shape)
            if why is not None:
                return why
        if isinstance(decode, DecodeMethod) and request.lengths:
            budget = self.decode_budget or self.budget or Budget.ratio(1.0)
            why = decode.batch_refusal(budget, list(request.lengths))
            if why is not None:
                return why
        if request.chunk is not None:
            if isinstance(method, PrefillMethod) and (why := method.chunk_refusal()) is not None:
                return (
                    f"'{label}' cannot compress a prompt chunk by chunk: {why}. Prefill it in one pass (no chunk) or "
                    "use a method that can, e.g. snapkv, pyramidkv, tova, h2o, knorm, streaming_llm (docs/PREFILL.md)."
                )
            if self.decode is not None and self.decode.declared().prefill_queries:
                return (
                    f"'{label}' cannot run after a chunked prefill: decode method '{self.decode.name}' starts from the "
                    "whole prompt's queries, which a chunked prefill does not keep; prefill in one pass (no chunk) to "
                    "use it."
                )
        if request.replay:
            why = caps.forward_change
            if why is None and request.chunk is not None:
                why = "the prefill runs in chunks"
            if why is not None:
                return f"'{label}' cannot replay a recorded prefill: '{method.name}' {why}."
        if request.images is False and not self.visual.is_empty:
            named = self.visual.named[0].method.name
            return (
                f"'{named}' is a visual-token method: it prunes an image's tokens in a vision-language model. Prefill "
                "the processor's output (input_ids with pixel_values) of a prompt with images."
            )
        if request.images and not self.visual.is_empty:
            change = "runs in chunks" if request.chunk is not None else caps.forward_change
            if change is None and caps.passes:
                change = "runs auxiliary passes over the prompt"
            if change is not None:
                return (
                    f"'{label}': the KV method '{method.name}' {change}, which a VLM prompt whose visual tokens are "
                    "pruned does not support; use another KV method (e.g. snapkv, pyramidkv, tova) after the visual "
                    "methods."
                )
        return None

    def check(self, request: Request) -> None:
        """:meth:`why_not`, raised as a :class:`CapabilityError`; with a model, each method's own checks against it
        (:meth:`Method.check`: a profile it needs exists and fits) run first."""
        if request.shape is not None:
            for m in (*(s.method for s in self.visual.specs), self.method, self.decode):
                if m is not None:
                    m.check(request.shape)
        why = self.why_not(request)
        if why is not None:
            raise CapabilityError(why)

    # ------------------------------------------------------------------------------------------------- build
    @classmethod
    def parse(cls, text: str | Spec | Method) -> Spec:
        """Read a spec string (see the module docstring); a :class:`Spec` is returned as is, a :class:`Method`
        becomes a spec of its own. Every malformed spec raises :class:`ConfigError` with the position."""
        if isinstance(text, Spec):
            return text
        if isinstance(text, Method):
            return cls.of(text)
        if not isinstance(text, str):
            raise ConfigError(f"A spec is a string such as 'snapkv:0.25', not {text!r}.")
        return _Parser(text).spec()

    @classmethod
    def of(cls, method: Method, budget: Budget | str | float | int | None = None) -> Spec:
        """A spec of one method: a prefill method with ``budget``, or — for a method that acts only while
        decoding — a full prefill followed by it at ``budget`` (as ``quest:0.125`` means ``+quest:0.125``); for a
        visual method, the method at ``budget`` and no KV method."""
        if isinstance(method, VisualMethod):
            if budget is None:
                raise ConfigError(f"Visual method '{method.name}' needs a budget (visual tokens per image).")
            return cls(visual=VisualPlan.of([VisualSpec(method, Budget.parse(budget))]))
        phases = method.capabilities.phases
        if Phase.PREFILL not in phases and Phase.DECODE in phases:
            return cls(_full(), None, method, _budget(budget))
        return cls(method, _budget(budget))

    @property
    def kv(self) -> Spec:
        """The KV part alone (no visual methods)."""
        return dataclasses.replace(self, visual=VisualPlan()) if self.visual.specs else self

    def with_budget(self, budget: Budget | str | float | int) -> Spec:
        """Fill the missing budgets with ``budget``: the prefill's if its method compresses and has none, the
        decode method's if it has none. A resolved spec is returned unchanged."""
        b = Budget.parse(budget)
        pre = self.budget if self.budget is not None or not self.method.compresses else b
        dec = None if self.decode is None else self.decode_budget if self.decode_budget is not None else b
        if pre is self.budget and dec is self.decode_budget:
            return self
        return Spec(self.method, pre, self.decode, dec, self.visual)

    def at_budgets(self, budgets: Iterable[Budget | str | float | int]) -> list[Spec]:
        """One resolved spec per budget if this one misses a budget, else ``[self]`` (how grids combine a list of
        specs with a list of budgets)."""
        if self.is_resolved:
            return [self]
        out = list(dict.fromkeys(self.with_budget(b) for b in budgets))
        if not out:
            raise ConfigError(f"'{self.label}' needs a budget: write it as {self.label}:0.25 or give budgets.")
        return out

    def without_budgets(self) -> Spec:
        """The KV methods without their budgets (the visual methods keep theirs: see :attr:`family`)."""
        return Spec(self.method, None, self.decode, None, self.visual)

    @property
    def prefill(self) -> Spec:
        """The prefill part alone (specs with the same prefill can share one prefilled cache)."""
        return Spec(self.method, self.budget, visual=self.visual)

    # ------------------------------------------------------------------------------------------------ facts
    @property
    def is_resolved(self) -> bool:
        """Every method that needs a budget has one."""
        return (self.budget is not None or not self.method.compresses) and (
            self.decode is None or self.decode_budget is not None
        )

    @property
    def compresses(self) -> bool:
        """The prefill compresses, a decode method bounds or sparsifies the cache, or visual methods prune."""
        return self.method.compresses or self.decode is not None or not self.visual.is_empty

    @property
    def is_full(self) -> bool:
        """The full-cache baseline: nothing compressed, no decode method, no visual method."""
        return not self.method.compresses and self.decode is None and self.visual.is_empty

    @property
    def label(self) -> str:
        """The canonical label, rendered from the objects (defaults dropped, parameters sorted by key, budgets as
        ``0.25`` or ``256``): ``full``, ``snapkv:0.25``, ``+quest[page=32]:0.125``, ``todre:0.1/snapkv:0.25``
        (the visual part as :meth:`VisualPlan.canonical` writes it; a full KV part is left out)."""
        return self._label(budgets=True)

    def _label(self, *, budgets: bool) -> str:
        kv = self._kv_label() if budgets else self.without_budgets()._kv_label()
        if self.visual.is_empty:
            return kv
        visual = self.visual.canonical(budgets=budgets)
        return visual if kv == FULL else f"{visual}{SEPARATOR}{kv}"

    def _kv_label(self) -> str:
        head = ""
        if self.method.name != FULL or self.decode is None or _params(self.method):
            head = method_label(self.method) + (f":{budget_label(self.budget)}" if self.budget is not None else "")
        if self.decode is None:
            return head
        tail = method_label(self.decode)
        if self.decode_budget is not None:
            tail += f":{budget_label(self.decode_budget)}"
        return f"{head}+{tail}"

    @property
    def family(self) -> str:
        """The label without budgets (``snapkv``, ``+quest[page=32]``, ``todre/snapkv``): one line of an
        accuracy-vs-budget plot."""
        return self._label(budgets=False)

    @property
    def budget_text(self) -> str:
        """The budgets for a table: ``25%``, ``50% + 0.125`` (prefill + decode when they differ), ``100%`` (full)."""
        shown = [str(b) for b in (self.budget, self.decode_budget) if b is not None]
        return " + ".join(dict.fromkeys(shown)) or "100%"

    def __str__(self) -> str:
        return self.label

    # ------------------------------------------------------------------------------------------------- keys
    def to_dict(self) -> dict[str, Any]:
        """Every resolved parameter (defaults included, nested methods as ``{"name", "params"}``) and the budgets,
        JSON-ready; the visual methods (companions included) under ``visual`` when there are any."""
        out: dict[str, Any] = {
            "method": method_dict(self.method),
            "budget": budget_dict(self.budget),
            "decode": method_dict(self.decode) if self.decode is not None else None,
            "decode_budget": budget_dict(self.decode_budget),
        }
        if not self.visual.is_empty:
            out["visual"] = self.visual.to_list()
        return out

    def key(self, **workload: Any) -> str:
        """The key of a measurement of this spec on a workload (task, length, model, batch size …): a SHA-256 of
        the JSON of :meth:`to_dict` and the workload. The tokensieve version is not part of it, so a rerun after an
        upgrade resumes; measure into a new store after changing what a method computes."""
        if "spec" in workload:
            raise ValueError("'spec' is reserved in a key's workload")
        blob = json.dumps({"spec": self.to_dict(), **workload}, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]

    def compressor_kwargs(self) -> dict[str, Any]:
        """``method=, budget=, decode=, decode_budget=`` for :class:`tokensieve.engine.Compressor`."""
        if not self.is_resolved:
            missing = "prefill" if self.budget is None and self.method.compresses else "decode"
            raise ConfigError(
                f"The spec '{self.label}' gives no budget for its {missing} method: write e.g. "
                f"'{self.label}:0.25'" + (" (or prefill:budget+decode:budget)." if self.decode is not None else ".")
            )
        out: dict[str, Any] = {
            "method": self.method,
            "budget": self.budget if self.budget is not None else Budget.ratio(1.0),
            "decode": self.decode,
            "decode_budget": self.decode_budget,
        }
        if not self.visual.is_empty:
            out["visual"] = self.visual
        return out


def _composition_refusal(method: Method, decode: Method, shape: ModelShape | None) -> str | None:
    """Why a prefill method and a decode method cannot run together (on a model of this shape), or None."""
    if shape is not None and shape.modified:
        what = "sliding-window" if any(w is not None for w in shape.windows) else "soft-capped"
        return (
            f"Decode method '{decode.name}' does not support {what} attention yet, and model '{shape.key}' has it. "
            "Run without a decode method (prefill methods honour the model's windows and soft-capping)."
        )
    dcaps, caps = decode.declared(), method.declared()
    if dcaps.own_prefill_scores and type(method) is not type(decode):
        return (
            f"'{decode.name}' evicts while decoding with the scores its own prefill gave the prompt's entries, so it "
            f"cannot follow '{method.name}'; run '{decode.name}' alone (it also acts while decoding)."
        )
    if caps.head_adaptive and not dcaps.head_adaptive:
        return (
            f"Decode method '{decode.name}' needs every KV head of a sequence to hold the same number of entries, "
            f"but '{method.name}' gives KV heads different budgets (head-adaptive). Use a prefill method with uniform "
            f"heads (e.g. snapkv, pyramidkv, streaming_llm) or the full cache before '{decode.name}', or run "
            f"'{method.name}' without a decode method."
        )
    if caps.passes:
        return (
            f"'{method.name}' runs auxiliary passes over the prompt, which a decode method ('{decode.name}') cannot "
            "follow; run it without a decode method."
        )
    return None


# ------------------------------------------------------------------------------------------------ rendering
def _defaults(method: Method) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(method):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _params(method: Method) -> dict[str, Any]:
    """The parameters that differ from the dataclass defaults, sorted by key."""
    defaults = _defaults(method)
    values = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    return {k: v for k, v in sorted(values.items()) if k not in defaults or v != defaults[k]}


def value_label(value: Any) -> str:
    if isinstance(value, Method):
        return method_label(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def method_label(method: Method) -> str:
    """``name[key=value,…]`` with the parameters that differ from the defaults; nested methods recursively."""
    params = _params(method)
    if not params:
        return method.name
    return method.name + "[" + ",".join(f"{k}={value_label(v)}" for k, v in params.items()) + "]"


def budget_label(budget: Budget) -> str:
    """``0.25`` for a ratio (``25%`` too), ``256`` for a token count."""
    return repr(float(budget.value)) if budget.kind == "ratio" else str(int(budget.value))


def _json_value(value: Any) -> Any:
    if isinstance(value, Method):
        return method_dict(value)
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return repr(value)


def method_dict(method: Method) -> dict[str, Any]:
    params = {f.name: _json_value(getattr(method, f.name)) for f in dataclasses.fields(method)}
    return {"name": method.name, "params": params}


def budget_dict(budget: Budget | None) -> dict[str, Any] | None:
    if budget is None:
        return None
    value: float | int = float(budget.value) if budget.kind == "ratio" else int(budget.value)
    return {"kind": budget.kind, "value": value, "sink": budget.sink, "recent": budget.recent}


# --------------------------------------------------------------------------------------------------- lists
def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs at top-level commas (commas inside brackets separate parameters)."""
    out: list[str] = []
    depth = 0
    start = 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def parse_specs(items: str | Iterable[str | Spec | Method]) -> list[Spec]:
    """Specs from a comma-separated string or a list of specs; duplicates dropped, order kept."""
    raw = split_specs(items) if isinstance(items, str) else list(items)
    return list(dict.fromkeys(Spec.parse(s) for s in raw))


def visual_plan(spec: str | Spec | VisualPlan | None) -> VisualPlan:
    """The visual methods of a spec (``"todre:0.11"``, ``"pool:64/fastv:0.5"``, a :class:`Spec`); ``None``, ``""``
    and ``"full"``: none. A spec with a KV part is refused (a visual plan names visual methods only)."""
    if isinstance(spec, VisualPlan):
        return spec
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", FULL)):
        return VisualPlan()
    parsed = Spec.parse(spec)
    if not parsed.kv.is_full:
        raise ConfigError(
            f"'{parsed.label}' has a KV part ('{parsed.kv.label}'); a visual plan names visual methods only "
            f"(write the whole spec to tokensieve.compress)."
        )
    return parsed.visual


def visual_label(spec: str | Spec | VisualPlan | None, *, budgets: bool = True) -> str:
    """The canonical label of a spec's visual methods (:meth:`VisualPlan.canonical`; ``full`` for none)."""
    return visual_plan(spec).canonical(budgets=budgets)


# -------------------------------------------------------------------------------------------------- parser
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_VALUE = re.compile(r"[^\s\[\],=:+/]+")
_BUDGET = re.compile(r"[^\s\[\],=:+/]+")


def _method_typed(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Method)


def _with_position(exc: ConfigError, text: str, pos: int) -> ConfigError:
    msg = f"In spec {text!r} at column {pos + 1}: {exc}\n  {text}\n  {' ' * pos}^"
    try:
        return type(exc)(msg)
    except TypeError:  # pragma: no cover - an error class with another signature
        return ConfigError(msg)


class _Parser:
    """Recursive descent over the grammar of the module docstring; every error carries its column."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0  # methods being read, nested in each other

    # -- helpers --------------------------------------------------------------------------------------------
    def error(self, expected: str, pos: int | None = None) -> ConfigError:
        at = self.pos if pos is None else pos
        found = f"'{self.text[at]}'" if at < len(self.text) else "the end"
        return ConfigError(
            f"Cannot read spec {self.text!r}: expected {expected} at column {at + 1}, found {found}.\n"
            f"  {self.text}\n  {' ' * at}^\n"
            f"Specs are written {GRAMMAR}."
        )

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self, pattern: re.Pattern[str], expected: str) -> tuple[str, int]:
        self.ws()
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise self.error(expected)
        self.pos = m.end()
        return m.group(0), m.start()

    def located(self, pos: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise _with_position(exc, self.text, pos) from None

    # -- grammar --------------------------------------------------------------------------------------------
    def spec(self) -> Spec:
        if not self.text.strip():
            raise self.error("a method name")
        visual: list[VisualSpec] = []
        while self.visual_ahead():
            visual.append(self.visual())
            if self.peek() != SEPARATOR:
                if self.peek():
                    raise self.error(f"'{SEPARATOR}' or the end of the spec")
                return Spec(visual=self.located(0, VisualPlan.of, visual))
            self.pos += 1
            if not self.peek():
                raise self.error(f"a method after '{SEPARATOR}'")
        kv = self.kv()
        if visual:
            kv = dataclasses.replace(kv, visual=self.located(0, VisualPlan.of, visual))
        return kv

    def visual_alone(self) -> VisualSpec:
        """One visual part and nothing else (:meth:`VisualSpec.parse`)."""
        if not self.text.strip():
            raise self.error("a visual method name")
        if not self.visual_ahead():
            self.ws()
            m = _NAME.match(self.text, self.pos)
            name = m.group(0) if m else ""
            self.located(self.pos, get_method_class, name, VISUAL)  # unknown: the closest visual names
            raise self.error(f"a visual method (write 'vis:{name}' for the visual one)")
        out = self.visual()
        if self.peek():
            raise self.error("the end of the visual spec")
        return out

    def visual_ahead(self) -> bool:
        """The next part names a visual method: ``vis:`` or a name only the visual family has."""
        self.ws()
        if self.text[self.pos : self.pos + len(VIS_PREFIX)].lower() == VIS_PREFIX:
            return True
        m = _NAME.match(self.text, self.pos)
        if m is None:
            return False
        name = m.group(0).lower()
        return name in method_names(VISUAL) and name not in method_names(KV)

    def visual(self) -> VisualSpec:
        self.ws()
        if self.text[self.pos : self.pos + len(VIS_PREFIX)].lower() == VIS_PREFIX:
            self.pos += len(VIS_PREFIX)
        method, start = self.call("a visual method name", VISUAL)
        if self.peek() != ":":
            raise _with_position(
                ConfigError(
                    f"Visual method '{method.name}' has no budget: write e.g. '{method.name}:0.25' or "
                    f"'{method.name}:64' (a ratio of each image's visual tokens, or a token count per image)."
                ),
                self.text,
                self.pos,
            )
        budget = self.budget()
        assert budget is not None
        return self.located(start, VisualSpec, method, budget[0])

    def kv(self) -> Spec:
        prefill: tuple[Method, int] | None = None
        budget: tuple[Budget, int] | None = None
        if self.peek() != "+":
            prefill = self.call("a method name", KV)
            budget = self.budget()
        decode: tuple[Method, int] | None = None
        decode_budget: tuple[Budget, int] | None = None
        if self.peek() == "+":
            self.pos += 1
            decode = self.call("a method name after '+'", KV)
            decode_budget = self.budget()
        if self.peek() == SEPARATOR:
            raise self.error(
                "the end of the spec: visual methods come first and the KV part last ('pool:128/snapkv:0.25'); "
                f"prefix a visual method named like a KV method with '{VIS_PREFIX}'"
            )
        if self.peek():
            if decode is not None:
                expected = "the end of the spec (one '+' at most: prefill+decode)"
                raise self.error(expected if decode_budget is not None else "':' or " + expected)
            raise self.error("'+' or the end of the spec" if budget is not None else "':', '+' or the end of the spec")

        if prefill is not None and decode is None:  # a decode-only method alone: a full prefill, then it
            phases = prefill[0].capabilities.phases
            if Phase.PREFILL not in phases and Phase.DECODE in phases:
                prefill, decode, budget, decode_budget = None, prefill, None, budget
        method = prefill[0] if prefill is not None else _full()
        if prefill is not None:
            self.located(prefill[1], _check_prefill, method)
            if budget is not None and not method.compresses and not budget[0].is_full:
                raise _with_position(
                    ConfigError(f"Method '{method.name}' keeps every prompt token: it takes no budget."),
                    self.text,
                    budget[1],
                )
        if decode is not None:
            self.located(decode[1], _check_decode, decode[0])
        return Spec(
            method,
            budget[0] if budget is not None else None,
            decode[0] if decode is not None else None,
            decode_budget[0] if decode_budget is not None else None,
        )

    def budget(self) -> tuple[Budget, int] | None:
        if self.peek() != ":":
            return None
        self.pos += 1
        raw, at = self.token(_BUDGET, "a budget after ':' (a ratio such as 0.25 or 25%, or a token count such as 256)")
        return self.located(at, Budget.parse, raw), at

    def call(self, expected: str, family: str | None = None) -> tuple[Method, int]:
        if self.depth >= MAX_NESTING:
            raise _with_position(
                ConfigError(f"Methods are nested more than {MAX_NESTING} deep; no method needs that."),
                self.text,
                self.pos,
            )
        self.depth += 1
        try:
            return self._call(expected, family)
        finally:
            self.depth -= 1

    def _call(self, expected: str, family: str | None) -> tuple[Method, int]:
        name, start = self.token(_NAME, expected)
        cls = self.located(start, get_method_class, name, family)
        if cls.family == DIT:
            raise _with_position(ConfigError(dit_refusal(cls.name)), self.text, start)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        params: dict[str, Any] = {}
        where: dict[str, int] = {}
        if self.peek() == "[":
            self.pos += 1
            while True:
                raw_key, kpos = self.token(_NAME, "a parameter name")
                key = raw_key.replace("-", "_")
                if key in params:
                    raise _with_position(ConfigError(f"Parameter '{key}' is given twice."), self.text, kpos)
                if self.peek() != "=":
                    raise self.error(f"'=' after '{raw_key}'")
                self.pos += 1
                self.ws()
                nested = _NAME.match(self.text, self.pos)
                followed = nested is not None and self.text[nested.end() : nested.end() + 1] == "["
                if followed or (key in fields and _method_typed(hints.get(key))):
                    params[key] = self.call(f"a method name for '{key}'")[0]
                else:
                    params[key] = self.token(_VALUE, f"a value for '{key}'")[0]
                where[key] = kpos
                c = self.peek()
                if c == ",":
                    self.pos += 1
                    continue
                if c == "]":
                    self.pos += 1
                    break
                raise self.error("']' or ','")
        try:
            return create_method(f"{VIS_PREFIX}{cls.name}" if cls.family == VISUAL else cls.name, **params), start
        except ConfigError as exc:
            at = next((p for k, p in where.items() if re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", str(exc))), start)
            raise _with_position(exc, self.text, at) from None


# ---------------------------------------------------------------------------------------------- DiT specs
def parse_dit_spec(text: str | DiTMethod) -> DiTMethod:
    """The diffusion-transformer method a DiT spec names (``svg:0.3``, ``svg2[top_p=0.9]``, ``dit:full``; the
    grammar: :mod:`tokensieve.methods.dit.grammar`). A KV-cache or visual-token spec is refused with the reason it
    cannot apply to a DiT; an unknown name lists the DiT methods."""
    if isinstance(text, DiTMethod):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"A DiT spec is a string such as 'svg:0.3' or a DiT method, not {text!r}.")
    first = re.match(r"\s*(?:dit:)?\s*([A-Za-z_][\w-]*)", text, re.IGNORECASE)
    name = first.group(1).lower() if first else ""
    if name not in method_names(DIT):
        for family, what in (
            (KV, "a KV-cache method: it compresses a language model's cache, and a diffusion transformer keeps none "
             "(every denoising step attends the whole video afresh)"),
            (VISUAL, "a visual-token method: it prunes an image's tokens before a language model reads them, and a "
             "diffusion transformer generates every token it holds"),
        ):  # fmt: skip
            if name in method_names(family):
                raise ConfigError(f"{text!r} names {what}. DiT methods: {', '.join(method_names(DIT))}.")
    if re.search(r"[/+]", text):
        raise ConfigError(f"A DiT spec names one method ({text!r} composes several), e.g. 'svg:0.3'.")
    cls = get_method_class(f"{DIT_PREFIX}{name}")
    method: DiTMethod = dit_grammar.build(cls, text)
    return method


__all__ = [
    "Spec",
    "VisualPlan",
    "VisualSpec",
    "budget_label",
    "method_label",
    "parse_dit_spec",
    "parse_specs",
    "split_specs",
    "visual_label",
    "visual_plan",
]
