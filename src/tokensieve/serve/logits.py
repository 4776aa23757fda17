"""How a served sequence's next token is chosen: the request's sampling settings, a chain of logits processors that
runs on the whole decode batch at once, and the log-probabilities a request may ask for.

The chain, in order (each step acts on one row of the ``(B, V)`` logits with that row's own settings, so a row's
result never depends on the other rows — a request batched with others is processed exactly as alone):

1. ``logit_bias`` — added to the logits of the named token ids (OpenAI: -100..100);
2. ``min_tokens`` — the end-of-sequence ids and ``stop_token_ids`` are forbidden until that many tokens exist;
3. ``repetition_penalty`` — every token of the prompt or the answer so far: a positive logit divided by it, a
   negative one multiplied (the CTRL paper's rule, as transformers and vLLM apply it);
4. ``frequency_penalty`` / ``presence_penalty`` — OpenAI's rule on the answer's tokens:
   ``logit - count * frequency_penalty - (count > 0) * presence_penalty``;
5. a grammar's mask (``response_format``, forced tool calls): every token the grammar does not allow is ``-inf``;
6. then, when the row is sampled (``temperature > 0``): ``top_k``, ``min_p`` and ``top_p`` filters and a draw from
   the row's own generator; at temperature 0 the argmax.

Log-probabilities are those of the model's own distribution (``log_softmax`` of the raw logits, before the chain),
as vLLM returns by default: they say what the model thought, not what the filters left.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.decoding import next_token

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings. The defaults change nothing: greedy, no penalty, no bias, no filter.

    ``logprobs``: None for none; ``k >= 0`` for the chosen token's log-probability and its ``k`` most likely
    alternatives at every step."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    logprobs: int | None = None

    @property
    def processes(self) -> bool:
        """Whether any step of the chain before the grammar changes this row's logits."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
        )


@dataclass
class Row:
    """What the chain needs of one sequence at one step."""

    sampling: Sampling
    prompt: Sequence[int]  # the prompt's ids (repetition penalty)
    output: Sequence[int]  # the answer's ids so far
    end_ids: frozenset[int] = frozenset()  # the ids min_tokens holds back (EOS and stop_token_ids)
    allowed: Callable[[int], Tensor] | None = None  # a grammar: the allowed tokens ``(V,)`` bool, given V


def process(logits: Tensor, rows: Sequence[Row]) -> Tensor:
    """The chain on a batch: ``logits`` ``(B, V)`` (one row per entry of ``rows``) → new ``(B, V)`` logits (float32;
    the input is not modified). Each step runs once for every row that uses it."""
    if logits.dim() != 2 or int(logits.shape[0]) != len(rows):
        raise ValueError("process takes (B, V) logits and one Row per batch row")
    out = logits.float().clone()  # (B, V)
    B, V = out.shape
    if not any(r.sampling.processes or r.allowed is not None for r in rows):
        return out
    # 1. logit_bias: one (B, V) bias
    biased = [b for b, r in enumerate(rows) if r.sampling.logit_bias]
    if biased:
        bias = torch.zeros_like(out)
        for b in biased:
            ids = torch.tensor([i for i, _ in rows[b].sampling.logit_bias if i < V], dtype=torch.long)
            vals = torch.tensor([v for i, v in rows[b].sampling.logit_bias if i < V], dtype=out.dtype)
            bias[b].index_put_((ids,), vals, accumulate=True)
        out += bias
    # 2. min_tokens: the end ids are forbidden while the answer is shorter
    held = torch.zeros(B, V, dtype=torch.bool)
    for b, r in enumerate(rows):
        if len(r.output) < r.sampling.min_tokens:
            ends = [i for i in r.end_ids if 0 <= i < V]
            if ends:
                held[b, ends] = True
    out.masked_fill_(held, -math.inf)
    # 3. repetition penalty over the prompt and the answer
    rep = [b for b, r in enumerate(rows) if r.sampling.repetition_penalty != 1.0]
    if rep:
        seen = torch.zeros(B, V, dtype=torch.bool)
        penalty = torch.ones(B, 1, dtype=out.dtype)
        for b in rep:
            ids = torch.tensor([*rows[b].prompt, *rows[b].output], dtype=torch.long)
            ids = ids[(ids >= 0) & (ids < V)]
            seen[b, ids] = True
            penalty[b, 0] = rows[b].sampling.repetition_penalty
        scaled = torch.where(out > 0, out / penalty, out * penalty)  # (B, V)
        out = torch.where(seen, scaled, out)
    # 4. OpenAI's frequency and presence penalties over the answer
    pen = [b for b, r in enumerate(rows) if r.sampling.presence_penalty or r.sampling.frequency_penalty]
    if pen:
        counts = torch.zeros(B, V, dtype=out.dtype)
        freq = torch.zeros(B, 1, dtype=out.dtype)
        pres = torch.zeros(B, 1, dtype=out.dtype)
        for b in pen:
            ids = torch.tensor(list(rows[b].output), dtype=torch.long)
            ids = ids[(ids >= 0) & (ids < V)]
            counts[b].index_add_(0, ids, torch.ones(len(ids), dtype=out.dtype))
            freq[b, 0] = rows[b].sampling.frequency_penalty
            pres[b, 0] = rows[b].sampling.presence_penalty
        out = out - counts * freq - (counts > 0).to(out.dtype) * pres
    # 5. a grammar's mask
    for b, r in enumerate(rows):
        if r.allowed is not None:
            out[b].masked_fill_(~r.allowed(V), -math.inf)
    return out


