"""Fidelity metrics that need no labels, and answer log-likelihood.

All functions take next-token log-probabilities ``(N, V)``: row ``i`` is the distribution that predicts the
continuation's token ``i``. The reference comes from the full-cache model on the same prompt and continuation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def log_probs(logits: Tensor) -> Tensor:
    """``(N, V)`` logits → ``(N, V)`` float32 log-probabilities."""
    return torch.log_softmax(logits.float(), dim=-1)


def kl_divergence(ref: Tensor, other: Tensor) -> Tensor:
    """``(N,)`` KL(ref ‖ other) in nats per position; ``ref``, ``other``: ``(N, V)`` log-probabilities."""
    if ref.shape != other.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(other.shape)}")
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0.0)


def top1_agreement(ref: Tensor, other: Tensor) -> Tensor:
    """``(N,)`` 1.0 where both distributions put their maximum on the same token."""
    return (ref.argmax(-1) == other.argmax(-1)).float()


def token_logprobs(logp: Tensor, targets: Tensor) -> Tensor:
    """``(N,)`` log-probability of each target token; ``logp (N, V)``, ``targets (N,)`` ids."""
    return logp.gather(-1, targets.long()[:, None])[:, 0]


@dataclass(frozen=True)
class Fidelity:
    """How close a compressed cache's next-token distributions are to the full cache's, over N positions."""

    kl: float  # mean KL(full ‖ compressed), nats
    kl_max: float  # worst position
    top1: float  # share of positions whose argmax agrees
    n: int


def fidelity(ref: Tensor, other: Tensor) -> Fidelity:
    """Compare ``(N, V)`` log-probabilities with the reference's."""
    if ref.shape[0] == 0:
        return Fidelity(math.nan, math.nan, math.nan, 0)
    kl = kl_divergence(ref, other)
    return Fidelity(float(kl.mean()), float(kl.max()), float(top1_agreement(ref, other).mean()), int(ref.shape[0]))


def perplexity(total_logprob: float, n: int) -> float:
    """exp(− mean log-probability) of ``n`` tokens."""
    return math.exp(-total_logprob / n) if n > 0 else math.nan
