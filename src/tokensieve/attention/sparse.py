"""Sparse decode kernels: attend to a selected subset of a row-major KV buffer without touching the rest.

Everything is batched over (sequence, KV head) rows: one matmul for Quest's page bounds, one ``index_select`` to
read the chosen pages or slots, one SDPA. Kernels take tensors (buffers, slot indices, masks), never stores.
Tested against the dense reference with a full selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def slot_mask(
    slots: Tensor, n: int, valid: Tensor | None, bias: Tensor | None, keep: Tensor | None = None
) -> Tensor | None:
    """Mask/bias ``(B, H, 1, m)`` (or None) for gathered ``slots`` ``(B, H, m)`` of rows holding ``n`` entries.

    A slot counts if it is below ``n``, not padding (``valid`` ``(B, n)``) and kept (``keep`` ``(B, H, m)``);
    ``bias`` ``(B, H, n)`` is the per-entry logit bias.
    """
    ok = slots < n
    if keep is not None:
        ok = ok & keep
    if valid is not None:
        ok = ok & valid.gather(1, slots.clamp(max=n - 1).flatten(1)).view_as(slots)
    mask: Tensor | None = None if bool(ok.all()) else ok[:, :, None, :]  # (B, H, 1, m)
    if bias is not None:
        b = bias.gather(2, slots.clamp(max=n - 1))[:, :, None, :]
        mask = b if mask is None else torch.where(mask, b, float("-inf"))
    return mask


def attend_slots(qg: Tensor, kbuf: Tensor, vbuf: Tensor, slots: Tensor, scaling: float, mask: Tensor | None) -> Tensor:
    """Attention over chosen slots of each row.

    qg ``(B, H, G, D)``; kbuf, vbuf ``(B, H, cap, D)``; slots ``(B, H, m)``; mask as :func:`slot_mask`
    → ``(B, H, G, D)``.
    """
    B, H, _, D = qg.shape
    m = slots.shape[-1]
    cap = kbuf.shape[2]
    flat = (torch.arange(B * H, device=qg.device)[:, None] * cap + slots.reshape(B * H, m)).flatten()
    K = kbuf.reshape(B * H * cap, D).index_select(0, flat).view(B, H, m, D)
    V = vbuf.reshape(B * H * cap, D).index_select(0, flat).view(B, H, m, D)
    return F.scaled_dot_product_attention(qg, K, V, attn_mask=mask, scale=scaling)


# -- Quest: page metadata, bounds and page reads ---------------------------------------------------------------------
# meta (B, H, 2D, pages): rows [0, D) hold M − m, rows [D, 2D) hold m (channel max M and min m of a page's keys), so
# that the bound Σ_d max(q_d M_d, q_d m_d) = relu(q)·(M − m) + q·m is one matmul over [relu(q), q].
def page_meta(kbuf: Tensor, complete: int, page: int) -> Tensor:
    """Metadata of the first ``complete`` pages of ``kbuf`` ``(B, H, cap, D)`` (cap a multiple of ``page``)
    → ``(B, H, 2D, cap / page)``; columns of pages not yet complete are zero."""
    B, H, cap, D = kbuf.shape
    meta = kbuf.new_zeros(B, H, 2 * D, cap // page)
    if complete:
        pages = kbuf[:, :, : complete * page].reshape(B, H, complete, page, D)
        hi, lo = pages.amax(3), pages.amin(3)  # (B, H, complete, D)
        meta[:, :, :D, :complete] = (hi - lo).transpose(-1, -2)
        meta[:, :, D:, :complete] = lo.transpose(-1, -2)
    return meta


def write_page_meta(meta: Tensor, kbuf: Tensor, index: int, page: int) -> None:
    """Fill column ``index`` of ``meta`` from page ``index`` of ``kbuf`` (called once, when the page fills)."""
    keys = kbuf[:, :, index * page : (index + 1) * page]  # (B, H, P, D)
    hi, lo = keys.amax(2), keys.amin(2)
    D = hi.shape[-1]
    meta[:, :, :D, index] = hi - lo
    meta[:, :, D:, index] = lo


def page_bounds(qg: Tensor, meta: Tensor) -> Tensor:
    """Quest's upper bound of ``q·k`` over each page, ``Σ_d max(q_d M_d, q_d m_d)``: qg ``(B, H, G, D)``,
    meta ``(B, H, 2D, P)`` → ``(B, H, G, P)``."""
    qq = torch.cat([F.relu(qg), qg], -1)  # (B, H, G, 2D)
    return torch.matmul(qq, meta)


def attend_pages(
    qg: Tensor, kbuf: Tensor, vbuf: Tensor, flat_pages: Tensor, page: int, scaling: float, mask: Tensor | None
) -> Tensor:
    """Attention over whole pages: ``flat_pages`` ``(B * H, k)`` index the buffers viewed as
    ``(B * H * cap / page, page, D)`` (row ``r``'s page ``p`` is ``r * cap / page + p``). → ``(B, H, G, D)``."""
    B, H, _, D = qg.shape
    k = flat_pages.shape[-1]
    kp = kbuf.view(-1, page, D)  # (rows * pages_per_row, P, D)
    vp = vbuf.view(-1, page, D)
    flat = flat_pages.reshape(-1)
    K = kp.index_select(0, flat).view(B, H, k * page, D)
    V = vp.index_select(0, flat).view(B, H, k * page, D)
    return F.scaled_dot_product_attention(qg, K, V, attn_mask=mask, scale=scaling)
