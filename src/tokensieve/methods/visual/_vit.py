"""Helpers shared by the vision-stage methods that allot a budget per grid (ToMe, HiPrune, HiRED): the groups of
each image and each image's share of the budget. Not a method (the leading underscore keeps it out of the
registry's discovery)."""

from __future__ import annotations

from ...core.budget import Budget
from ...errors import ConfigError
from .base import Stage, VisualContext, VisualMethod


def image_groups(ctx: VisualContext) -> dict[int, list[int]]:
    """Each image's group indices (in group order), images in order."""
    out: dict[int, list[int]] = {}
    for gi, g in enumerate(ctx.groups):
        out.setdefault(g.image, []).append(gi)
    return {k: out[k] for k in sorted(out)}


def image_budgets(ctx: VisualContext, budget: Budget) -> dict[int, int]:
    """Each image's kept-token count: the budget of the tokens it had at the method's first step (``ctx.base``),
    clipped to the tokens it has now (the same rule as :meth:`VisualMethod.count`, per image)."""
    groups = image_groups(ctx)
    out: dict[int, int] = {}
    for (image, gis), n0 in zip(groups.items(), ctx.base):
        n = sum(ctx.groups[gi].size for gi in gis)
        out[image] = min(budget.tokens_for(n0, larger="clip"), n) if n > 0 else 0
    return out


def check_vision_only(method: VisualMethod) -> None:
    """The stage check of a vision-only method whose layers come from its own fields (no ``layer`` field)."""
    if method.where is not Stage.VISION:  # pragma: no cover - the single stage is fixed by the class
        raise ConfigError(f"Visual method '{method.name}' acts at the vision stage only.")


def memory_of(ctx: VisualContext, name: str) -> dict[str, object]:
    """The context's cross-step memory, or an error naming the method when a progressive step runs without it."""
    if ctx.memory is None:
        if ctx.steps > 1:
            raise ConfigError(f"Visual method '{name}' acts at several layers and needs the engine's ctx.memory.")
        return {}
    return ctx.memory
