"""Radial Attention: a static O(n log n) mask whose spatial window shrinks as the temporal distance grows.

Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation", NeurIPS 2025
(arXiv:2506.19852); checked against the authors' code (mit-han-lab/radial-attention, ``radial_attn/attn_mask.py``
``gen_log_mask_shrinked`` with ``model_type="wan"``, and ``radial_attn/models/wan``).

**Rule** (static: one mask per video geometry, the same for every head, layer and step). With ``S`` tokens per frame
and ``d = |i − j|`` the distance of query frame ``i`` and key frame ``j``:

* key frame 0 is an attention sink: read whole by every frame (Wan);
* ``d ≤ 1``: the whole frame (window ``S``);
* ``d ≥ 2``: tokens within a window ``w = max(2^{bits(S)} / 2^{bits(d)} · decay, block)`` of the query's place in its
  frame (``bits`` = bit length);
* every pair but the sink, ``d ≤ 1`` included, is read only when ``d`` is divisible by ``128 / (2^{bits(S)} /
  2^{bits(d)})`` once that decay length falls below 128 (``get_diagonal_split_mask``: far frames are read one in
  two, one in four, …). At the authors' geometry (``S`` = 1,560 tokens per frame) this never drops a neighbouring
  frame; with fewer than 128 tokens per frame it drops the neighbours too, as the authors' code does, and the mask
  becomes far sparser than at larger frames;
* the token mask is reduced to ``block``-token blocks (``shrinkMaskStrict``): a block is read when more than 60 % of
  its non-empty key columns are more than a third full.

**Defaults** as the authors' Wan 2.1 script for the model's own video length (``scripts/wan_t2v_inference.sh``):
``decay = 0.2``, the first layer dense (``dense_layers=1``) and 12 of 50 steps dense (``warmup = 0.24``), 128-token
blocks.

**Choices.** The mask is computed once per geometry and cached. The density is the fraction of blocks read (every
pair of a read block is computed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from .base import Attended, DiTCall, DiTMethod, blocks_of, run_blocks


def _window(dist: int, tpf: int, decay: float, block: int) -> float:
    if dist <= 1:
        return float(tpf)
    decay_length = 2 ** tpf.bit_length() / 2 ** dist.bit_length() * decay
    return decay_length if decay_length >= block else float(block)


def _split_keep(dist: int, tpf: int) -> bool:
    decay_length = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
    if decay_length >= 128:
        return True
    return dist % int(128 / decay_length) == 0


def shrink(mask: Tensor, block: int) -> Tensor:
    """``shrinkMaskStrict``: ``(n·block, m·block)`` token mask → ``(n, m)`` block mask."""
    n, m = mask.shape[0] // block, mask.shape[1] // block
    cols = mask[: n * block, : m * block].view(n, block, m, block).float().sum(1) / block  # (n, m, block)
    nonzero = (cols > 0).sum(-1)
    dense = (cols > 1 / 3).sum(-1)
    return dense / (nonzero + 1e-9) > 0.6


def radial_mask(frames: int, tpf: int, block: int, decay: float, device: torch.device | None = None) -> Tensor:
    """``(n, n)`` bool block mask of Radial Attention on ``frames × tpf`` tokens (``n = ceil(frames·tpf / block)``)."""
    N = frames * tpf
    n = blocks_of(N, block)
    final = torch.zeros(n, n, dtype=torch.bool, device=device)
    r = torch.arange(tpf, device=device)
    diff = (r[None, :] - r[:, None]).abs()
    per_block = -(-tpf // block)
    for i in range(frames):
        for j in range(frames):
            if j == 0:
                local = torch.ones(tpf, tpf, dtype=torch.bool, device=device)
            else:
                dist = abs(i - j)
                local = diff <= _window(dist, tpf, decay, block)
                if not _split_keep(dist, tpf):
                    local = torch.zeros_like(local)
            rr, rc = (i * tpf) % block, (j * tpf) % block
            padded = torch.zeros(rr + per_block * block, rc + per_block * block, dtype=torch.bool, device=device)
            padded[rr : rr + tpf, rc : rc + tpf] = local
            bm = shrink(padded, block)
            r0, c0 = (i * tpf) // block, (j * tpf) // block
            r1, c1 = min(r0 + bm.shape[0], n), min(c0 + bm.shape[1], n)
            final[r0:r1, c0:c1] |= bm[: r1 - r0, : c1 - c0]
    return final


@register
@dataclass(frozen=True)
class RadialAttention(DiTMethod):
    """Radial Attention: a static O(n log n) mask whose spatial window shrinks as the temporal distance grows.

    The module docstring states the rule, the code it was checked against and the defaults.
    """

    name: ClassVar[str] = "radial"
    paper: ClassVar[str] = "Li et al., Radial Attention, NeurIPS 2025 (arXiv:2506.19852)"
    rule: ClassVar[str] = (
        "static mask: first frame + neighbours whole, window halving and frames thinning with distance"
    )

    decay: float = 0.2
    warmup: float = 0.24
    dense_layers: float = 1
    block: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay <= 0 or self.block not in (64, 128):
            raise ConfigError("radial: decay must be > 0 and block 64 or 128 (the authors' kernels).")

    def sparse(self, call: DiTCall) -> Attended:
        g = call.grid
        key = f"radial:{g.frames}:{g.frame_tokens}:{self.block}:{self.decay}"
        mask = call.state.get(key)
        if mask is None:
            mask = call.state[key] = radial_mask(g.frames, g.frame_tokens, self.block, self.decay, call.q.device)
        grid = (mask.to(torch.int8) * 2)[None, None]
        out = run_blocks(call, call.q, call.k, call.v, grid, self.block)
        return Attended(out, float(mask.float().mean()))
