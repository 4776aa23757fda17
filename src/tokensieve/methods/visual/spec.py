"""Visual specs: ``name[key=value,...]:budget`` for one visual-token method, and a plan of at most one per stage.

::

    visual := [ 'vis:' ] name [ '[' key '=' value { ',' key '=' value } ']' ] ':' budget

``fastv[layer=2]:0.25`` (FastV before decoder layer 2, keep a quarter of each image's visual tokens),
``pool:64`` (average-pool each image's grid to at most 64 tokens), ``vis:random[seed=3]:0.11``. The budget counts
visual tokens **per image**: a ratio of each image's prunable tokens, or a token count per image. How a visual
plan is written next to a KV spec (``pool:128/snapkv:0.25``) is :func:`tokensieve.adapters.vision.split_spec`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ...core.budget import Budget
from ...errors import ConfigError
from .base import Stage, VisualMethod
from .registry import create_visual

PREFIX = "vis:"
_CALL = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\[(.*)\])?\s*$")


def split_list(text: str) -> list[str]:
    """Split a comma-separated list of visual specs at the commas outside brackets
    (``"fastv[layer=2,x=1]:0.5,pool"`` → ``["fastv[layer=2,x=1]:0.5", "pool"]``); blanks dropped."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [x for x in out if x]


def _params(text: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not text.strip():
        return out
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"In visual spec '{where}': parameter '{part.strip()}' is not key=value.")
        key, value = part.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key or key in out:
            raise ConfigError(f"In visual spec '{where}': empty or repeated parameter '{key}'.")
        out[key] = value.strip()
    return out


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def budget_text(budget: Budget) -> str:
    return f"{float(budget.value):g}" if budget.kind == "ratio" else str(int(budget.value))


@dataclass(frozen=True)
class VisualSpec:
    """One visual-token method and its budget (visual tokens per image)."""

    method: VisualMethod
    budget: Budget

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            object.__setattr__(self, "method", create_visual(self.method))
        object.__setattr__(self, "budget", Budget.parse(self.budget))
        self.method.check()

    @classmethod
    def parse(cls, text: str) -> VisualSpec:
        src = text.strip()
        body = src[len(PREFIX) :] if src.lower().startswith(PREFIX) else src
        call, sep, budget = body.rpartition(":")
        if not sep or "]" in budget:
            raise ConfigError(
                f"Visual spec '{text}' has no budget: write e.g. 'fastv[layer=2]:0.25' or 'pool:64' "
                "(a ratio or a token count per image)."
            )
        m = _CALL.match(call)
        if m is None:
            raise ConfigError(f"Cannot read visual spec '{text}': expected name[key=value,...]:budget.")
        method = create_visual(m.group(1), **_params(m.group(2) or "", text))
        return cls(method, Budget.parse(budget.strip()))

    @property
    def stage(self) -> Stage:
        return self.method.where

    @property
    def label(self) -> str:
        """Canonical text: defaults dropped, parameters sorted."""
        cls = type(self.method)
        changed = []
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name):
            default = f.default if f.default is not dataclasses.MISSING else None
            value = getattr(self.method, f.name)
            if value != default:
                changed.append(f"{f.name}={_render(value)}")
        params = f"[{','.join(changed)}]" if changed else ""
        return f"{self.method.name}{params}:{budget_text(self.budget)}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class VisualPlan:
    """At most one visual spec per stage, run in stage order (vision, projector, llm); each budget applies to the
    visual tokens that reach its stage."""

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
    def parse(cls, parts: list[str] | str) -> VisualPlan:
        items = [parts] if isinstance(parts, str) else parts
        specs = [VisualSpec.parse(p) for p in items if p.strip()]
        named = {s.stage for s in specs}
        extra: list[VisualSpec] = []
        for s in specs:
            for method, budget in s.method.companions(s.budget):
                if method.where not in named:
                    extra.append(VisualSpec(method, budget))
                    named.add(method.where)
        return cls(tuple(specs + extra))

    def at(self, stage: Stage) -> VisualSpec | None:
        for s in self.specs:
            if s.stage is stage:
                return s
        return None

    @property
    def is_empty(self) -> bool:
        return not self.specs

    @property
    def label(self) -> str:
        return "/".join(s.label for s in self.specs)
