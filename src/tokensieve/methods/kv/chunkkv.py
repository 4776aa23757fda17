"""ChunkKV: keep whole chunks of consecutive tokens, chosen by any scorer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod, WrapperMethod
from ...core.registry import register
from ...errors import ConfigError
from ...selection import Selection
from ...selection.topk import topk_select
from .snapkv import SnapKV


def chunk_scores(scores: Tensor, valid: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Per-token scores replaced by their chunk's: ``(B, T)`` chunk score of each token and ``(B, T)`` chunk index.

    Chunks are ``chunk`` consecutive real tokens from each sequence's first one (the last may be shorter); a chunk's
    score is the mean over its tokens of the scores summed over KV heads. scores ``(B, H, T)``; padding gets −inf.
    """
    B = scores.shape[0]
    summed = scores.float().masked_fill(~valid[:, None, :], 0.0).sum(1)  # (B, T)
    idx = ((valid.long().cumsum(-1) - 1).clamp_min(0) // chunk).masked_fill(~valid, 0)  # (B, T)
    n_chunks = int(idx.max()) + 1 if idx.numel() else 1
    total = torch.zeros(B, n_chunks).scatter_add_(1, idx, summed.masked_fill(~valid, 0.0))
    size = torch.zeros(B, n_chunks).scatter_add_(1, idx, valid.float())
    mean = total / size.clamp_min(1)
    return mean.gather(1, idx).masked_fill(~valid, float("-inf")), idx


@register
@dataclass(frozen=True)
class ChunkKV(WrapperMethod):
    """ChunkKV: the unit of selection is a chunk of ``chunk`` consecutive tokens, so what is kept stays readable text;
    one set of chunks per layer, shared by every KV head (Liu et al., "ChunkKV: Semantic-Preserving KV Cache
    Compression for Efficient Long-Context LLM Inference", arXiv:2502.00299).

    Score: ``S_c = mean_{j ∈ c} Σ_h s_{h,j}`` with the base method's token scores ``s`` (SnapKV's window attention by
    default); the best chunks are kept whole.

    Choices: chunk 10 (the paper's robust choice; kvpress uses 20); chunks start at each sequence's first real token,
    the last may be shorter (kvpress); the base method's protected tokens (SnapKV's window) are kept first and count
    inside the budget; chunks are taken best first while they fit, and the first chunk that does not fit whole is cut
    to its best-scored tokens, so the budget is met exactly (kvpress keeps ``n·c`` tokens instead). Layer-wise index
    reuse (``reuse`` > 1: the chunks picked at layer ``l`` also serve the next ``reuse − 1`` layers) is off by
    default: the paper presents it as a speed-up, not a gain in accuracy.
    """

    name: ClassVar[str] = "chunkkv"
    paper: ClassVar[str] = (
        "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference (arXiv:2502.00299)"
    )
    rule: ClassVar[str] = "S_c = mean_{j in chunk c} sum_h s_hj (base scores); keep the best whole chunks"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT, needs_attention=True, granularity=Granularity.PAGE
    )
    base: PrefillMethod = field(default_factory=SnapKV)
    chunk: int = 10
    reuse: int = 1

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.reuse < 1:
            raise ConfigError(f"chunkkv: chunk and reuse must be >= 1; got chunk={self.chunk}, reuse={self.reuse}.")
        self.check_base(uniform=True)

    def select(self, scores: Tensor, counts: Tensor, ctx: LayerContext) -> Selection:
        key = ("chunkkv", self.chunk, self.reuse, ctx.layer_idx - ctx.layer_idx % self.reuse)
        if self.reuse > 1 and ctx.layer_idx % self.reuse and key in ctx.run.scratch:
            rank = ctx.run.scratch[key]  # this layer reuses the chunks of its group's first layer
        else:
            rank = chunk_order(scores, ctx.selectable, self.chunk)
            if self.reuse > 1:
                ctx.run.scratch[key] = rank
        order_scores = rank[:, None, :].expand_as(scores)
        return topk_select(order_scores, counts, ctx.selectable, sink=ctx.run.sink, recent=ctx.run.recent)


def chunk_order(scores: Tensor, valid: Tensor, chunk: int) -> Tensor:
    """One ranking of a layer's tokens per sequence, ``(B, T)`` (higher first): tokens of the best chunk first, then
    the next chunk's, …; inside a chunk, by the token's own score summed over heads. Ties between chunks go to the
    earlier chunk. Taking the top ``k`` of this ranking keeps whole chunks and cuts only the last one."""
    B, T = scores.shape[0], scores.shape[2]
    per_chunk, idx = chunk_scores(scores, valid, chunk)  # (B, T), (B, T)
    own = scores.float().masked_fill(~valid[:, None, :], 0.0).sum(1)  # (B, T)
    by_token = torch.sort(own.masked_fill(~valid, float("-inf")), dim=-1, descending=True, stable=True).indices
    # chunk rank: 0 for the best chunk (chunk indices follow positions, so a stable sort favours the earlier one)
    n_chunks = int(idx.max()) + 1 if idx.numel() else 1
    cscore = torch.full((B, n_chunks), float("-inf")).scatter_reduce(1, idx, per_chunk, "amax")
    corder = torch.sort(cscore, dim=-1, descending=True, stable=True).indices
    crank = torch.empty_like(corder).scatter_(1, corder, torch.arange(n_chunks).expand(B, n_chunks))
    tok_crank = crank.gather(1, idx).masked_fill(~valid, n_chunks)  # (B, T)
    order = by_token.gather(1, torch.sort(tok_crank.gather(1, by_token), dim=-1, stable=True).indices)
    rank = torch.empty(B, T)
    rank.scatter_(1, order, -torch.arange(T, dtype=torch.float32).expand(B, T))
    return rank.masked_fill(~valid, float("-inf"))
