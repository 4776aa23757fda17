"""Budgets: how many KV entries a compressed cache may store.

A budget is either a *ratio* of the compressed prompt (``0.25`` keeps a quarter, i.e. 75 % compression) or an
absolute *token* count. It is always counted per (layer, KV head) **on average**: a sequence with ``n`` compressed
tokens may store ``num_layers * num_kv_heads * tokens_for(n)`` KV entries in total, protected sink and recent tokens
included, whatever the per-layer or per-head allocation. That is what makes methods comparable: the same budget
means the same number of stored entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

BudgetKind = Literal["ratio", "tokens"]
MAX_TOKENS = 2**63 - 1  # token counts are computed with 64-bit integers


def _whole(v: object) -> bool:
    """A whole number (an int, or a float without a fraction); NaN, ±inf, booleans and text are not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or (math.isfinite(v) and v == int(v))


@dataclass(frozen=True)
class Budget:
    """A KV budget.

    Args:
        value: a ratio in (0, 1] when ``kind == "ratio"``, else a token count >= 1.
        kind: ``"ratio"`` or ``"tokens"``.
        sink: protected first tokens of each sequence (``None``: the method's default).
        recent: protected most recent tokens (``None``: the method's default).
    """

    value: float
    kind: BudgetKind = "ratio"
    sink: int | None = None
    recent: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("ratio", "tokens"):
            raise ConfigError(f"Budget kind must be 'ratio' or 'tokens', not {self.kind!r}.")
        if self.kind == "ratio":
            if not (isinstance(self.value, (int, float)) and 0.0 < float(self.value) <= 1.0):
                raise ConfigError(
                    f"A ratio budget must be in (0, 1] (the share of the prompt's KV entries kept); got {self.value}. "
                    "Use an integer for an absolute token count, e.g. --budget 256."
                )
        else:
            if not _whole(self.value) or self.value < 1:
                raise ConfigError(f"A token budget must be a whole number >= 1; got {self.value}.")
            if self.value > MAX_TOKENS:
                raise ConfigError(f"A token budget of {int(self.value)} is too large (at most {MAX_TOKENS}).")
            object.__setattr__(self, "value", int(self.value))
        for name in ("sink", "recent"):
            v = getattr(self, name)
            if v is not None and (not _whole(v) or not 0 <= v <= MAX_TOKENS):
                raise ConfigError(f"Budget {name} must be a whole number in [0, {MAX_TOKENS}]; got {v}.")

    # ----------------------------------------------------------------------------------------------------- build
    @classmethod
    def ratio(cls, r: float, *, sink: int | None = None, recent: int | None = None) -> Budget:
        return cls(float(r), "ratio", sink, recent)

    @classmethod
    def tokens(cls, n: int, *, sink: int | None = None, recent: int | None = None) -> Budget:
        return cls(n, "tokens", sink, recent)

    @classmethod
    def parse(cls, spec: Budget | str | float | int) -> Budget:
        """Parse ``0.25``, ``"25%"``, ``"0.25"`` (ratios) or ``256``, ``"256"`` (token counts).

        A float is a ratio, an int is a token count; ``1.0`` is the whole prompt, ``1`` is one token.
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, bool):
            raise ConfigError(f"Not a budget: {spec!r}.")
        if isinstance(spec, int):
            return cls.tokens(spec)
        if isinstance(spec, float):
            return cls.ratio(spec)
        text = str(spec).strip()
        try:
            if text.endswith("%"):
                kind, value = "ratio", float(text[:-1]) / 100.0
            elif any(c in text for c in ".eE"):
                kind, value = "ratio", float(text)
            else:
                kind, value = "tokens", int(text)
        except ValueError:
            raise ConfigError(
                f"Cannot read budget {spec!r}: use a ratio such as 0.25 or 25%, or a token count such as 256."
            ) from None
        return cls.ratio(value) if kind == "ratio" else cls.tokens(int(value))

    # --------------------------------------------------------------------------------------------------- resolve
    @property
    def is_full(self) -> bool:
        return self.kind == "ratio" and float(self.value) >= 1.0

    def tokens_for(self, n: int, *, larger: Literal["error", "clip", "keep"] = "error") -> int:
        """Average per-(layer, KV head) number of entries a sequence with ``n`` compressed tokens keeps.

        An absolute budget above ``n`` is an error (``larger="error"``, compressing a prompt), covers the ``n``
        tokens (``"clip"``, tokens a sparse method reads from a cache of ``n``) or stays as it is (``"keep"``, the
        size a bounded cache may grow to after a prompt of ``n``).
        """
        if n <= 0:
            raise ConfigError("Nothing to compress: the prompt has no tokens.")
        if self.kind == "ratio":
            return max(1, min(n, math.floor(float(self.value) * n + 0.5)))
        if self.value > n and larger != "error":
            return n if larger == "clip" else int(self.value)
        if self.value > n:
            raise ConfigError(
                f"The absolute budget ({self.value} tokens) is larger than the prompt to compress ({n} tokens). "
                "Use a smaller budget or a ratio such as 0.5."
            )
        return int(self.value)

    def describe(self) -> str:
        if self.kind == "ratio":
            return f"{float(self.value):.0%}" if self.value * 100 == int(self.value * 100) else f"{self.value:g}"
        return f"{int(self.value)} tok"

    def __str__(self) -> str:
        return self.describe()
