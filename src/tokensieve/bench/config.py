"""What a benchmark measures: configurations (specs), context lengths, batch sizes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..core.budget import Budget
from ..core.capabilities import Request
from ..errors import ConfigError
from ..results.threads import default_threads
from ..spec import Spec, parse_specs

# what `tokensieve bench` measures when no --methods are given
DEFAULT_METHODS = "full,snapkv:0.125,streaming_llm:0.125,+quest:0.125,+tokenselect:0.125,+tidaldecode:0.125"


def bench_specs(
    methods: str | Iterable[str | Spec], budgets: Iterable[Budget | str | float | int] = ()
) -> tuple[Spec, ...]:
    """Resolved specs from a comma-separated list: a spec without a budget takes each of ``budgets``."""
    budgets = list(budgets)
    out: list[Spec] = []
    for spec in parse_specs(methods):
        if not spec.is_resolved and not budgets:
            raise ConfigError(
                f"'{spec.label}' gives no budget: write it with one (e.g. {spec.label}:0.125) or give --budgets."
            )
        out += spec.at_budgets(budgets)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark: resolved specs (the full cache is always added first), lengths, batch sizes, repetitions."""

    specs: tuple[Spec, ...]
    lengths: tuple[int, ...] = (2048,)
    batch_sizes: tuple[int, ...] = (1,)
    decode_tokens: int = 32
    repetitions: int = 3
    threads: int = field(default_factory=default_threads)  # the one default (tokensieve.results.threads)
    model: str = "smollm2-135m"
    extra: dict[str, str] = field(default_factory=dict)
    chunk: int | None = None  # chunked prefill (Compressor chunk=): every configuration prefills in such chunks

    def __post_init__(self) -> None:
        if not self.specs:
            raise ConfigError("Give at least one method configuration.")
        for s in self.specs:
            s.compressor_kwargs()  # every budget given (the message says what to write)
        specs = tuple(dict.fromkeys(self.specs))
        if not any(s.is_full for s in specs):  # the full cache is always measured
            specs = (Spec(), *specs)
        object.__setattr__(self, "specs", specs)
        if any(n < 16 for n in self.lengths) or not self.lengths:
            raise ConfigError("Context lengths must be >= 16 tokens.")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise ConfigError("Batch sizes must be >= 1.")
        if self.chunk is not None:
            if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 2:
                raise ConfigError(f"--chunk must be a whole number of tokens >= 2; got {self.chunk!r}.")
            for s in specs:
                s.check(Request(chunk=self.chunk))  # a method that cannot score a chunk fails before the model loads
        if self.decode_tokens < 2 or self.repetitions < 1 or self.threads < 1:
            raise ConfigError("decode_tokens >= 2, repetitions >= 1 and threads >= 1 are required.")
