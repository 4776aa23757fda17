"""Decoding: the one greedy loop of every prompt (text or vision-language) and the one rule that picks a token.

:func:`greedy` drives any model through a ``step`` callable (one forward pass of the picked tokens, returning the next
logits), so the Compressor's text path and its vision-language path share it; :func:`next_token` is the sampling rule
of the server (greedy at temperature 0, nucleus sampling otherwise). Pure tensors: no model, no cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Generation:
    """Greedy continuation of a CachedContext."""

    tokens: list[list[int]]  # per sequence, generated ids (EOS excluded)
    steps: int  # decode forward passes
    decode_seconds: float
    finished: list[bool] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        n = sum(len(t) for t in self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def padded(self, eos_token_id: int) -> Tensor:
        """``(B, n)`` the tokens as transformers pads them: each row's tokens, then ``eos_token_id`` from the step at
        which it finished (``n`` = the steps taken plus one)."""
        n = max((len(t) for t in self.tokens), default=0)
        n = max(n, self.steps + 1) if any(self.finished) else n
        rows = [t + [eos_token_id] * (n - len(t)) for t in self.tokens]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)


def greedy(
    logits: Tensor,
    step: Callable[[Tensor], Tensor],
    max_new_tokens: int,
    eos: set[int],
    on_token: Callable[[int, int], None] | None = None,
) -> tuple[Generation, Tensor]:
    """The one greedy loop (text and vision-language prompts alike): pick each row's most likely token from
    ``logits`` ``(B, V)``, stop a row at an end-of-sequence token, feed the picks ``(B,)`` to ``step`` (one forward
    pass; returns the next ``(B, V)`` logits) until every row stopped or ``max_new_tokens`` were picked. Returns the
    generation and the last logits."""
    B = int(logits.shape[0])
    tokens: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    steps = 0
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        for b, t in enumerate(nxt.tolist()):
            if finished[b]:
                continue
            if t in eos:
                finished[b] = True
                continue
            tokens[b].append(t)
            if on_token is not None:
                on_token(b, t)
        if all(finished) or i == max_new_tokens - 1:
            break
        logits = step(nxt)
        steps += 1
    return Generation(tokens, steps, time.perf_counter() - t0, finished), logits


def next_token(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """The next token from one sequence's logits ``(V,)``: the argmax when ``temperature == 0``, else a draw with
    nucleus ``top_p``. Numerically safe for every temperature in (0, 2] and top_p in (0, 1]: the logits are shifted
    so their maximum is 0 before they are divided (in float64), so a tiny temperature gives ``-inf`` for every token
    but the best ones, never ``inf - inf``. Logits that are not finite are an error of this sequence alone."""
    if bool(torch.isnan(logits).any()) or not bool(torch.isfinite(logits.max())):
        raise RuntimeError("the model's next-token scores for this sequence are not finite numbers")
    if temperature <= 0:
        return int(logits.argmax())
    shifted = (logits.double() - logits.max().double()) / float(temperature)  # (V,) <= 0, max exactly 0
    probs = torch.softmax(shifted, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


__all__ = ["Generation", "greedy", "next_token"]
