"""PSA: Pyramid Sparse Attention — each query block reads important key blocks whole and others average-pooled.

Li et al., "PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation", arXiv:2512.04025 (2025);
checked against the authors' code (xiaolong-li1/Pyramid-Sparse-Attention: ``src/psa_triton/attention.py``,
``utils/transfer_attn_to_mask.py``, ``kernels/attn_pooling_kernel.py``, ``kernels/psa_kernel_legacy.py`` and
``configs/attention_config.yaml``).

**Rule.** Tokens are rearranged into space-time tiles (so that a block is a local cube). Queries form blocks of
``block_m`` tokens, keys blocks of ``block_n``. *Importance*: ``block_m / 4`` query positions and ``block_n / 4`` key
positions are sampled (the same positions in every block of a head); for each sampled query the largest logit of every
key block is turned into a probability against the softmax over all sampled keys, the maximum over the block's sampled
queries is the block pair's importance, and each query block's row is normalised to sum 1
(``attn_with_pooling_optimized``). *Levels* (``thresholdbound``): each row's key blocks are sorted by importance and,
by the cumulative importance reached, given a pyramid level — 1 (read whole) up to ``e1``, 2 (keys and values
average-pooled by 2) up to ``e2``, 4 up to ``e4``, 8 up to ``e8``, skipped beyond; each level's run of blocks includes
the block that crosses its bound, is rounded up to a multiple of the level (the authors' kernel tiles), and level 1
holds at least 8 % of the blocks. *Attention*: a key pooled by ``p`` stands for ``p`` keys — its logit gets ``+ log p``.

**Defaults** as the authors' Wan 2.1 1.3B configuration (``psa_balanced``): ``block_m = 128``, ``block_n = 32``, bounds
(0.6, 0.7, 0.7, 0.8) — level 4 empty —, 2 × 8 × 8 tiles, the first 15 of 50 steps dense (``warmup = 0.3``).

**Choices.** The authors order tokens along a 3D Gilbert curve; we use the 2 × 8 × 8 tiles of their ``STA`` option
(also local cubes). The sampled positions come from a generator seeded by (layer, step), one draw per head shared by the
sequences of a batch (batch = single). Our kernel reads the pooled
keys from levels appended to the key sequence, each level's blocks under the token rule "this pooled key's block has
this level for this query block". The density counts a pooled pair as ``1/p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from .base import Attended, DiTCall, DiTMethod, VideoGrid, blocks_of, classify_blocks, run_blocks

LEVELS = (1, 2, 4, 8)


def tile_order(grid: VideoGrid, tile: tuple[int, int, int], device: torch.device) -> Tensor:
    """``(N,)``: frame-major indices in tile order (tiles of ``tile`` = (t, h, w) patches, row-major inside)."""
    F, H, W = grid.frames, grid.height, grid.width
    t, h, w = (max(1, min(a, b)) for a, b in zip(tile, (F, H, W)))
    f = torch.arange(F, device=device)[:, None, None]
    y = torch.arange(H, device=device)[None, :, None]
    x = torch.arange(W, device=device)[None, None, :]
    nh, nw = -(-H // h), -(-W // w)
    tid = ((f // t) * nh + y // h) * nw + x // w
    inner = ((f % t) * h + y % h) * w + x % w
    return torch.argsort((tid * (t * h * w) + inner).reshape(-1), stable=True)


def block_importance(q: Tensor, k: Tensor, block_m: int, block_n: int, scaling: float, gen: torch.Generator) -> Tensor:
    """``(B, H, nq, nk)``: the sampled, max-pooled block attention of ``attn_with_pooling_optimized``, rows summing
    to 1. ``q``/``k`` lengths are multiples of the blocks."""
    B, H, N, D = q.shape
    nq, nk = N // block_m, k.shape[2] // block_n
    sm, sn = block_m // 4, block_n // 4
    # positions in a query / key block: one draw per head, the same for every sequence of a batch
    pq = torch.rand(1, H, block_m, generator=gen).topk(sm, -1).indices.to(q.device).expand(B, H, sm)
    pk = torch.rand(1, H, block_n, generator=gen).topk(sn, -1).indices.to(q.device).expand(B, H, sn)
    qs = torch.gather(q.view(B, H, nq, block_m, D), 3, pq[:, :, None, :, None].expand(B, H, nq, sm, D)).reshape(
        B, H, nq * sm, D
    )
    ks = torch.gather(k.view(B, H, nk, block_n, D), 3, pk[:, :, None, :, None].expand(B, H, nk, sn, D)).reshape(
        B, H, nk * sn, D
    )
    logits = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scaling  # (B, H, nq*sm, nk*sn)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    block_max = logits.view(B, H, nq * sm, nk, sn).amax(-1)  # (B, H, nq*sm, nk)
    p = torch.exp(block_max - lse).view(B, H, nq, sm, nk).amax(3)  # (B, H, nq, nk)
    return p / p.sum(-1, keepdim=True).clamp(min=1e-12)


def pyramid_levels(importance: Tensor, bounds: dict[int, float], min_full: float = 0.08) -> Tensor:
    """``thresholdbound``: ``(…, nk)`` int levels (0 = skip) from each row's importance."""
    nk = importance.shape[-1]
    sorted_w, order = torch.sort(importance, dim=-1, descending=True)
    cum = torch.cumsum(sorted_w, -1)
    ratio = cum / cum[..., -1:].clamp(min=1e-12)
    level_sorted = torch.zeros_like(order)
    last = torch.zeros(importance.shape[:-1], dtype=torch.long, device=importance.device)
    pos = torch.arange(nk, device=importance.device)
    for level, end in sorted(bounds.items(), key=lambda kv: kv[1]):
        valid = ratio <= end + 1e-6
        init_end = torch.where(valid.any(-1), valid.sum(-1) + 1, last)
        if level > 1:
            length = (init_end - last).clamp(min=0)
            rem = length % level
            aligned = last + torch.where(rem != 0, length + level - rem, length)
            aligned = aligned.clamp(max=nk)
            at_edge = aligned == nk
            aligned = torch.where(at_edge, last + ((aligned - last) // level) * level, aligned)
        else:
            aligned = torch.maximum(init_end.clamp(0, nk), last)
            aligned = torch.maximum(aligned, torch.full_like(aligned, min(nk, int(nk * min_full) + 1)))
        inside = (pos >= last[..., None]) & (pos < aligned[..., None])
        level_sorted = torch.where(inside, torch.full_like(level_sorted, level), level_sorted)
        last = aligned
    return torch.zeros_like(level_sorted).scatter_(-1, order, level_sorted)


def avg_pool_tokens(x: Tensor, p: int) -> Tensor:
    B, H, N, D = x.shape
    return x.view(B, H, N // p, p, D).mean(3)


@register
@dataclass(frozen=True)
class PyramidSparseAttention(DiTMethod):
    """PSA: Pyramid Sparse Attention — each query block reads important key blocks whole and others average-pooled.

    The module docstring states the rule, the code it was checked against and the defaults.
    """

    name: ClassVar[str] = "psa"
    paper: ClassVar[str] = "Li et al., PSA: Pyramid Sparse Attention, arXiv:2512.04025 (2025)"
    rule: ClassVar[str] = (
        "per query block: key blocks whole, pooled 2×/4×/8× or skipped by cumulative sampled importance"
    )

    e1: float = 0.6
    e2: float = 0.7
    e4: float = 0.7
    e8: float = 0.8
    block_m: int = 128
    block_n: int = 32
    tile: tuple[int, int, int] = (2, 8, 8)
    warmup: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.e1 <= self.e2 <= self.e4 <= self.e8 <= 1:
            raise ConfigError("psa: bounds must satisfy 0 ≤ e1 ≤ e2 ≤ e4 ≤ e8 ≤ 1.")
        if self.block_n % 32 or self.block_m % 4:
            raise ConfigError("psa: block_n must be a multiple of 32 (8× pooling in 4-token groups), block_m of 4.")

    def sparse(self, call: DiTCall) -> Attended:
        q, k, v = call.q, call.k, call.v
        B, H, N, D = q.shape
        order = tile_order(call.grid, self.tile, q.device)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(N, device=q.device)
        bm, bn = self.block_m, self.block_n
        nq = blocks_of(N, bm)
        unit = math.lcm(bn * 8, bm)
        Np = -(-N // unit) * unit
        nk = Np // bn

        def pad(x: Tensor) -> Tensor:
            x = x.index_select(2, order)
            return torch.cat([x, x.new_zeros(B, H, Np - N, D)], 2) if Np > N else x

        qp, kp, vp = pad(q), pad(k), pad(v)
        gen = torch.Generator(device="cpu").manual_seed(0x95A + 1000 * call.layer + call.step)
        imp = block_importance(qp[:, :, : nq * bm], kp, bm, bn, call.scaling, gen)  # (B, H, nq, nk)
        real_k = torch.arange(nk, device=q.device) * bn < N
        imp = imp * real_k
        bounds = {1: self.e1, 2: self.e2, 4: self.e4, 8: self.e8, 0: 1.0}
        lvl = pyramid_levels(imp, bounds)  # (B, H, nq, nk)
        lvl = torch.where(real_k, lvl, torch.zeros_like(lvl))
        # keys: [whole | pooled 2 | pooled 4 | pooled 8]; the pooled segments of a key block are bn / p long
        segs = [kp] + [avg_pool_tokens(kp, p) for p in LEVELS[1:]]
        vsegs = [vp] + [avg_pool_tokens(vp, p) for p in LEVELS[1:]]
        K, V = torch.cat(segs, 2), torch.cat(vsegs, 2)
        starts = [0]
        for p in LEVELS[:-1]:
            starts.append(starts[-1] + Np // p)
        s1, s2, s4 = starts[1], starts[2], starts[3]
        # kernel grid on (bm query, bn key) blocks of every segment: allowed pairs counted per block
        grids = []
        for p in LEVELS:
            sel = (lvl == p).float()  # (B, H, nq, nk): key block j at level p
            per_seg_block = sel.view(B, H, nq, nk // p, p).sum(-1)  # flex block of bn pooled keys covers p key blocks
            grids.append(per_seg_block * (bm * bn / p))
        grid = classify_blocks(torch.cat(grids, -1), bm, bn)
        lvl_flat = lvl.reshape(-1).to(torch.int64).contiguous()
        Ntot = K.shape[2]

        def level_of(ki: Tensor) -> tuple[Tensor, Tensor]:
            p = torch.where(ki < s1, 1, torch.where(ki < s2, 2, torch.where(ki < s4, 4, 8)))
            start = torch.where(ki < s1, 0, torch.where(ki < s2, s1, torch.where(ki < s4, s2, s4)))
            return p, ((ki - start) * p) // bn

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            p, kb = level_of(ki)
            return lvl_flat[((b * H + h) * nq + qi // bm) * nk + kb] == p

        def score_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            p, _ = level_of(ki)
            return s + torch.log(p.to(s.dtype))

        assert Ntot == starts[-1] + Np // 8
        out = run_blocks(call, qp[:, :, :N], K, V, grid[:, :, :, :], (bm, bn), mask_mod=mask_mod, score_mod=score_mod)
        reads = sum(((lvl == p).float().sum((-1,)) * bn / p) for p in LEVELS)  # (B, H, nq) keys per query row
        qrows = torch.full((nq,), float(bm), device=q.device)
        qrows[-1] = N - (nq - 1) * bm
        density = float((reads * qrows).sum()) / (B * H * N * N)
        return Attended(out.index_select(2, inv), density)
