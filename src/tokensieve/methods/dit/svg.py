"""Sparse VideoGen: spatial and temporal heads, classified online at every call.

Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers with Spatial-Temporal Sparsity", ICML 2025
(arXiv:2502.01776); checked against the authors' code (svg-project/Sparse-VideoGen, ``svg/models/wan/attention.py``
and ``utils.py``).

**Rule.** Some heads attend within their own frame and its neighbours (*spatial* heads), others to the same place
in every frame (*temporal* heads). At every sparse call, for each (sequence, head), 64 query rows drawn among the
first 10,000 are attended exactly and under two emulated masks — *spatial*: the first frame (an attention sink) plus
a band of ±``2·S`` tokens on 128-token blocks (``|i//128 − j//128| < 2S//128``, ``S`` tokens per frame); *temporal*:
the same mask in the token-major layout (``p = s·F + f``) — and the head takes the mask whose output is nearer (mean
squared error) to the exact one. The head then runs sparse attention in its layout: spatial heads in the model's
frame-major order, temporal heads permuted to token-major order (neighbours in time become neighbours in the
sequence); in both, query ``i`` reads key ``j`` when ``|i − j| ≤ W`` or ``j < S`` (the sink, as the official mask
writes it in either layout). The band half-width ``W`` comes from the density ``d`` (the official ``sparsity``, the
fraction of attention computed): ``w = N(1 − √(1 − d))`` tokens, rounded up to a multiple of 128 (``sparsity_to_width``
and ``round_to_multiple``).

**Defaults** as the authors' Wan 2.1 text-to-video scripts (``scripts/wan/wan_t2v_720p_svg.sh``): ``d = 0.3``, the first
20 % of the steps dense (``first_times_fp``), the first 3 % of the layers dense (``first_layers_fp``, floored: none in
a model under 34 layers), 64 sampled rows.

**Choices.** The rows are drawn from a generator seeded by (layer, step), so a run is reproducible (the authors draw
from the global generator). The band is applied at token level on partial blocks of our FlexAttention kernel (the
authors' FlexAttention path does the same; their FlashInfer path rounds it to blocks). The density reported is the
exact fraction of pairs read (sink included), the same for both head types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...attention.bidirectional import FULL, PARTIAL, SKIP
from ...core.registry import register
from ...errors import ConfigError
from .base import Attended, DiTCall, DiTMethod, blocks_of, gather_tokens, run_blocks, scatter_tokens


def width_tokens(density: float, tokens: int, round_to: int = 128) -> int:
    """The band half-width ``W`` (tokens) for a density: ``N(1 − √(1 − d))`` rounded up to ``round_to``."""
    w = tokens * (1.0 - math.sqrt(max(0.0, 1.0 - density)))
    return int(math.ceil(w / round_to) * round_to) if round_to > 1 else math.ceil(w)


def token_major(frames: int, frame_tokens: int, device: torch.device | None = None) -> Tensor:
    """``(N,)``: the frame-major index of the token at each position of the token-major layout (``p = s·F + f``)."""
    p = torch.arange(frames * frame_tokens, device=device)
    return (p % frames) * frame_tokens + p // frames


def emulated_masks(rows: Tensor, tokens: int, frames: int, frame_tokens: int) -> Tensor:
    """``(2, R, N)`` bool: the official emulated spatial and temporal masks at the sampled query ``rows``."""
    dev = rows.device
    j = torch.arange(tokens, device=dev)
    band = (2 * frame_tokens) // 128

    def spatial(i: Tensor, jj: Tensor) -> Tensor:
        return (jj[None, :] < frame_tokens) | ((i[:, None] // 128 - jj[None, :] // 128).abs() < band)

    # the temporal mask is the spatial one read in token-major coordinates: position of a frame-major index t
    pos = (j % frame_tokens) * frames + j // frame_tokens
    return torch.stack([spatial(rows, j), spatial(pos[rows], pos)])


def band_grid(tokens: int, block: int, width: int, sink: int, device: torch.device) -> tuple[Tensor, int]:
    """The kernel grid of the rule ``|i − j| ≤ width or j < sink`` and its exact number of allowed pairs."""
    n = blocks_of(tokens, block)
    start = torch.arange(n, device=device) * block
    end = torch.clamp(start + block, max=tokens) - 1
    a0, a1 = start[:, None], end[:, None]
    c0, c1 = start[None, :], end[None, :]
    dmin = torch.clamp(torch.maximum(c0 - a1, a0 - c1), min=0)
    dmax = torch.maximum((a1 - c0).abs(), (c1 - a0).abs())
    in_sink = c1 < sink
    some_sink = c0 < sink
    grid = torch.where((dmax <= width) | in_sink, FULL, torch.where((dmin <= width) | some_sink, PARTIAL, SKIP)).to(
        torch.int8
    )
    i = torch.arange(tokens, device=device)
    lo, hi = torch.clamp(i - width, min=0), torch.clamp(i + width, max=tokens - 1)
    band = hi - lo + 1
    overlap = torch.clamp(torch.clamp(hi, max=sink - 1) - lo + 1, min=0)  # sink keys already inside the band
    allowed = int((band + sink - overlap).sum())
    return grid, allowed


@register
@dataclass(frozen=True)
class SparseVideoGen(DiTMethod):
    """Sparse VideoGen: spatial and temporal heads, classified online at every call.

    The module docstring states the rule, the code it was checked against and the defaults.
    """

    name: ClassVar[str] = "svg"
    paper: ClassVar[str] = "Xi et al., Sparse VideoGen, ICML 2025 (arXiv:2502.01776)"
    rule: ClassVar[str] = (
        "per head: spatial (frame band + first frame) or temporal (same band, token-major), by MSE on 64 rows"
    )
    budget_param: ClassVar[str | None] = "density"

    density: float = 0.3
    warmup: float = 0.2
    dense_layers: float = 0.03
    sampled_rows: int = 64
    max_row: int = 10_000
    round_to: int = 128
    block: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"svg: density must be in (0, 1], got {self.density}.")
        if self.sampled_rows < 1 or self.block < 16:
            raise ConfigError("svg: sampled_rows must be ≥ 1 and block ≥ 16.")

    def classify(self, call: DiTCall) -> Tensor:
        """``(B, H)`` bool: True where the head is temporal (online profiling on sampled rows)."""
        q, k, v = call.q, call.k, call.v
        _B, _H, N, _D = q.shape
        gen = torch.Generator(device="cpu").manual_seed(0x5EED + 1000 * call.layer + call.step)
        rows = torch.randint(0, min(self.max_row, N), (min(self.sampled_rows, N),), generator=gen).to(q.device)
        sq = q[:, :, rows].float()
        logits = torch.matmul(sq, k.float().transpose(-1, -2)) * call.scaling  # (B, H, R, N)
        exact = torch.matmul(torch.softmax(logits, -1), v.float())
        masks = emulated_masks(rows, N, call.grid.frames, call.grid.frame_tokens)
        mses = []
        for m in masks:
            approx = torch.matmul(torch.softmax(logits.masked_fill(~m, float("-inf")), -1), v.float())
            mses.append(((approx - exact) ** 2).mean(dim=(2, 3)))
        return torch.stack(mses).argmin(0) == 1

    def sparse(self, call: DiTCall) -> Attended:
        q, k, v = call.q, call.k, call.v
        _B, _H, N, _D = q.shape
        S = call.grid.frame_tokens
        temporal = self.classify(call)  # (B, H)
        perm = token_major(call.grid.frames, S, q.device)
        ident = torch.arange(N, device=q.device)
        index = torch.where(temporal[..., None], perm[None, None], ident[None, None])  # (B, H, N)
        qp, kp, vp = gather_tokens(q, index), gather_tokens(k, index), gather_tokens(v, index)
        width = width_tokens(self.density, N, self.round_to)
        key = f"svg_grid:{N}:{self.block}:{width}:{S}"
        cached = call.state.get(key)
        if cached is None:
            cached = call.state[key] = band_grid(N, self.block, width, S, q.device)
        grid, allowed = cached

        # the rule's two numbers as a captured tensor: closure ints become symbols that Inductor's CPU FlexAttention
        # template can misname (torch 2.13)
        rule = torch.tensor([width, S], device=q.device)

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return ((qi - ki).abs() <= rule[0]) | (ki < rule[1])

        out = run_blocks(call, qp, kp, vp, grid[None, None], self.block, mask_mod=mask_mod)
        call.state["temporal_heads"] = temporal
        return Attended(scatter_tokens(out, index), allowed / (N * N))
