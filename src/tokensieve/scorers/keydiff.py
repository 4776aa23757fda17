"""KeyDiff's scorer: distinctive keys — those least similar to the mean key direction — matter most."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def keydiff_scores(keys: Tensor, valid: Tensor) -> Tensor:
    """``s_j = −cos(k_j, a)`` with the anchor ``a = mean_i k_i / ‖k_i‖`` over each row's real tokens.

    keys ``(B, H, T, D)``, valid ``(B, T)`` → ``(B, H, T)`` (padding scores −inf).
    """
    k = keys.float()
    w = valid[:, None, :, None].to(k.dtype)
    anchor = (F.normalize(k, dim=-1) * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)
    s = -F.cosine_similarity(k, anchor, dim=-1)
    return s.masked_fill(~valid[:, None, :], float("-inf"))


def keydiff_blockwise(keys: Tensor, keep: int, block: int) -> Tensor:
    """KeyDiff's block-wise eviction of one row's keys ``(n, D)`` down to ``keep`` entries.

    The first ``keep`` tokens fill the cache; each following block of ``block`` tokens joins it, the anchor is
    recomputed over cache + block, and the ``keep`` highest-scored entries stay. Returns the kept indices, ascending.
    """
    n = keys.shape[0]
    if keep >= n:
        return torch.arange(n)
    if keep <= 0:
        return torch.arange(0)
    kept = torch.arange(keep)
    for start in range(keep, n, block):
        cand = torch.cat([kept, torch.arange(start, min(n, start + block))])
        s = keydiff_scores(keys[cand][None, None], torch.ones(1, cand.numel(), dtype=torch.bool))[0, 0]
        top = torch.sort(s, descending=True, stable=True).indices[:keep]
        kept = cand[top].sort().values
    return kept
