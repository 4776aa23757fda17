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
