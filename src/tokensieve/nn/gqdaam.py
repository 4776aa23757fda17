"""GQ-DAAM: density-adaptive attention (Form B) in front of grouped-query attention, as the DAAM-PEFT code builds it
(``GQDAAM.py`` for IEMOCAP, CIFAR-100 and AG News in gioannides/DAAM-PEFT-paper-code; DAAM, arXiv 2401.11143).

The official model re-weights the rows of a (B, rows, features) input with multi-head Form B
(:class:`~tokensieve.nn.gaussian.DensityAdaptiveAttention`, rows split into heads), projects the features to the
attention width, and runs one grouped-query self-attention layer over the rows; a task head (convolutions and a
linear layer there) follows. :class:`GroupedQueryDAAM` is that front: Form B → Linear → grouped-query attention.

The attention layer is the one the official code uses (a MAGNETO-style grouped-query layer), and it differs from the
textbook grouped-query attention in two ways, both reproduced here:

* **Scaling.** The queries are divided by √d and the logits again by √d, so the softmax sees q·k / d, not
  q·k / √d. ``logit_scale`` overrides the divisor (``None``: d, the official behaviour; ``"sqrt"``: √d).
* **Grouping.** The G = query_heads / kv_heads query heads of a group *sum* their logits against the group's key
  head: one attention map per key/value head, so the output has kv_heads · d features. A layer norm over them
  (``layer_norm``) precedes the output projection back to the width.

Initialisation as the official layer: Xavier-normal weights (gain ``gamma_init`` for the value and output
projections), zero biases.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .gaussian import DensityAdaptiveAttention

__all__ = ["GroupedQueryAttention", "GroupedQueryDAAM"]


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention as the DAAM-PEFT code computes it (see the module docstring).

    Args:
        embed_dim: width of the inputs and of the output.
        query_heads, kv_heads: query heads and key/value heads (``kv_heads`` divides ``query_heads``, both divide
            ``embed_dim``); head width d = embed_dim / query_heads.
        layer_norm: a LayerNorm over the kv_heads · d attention features before the output projection (official: on).
        logit_scale: ``None`` — logits q·k / d (official); ``"sqrt"`` — q·k / √d.
        gamma_init: Xavier gain of the value and output projections.

    Shapes: query (B, n, embed_dim), key and value (B, s, embed_dim) → output (B, n, embed_dim) and, with
    ``need_weights``, the attention (B, kv_heads, n, s).
    """

    def __init__(
        self,
        embed_dim: int,
        query_heads: int,
        kv_heads: int,
        *,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        logit_scale: Literal["sqrt"] | None = None,
        gamma_init: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if min(embed_dim, query_heads, kv_heads) < 1:
            raise ConfigError("embed_dim, query_heads and kv_heads must be ≥ 1")
        if query_heads % kv_heads:
            raise ConfigError(f"kv_heads ({kv_heads}) must divide query_heads ({query_heads})")
        if embed_dim % query_heads:
            raise ConfigError(f"query_heads ({query_heads}) must divide embed_dim ({embed_dim})")
        if logit_scale not in (None, "sqrt"):
            raise ConfigError(f"logit_scale must be None (official: q·k/d) or 'sqrt', got {logit_scale!r}")
        self.embed_dim = embed_dim
        self.query_heads = query_heads
        self.kv_heads = kv_heads
        self.head_dim = embed_dim // query_heads
        self.logit_scale = logit_scale
        kv_dim = self.head_dim * kv_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias)
        self.norm = nn.LayerNorm(kv_dim, eps=layer_norm_eps) if layer_norm else None
        self.out_proj = nn.Linear(kv_dim, embed_dim, bias=bias)
        for lin, gain in (
            (self.q_proj, 1.0),
            (self.k_proj, 1.0),
            (self.v_proj, gamma_init),
            (self.out_proj, gamma_init),
        ):
            nn.init.xavier_normal_(lin.weight, gain=gain)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        b, n, _ = query.shape
        s = key.shape[1]
        d, hk = self.head_dim, self.kv_heads
        g = self.query_heads // hk
        q = self.q_proj(query).reshape(b, n, hk, g, d).permute(0, 2, 3, 1, 4)  # (B, hk, G, n, d): head = h·G + g
        k = self.k_proj(key).reshape(b, s, hk, d).transpose(1, 2)  # (B, hk, s, d)
        v = self.v_proj(value).reshape(b, s, hk, d).transpose(1, 2)  # (B, hk, s, d)
        divisor = math.sqrt(d) if self.logit_scale == "sqrt" else float(d)
        logits = torch.einsum("bhgnd,bhsd->bhns", q, k) / divisor  # summed over the G query heads of each group
        attn = torch.softmax(logits, dim=-1)  # (B, hk, n, s)
        out = (attn @ v).transpose(1, 2).reshape(b, n, hk * d)  # (B, n, hk·d)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out), (attn if need_weights else None)


class GroupedQueryDAAM(nn.Module):
    """GQ-DAAM's front: multi-head Form B over the rows → Linear(features → embed_dim) → grouped-query
    self-attention over the rows.

    Args:
        features: input features (the last axis).
        embed_dim: attention width.
        daam_heads: heads of Form B (row groups; divides the number of rows at run time).
        query_heads, kv_heads: of the attention layer (official: 8 and 2 at width 512).
        **attention: further options of :class:`GroupedQueryAttention` (``layer_norm``, ``logit_scale``, …).

    Shapes: (B, rows, features) → (B, rows, embed_dim). ``forward(x, return_weights=True)`` also returns the Form B
    weights G (B, rows, features) and the attention (B, kv_heads, rows, rows).
    """

    def __init__(
        self, features: int, embed_dim: int, *, daam_heads: int = 1, query_heads: int = 8, kv_heads: int = 2,
        **attention: object,
    ) -> None:  # fmt: skip
        super().__init__()
        self.daam = DensityAdaptiveAttention(features, daam_heads)
        self.embed = nn.Linear(features, embed_dim)
        self.attention = GroupedQueryAttention(embed_dim, query_heads, kv_heads, **attention)  # type: ignore[arg-type]

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor | None]]:
        y, g = self.daam(x, return_weights=True)
        t = self.embed(y)
        out, attn = self.attention(t, t, t, need_weights=return_weights)
        return (out, (g, attn)) if return_weights else out
