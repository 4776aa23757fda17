"""DapQ: position-aware pseudo queries, placed where the answer will be, form the observation window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...scorers import pool1d


@register
@dataclass(frozen=True)
class DapQ(PrefillMethod):
    """DapQ: ``n_pseudo`` pseudo tokens are appended to the prompt with the positions the first generated tokens
    will have; their queries — carrying the rotary phase of decoding — vote for the prompt tokens to keep, and the
    pseudo tokens are then dropped (arXiv:2603.11564).

    Score: ``s_j = pool_k( Σ_m softmax(q̃_m Kᵀ/√D)_j )`` over the pseudo queries ``q̃_m`` (positions ``L_p … L_p+N−1``),
    averaged over the query heads of each KV head; top-budget prompt tokens per KV head. Decoding starts at ``L_p``:
    the first output token comes from the last real prompt token's logits, and the pseudo tokens' KV is never stored.

    Choices (the paper body is not available; these follow its abstract and summaries): pseudo content is the
    prompt's first ``prefix`` tokens followed by its last ``n_pseudo − prefix`` tokens (the "prefix + suffix"
    variant reported best, 4 + 28); the softmax runs over prompt *and* earlier pseudo keys (causal, as the forward
    pass computes it) and the mass on prompt tokens is summed; average pooling with kernel 5 as in SnapKV, over the
    prompt tokens' votes only (as SnapKV's reference pools the keys before its window: the pseudo tokens' own
    columns never leak into the last prompt tokens' scores); no protected tokens. With left padding each sequence's
    pseudo tokens continue from its own length.
    Needs :meth:`tokensieve.Compressor.prefill` (which appends the pseudo tokens); inside ``model.generate`` it
    raises.
    """

    name: ClassVar[str] = "dapq"
    paper: ClassVar[str] = (
        "Decoding-aligned KV Cache Compression via Position-aware Pseudo Queries (DapQ, arXiv:2603.11564)"
    )
    rule: ClassVar[str] = "s_j = pool(sum_m softmax(q~_m K^T/sqrt(D))_j) over pseudo queries at decoding positions"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        needs_attention=True,
        suffix=True,
    )
    n_pseudo: int = 32
    prefix: int = 4
    kernel: int = 5
    pooling: Literal["avg", "max", "none"] = "avg"

    def __post_init__(self) -> None:
        if self.n_pseudo < 1 or not 0 <= self.prefix <= self.n_pseudo:
            raise ConfigError("dapq: n_pseudo must be >= 1 and 0 <= prefix <= n_pseudo.")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"dapq: kernel must be an odd number >= 1, got {self.kernel}.")

    def prefill_suffix(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            real = ids[mask.bool()]
            head = real[: self.prefix]
            n_tail = self.n_pseudo - head.numel()
            tail = real[-n_tail:] if n_tail > 0 else real[:0]
            row = torch.cat([head, tail])
            if row.numel() < self.n_pseudo:  # prompts shorter than the pseudo window: repeat
                row = row.repeat(self.n_pseudo // max(1, row.numel()) + 1)[: self.n_pseudo]
            rows.append(row)
        return torch.stack(rows)  # (B, N)

    def score(self, ctx: LayerContext) -> Tensor:
        if ctx.tail <= 0:
            raise CapabilityError(
                "dapq needs its pseudo queries, which tokensieve.Compressor.prefill appends; it cannot run inside "
                "model.generate. Use press.prefill / press.decode (or the CLI)."
            )
        probs = ctx.window_attention(ctx.tail)  # (B, H_q, N, T): the pseudo queries
        votes = probs.sum(2)  # (B, H_q, T)
        prompt = ctx.length - ctx.tail  # pool the prompt's votes only: the pseudo keys are never candidates
        s = torch.cat([pool1d(votes[..., :prompt], self.kernel, self.pooling), votes[..., prompt:]], dim=-1)
        s = ctx.to_kv_heads(s, "mean")
        return s.masked_fill(~ctx.selectable[:, None, :], 0.0)
