"""What a benchmark measures: method configurations, context lengths, batch sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.budget import Budget
from ..core.capabilities import Phase
from ..core.registry import create_method
from ..errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """A prefill method with its budget, optionally followed by a decode method with its budget.

    Written ``prefill[:budget][+decode[:budget]]``: ``full``, ``snapkv:0.125``, ``full+quest:0.125``,
    ``snapkv:0.5+quest:0.125``, ``+h2o:512`` (full prefill, H2O while decoding).
    """

    prefill: str = "full"
    budget: str = "1.0"
    decode: str | None = None
    decode_budget: str | None = None

    def __post_init__(self) -> None:
        pm = create_method(self.prefill)
        pm.capabilities.check(method=pm.name, phase=Phase.PREFILL)
        Budget.parse(self.budget)
        if self.decode is not None:
            dm = create_method(self.decode)
            dm.capabilities.check(method=dm.name, phase=Phase.DECODE)
            Budget.parse(self.decode_budget or self.budget)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        text = text.strip()
        if not text:
            raise ConfigError("Empty method configuration.")
        head, _, tail = text.partition("+")
        prefill, _, budget = head.partition(":")
        kwargs: dict[str, str | None] = {"prefill": prefill or "full", "budget": budget or "1.0"}
        if tail:
            decode, _, dbudget = tail.partition(":")
            if not decode:
                raise ConfigError(f"'{text}': name the decode method after '+'.")
            kwargs["decode"] = decode
            kwargs["decode_budget"] = dbudget or None
        if kwargs["prefill"] != "full" and not budget:
            raise ConfigError(f"'{text}': give the budget of '{prefill}', e.g. {prefill}:0.25.")
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        head = "full" if self.prefill == "full" else f"{self.prefill}:{self.budget}"
        if self.decode is None:
            return head
        return f"{head}+{self.decode}:{self.decode_budget or self.budget}"

    @property
    def is_baseline(self) -> bool:
        return self.prefill == "full" and self.decode is None

    @property
    def prefill_key(self) -> tuple[str, str]:
        """Configurations with the same prefill share one prefill per repetition."""
        return (self.prefill, "1.0" if self.prefill == "full" else self.budget)


@dataclass(frozen=True)
class BenchConfig:
    specs: tuple[MethodSpec, ...]
    lengths: tuple[int, ...] = (2048,)
    batch_sizes: tuple[int, ...] = (1,)
    decode_tokens: int = 32
    repetitions: int = 3
    threads: int = 2
    model: str = "smollm2-135m"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.specs:
            raise ConfigError("Give at least one method configuration.")
        if not any(s.is_baseline for s in self.specs):  # the full cache is always measured
            object.__setattr__(self, "specs", (MethodSpec(), *self.specs))
        if any(n < 16 for n in self.lengths) or not self.lengths:
            raise ConfigError("Context lengths must be >= 16 tokens.")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise ConfigError("Batch sizes must be >= 1.")
        if self.decode_tokens < 2 or self.repetitions < 1 or self.threads < 1:
            raise ConfigError("decode_tokens >= 2, repetitions >= 1 and threads >= 1 are required.")
