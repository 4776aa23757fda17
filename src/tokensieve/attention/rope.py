"""Rotary position embedding as transformers applies it ("rotate-half" layout), as plain tensor functions.

A vector ``x`` at position ``p`` becomes ``R_p x = s · (x ⊙ cos(p θ) + rotate_half(x) ⊙ sin(p θ))`` on its first
``r = 2 · len(θ)`` channels (``θ`` repeated for both halves, ``s`` the attention scaling of scaled RoPE types); the
other channels (partial rotary) are left as they are. Expected Attention needs the inverse (to recover pre-rotation
queries) and the mean rotation over future positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _half_swap(x: Tensor, r: int) -> Tensor:
    """``rotate_half`` on the first ``r`` channels, zero elsewhere: ``[−x[r/2:r], x[:r/2], 0, …]``."""
    out = torch.zeros_like(x)
    h = r // 2
    out[..., :h] = -x[..., h:r]
    out[..., h:r] = x[..., :h]
    return out


def _tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """``cos(p θ)``, ``sin(p θ)`` over the rotary channels, ``(..., r)``."""
    ang = positions.double()[..., None] * inv_freq.double()
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def unrotate(x: Tensor, positions: Tensor, inv_freq: Tensor, scaling: float = 1.0) -> Tensor:
    """The vectors before rotation: ``R_p⁻¹ x``. x ``(..., T, D)``, positions ``(..., T)`` broadcastable."""
    r = 2 * inv_freq.numel()
    cos, sin = _tables(positions, inv_freq)
    xd = x.double()
    out = xd.clone()
    rot = xd[..., :r]
    out[..., :r] = (rot * cos - _half_swap(xd, r)[..., :r] * sin) / scaling
    return out.to(x.dtype)


def mean_rotation(positions: Tensor, inv_freq: Tensor, head_dim: int, scaling: float = 1.0) -> Tensor:
    """``R̄ = mean_p R_p`` over ``positions`` ``(n,)`` as a ``(D, D)`` matrix (float64); identity outside the
    rotary channels."""
    r = 2 * inv_freq.numel()
    cos, sin = _tables(positions, inv_freq)  # (n, r)
    c, s = cos.mean(0), sin.mean(0)  # (r,)
    R = torch.eye(head_dim, dtype=torch.float64)
    P = torch.zeros(r, r, dtype=torch.float64)
    h = r // 2
    P[:h, h:] = -torch.eye(h, dtype=torch.float64)
    P[h:, :h] = torch.eye(h, dtype=torch.float64)
    R[:r, :r] = scaling * (torch.diag(c) + torch.diag(s) @ P)
    return R


__all__ = ["mean_rotation", "unrotate"]
