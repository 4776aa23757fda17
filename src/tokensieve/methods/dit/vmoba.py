"""VMoBA: mixture-of-block attention for video — 1D/2D/3D key blocks by layer, global threshold selection per head.

Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models", arXiv:2506.23858 (2025); checked against
the authors' single-file implementation (KwaiVGI/VMoBA, ``src/vmoba.py``: ``process_moba_input``,
``moba_attn_varlen`` and ``_select_threshold_head_global``).

**Rule.** Keys are partitioned into blocks ("chunks") that cycle with the layer: layer ``l`` uses a 1D partition
(``l mod 3 = 0``: runs of ``chunk_1d`` whole frames), a 2D one (``= 1``: ``chunk_2d = (h, w)`` spatial tiles through all
frames) or a 3D one (``= 2``: ``chunk_3d = (t, h, w)`` space-time cubes); the tokens are rearranged so that every chunk
is contiguous (``process_moba_input``). A chunk is represented by the mean of its keys; every query token scores every
chunk by ``q · mean(k)`` (the gate). Selection is *global per head* and *threshold-based*: the gate is min-max
normalised over all (chunk, query) pairs of the head; each query always reads its own chunk; the other (chunk, query)
pairs of the head are taken in descending order of normalised gate until the selected mass (own chunks included)
reaches ``threshold`` of the head's total. Each query then attends exactly over the keys of its selected chunks. (The
pair of least gate normalises to 0 and is never needed to reach a threshold ≤ 1: a threshold above 1 reads every
chunk, the keep-all setting.)

**Defaults.** ``threshold = 0.25`` and threshold-based selection, as ``moba_attn_varlen``'s defaults; global per-head
selection (``select = "head_global"``) as the paper describes it (the function's default ``"query_head"``, the same
rule per query, is available as ``select=query_head``). No dense steps or layers (the paper trains with VMoBA from the
start). Chunk shapes are not given for Wan in the paper or code; ours: one frame (1D), a quarter of each side (2D),
half the frames × a quarter of each side (3D), each at least one token.

**Choices.** The authors gather each chunk's selected queries (varlen FlashAttention); our kernel reads
``block``-token blocks of the rearranged sequence and evaluates the (query, chunk) selection on partial blocks (exact
output). The density is the exact fraction of (query, key) pairs read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from .base import (
    Attended,
    DiTCall,
    DiTMethod,
    VideoGrid,
    blocks_of,
    classify_blocks,
    run_blocks,
    scatter_tokens,
)


def chunk_layout(grid: VideoGrid, shape: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """The rearrangement that makes ``shape`` = (t, h, w) chunks contiguous: ``order`` ``(N,)`` (frame-major index at
    each new position), ``chunk`` ``(N,)`` (chunk id at each new position) and the number of chunks. Edge chunks
    may be smaller."""
    F, H, W = grid.frames, grid.height, grid.width
    t, h, w = (max(1, min(a, b)) for a, b in zip(shape, (F, H, W)))
    f = torch.arange(F, device=device)[:, None, None]
    y = torch.arange(H, device=device)[None, :, None]
    x = torch.arange(W, device=device)[None, None, :]
    nh, nw = -(-H // h), -(-W // w)
    cid = ((f // t) * nh + y // h) * nw + x // w  # (F, H, W)
    inner = ((f % t) * h + y % h) * w + x % w
    key = (cid * (t * h * w) + inner).reshape(-1)
    order = torch.argsort(key, stable=True)
    chunk = cid.reshape(-1)[order]
    return order, chunk, int(cid.max()) + 1


def select_head_global(gate: Tensor, own: Tensor, threshold: float) -> Tensor:
    """``_select_threshold_head_global``: gate ``(B, H, N, C)``, own ``(B, H, N, C)`` bool (each query's chunk) →
    selected ``(B, H, N, C)``."""
    B, H, N, C = gate.shape
    eps = 1e-6
    g = gate.flatten(2)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    den = torch.where(hi - lo <= eps, torch.ones_like(hi), hi - lo)
    norm = (g - lo) / den  # (B, H, N*C)
    own_f = own.flatten(2)
    total = norm.sum(-1)
    remain = (threshold - (norm * own_f).sum(-1) / (total + eps)).clamp(min=0)
    others = torch.where(own_f, torch.zeros_like(norm), norm)
    vals, idx = torch.sort(others, dim=-1, descending=True)
    ratio = vals.cumsum(-1) / (total[..., None] + eps)
    cond = ratio >= remain[..., None]
    cutoff = torch.where(cond.any(-1), cond.float().argmax(-1), torch.full_like(total, N * C - 1).long())
    take = torch.arange(N * C, device=gate.device) <= cutoff[..., None]
    picked = torch.zeros_like(own_f).scatter_(-1, idx, take)
    return (picked | own_f).view(B, H, N, C)


def select_query_head(gate: Tensor, own: Tensor, threshold: float) -> Tensor:
    """``_select_threshold_query_head``: the same rule for each query over its chunks."""
    eps = 1e-6
    lo, hi = gate.amin(-1, keepdim=True), gate.amax(-1, keepdim=True)
    den = torch.where(hi - lo <= eps, torch.ones_like(hi), hi - lo)
    norm = (gate - lo) / den
    total = norm.sum(-1)
    remain = (threshold - (norm * own).sum(-1) / (total + eps)).clamp(min=0)
    others = torch.where(own, torch.zeros_like(norm), norm)
    vals, idx = torch.sort(others, dim=-1, descending=True)
    ratio = vals.cumsum(-1) / (total[..., None] + eps)
    cond = ratio >= remain[..., None]
    C = gate.shape[-1]
    cutoff = torch.where(cond.any(-1), cond.float().argmax(-1), torch.full_like(total, C - 1).long())
    take = torch.arange(C, device=gate.device) <= cutoff[..., None]
    return torch.zeros_like(own).scatter_(-1, idx, take) | own


@register
@dataclass(frozen=True)
class VMoBA(DiTMethod):
    """VMoBA: mixture-of-block attention for video — 1D/2D/3D key blocks by layer, global threshold selection per head.

    The module docstring states the rule, the code it was checked against and the defaults.
    """

    name: ClassVar[str] = "vmoba"
    paper: ClassVar[str] = "Wu et al., VMoBA, arXiv:2506.23858 (2025)"
    rule: ClassVar[str] = "1D/2D/3D key chunks cycling by layer; (query, chunk) by q·mean(k), global per-head threshold"

    threshold: float = 0.25
    select: str = "head_global"
    chunk_1d: int = 1
    chunk_2d: tuple[int, int] = (0, 0)  # (h, w) in patches; 0: a quarter of the side
    chunk_3d: tuple[int, int, int] = (0, 0, 0)  # (t, h, w); 0: half the frames, a quarter of each side
    block: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold > 0 or self.select not in ("head_global", "query_head"):
            raise ConfigError("vmoba: threshold > 0, select head_global or query_head.")

    def chunk_shape(self, layer: int, grid: VideoGrid) -> tuple[int, int, int]:
        F, H, W = grid.frames, grid.height, grid.width
        kind = layer % 3
        if kind == 0:
            return (self.chunk_1d, H, W)
        if kind == 1:
            h, w = self.chunk_2d
            return (F, h or max(1, H // 4), w or max(1, W // 4))
        t, h, w = self.chunk_3d
        return (t or max(1, F // 2), h or max(1, H // 4), w or max(1, W // 4))

    def sparse(self, call: DiTCall) -> Attended:
        q, k, v = call.q, call.k, call.v
        B, H, N, _D = q.shape
        shape = self.chunk_shape(call.layer, call.grid)
        order, chunk, C = chunk_layout(call.grid, shape, q.device)
        qp, kp, vp = q.index_select(2, order), k.index_select(2, order), v.index_select(2, order)
        onehot = torch.nn.functional.one_hot(chunk, C).float()  # (N, C)
        sizes = onehot.sum(0)  # (C,)
        mean_k = torch.einsum("bhnd,nc->bhcd", kp.float(), onehot) / sizes[:, None]
        gate = torch.matmul(qp.float(), mean_k.transpose(-1, -2))  # (B, H, N, C)
        own = onehot.bool()[None, None].expand(B, H, N, C)
        pick = select_head_global if self.select == "head_global" else select_query_head
        sel = pick(gate, own, self.threshold)  # (B, H, N, C)
        # kernel grid: per (query block, key block) the number of allowed pairs = Σ_q Σ_c sel · |c ∩ key block|
        nb = blocks_of(N, self.block)
        pad = nb * self.block - N
        kb_member = torch.nn.functional.pad(onehot, (0, 0, 0, pad)).view(nb, self.block, C).sum(1)  # (nk, C)
        qsel = torch.nn.functional.pad(sel.float(), (0, 0, 0, pad)).view(B, H, nb, self.block, C).sum(3)
        allowed = qsel @ kb_member.T  # (B, H, nq, nk)
        grid = classify_blocks(allowed, self.block, self.block)
        flat = sel.reshape(-1).contiguous()
        chunk_l = chunk.contiguous()
        dims = torch.tensor([H, N, C], device=q.device)  # captured as a tensor (see svg.py)

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return flat[((b * dims[0] + h) * dims[1] + qi) * dims[2] + chunk_l[ki]]

        out = run_blocks(call, qp, kp, vp, grid, self.block, mask_mod=mask_mod)
        density = float((sel.float() * sizes).sum()) / (B * H * N * N)
        return Attended(scatter_tokens(out, order), density)
