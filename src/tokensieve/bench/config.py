"""What a benchmark measures: method configurations, context lengths, batch sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.budget import Budget
from ..core.capabilities import Phase
from ..errors import ConfigError
from ..registry import create_method


def _split_budget(part: str) -> tuple[str, str]:
    """``name[params]:budget`` → (``name[params]``, ``budget``); the budget is optional."""
    i = part.rfind(":")
    return (part[:i], part[i + 1 :]) if i > part.rfind("]") else (part, "")


@dataclass(frozen=True)
class MethodSpec:
    """A prefill method with its budget, optionally followed by a decode method with its budget.

    Written ``prefill[:budget][+decode[:budget]]``: ``full``, ``snapkv:0.125``, ``full+quest:0.125``,
    ``snapkv:0.5+quest:0.125``, ``+h2o:512`` (full prefill, H2O while decoding). Method parameters go in
    brackets, separated by semicolons: ``+quest[page=32]:0.125``, ``snapkv[window=64;kernel=7]:0.25``.
    """

    prefill: str = "full"
    budget: str = "1.0"
    decode: str | None = None
    decode_budget: str | None = None
    prefill_params: tuple[tuple[str, str], ...] = ()
    decode_params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        pm = create_method(self.prefill, **dict(self.prefill_params))
        pm.capabilities.check(method=pm.name, phase=Phase.PREFILL)
        Budget.parse(self.budget)
        if self.decode is not None:
            dm = create_method(self.decode, **dict(self.decode_params))
            dm.capabilities.check(method=dm.name, phase=Phase.DECODE)
            Budget.parse(self.decode_budget or self.budget)
        elif self.decode_params:
            raise ConfigError("Decode parameters without a decode method.")

    @staticmethod
    def _name(text: str, whole: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        m = re.fullmatch(r"\s*([\w-]*)\s*(?:\[(.*)\])?\s*", text)
        if m is None:
            raise ConfigError(f"Cannot read '{whole}': write name[key=value;…]:budget.")
        params = []
        for item in filter(None, (m.group(2) or "").split(";")):
            if "=" not in item:
                raise ConfigError(f"'{whole}': parameters are key=value, got '{item}'.")
            k, v = item.split("=", 1)
            params.append((k.strip(), v.strip()))
        return m.group(1), tuple(params)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        text = text.strip()
        if not text:
            raise ConfigError("Empty method configuration.")
        head, _, tail = text.partition("+")
        prefill_part, budget = _split_budget(head)
        prefill, pparams = cls._name(prefill_part, text)
        kwargs: dict[str, object] = {"prefill": prefill or "full", "budget": budget or "1.0", "prefill_params": pparams}
        if tail:
            dpart, dbudget = _split_budget(tail)
            decode, dparams = cls._name(dpart, text)
            if not decode:
                raise ConfigError(f"'{text}': name the decode method after '+'.")
            kwargs.update(decode=decode, decode_budget=dbudget or None, decode_params=dparams)
        if kwargs["prefill"] != "full" and not budget:
            raise ConfigError(f"'{text}': give the budget of '{prefill}', e.g. {prefill}:0.25.")
        return cls(**kwargs)  # type: ignore[arg-type]

    @staticmethod
    def _params_label(params: tuple[tuple[str, str], ...]) -> str:
        return "[" + ";".join(f"{k}={v}" for k, v in params) + "]" if params else ""

    @property
    def label(self) -> str:
        pp = self._params_label(self.prefill_params)
        head = "full" if self.prefill == "full" and not pp else f"{self.prefill}{pp}:{self.budget}"
        if self.decode is None:
            return head
        return f"{head}+{self.decode}{self._params_label(self.decode_params)}:{self.decode_budget or self.budget}"

    @property
    def is_baseline(self) -> bool:
        return self.prefill == "full" and self.decode is None and not self.prefill_params

    @property
    def prefill_key(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        """Configurations with the same prefill share one prefill per repetition."""
        return (self.prefill, "1.0" if self.prefill == "full" else self.budget, self.prefill_params)


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
