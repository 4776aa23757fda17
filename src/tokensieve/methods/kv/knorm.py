"""KNorm: keep the keys with the lowest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...scorers import key_norm_scores


@register
@dataclass(frozen=True)
class KNorm(PrefillMethod):
    """KNorm: keys with a low L2 norm attract attention, so keep them (Devoto et al., arXiv:2406.11430).

    Score: ``s_j = −‖k_j‖₂`` per KV head (post-RoPE keys; RoPE is a rotation, so the norm is the same as before it).
    Needs no attention, so it is compatible with fused attention kernels. No protected tokens by default.
    """

    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (arXiv:2406.11430)"
    rule: ClassVar[str] = "s_j = -||k_j||_2"

    def score(self, ctx: LayerContext) -> Tensor:
        return key_norm_scores(ctx)
