"""AdaSpa: training-free adaptive sparse attention for long video — exact block search at a few steps, reused between.

Xia et al., "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation", ICCV 2025
(arXiv:2502.21079). No official code was reachable; the rule is the paper's as we read it.

**Rule.** *Blockified pattern*: a query block reads a set of key blocks. *Online precise search*: at a search step the
layer runs dense attention and, from the same logits and their log-sum-exp (the paper fuses the search into that pass
with the LSE cached), the exact attention mass every (query block, key block) pair carries: the mean over the block's
queries of the summed probabilities of the block's keys. *Invariance across steps*: the pattern found at a search step
is reused by every later step until the next search. *Head-adaptive allocation*: the layer's budget of ``density ·
H · n²`` blocks per sequence is spent on the pairs of largest mass across all heads and query blocks together, so a head
whose attention is concentrated gets few blocks and a diffuse head many; every query block keeps its diagonal block.

**Defaults** (ours where the paper gives none for our model): ``density = 0.25``, search at the first sparse step and
again at half the run (``research = 0.5``), the first 10 % of the steps dense, 64-token blocks.

**Choices.** The search pass runs dense attention (its density counts 1). Masses are computed per head in chunks of
queries, so the search needs no ``N²`` buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from .base import Attended, DiTCall, DiTMethod, blocks_of, dense_attention, run_blocks


def block_mass(q: Tensor, k: Tensor, scaling: float, block: int, chunk: int = 1024) -> Tensor:
    """``(B, H, n, n)``: mean over each query block's queries of the softmax mass of each key block (rows sum to 1)."""
    B, H, N, _D = q.shape
    n = blocks_of(N, block)
    pad = n * block - N
    out = torch.zeros(B, H, n * block, n, device=q.device)
    kt = k.float().transpose(-1, -2)
    for s in range(0, N, chunk):
        logits = torch.matmul(q[:, :, s : s + chunk].float(), kt) * scaling  # (B, H, c, N)
        probs = torch.softmax(logits, -1)
        if pad:
            probs = torch.nn.functional.pad(probs, (0, pad))
        out[:, :, s : s + chunk] = probs.view(B, H, -1, n, block).sum(-1)
    rows = torch.full((n,), float(block), device=q.device)
    rows[-1] = N - (n - 1) * block
    return out.view(B, H, n, block, n).sum(3) / rows[:, None]


def head_adaptive_blocks(mass: Tensor, density: float) -> Tensor:
    """``(B, H, n, n)`` bool: per sequence, the ``density · H · n²`` pairs of largest mass across heads (diagonal
    always kept)."""
    B, H, n, _ = mass.shape
    eye = torch.eye(n, dtype=torch.bool, device=mass.device)
    budget = max(math.ceil(density * H * n * n), H * n)
    score = torch.where(eye, torch.full_like(mass, float("inf")), mass).reshape(B, -1)
    top = score.topk(min(budget, score.shape[-1]), dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True).view(B, H, n, n)


@register
@dataclass(frozen=True)
class AdaSpa(DiTMethod):
    """AdaSpa: training-free adaptive sparse attention — exact block search at a few steps, reused between.

    The module docstring states the rule as we read the paper (no official code was reachable) and the defaults.
    """

    name: ClassVar[str] = "adaspa"
    paper: ClassVar[str] = "Xia et al., Training-free and Adaptive Sparse Attention for Long Video, ICCV 2025"
    rule: ClassVar[str] = "exact block masses at search steps (dense pass); top blocks across heads; reused between"
    budget_param: ClassVar[str | None] = "density"

    density: float = 0.25
    research: float = 0.5
    warmup: float = 0.1
    block: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.density <= 1 or not 0 <= self.research <= 1:
            raise ConfigError("adaspa: density in (0, 1], research in [0, 1].")

    def search_steps(self, num_steps: int) -> set[int]:
        first = self.warmup_steps(num_steps)
        return {first, max(first, math.floor(self.research * num_steps))}

    def sparse(self, call: DiTCall) -> Attended:
        pattern = call.state.get("pattern")
        B = call.q.shape[0]
        search = call.step in self.search_steps(call.num_steps) and call.state.get("searched_at") != call.step
        if pattern is None or pattern.shape[0] != B or search:
            call.state["searched_at"] = call.step
            mass = block_mass(call.q, call.k, call.scaling, self.block)
            call.state["pattern"] = head_adaptive_blocks(mass, self.density)
            return Attended(dense_attention(call), 1.0)
        grid = pattern.to(torch.int8) * 2
        out = run_blocks(call, call.q, call.k, call.v, grid, self.block)
        N = call.q.shape[2]
        n = pattern.shape[-1]
        sizes = torch.full((n,), float(self.block), device=call.q.device)
        sizes[-1] = N - (n - 1) * self.block
        pairs = (pattern.float() * sizes[:, None] * sizes[None, :]).sum()
        return Attended(out, float(pairs) / (pattern.shape[0] * pattern.shape[1] * N * N))
