"""The full-cache baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.method import Method
from ...core.registry import register


@register
@dataclass(frozen=True)
class FullCache(Method):
    """Full cache: every token's keys and values are kept (the baseline every method is measured against).

    Runs through the same cache and attention kernels as the compressing methods, so that speed and memory
    ratios compare methods, not implementations.
    """

    name: ClassVar[str] = "full"
    paper: ClassVar[str] = "Attention Is All You Need (arXiv:1706.03762) — no compression"
    rule: ClassVar[str] = "keep every token"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL, Phase.DECODE}), apply=Apply.NONE
    )
