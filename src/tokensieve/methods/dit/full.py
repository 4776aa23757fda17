"""``full``: dense attention everywhere — the unmodified model, the reference every sparse method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.registry import register
from .base import Attended, DiTCall, DiTMethod, dense_attention


@register
@dataclass(frozen=True)
class Full(DiTMethod):
    """Dense attention at every layer and step (plain SDPA, exactly the model's own attention)."""

    name = "full"
    paper = "—"
    rule = "every query reads every key"

    @classmethod
    def summary(cls) -> str:
        return "diffusion transformer: dense attention (the reference)"

    def sparse(self, call: DiTCall) -> Attended:
        return Attended(dense_attention(call), 1.0)