def choose(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """The next token of one row from its processed logits ``(V,)``: the argmax at temperature 0, else ``top_k``,
    then ``min_p`` (tokens less likely than ``min_p`` times the most likely one are dropped), then a nucleus draw
    (:func:`~tokensieve.core.decoding.next_token`). A row whose every token is forbidden is an error of that row."""
    if not bool(torch.isnan(logits).any()) and float(logits.max()) == -math.inf:
        raise RuntimeError("every token is forbidden for this sequence (its logit_bias, min_tokens or grammar)")
    if sampling.temperature > 0:
        V = int(logits.shape[-1])
        if 0 < sampling.top_k < V:
            kth = torch.topk(logits, sampling.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if sampling.min_p > 0:
            probs = torch.softmax((logits.double() - logits.max().double()) / sampling.temperature, dim=-1)
            logits = logits.masked_fill(probs < sampling.min_p * probs.max(), -math.inf)
    return next_token(logits, sampling.temperature, sampling.top_p, generator)  # -inf entries get probability 0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely alternatives at its step (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(raw: Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """Log-probabilities of ``tokens[i]`` under ``raw[i]`` ``(N, V)`` (the model's logits at the step that chose it),
    with the ``k`` most likely tokens of each step."""
    if not tokens:
        return []
    logp = torch.log_softmax(raw.double(), dim=-1)  # (N, V)
    picked = logp.gather(1, torch.tensor(list(tokens), dtype=torch.long)[:, None])[:, 0]  # (N,)
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(tokens)
    if k > 0:
        values, ids = logp.topk(min(k, int(logp.shape[-1])), dim=-1)  # (N, k)
        tops = [tuple(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
    return [TokenLogprob(int(t), float(p), top) for t, p, top in zip(tokens, picked.tolist(), tops)]


def prompt_logprobs(
    prefill: Callable[[Tensor], Any], extend: Callable[[Any, Tensor], Tensor], ids: Sequence[int], k: int,
    chunk: int = 256,
) -> list[TokenLogprob | None]:  # fmt: skip
    """Log-probabilities of every prompt token given the tokens before it (None for the first: nothing predicts it),
    from one uncompressed forward pass over the prompt, run ``chunk`` tokens at a time so that at most ``chunk × V``
    logits exist at once. ``prefill(ids (1, 1))`` starts a full-cache context and ``extend(ctx, ids (1, L))`` returns
    the logits ``(1, L, V)`` at each position of a chunk."""
    out: list[TokenLogprob | None] = [None]
    if len(ids) < 2:
        return out
    ctx = prefill(torch.tensor([list(ids[:1])], dtype=torch.long))
    last = ctx.logits[0:1].float()  # (1, V) predicts ids[1]
    pos = 1
    while pos < len(ids):
        piece = list(ids[pos : pos + chunk])
        logits = extend(ctx, torch.tensor([piece], dtype=torch.long))[0].float()  # (L, V)
        preds = torch.cat([last, logits[:-1]])  # (L, V): row i predicts piece[i]
        out.extend(token_logprobs(preds, piece, k))
        last = logits[-1:]
        pos += len(piece)
    return out


__all__ = ["MAX_LOGPROBS", "Row", "Sampling", "TokenLogprob", "choose", "process", "prompt_logprobs",
           "token_logprobs"]  # fmt: skip
