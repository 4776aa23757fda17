"""Visual-token pruning adapters for VLM families (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, Idefics3 /
SmolVLM): :func:`vision_adapter` picks the family. The visual methods and their plan are written in the one spec
grammar (:mod:`tokensieve.spec`); docs/VLM_PRUNING.md is the guide."""

from __future__ import annotations

from typing import Any

from ...errors import CapabilityError
from .base import ImageTokens, VisionAdapter
from .segments import Seq, VisionState

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


__all__ = ["ImageTokens", "Seq", "VisionAdapter", "VisionState", "vision_adapter"]
