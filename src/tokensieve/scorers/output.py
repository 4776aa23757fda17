"""Output-aware scoring: how far an entry's value moves the attention output (CriticalKV)."""

from __future__ import annotations

import torch
from torch import Tensor


def projected_value_norms(values: Tensor, out_proj: Tensor, num_q_heads: int) -> Tensor:
    """``‖v_j W_o^{(h)}‖₁`` averaged over the query heads ``h`` of each KV head.

    values ``(B, H_kv, T, D)``; out_proj ``(hidden, H_q · D)`` (query head ``h``'s slice: columns ``h·D … h·D+D−1``)
    → ``(B, H_kv, T)``.
    """
    B, Hkv, T, D = values.shape
    G = num_q_heads // Hkv
    W = out_proj.to(torch.float32).reshape(out_proj.shape[0], num_q_heads, D)  # (hidden, H_q, D)
    out = torch.empty(B, Hkv, T)
    for h in range(Hkv):
        Wg = W[:, h * G : (h + 1) * G]  # (hidden, G, D)
        proj = torch.einsum("btd,xgd->btgx", values[:, h].float(), Wg)  # (B, T, G, hidden)
        out[:, h] = proj.abs().sum(-1).mean(-1)
    return out
