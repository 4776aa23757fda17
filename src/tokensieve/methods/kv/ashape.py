"""A-shape (Λ-shape) prefill attention: attention sinks plus a local window, as blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from ._sparse_prefill import BlockGrid, SparsePrefill


def ashape_blocks(n: int, block: int, starts: Tensor, sink: int, local: int) -> Tensor:
    """``(B, n, n)`` bool: query block ``i`` reads the blocks holding a sequence's first ``sink`` real tokens
    (``starts`` ``(B,)``: index of the first real token on the grid) and the ``ceil(local / block)`` blocks ending
    with its own."""
    idx = torch.arange(n, device=starts.device)
    first = starts // block  # (B,)
    last = (starts + max(sink, 1) - 1) // block
    sink_cols = (idx[None, :] >= first[:, None]) & (idx[None, :] <= last[:, None]) & (sink > 0)  # (B, n)
    lb = max(1, -(-local // block))
    local_band = (idx[:, None] - idx[None, :] < lb) & (idx[None, :] <= idx[:, None])  # (n, n)
    return sink_cols[:, None, :] | local_band[None]


@register
@dataclass(frozen=True)
class AShape(SparsePrefill):
    """A-shape prefill attention: every query reads the first ``sink`` tokens and a window of ``local`` recent tokens
    — the attention-sink pattern of StreamingLLM (Xiao et al., arXiv:2309.17453) used at prefill, as MInference's
    "A-shape" head pattern (Jiang et al., arXiv:2407.02490, §3).

    Rule: query block ``i`` reads key block ``j`` iff ``j`` holds one of the sequence's first ``sink`` real tokens,
    or ``i − j < ⌈local / block⌉`` (the local band, diagonal included). Static: no scores are computed.

    Choices: block granularity (blocks of ``block`` tokens on the grid anchored at the prompt's end, so the sink is
    the whole block(s) holding the first real tokens and the window is whole blocks, never narrower than asked);
    ``sink`` 128 as MInference's code (``n_init``); ``local`` 1024 (MInference's code uses 3968, which is dense below
    4K tokens — the paper's point is a fixed local window, and the search space of its offline pattern search has
    A-shape (100, 800)); every head and layer the same (MInference assigns A-shape to some heads only — that is
    ``minference``'s profile). With ``sink + local`` covering the prompt it equals dense attention.
    """

    name: ClassVar[str] = "ashape"
    paper: ClassVar[str] = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention "
        "(arXiv:2407.02490) — A-shape; sinks from arXiv:2309.17453"
    )
    rule: ClassVar[str] = "query block i reads the first-sink-token blocks and the blocks j with i - j < local/block"
    sink: int = 128
    local: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink < 0 or self.local < 1:
            raise ConfigError(f"ashape: sink >= 0 and local >= 1 are required (got {self.sink}, {self.local}).")

    def blocks(self, grid: BlockGrid, profile: Any) -> Tensor | None:
        B, Hq = grid.q.shape[:2]
        starts = grid.valid.shape[1] - grid.lengths
        chosen = ashape_blocks(grid.n, grid.block, starts, self.sink, self.local)  # (B, n, n)
        return chosen[:, None].expand(B, Hq, grid.n, grid.n)
