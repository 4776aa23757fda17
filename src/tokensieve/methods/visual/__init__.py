"""Visual-token methods (score → select → apply on visual tokens, at the vision / projector / llm stage).

One file per method; :mod:`.registry` lists them, :mod:`.spec` reads ``name[params]:budget``.
"""

from .base import Stage, VisualContext, VisualGroup, VisualKept, VisualMethod
from .registry import create_visual, get_visual_class, register_visual, visual_method_names
from .spec import VisualPlan, VisualSpec

__all__ = [
    "Stage",
    "VisualContext",
    "VisualGroup",
    "VisualKept",
    "VisualMethod",
    "VisualPlan",
    "VisualSpec",
    "create_visual",
    "get_visual_class",
    "register_visual",
    "visual_method_names",
]
