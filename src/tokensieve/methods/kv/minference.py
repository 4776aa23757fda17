"""MInference: a sparse pattern per head chosen offline, its indices estimated online from the last queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.profiles import HeadPatterns
from ...core.registry import register
from ...errors import ConfigError
from ._sparse_prefill import BlockGrid, SparsePrefill, topn_mask
from .ashape import ashape_blocks
from .flexprefill import last_block_attention, vertical_slash_scores

FORCED_COLUMNS = 30  # MInference's code: the first 30 keys are always vertical lines
FORCED_DIAGONALS = 100  # and the 100 most local diagonals always slashes
MIN_VERTICAL, MIN_SLASH = 30, 50  # and at least this many of each are kept


def vertical_slash_tokens(grid: BlockGrid, last_q: int, v: Tensor, s: Tensor) -> Tensor:
    """MInference's online vertical-slash estimate as blocks ``(B, H_q, n, n)``: ``Â = softmax(Q_last Kᵀ/√D)`` of the
    last ``last_q`` queries; the ``v[h]`` keys with the largest column sums (the first 30 real keys forced) and the
    ``s[h]`` diagonals with the largest sums (the 100 most local forced; at least 30 columns and 50 diagonals). A key
    column selects its block for every query block at or after it; a diagonal at offset ``o`` selects the block
    diagonals it crosses, ``⌊o/b⌋`` and ``⌈o/b⌉``."""
    B, Hq = grid.q.shape[:2]
    b, n = grid.block, grid.n
    att = last_block_attention(grid, min(last_q, int(grid.lengths.min())))
    a_v, a_s = vertical_slash_scores(att)  # (B, Hq, Tp) each; means, the same ranking as MInference's sums
    Tp = a_v.shape[-1]
    idx = torch.arange(Tp, device=a_v.device)
    start = (Tp - grid.lengths)[:, None, None]  # (B, 1, 1)
    first = (idx >= start) & (idx < start + FORCED_COLUMNS)
    a_v = torch.where(first, float("inf"), a_v.masked_fill(~grid.valid[:, None], -1.0))
    a_s = torch.where(idx < FORCED_DIAGONALS, float("inf"), a_s)
    cols = topn_mask(a_v, v.clamp(min=MIN_VERTICAL).expand(B, Hq))  # (B, Hq, Tp)
    diags = topn_mask(a_s, s.clamp(min=MIN_SLASH).expand(B, Hq))
    colblk = cols.view(B, Hq, n, b).any(-1)  # (B, Hq, n)
    lo = diags.view(B, Hq, n, b).any(-1)  # offsets o in [m·b, (m+1)·b) cross block diagonal m ...
    hi = torch.zeros_like(lo)
    hi[..., 1:] = diags.view(B, Hq, n, b)[..., 1:].any(-1)[..., :-1]  # ... and m + 1 unless o is a multiple of b
    diagblk = lo | hi
    off = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0).to(a_v.device)
    return colblk[:, :, None, :] | diagblk[:, :, off]


def pooled_block_topk(grid: BlockGrid, k: Tensor) -> Tensor:
    """MInference's block-sparse estimate: mean-pooled query and key blocks, score ``Q̄K̄ᵀ`` (block-causal), the
    ``k[h]`` best key blocks per query block → ``(B, H_q, n, n)``."""
    B, Hq = grid.q.shape[:2]
    counts = grid.block_valid().clamp(min=1)[:, None, :, None]
    qbar = (grid.q.float() * grid.valid[:, None, :, None]).view(B, Hq, grid.n, grid.block, -1).sum(3) / counts
    kk = grid.kv_for_queries(grid.k).float() * grid.valid[:, None, :, None]
    kbar = kk.view(B, Hq, grid.n, grid.block, -1).sum(3) / counts
    sc = torch.matmul(qbar, kbar.transpose(-1, -2)).masked_fill(~grid.causal, float("-inf"))
    return topn_mask(sc, k.expand(B, Hq)[..., None].expand(B, Hq, grid.n))


def pattern_blocks(grid: BlockGrid, heads: tuple[tuple[str, int, int], ...], last_q: int) -> Tensor:
    """The blocks of one layer whose query heads follow ``heads`` (``(kind, v, s)`` per query head)."""
    B, Hq = grid.q.shape[:2]
    dev = grid.q.device
    kinds = [h[0] for h in heads]
    v = torch.tensor([h[1] for h in heads], device=dev)
    s = torch.tensor([h[2] for h in heads], device=dev)
    out = torch.zeros(B, Hq, grid.n, grid.n, dtype=torch.bool, device=dev)
    if "vs" in kinds:
        sel = torch.tensor([k == "vs" for k in kinds], device=dev)
        out |= vertical_slash_tokens(grid, last_q, v, s) & sel[None, :, None, None]
    if "block" in kinds:
        sel = torch.tensor([k == "block" for k in kinds], device=dev)
        out |= pooled_block_topk(grid, v.clamp(max=grid.n)) & sel[None, :, None, None]
    starts = grid.valid.shape[1] - grid.lengths
    for h, (kind, hv, hs) in enumerate(heads):
        if kind == "a":
            out[:, h] |= ashape_blocks(grid.n, grid.block, starts, hv, hs)
    return out


@register
@dataclass(frozen=True)
class MInference(SparsePrefill):
    """MInference 1.0: dynamic sparse prefill attention (Jiang et al., NeurIPS 2024, arXiv:2407.02490, §3).

    Offline, each head is assigned one of three patterns by a search on a calibration prompt (the ``minference``
    profile, ``tokensieve profile minference``): **A-shape** (sinks + local window), **vertical-slash** (some key
    columns for every query, plus some diagonals), **block-sparse** (top key blocks per query block). Online, per
    prompt: A-shape is static; vertical-slash indices come from ``Â = softmax(Q_last Kᵀ/√D)`` of the last
    ``last_q = 64`` queries — the ``v`` keys with the largest column sums and the ``s`` diagonals with the largest
    sums, the first 30 keys and the 100 most local diagonals forced (the official code); block-sparse from mean-pooled
    query/key blocks, ``Q̄K̄ᵀ`` block-causal, top ``v`` key blocks per query block.

    Choices: MInference's kernels read single columns and diagonals; ours (:mod:`tokensieve.attention.flex`) reads
    blocks, so each chosen column or diagonal selects the block(s) holding it — never sparser than the token
    pattern, exact attention inside. The offline search is :mod:`tokensieve.profiling.head_patterns` (the v1 rule:
    the candidate covering the most attention mass, but among candidates of at most a target block density, since
    candidates that MInference matches in FLOPs are not matched in blocks). Selection per query head, as the code.
    """

    name: ClassVar[str] = "minference"
    paper: ClassVar[str] = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention (arXiv:2407.02490)"
    )
    rule: ClassVar[str] = "per head (profile): A-shape | vertical-slash from the last 64 queries | top pooled blocks"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.NONE,
        profile="minference",
        rescorable=False,
        own_attention=True,
    )
    block: int = 64
    last_q: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.last_q < 1:
            raise ConfigError(f"minference: last_q must be >= 1, got {self.last_q}.")

    def blocks(self, grid: BlockGrid, profile: Any) -> Tensor | None:
        if not isinstance(profile, HeadPatterns):
            raise ConfigError("minference needs its 'minference' profile (`tokensieve profile minference`).")
        return pattern_blocks(grid, profile.patterns[grid.layer_idx], self.last_q)
