"""HiP: hierarchically pruned attention — top-k key blocks per query block found by a binary tree search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.context import ModelShape
from ...core.method import dense_layers_refusal
from ...core.registry import register
from ...errors import ConfigError
from ._sparse_prefill import BlockGrid, SparsePrefill
from .ashape import ashape_blocks


def representative_scores(grid: BlockGrid, rep: int, stride: int) -> Tensor:
    """``R[b, h, i, j]`` ``(B, H_q, n, n)``: the largest ``q·k`` between query block ``i``'s queries taken with
    ``stride`` and the first ``rep`` keys of key block ``j`` (HiP's score of a branch whose first block is ``j``);
    padding queries and keys never count (``-inf`` when none is real)."""
    B, Hq, _, D = grid.q.shape
    b, n = grid.block, grid.n
    q = grid.q.float().view(B, Hq, n, b, D)[:, :, :, ::stride]  # (B, Hq, n, b/stride, D)
    qv = grid.valid.view(B, n, b)[:, :, ::stride]  # (B, n, b/stride)
    k = grid.kv_for_queries(grid.k).float().view(B, Hq, n, b, D)[:, :, :, :rep]  # (B, Hq, n, rep, D)
    kv = grid.valid.view(B, n, b)[:, :, :rep]  # (B, n, rep)
    s = torch.einsum("bhiqd,bhjrd->bhijqr", q, k)  # (B, Hq, n, n, b/stride, rep)
    ok = qv[:, None, :, None, :, None] & kv[:, None, None, :, None, :]
    return s.masked_fill(~ok, float("-inf")).amax(dim=(-1, -2))


def tree_topk(R: Tensor, lo: Tensor, hi: Tensor, k: int) -> Tensor:
    """HiP's hierarchical top-k over the key blocks ``[lo, hi)`` of each row (``R`` ``(..., n)``: the score of a
    branch starting at block ``j``; ``lo``, ``hi`` broadcast to ``R.shape[:-1]``) → ``(..., n)`` bool.

    Split the range into ``k`` equal branches; then, until every branch is one block, split each branch into halves
    (the left half takes the extra block), score each half by its first block and keep the ``k`` best halves. A row
    with at most ``k`` blocks keeps them all."""
    shape = R.shape[:-1]
    n = R.shape[-1]
    lo = lo.expand(shape)
    hi = hi.expand(shape)
    V = (hi - lo).clamp(min=0)
    idx = torch.arange(k + 1, device=R.device)
    edges = lo[..., None] + (V[..., None] * idx) // k  # (..., k + 1)
    start, size = edges[..., :-1], edges[..., 1:] - edges[..., :-1]
    while bool((size > 1).any()):
        left = (size + 1) // 2
        starts = torch.cat([start, start + left], -1)
        sizes = torch.cat([left, size - left], -1)
        score = R.gather(-1, starts.clamp(max=n - 1)).masked_fill(sizes == 0, float("-inf"))
        top = score.topk(k, dim=-1).indices
        start, size = starts.gather(-1, top), sizes.gather(-1, top)
    out = torch.zeros(*shape, n + 1, dtype=torch.bool, device=R.device)
    out.scatter_(-1, torch.where(size > 0, start, n), True)
    out = out[..., :n]
    cols = torch.arange(n, device=R.device)
    every = (cols >= lo[..., None]) & (cols < hi[..., None])
    return torch.where((k >= V)[..., None], every, out)


@register
@dataclass(frozen=True)
class HiP(SparsePrefill):
    """HiP attention: hierarchically pruned attention (Lee et al., ICLR 2025, arXiv:2406.09827).

    Rule ("attention locality": neighbouring keys score alike, so the top-k keys can be found by a tree search in
    ``O(T log T)`` instead of scoring every key): for each query block, the key blocks before the sliding window are
    split into ``k = top_tokens / block`` equal branches; repeatedly every branch is halved, each half is scored by
    its **first** block — the largest raw ``q·k`` (post-RoPE, no softmax) between the query block's queries taken
    with a stride and that block's first ``rep`` keys — and the ``k`` best halves are kept, until each branch is one
    block. Attention is then exact over the chosen blocks ∪ the sink block(s) ∪ the sliding window.

    Why HiP of the three seeds (HiP, HISA, DHSA): HiP is training-free on any RoPE model with plain ``q·k`` and its
    algorithm is a short, unambiguous loop; HISA's second stage is the trained indexer of DeepSeek-V3.2-style models
    (on Llama-like models it reduces to a Quest-like scheme), and DHSA needs a trained chunk-boundary predictor.

    Choices: the search unit is our kernel's block (``block`` 64 tokens) — the paper's key blocks are 2 tokens and
    its kernel gathers them; ours reads whole blocks, so ``rep = 2`` keys (the paper's b_k) represent a block and
    ``top_tokens = 512`` (the paper's mask_k) becomes 8 blocks. Query stride 2, 16 sink tokens and a 256-token
    window as the v1.1 kernel configuration; the first ``dense_layers = 3`` layers dense (the paper's recipe).
    Selection per query head, as the code.
    """

    name: ClassVar[str] = "hip"
    paper: ClassVar[str] = (
        "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning (arXiv:2406.09827)"
    )
    rule: ClassVar[str] = (
        "per query block: tree search for the top-k key blocks; a half scores max q.k of its first keys"
    )
    block: int = 64
    top_tokens: int = 512
    rep: int = 2
    stride: int = 2
    sink: int = 16
    window: int = 256
    dense_layers: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_tokens < 1 or not 1 <= self.rep <= self.block or not 1 <= self.stride <= self.block:
            raise ConfigError("hip: top_tokens >= 1 and 1 <= rep, stride <= block are required.")
        if self.sink < 0 or self.window < 1 or self.dense_layers < 0:
            raise ConfigError("hip: sink >= 0, window >= 1 and dense_layers >= 0 are required.")

    def refusal(self, shape: ModelShape) -> str | None:
        return dense_layers_refusal(self.name, self.dense_layers, shape) or super().refusal(shape)

    def blocks(self, grid: BlockGrid, profile: Any) -> Tensor | None:
        if grid.layer_idx < self.dense_layers:
            return None
        return hip_blocks(grid, self.top_tokens, self.rep, self.stride, self.sink, self.window)


def hip_blocks(grid: BlockGrid, top_tokens: int, rep: int, stride: int, sink: int, window: int) -> Tensor:
    """HiP's block choice ``(B, H_q, n, n)`` (see :class:`HiP`)."""
    b, n = grid.block, grid.n
    k = max(1, -(-top_tokens // b))
    wb = max(1, -(-window // b))
    starts = grid.valid.shape[1] - grid.lengths  # (B,)
    lo = ((starts + max(sink, 1) - 1) // b + 1)[:, None, None]  # after the sink block(s)
    hi = (torch.arange(n, device=starts.device) - wb + 1)[None, None, :]  # blocks before the window band
    R = representative_scores(grid, rep, stride)  # (B, Hq, n, n)
    chosen = tree_topk(R, lo, hi, k)
    return chosen | ashape_blocks(n, b, starts, sink, window)[:, None]
