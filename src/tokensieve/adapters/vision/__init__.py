"""Visual-token pruning adapters for VLM families (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, Idefics3 /
SmolVLM): :func:`vision_adapter` picks the family, :func:`split_spec` reads a visual plan written next to a KV spec,
:func:`visual_label` gives a plan's canonical label (the results store's ``label``). docs/VLM_PRUNING.md is the
guide."""

from __future__ import annotations

from typing import Any

from ...errors import CapabilityError, ConfigError
from ...methods.visual.registry import visual_method_names
from ...methods.visual.spec import PREFIX, VisualPlan, VisualSpec
from .base import ImageTokens, VisionAdapter
from .engine import LayerKV, Seq, VisionState

SEPARATOR = "/"


_FAMILIES: dict[str, tuple[str, str]] = {
    "LlavaForConditionalGeneration": ("llava", "LlavaAdapter"),
    "LlavaNextForConditionalGeneration": ("llava_next", "LlavaNextAdapter"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLAdapter"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLAdapter"),
    "Idefics3ForConditionalGeneration": ("idefics3", "Idefics3Adapter"),
    "SmolVLMForConditionalGeneration": ("idefics3", "Idefics3Adapter"),
}


def vision_adapter(model: Any) -> VisionAdapter:
    """The adapter of ``model``'s family (by its transformers class), or CapabilityError naming the supported ones."""
    import importlib

    name = type(model).__name__
    if name not in _FAMILIES:
        raise CapabilityError(f"No visual-token pruning adapter for {name}; supported: {', '.join(sorted(_FAMILIES))}.")
    module, cls = _FAMILIES[name]
    adapter: type[VisionAdapter] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    return adapter(model)


def _segments(text: str) -> list[str]:
    """Split at top-level ``/`` (not inside brackets)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == SEPARATOR and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out]


def split_spec(text: str) -> tuple[VisualPlan, str]:
    """Split ``visual { '/' visual } [ '/' kv-spec ]`` into the visual plan and the KV spec text ('' for none).

    A segment is visual when it starts with ``vis:`` or names a visual method that is not also a KV method
    (``random`` is both: write ``vis:random:0.25`` for the visual one). The KV part is the last segment, read by
    :meth:`tokensieve.spec.Spec.parse`. ``"pool:128/snapkv:0.25"`` → (pool at 128 visual tokens per image,
    ``"snapkv:0.25"``); ``"fastv[layer=2]:0.5"`` → (FastV, ``""``).
    """
    from ...registry import method_names

    kv_names = set(method_names())
    vis_names = set(visual_method_names())
    visual: list[str] = []
    kv: list[str] = []
    for seg in _segments(text):
        if not seg:
            raise ConfigError(f"Empty part in spec '{text}' (parts are separated by '{SEPARATOR}').")
        name = seg[len(PREFIX) :] if seg.lower().startswith(PREFIX) else seg
        name = name.split("[", 1)[0].split(":", 1)[0].strip().lower()
        is_visual = seg.lower().startswith(PREFIX) or (name in vis_names and name not in kv_names)
        if is_visual:
            if kv:
                raise ConfigError(f"In '{text}': visual methods come before the KV spec ('pool:128/snapkv:0.25').")
            visual.append(seg)
        else:
            kv.append(seg)
    if len(kv) > 1:
        raise ConfigError(
            f"In '{text}': one KV spec after the visual methods; '{kv[0]}' is no visual method "
            f"(visual methods: {', '.join(sorted(vis_names))}; prefix one with '{PREFIX}')."
        )
    return VisualPlan.parse(visual), kv[0] if kv else ""


FULL = "full"


def visual_plan(spec: str | VisualPlan | None) -> VisualPlan:
    """The plan of a visual spec text (``"todre:0.11"``, ``"pool:64/fastv:0.5"``); ``None``, ``""`` and ``"full"``:
    the empty plan (no pruning). A KV part is refused (see :func:`split_spec`)."""
    from .base import as_plan

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", FULL)):
        return VisualPlan()
    return as_plan(spec)


def named_specs(spec: str | VisualPlan | None) -> tuple[VisualSpec, ...]:
    """The specs of a plan in stage order without the companions another of its specs brings along (``todre:0.1``
    names its llm stage implicitly, so ``todre:0.1`` and ``todre:0.1/todre[stage=llm]:1`` are one configuration)."""
    plan = visual_plan(spec)
    implied = [(m, b) for s in plan.specs for m, b in s.method.companions(s.budget)]
    return tuple(s for s in plan.specs if (s.method, s.budget) not in implied)


def visual_label(spec: str | VisualPlan | None, *, budgets: bool = True) -> str:
    """The canonical label of a visual plan: ``full`` for none, else each named spec's label (defaults dropped,
    parameters sorted, budgets as ``0.11``, ``1.0`` or ``64``) in stage order, joined by ``/``, written ``vis:name``
    where a KV method has the same name (``vis:random:0.11``). ``budgets=False``: the label without budgets (``todre``,
    ``vis:random[seed=3]``) — one line of an accuracy-vs-budget plot. Two texts of one configuration give one label
    (``11%`` and ``0.11``; parameters in any order; a companion written out), so ``tokensieve train vlm-eval`` and
    ``tokensieve bench --vlm`` rows of the same configuration join."""
    from ...registry import method_names

    named = named_specs(spec)
    if not named:
        return FULL
    kv = set(method_names())
    parts = []
    for s in named:
        text = s.label.rsplit(":", 1)[0] + (f":{_budget(s)}" if budgets else "")
        parts.append(f"{PREFIX}{text}" if s.method.name in kv else text)
    return SEPARATOR.join(parts)


def _budget(s: VisualSpec) -> str:
    """A budget as a label writes it: ``0.11``, ``1.0`` (a ratio, never ``1``, which reads as one token), ``64``."""
    if s.budget.kind != "ratio":
        return str(int(s.budget.value))
    text = f"{float(s.budget.value):g}"
    return text if any(c in text for c in ".e") else f"{text}.0"


__all__ = [
    "FULL",
    "ImageTokens",
    "LayerKV",
    "Seq",
    "VisionAdapter",
    "VisionState",
    "named_specs",
    "split_spec",
    "vision_adapter",
    "visual_label",
    "visual_plan",
]
