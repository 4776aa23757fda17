"""MInference's offline pattern search: one sparse pattern per (layer, query head), from dense attention on a
calibration prompt.

For every layer and query head the dense attention ``A = softmax(qKᵀ/√D)`` of the calibration prompt is computed,
and every candidate pattern (MInference's search space, below) is built exactly as ``minference`` builds it online
(:func:`tokensieve.methods.kv.minference.pattern_blocks`). A candidate's *recall* is the attention mass its blocks
cover, averaged over the query rows of the prompt's second half (MInference's v1 metric; its code averages the rows
past 2500 tokens). The head gets the candidate of largest recall among those whose block density is at most
``max_density`` (MInference's candidates are matched in FLOPs for its token-level kernels; on our block kernel they
are not, so the density cap plays that role), or the sparsest one when none fits.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm import tqdm

from ..adapters.models import model_shape
from ..adapters.profiles import Profile, shape_dict
from ..data.prompts import encode
from ..data.text import calibration_text, python_version
from ..errors import ConfigError

KIND = "minference"
# MInference's search space (its code): A-shape (sink, local), vertical-slash (v, s), block-sparse (blocks) ...
CANDIDATES: tuple[tuple[str, int, int], ...] = (
    ("a", 100, 800),
    ("vs", 30, 800),
    ("vs", 100, 750),
    ("vs", 500, 700),
    ("vs", 3500, 100),
    ("vs", 1000, 4096),
    ("block", 8, 0),
    # ours: the same shapes at the scale of a 2K-8K context (MInference's sizes are made for 100K+ tokens, where
    # they are sparse; at 2K most of them cover more than half of the blocks)
    ("a", 64, 256),
    ("a", 128, 512),
    ("vs", 30, 128),
    ("vs", 64, 256),
    ("vs", 128, 512),
    ("block", 4, 0),
)


def profile_head_patterns(
    model: Any,
    tok: Any,
    *,
    tokens: int = 2048,
    seed: int = 0,
    block: int = 64,
    max_density: float = 0.5,
    progress: bool = False,
) -> Profile:
    """The ``minference`` profile from one calibration prompt of ``tokens`` tokens."""
    from ..methods.kv._sparse_prefill import BlockGrid
    from ..methods.kv.minference import pattern_blocks
    from .probe import probe_prefill

    shape = model_shape(model)
    if tokens < 4 * block:
        raise ConfigError(f"MInference's search needs a calibration prompt of at least {4 * block} tokens.")
    corpus = encode(tok, calibration_text(min_chars=8 * tokens))
    start = (seed * tokens) % max(1, len(corpus) - tokens)
    ids = torch.tensor([corpus[start : start + tokens]])
    if ids.shape[1] < tokens:
        raise ConfigError(f"The calibration text has fewer than {tokens} tokens.")
    patterns: list[list[list[Any]]] = [[] for _ in range(shape.num_layers)]
    bar = tqdm(total=shape.num_layers, desc=KIND, unit="layer", file=sys.stderr, disable=not progress)

    def observe(ctx: Any) -> None:
        q, k = ctx.queries, ctx.keys  # (1, Hq, T, D), (1, Hkv, T, D)
        T = q.shape[2]
        n = -(-T // block)
        pad = n * block - T
        valid = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, T, dtype=torch.bool)], 1)
        pq = torch.nn.functional.pad(q, (0, 0, pad, 0))
        pk = torch.nn.functional.pad(k, (0, 0, pad, 0))
        grid = BlockGrid(pq, pk, valid, block, n, ctx.scaling, ctx.group, valid.sum(-1), ctx.layer_idx)
        rows = slice(pad + T // 2, pad + T)
        i = torch.arange(n * block)
        Hq = q.shape[1]
        ok = (i[None, :] <= i[rows, None]) & valid[0][None, :]
        att = torch.stack(
            [
                torch.softmax(
                    (pq[0, h, rows].float() @ pk[0, h // ctx.group].float().T * ctx.scaling).masked_fill(
                        ~ok, float("-inf")
                    ),
                    -1,
                )
                for h in range(Hq)
            ]
        )  # (Hq, R, Tp): dense attention of the rows, computed once per layer
        results = []  # per candidate: (recall (Hq,), density (Hq,))
        for cand in CANDIDATES:
            chosen = pattern_blocks(grid, (cand,) * Hq, 64)[0]  # (Hq, n, n)
            chosen = (chosen | torch.eye(n, dtype=torch.bool)) & grid.causal
            dens = chosen.sum((-1, -2)).double() / grid.causal.sum()
            tok_mask = chosen.repeat_interleave(block, -1).repeat_interleave(block, -2)[:, rows]  # (Hq, R, Tp)
            rec = (att * tok_mask).sum(-1).double().mean(-1)  # (Hq,)
            results.append((rec, dens))
        for h in range(q.shape[1]):
            fits = [c for c in range(len(CANDIDATES)) if results[c][1][h] <= max_density]
            pool = fits or [min(range(len(CANDIDATES)), key=lambda c: float(results[c][1][h]))]
            best = max(pool, key=lambda c: (float(results[c][0][h]), -float(results[c][1][h])))
            kind, v, s = CANDIDATES[best]
            patterns[ctx.layer_idx].append([kind, v, s, round(float(results[best][0][h]), 4)])
        bar.update(1)

    probe_prefill(model, ids, observe)
    bar.close()
    data = {
        "patterns": [[p[:3] for p in layer] for layer in patterns],
        "recall": [[p[3] for p in layer] for layer in patterns],
        "candidates": [list(c) for c in CANDIDATES],
    }
    settings = {"tokens": tokens, "seed": seed, "block": block, "max_density": max_density,
                "corpus": f"Python {python_version()} standard-library docstrings"}  # fmt: skip
    from .. import __version__

    return Profile(KIND, shape.key, shape_dict(shape), settings, data, version=__version__)
