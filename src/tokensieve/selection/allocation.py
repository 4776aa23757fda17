"""Budget allocation across layers and heads: integer counts that sum exactly to a target."""

from __future__ import annotations

import torch
from torch import Tensor


def round_to_total(x: Tensor, total: Tensor, lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """Integer allocation close to ``x`` with each entry in ``[lo, hi]`` and each row summing to ``total``.

    Args:
        x: ``(R, n)`` desired (real-valued) allocations.
        total: ``(R,)`` long targets; must satisfy ``Σ lo <= total <= Σ hi`` per row (clamped otherwise).
        lo, hi: ``(R, n)`` (or scalar) inclusive bounds.

    Returns:
        ``(R, n)`` long. Largest-remainder rounding, then ±1 steps in order of remainder until the sum matches.
    """
    x = x.double()
    lo_t = torch.as_tensor(lo, dtype=torch.long).expand_as(x).clone()
    hi_t = torch.as_tensor(hi, dtype=torch.long).expand_as(x).clone()
    hi_t = torch.maximum(hi_t, lo_t)
    total = total.long().clamp(lo_t.sum(-1), hi_t.sum(-1))
    out = x.clamp(lo_t.double(), hi_t.double()).floor().long()
    frac = (x - x.floor()).masked_fill(x >= hi_t.double(), -1.0)
    for r in range(x.shape[0]):
        diff = int(total[r] - out[r].sum())
        if diff == 0:
            continue
        order = torch.argsort(frac[r], descending=diff > 0, stable=True).tolist()
        step = 1 if diff > 0 else -1
        while diff != 0:
            moved = False
            for i in order:
                if diff == 0:
                    break
                nv = int(out[r, i]) + step
                if int(lo_t[r, i]) <= nv <= int(hi_t[r, i]):
                    out[r, i] = nv
                    diff -= step
                    moved = True
            if not moved:  # pragma: no cover - impossible after the clamp of `total`
                break
    return out


def pooled_counts(scores: Tensor, total: int) -> Tensor:
    """How many of each row's entries are among the ``total`` highest of all rows pooled together.

    Args:
        scores: ``(R, T)``; ``-inf`` where an entry may not be chosen.
        total: entries to choose (at most the number of finite scores).

    Returns:
        ``(R,)`` long, summing to ``total``. Ties go to the earlier row, then the earlier entry.
    """
    R, T = scores.shape
    flat = scores.reshape(-1).float()
    order = torch.sort(flat, descending=True, stable=True).indices[: max(0, int(total))]
    return torch.bincount(order // T, minlength=R).long()


def full_or_window_counts(order: list[int], full: int, window: int, total: int) -> Tensor:
    """Entries per unit (head or layer) when units either keep everything or a window, under an exact total.

    Every unit keeps ``window`` entries (at most ``full``); then units are upgraded to ``full`` in ``order`` (most
    deserving first) while the total allows, and what is left goes to the next unit in that order. When even the
    windows do not fit, the total is spread evenly.

    Args:
        order: unit indices, the first to keep everything first (a permutation of ``range(n)``).
        full: entries of a unit that keeps everything; window: entries of one that does not.
        total: entries of all units together, ``<= n · full``.

    Returns:
        ``(n,)`` long summing to ``total``.
    """
    n = len(order)
    w = min(window, full)
    if n * w >= total:
        return round_to_total(torch.full((1, n), total / max(n, 1)), torch.tensor([total]), lo=0, hi=full)[0]
    counts = torch.full((n,), w, dtype=torch.long)
    upgraded = n if full == w else min(n, (total - n * w) // (full - w))
    for u in order[:upgraded]:
        counts[u] = full
    rest = total - int(counts.sum())
    if rest > 0:
        counts[order[upgraded]] += rest
    return counts
