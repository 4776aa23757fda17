"""LagKV's scorer: a token matters when it stands out against the statistics of the partition that follows it."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def lag_relative_scores(x: Tensor, lag: int) -> Tensor:
    """Scores of every partition but the last, each normalised by the next one.

    x ``(H, P·lag, D)`` (``P`` whole partitions) → ``(H, (P−1)·lag)``: for partition ``p``, with the next partition's
    per-channel ``min`` and ``max``, ``softmax over the partition of std_channels((x − min) / (max − min))``.
    """
    H, n, D = x.shape
    parts = x.reshape(H, n // lag, lag, D)
    ref, cur = parts[:, 1:], parts[:, :-1]
    lo = ref.amin(dim=2, keepdim=True)
    hi = ref.amax(dim=2, keepdim=True)
    z = (cur - lo) / (hi - lo).clamp_min(EPS)
    return z.std(dim=-1).softmax(dim=-1).reshape(H, -1)


def lagkv_scores(keys: Tensor, values: Tensor, valid: Tensor, sink: int, lag: int) -> Tensor:
    """LagKV's per-token scores ``(B, H, T)``, computed on each sequence's own real tokens.

    After ``sink`` tokens, the prompt is cut into partitions of ``lag`` tokens; each partition but the last is scored
    against the next one, keys and values alike (mean of the two), and a token's score is its rank inside its
    partition divided by ``lag`` (so every partition keeps about the same share). The last whole partition and the
    remainder (no reference yet) score ``2 + position / n`` and the sinks ``3``: always kept first, newest tail tokens
    first. A prompt shorter than ``sink + 2·lag`` has no reference at all: its scores are its positions (recency).
    """
    B, H, T, _ = keys.shape
    out = torch.zeros(B, H, T)
    for b in range(B):
        idx = valid[b].nonzero().flatten()
        n = idx.numel()
        s = torch.zeros(H, n)
        if n < sink + 2 * lag:
            s[:] = torch.arange(n, dtype=torch.float32)
        else:
            end = sink + ((n - sink) // lag) * lag
            k = keys[b][:, idx[sink:end]].float()
            v = values[b][:, idx[sink:end]].float()
            score = (lag_relative_scores(k, lag) + lag_relative_scores(v, lag)) / 2  # (H, (P-1)·lag)
            parts = score.reshape(H, -1, lag)
            rank = parts.argsort(-1).argsort(-1).float() / lag
            scored = rank.shape[1] * lag
            s[:, sink : sink + scored] = rank.reshape(H, -1)
            s[:, sink + scored :] = 2 + torch.arange(sink + scored, n, dtype=torch.float32) / n
            s[:, :sink] = 3
        out[b, :, idx] = s
    return out
