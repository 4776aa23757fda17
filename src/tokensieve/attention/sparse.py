"""Sparse decode kernels: attend to a selected subset of a dense store without touching the rest.

Everything is batched over (sequence, KV head) rows: one matmul for page bounds, one ``index_select`` to read the
chosen pages or tokens, one SDPA. Tested against the dense reference with a full selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache.storage import DenseKV


def page_bounds(keys: Tensor, n: int, page: int) -> tuple[Tensor, Tensor]:
    """Per-page channel max and min of the first ``n`` keys: keys ``(B, H, cap, D)`` → two ``(B, H, ceil(n/P), D)``."""
    B, H, _, D = keys.shape
    n_pages = -(-n // page)
    k = keys[:, :, :n]
    pad = n_pages * page - n
    if pad:
        k_hi = torch.cat([k, k.new_full((B, H, pad, D), float("-inf"))], 2)
        k_lo = torch.cat([k, k.new_full((B, H, pad, D), float("inf"))], 2)
    else:
        k_hi = k_lo = k
    return k_hi.view(B, H, n_pages, page, D).amax(3), k_lo.view(B, H, n_pages, page, D).amin(3)


def quest_upper_bounds(qg: Tensor, pmax: Tensor, pmin: Tensor) -> Tensor:
    """Quest's bound on ``q·k`` per page: ``Σ_d max(q_d M_d, q_d m_d)`` as two matmuls.

    qg ``(B, H, G, D)``, pmax/pmin ``(B, H, P, D)`` → ``(B, H, G, P)``.
    """
    return torch.matmul(qg.clamp(min=0), pmax.transpose(-1, -2)) + torch.matmul(qg.clamp(max=0), pmin.transpose(-1, -2))


def slot_mask(store: DenseKV, slots: Tensor, keep: Tensor | None = None) -> Tensor | None:
    """Mask/bias for gathered ``slots`` ``(B, H, m)``: validity (slot < n, not padding, ``keep``) and logit bias."""
    ok = slots < store.n
    if keep is not None:
        ok = ok & keep
    if store.valid is not None:
        ok = ok & store.valid.gather(1, slots.clamp(max=store.n - 1).flatten(1)).view_as(slots)
    mask: Tensor | None = None if bool(ok.all()) else ok[:, :, None, :]  # (B, H, 1, m)
    if store.bias is not None:
        bias = store.bias.gather(2, slots.clamp(max=store.n - 1))[:, :, None, :]
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    return mask


def attend_pages(qg: Tensor, store: DenseKV, pages: Tensor, page: int, scaling: float) -> Tensor:
    """Attention over whole pages of each row. qg ``(B, H, G, D)``, pages ``(B, H, k)`` → ``(B, H, G, D)``."""
    B, H, _, D = qg.shape
    k = pages.shape[-1]
    kp, vp = store.pages(page)  # (rows * pages_per_row, P, D)
    per_row = store.capacity // page
    flat = (torch.arange(B * H, device=qg.device)[:, None] * per_row + pages.reshape(B * H, k)).flatten()
    K = kp.index_select(0, flat).view(B, H, k * page, D)
    V = vp.index_select(0, flat).view(B, H, k * page, D)
    slots = (pages[..., None] * page + torch.arange(page, device=qg.device)).view(B, H, k * page)
    return F.scaled_dot_product_attention(qg, K, V, attn_mask=slot_mask(store, slots), scale=scaling)


def attend_slots(qg: Tensor, store: DenseKV, slots: Tensor, scaling: float, keep: Tensor | None = None) -> Tensor:
    """Attention over chosen slots of each row. qg ``(B, H, G, D)``, slots ``(B, H, m)`` (``keep`` ``(B, H, m)``
    bool masks some out) → ``(B, H, G, D)``."""
    B, H, _, D = qg.shape
    m = slots.shape[-1]
    kb, vb = store.buffers
    cap = store.capacity
    flat = (torch.arange(B * H, device=qg.device)[:, None] * cap + slots.reshape(B * H, m)).flatten()
    K = kb.view(B * H * cap, D).index_select(0, flat).view(B, H, m, D)
    V = vb.view(B * H * cap, D).index_select(0, flat).view(B, H, m, D)
    return F.scaled_dot_product_attention(qg, K, V, attn_mask=slot_mask(store, slots, keep), scale=scaling)
