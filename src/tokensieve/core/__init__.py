"""Concepts with no model knowledge: budgets, layer contexts, selections, capabilities, methods, the registry."""

from ..selection import Selection
from .budget import Budget
from .capabilities import Apply, Capabilities, Granularity, Phase
from .context import LayerContext, ModelShape, RunState
from .method import Compressed, Method, PrefillMethod
from .registry import register

__all__ = [
    "Apply",
    "Budget",
    "Capabilities",
    "Compressed",
    "Granularity",
    "LayerContext",
    "Method",
    "ModelShape",
    "Phase",
    "PrefillMethod",
    "RunState",
    "Selection",
    "register",
]
