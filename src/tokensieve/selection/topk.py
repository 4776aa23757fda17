"""Top-k selection with protected sink and recent tokens, per row and per-row budgets."""

from __future__ import annotations

import torch
from torch import Tensor

from .kept import Selection


def protected_mask(valid: Tensor, sink: int | Tensor, recent: int | Tensor) -> tuple[Tensor, Tensor]:
    """Masks of the protected tokens of each sequence.

    Args:
        valid: ``(B, T)`` bool, False at (left) padding.
        sink: number of first real tokens to protect — an int, or ``(B, H)`` per row.
        recent: number of last real tokens to protect — an int, or ``(B, H)`` per row.

    Returns:
        ``(sink_mask, recent_mask)``: ``(B, T)`` bool for int arguments, ``(B, H, T)`` when either is per row.
    """
    first = valid.long().cumsum(-1)  # 1-based rank from the start among real tokens
    last = valid.long().flip(-1).cumsum(-1).flip(-1)  # 1-based rank from the end
    if isinstance(sink, int) and isinstance(recent, int):
        return valid & (first <= sink), valid & (last <= recent)
    sink_t = torch.as_tensor(sink, device=valid.device)
    recent_t = torch.as_tensor(recent, device=valid.device)
    sink_t = sink_t[..., None] if sink_t.dim() else sink_t
    recent_t = recent_t[..., None] if recent_t.dim() else recent_t
    v = valid[:, None, :]
    return v & (first[:, None, :] <= sink_t), v & (last[:, None, :] <= recent_t)


def topk_select(
    scores: Tensor,
    counts: Tensor,
    valid: Tensor,
    *,
    sink: int | Tensor = 0,
    recent: int | Tensor = 0,
) -> Selection:
    """Keep, per row, the ``counts[b, h]`` tokens with the highest scores, protected tokens first.

    Protected tokens count inside the budget. When the budget is smaller than the protected set, recent tokens
    win over sinks, and the latest of them win over older ones. Padding is never selected.

    Args:
        scores: ``(B, H, T)`` importance (higher = keep).
        counts: ``(B, H)`` long, tokens to keep per row; clamped to the number of real tokens.
        valid: ``(B, T)`` bool.
        sink, recent: protected first / last real tokens (ints, or ``(B, H)`` per row).

    Returns:
        A :class:`Selection` with exactly ``min(counts, n_valid)`` tokens per row.
    """
    B, H, T = scores.shape
    n_valid = valid.sum(-1)  # (B,)
    counts = torch.minimum(counts.long(), n_valid[:, None].expand(B, H))
    kmax = int(counts.max()) if counts.numel() else 0
    if kmax == 0:
        return Selection(torch.empty(B, H, 0, dtype=torch.long, device=scores.device), counts)
    sink_mask, recent_mask = protected_mask(valid, sink, recent)
    if sink_mask.dim() == 2:
        sink_mask, recent_mask = sink_mask[:, None, :], recent_mask[:, None, :]
    # Secondary key: the score, or the position for recent tokens (newest first when the budget is short).
    pos = torch.arange(T, device=scores.device, dtype=torch.float32).expand(B, H, T)
    sec = torch.nan_to_num(scores.float(), nan=float("-inf"))
    sec = torch.where(recent_mask, pos, sec)
    # Primary key: tier (recent 2 > sink 1 > others 0 > padding -1).
    tier = torch.zeros(B, H, T, dtype=torch.long, device=scores.device)
    tier = tier.masked_fill(sink_mask, 1).masked_fill(recent_mask, 2)
    tier = tier.masked_fill(~valid[:, None, :], -1)
    order = sec.sort(dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, tier.gather(-1, order).sort(dim=-1, descending=True, stable=True).indices)
    top = order[..., :kmax]  # (B, H, kmax), best first
    rank = torch.arange(kmax, device=scores.device).expand(B, H, kmax)
    keep = rank < counts[..., None]
    big = T + 1
    idx = torch.where(keep, top, torch.full_like(top, big)).sort(dim=-1).values
    idx = torch.where(idx < big, idx, torch.full_like(idx, -1))
    return Selection(indices=idx, counts=counts)
