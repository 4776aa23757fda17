"""Statistics over seeds for the DAAM lab: a mean with its Student-t interval, and paired comparisons (the same seed
under two settings: same initialisation of the shared parts, same batch order)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["fmt", "paired", "t_interval"]


def t_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its ``level`` Student-t interval (NaN half-width below two values)."""
    from scipy import stats

    n = len(xs)
    m = float(np.mean(xs))
    if n < 2:
        return m, math.nan
    sem = float(np.std(xs, ddof=1)) / math.sqrt(n)
    return m, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sem


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of a − b (same seeds, same order): mean difference, 95 % t half-width, two-sided paired
    t-test p (1.0 when every difference is 0), seeds where a is higher / lower."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    m, half = t_interval(d.tolist())
    if len(d) < 2:
        p = math.nan
    elif np.all(np.abs(d) < 1e-12):
        p = 1.0
    elif np.std(d, ddof=1) == 0:
        p = 0.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return {"diff": m, "half": half, "p": p, "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "n": len(d)}


def fmt(m: float, half: float) -> str:
    """``m ± half`` (just ``m`` without an interval)."""
    return f"{m:.3f} ± {half:.3f}" if not math.isnan(half) else f"{m:.3f}"
