"""RazorAttention's data-free search for retrieval heads (echo heads and induction heads).

Input: a start token followed by ``n_random`` random token ids repeated ``repeats`` times. For every query in the
second repetition onward, a head's *echo* score is the attention it pays to earlier copies of the query's own token,
and its *induction* score the attention it pays to the tokens that followed those copies. Scores are averaged over
queries, taken per KV head as the maximum over the KV head's query heads, and ranked across all layers and heads:
the top ``echo_share`` by echo score and the top ``induction_share`` by induction score are retrieval heads
(RazorAttention, arXiv:2407.15891: 1 % and 14 %).

Choice: the paper repeats 2,500 random tokens 4 times (10,000 tokens); for models with short contexts we default to
1,000 × 4 so the probe fits in 4K positions. The number is stored in the profile.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from tqdm import tqdm

from ..adapters.models import model_shape
from ..adapters.profiles import Profile, shape_dict
from ..core.context import LayerContext, grouped_logits
from ..errors import ConfigError
from .probe import probe_prefill

KIND = "retrieval-heads"


def random_repeat_ids(
    vocab_size: int, n_random: int, repeats: int, seed: int, start_id: int, low: int = 100
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(low, vocab_size, (n_random,), generator=g)
    return torch.cat([torch.tensor([start_id]), seq.repeat(repeats)])[None]  # (1, 1 + n_random * repeats)


def echo_induction_scores(ctx: LayerContext, n_random: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head ``(H_q,)`` mean echo and induction attention over queries of repetitions 2+."""
    q, k = ctx.queries[0:1], ctx.keys[0:1]
    T = q.shape[2]
    Hq = q.shape[1]
    echo = torch.zeros(Hq, dtype=torch.float64)
    induction = torch.zeros(Hq, dtype=torch.float64)
    n_q = 0
    first = 1 + n_random
    for s in range(first, T, chunk):
        e = min(T, s + chunk)
        qi = torch.arange(s, e)[:, None]  # (c, 1) query positions
        kj = torch.arange(e)[None, :]  # (1, e) key positions
        logits = grouped_logits(q[:, :, s:e], k[:, :, :e], ctx.scaling)[0]  # (H_q, c, e)
        probs = torch.softmax(logits.masked_fill(kj > qi, float("-inf")), dim=-1)
        copy = (kj >= 1) & (kj < qi) & ((qi - kj) % n_random == 0)  # earlier copies of the query's token
        after = (kj >= 2) & (kj - 1 < qi) & ((qi - (kj - 1)) % n_random == 0)  # the token after each copy
        echo += (probs * copy).sum(-1).sum(-1).double()
        induction += (probs * after).sum(-1).sum(-1).double()
        n_q += e - s
    return echo / n_q, induction / n_q


def profile_retrieval_heads(
    model: Any,
    *,
    n_random: int = 1000,
    repeats: int = 4,
    seed: int = 0,
    echo_share: float = 0.01,
    induction_share: float = 0.14,
    progress: bool = False,
) -> Profile:
    """Rank the model's KV heads by echo and induction attention (``progress``: a bar on stderr, one step per
    layer)."""
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 2:
        raise ConfigError(f"n_random must be a whole number >= 2 (random tokens per repetition); got {n_random!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ConfigError(f"repeats must be a whole number >= 2 (echo needs a second copy); got {repeats!r}.")
    shape = model_shape(model)
    vocab = int(model.config.vocab_size)
    start = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    ids = random_repeat_ids(vocab, n_random, repeats, seed, int(start), low=min(100, vocab // 4))
    echo = torch.zeros(shape.num_layers, shape.num_kv_heads, dtype=torch.float64)
    induction = torch.zeros_like(echo)

    bar = tqdm(total=shape.num_layers, desc=KIND, unit="layer", file=sys.stderr, disable=not progress)

    def observe(ctx: LayerContext) -> None:
        e, i = echo_induction_scores(ctx, n_random)
        G = shape.group
        echo[ctx.layer_idx] = e.view(shape.num_kv_heads, G).amax(-1)
        induction[ctx.layer_idx] = i.view(shape.num_kv_heads, G).amax(-1)
        bar.update(1)

    try:
        probe_prefill(model, ids, observe)
    finally:
        bar.close()
    n_heads = shape.num_layers * shape.num_kv_heads
    n_echo = max(1, math.ceil(echo_share * n_heads))
    n_ind = max(1, round(induction_share * n_heads))
    flat_e, flat_i = echo.flatten(), induction.flatten()
    top_echo = flat_e.argsort(descending=True)[:n_echo].tolist()
    by_ind = flat_i.argsort(descending=True).tolist()
    ranked = top_echo + [h for h in by_ind if h not in top_echo]
    chosen = set(top_echo) | set(by_ind[:n_ind])
    H = shape.num_kv_heads
    data = {
        "echo": [[round(float(x), 6) for x in row] for row in echo.tolist()],
        "induction": [[round(float(x), 6) for x in row] for row in induction.tolist()],
        "ranked": [[h // H, h % H] for h in ranked],
        "count": len(chosen),
    }
    settings = {
        "n_random": n_random,
        "repeats": repeats,
        "seed": seed,
        "echo_share": echo_share,
        "induction_share": induction_share,
        "tokens": int(ids.shape[1]),
    }
    from .. import __version__

    return Profile(KIND, shape.key, shape_dict(shape), settings, data, version=__version__)
