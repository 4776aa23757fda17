"""FASA's calibration: which RoPE frequency chunks of each head rank tokens like the full attention logits.

RoPE rotates the query/key dimensions in pairs; each pair is a *frequency chunk* (FC) and ``q·k`` is the sum of the
FCs' contributions. With transformers' ``rotate_half`` layout the pair of chunk ``i`` is dimensions ``(i, i + D/2)``
— the paper's definition (the official code groups adjacent dimensions ``(2i, 2i+1)``, which is not the rotation
pair in this layout).

For teacher-forced decode steps over calibration text, the *contextual agreement* of chunk ``i`` at ``K`` is
``CA_K = |TopK(q^{[i]}·K^{[i]}ᵀ) ∩ TopK(q·Kᵀ)| / K``, averaged over steps and over the query heads of each KV head
(we select chunks per KV head, so a KV head's cache is read with one set of dimensions). The profile stores the CA
table for several ``K``; methods pick the dominant chunks from it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..adapters.models import model_shape
from ..adapters.profiles import Profile, shape_dict
from ..cache.storage import KVStore
from ..data.prompts import encode
from ..data.text import calibration_text, python_version
from ..errors import ConfigError
from ..scorers.frequency import chunk_scores
from .semantic_heads import _dense_keys

KIND = "fasa"
DEFAULT_KS = (64, 128, 256, 512)


def profile_frequency_chunks(
    model: Any,
    tok: Any,
    *,
    samples: int = 8,
    seed: int = 0,
    prompt_tokens: int = 1024,
    steps: int = 32,
    ks: tuple[int, ...] = DEFAULT_KS,
    progress: bool = False,
) -> Profile:
    """FASA's profile from ``samples`` calibration texts of ``prompt_tokens`` + ``steps`` tokens (``progress``: a bar
    on stderr, one step per text)."""
    from ..engine import Compressor

    shape = model_shape(model)
    L, H, G, D = shape.num_layers, shape.num_kv_heads, shape.group, shape.head_dim
    ks = tuple(k for k in ks if k < prompt_tokens)
    if not ks or samples < 1:
        raise ConfigError(
            f"FASA's calibration needs prompts longer than {min(DEFAULT_KS)} tokens (got {prompt_tokens}) and at "
            "least one sample."
        )
    ca = torch.zeros(len(ks), L, H, D // 2, dtype=torch.float64)
    n_steps = torch.zeros(L, dtype=torch.float64)
    corpus = encode(tok, calibration_text())
    span = prompt_tokens + steps
    press = Compressor(model, "full")
    bar = tqdm(total=samples, desc=KIND, unit="text", file=sys.stderr, disable=not progress)
    for s in range(samples):
        start = ((s + seed) * span) % max(1, len(corpus) - span)
        ids = corpus[start : start + span]

        def observe(layer: int, q: Tensor, store: KVStore, n0: int = prompt_tokens) -> None:
            k, _ = _dense_keys(store)
            keys = k[0, :, :n0]  # (H_kv, n0, D) the prompt's keys
            qh = q[0, :, -1].reshape(H, G, D)  # (H_kv, G, D)
            full = torch.einsum("hgd,hnd->hgn", qh, keys)  # (H_kv, G, n0)
            part = chunk_scores(qh, keys[:, None])  # (H_kv, G, n0, D/2)
            for ki, kk in enumerate(ks):
                top_full = full.topk(kk, dim=-1).indices  # (H_kv, G, kk)
                hit = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, top_full, True)
                top_part = part.topk(kk, dim=-2).indices  # (H_kv, G, kk, D/2)
                agree = hit[..., None].expand_as(part).gather(-2, top_part).double().mean(-2)  # (H_kv, G, D/2)
                ca[ki, layer] += agree.mean(1)
            n_steps[layer] += 1

        ctx = press.prefill(torch.tensor([ids[:prompt_tokens]]))
        ctx.cache.observers.append(observe)
        for t in ids[prompt_tokens:]:
            press.extend(ctx, torch.tensor([[t]]))
        bar.update(1)
    bar.close()
    ca /= n_steps.clamp_min(1)[None, :, None, None]
    data = {
        "pairing": "rotate_half: chunk i = dims (i, i + D/2)",
        "ks": list(ks),
        "ca": [[[[round(float(x), 4) for x in head] for head in layer] for layer in kslice] for kslice in ca.tolist()],
    }
    settings = {
        "samples": samples,
        "seed": seed,
        "prompt_tokens": prompt_tokens,
        "steps": steps,
        "corpus": f"Python {python_version()} standard-library docstrings",
    }
    from .. import __version__

    return Profile(KIND, shape.key, shape_dict(shape), settings, data, version=__version__)
