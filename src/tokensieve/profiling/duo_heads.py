"""DuoAttention's calibration: which KV heads need the whole context (retrieval heads) and which do with sinks and a
recent window (streaming heads), found by optimisation (arXiv:2410.10819).

One gate ``α ∈ [0, 1]`` per (layer, KV head), shared by the head's query heads, mixes the two attentions:
``α · full + (1 − α) · streaming``, where streaming attention sees only the first ``sink`` and the last ``recent``
tokens. Only the gates are trained (the model is frozen): on synthetic multi-passkey prompts — calibration text with
passkeys of random words at random depths, then a question and its answer (all the passkeys) — the final hidden
states of the gated model are pulled towards the full model's on the answer positions, with an L1 penalty that pushes
gates to 0: ``loss = mean_answer mean_hidden (h_full − h_gated)² + λ · mean |α|``. Heads whose gate stays high need
the whole context.

Choices (the paper trains 2,000 steps on 1K–32K-token prompts with 10 passkeys of 32 words; a CPU has minutes):
defaults of 120 steps on 1,024-token prompts with 4 passkeys of 8 words, window 64 sinks + 256 recent tokens (the
paper's deployment window), AdamW lr 0.02 without weight decay, λ 0.05, gates start at 1 and are clamped to [0, 1]
after each step, the learning rate warms up linearly over the first 20 % of steps from 0.1× and decays linearly to
0.1× over the last 20 %. Everything is stored in the profile's settings.

No profile ships for the embedded model: on the shared 2-core machine it was developed on, one step at 1,024 tokens
(two forward passes and a backward pass) took about a minute, two hours for the default 120 steps. Run
``tokensieve profile duo`` once where there is time.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..adapters.models import model_shape
from ..adapters.profiles import Profile, shape_dict
from ..data.prompts import chat_ids, encode
from ..data.text import calibration_text, python_version
from ..data.words import ADJECTIVES, NOUNS
from ..errors import ConfigError

KIND = "duo"
IMPLEMENTATION = "tokensieve_duo_gates"
_GATES: contextvars.ContextVar[tuple[Tensor, int, int] | None] = contextvars.ContextVar("duo_gates", default=None)
_REGISTERED = False


def streaming_allowed(T: int, sink: int, recent: int) -> Tensor:
    """``(T, T)`` bool: query ``i`` sees key ``j ≤ i`` if ``j < sink`` or ``i − j < recent`` (Λ-shaped)."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (j <= i) & ((j < sink) | (i - j < recent))


def gated_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention function (transformers' interface): ``α·full + (1 − α)·streaming`` per KV head, for one unpadded
    sequence. query ``(1, H_q, T, D)``, key/value ``(1, H_kv, T, D)`` → ``(1, T, H_q, D)``."""
    state = _GATES.get()
    if state is None:  # pragma: no cover - only routed inside gates_active
        raise RuntimeError("DuoAttention's gated attention runs only inside duo_heads.gates_active().")
    gates, sink, recent = state
    layer = int(getattr(module, "layer_idx", 0))
    Hq, T = query.shape[1], query.shape[2]
    Hkv = key.shape[1]
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)
    mask = streaming_allowed(T, sink, recent).to(query.device)
    stream = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    a = gates[layer].repeat_interleave(Hq // Hkv)[None, :, None, None].to(query.dtype)
    out = a * full + (1 - a) * stream
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gates_active(model: Any, gates: Tensor, sink: int, recent: int) -> Iterator[None]:
    """Within this block the model's attention is the gated mixture (the previous implementation is restored)."""
    global _REGISTERED
    from transformers import AttentionInterface

    if not _REGISTERED:
        AttentionInterface.register(IMPLEMENTATION, gated_attention)
        _REGISTERED = True
    previous = model.config._attn_implementation
    token = _GATES.set((gates, sink, recent))
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _GATES.reset(token)


def passkey_sample(
    tok: Any, corpus: list[int], rng: random.Random, length: int, keys: int, words: int
) -> tuple[Tensor, int]:
    """A multi-passkey prompt of about ``length`` tokens followed by its answer: ``(ids (1, T), answer_start)``.

    ``keys`` passkeys of ``words`` random words each are placed at random depths of a slice of the calibration
    text; the question asks for all of them and the answer lists them in order (teacher-forced)."""
    passkeys = [" ".join(rng.choice(ADJECTIVES + NOUNS) for _ in range(words)) for _ in range(keys)]
    needles = [encode(tok, f" The pass key number {i + 1} is: {p}. Remember it. ") for i, p in enumerate(passkeys)]
    question = "\n\nWhat are the pass keys? List all of them, in order."
    answer = encode(tok, "The pass keys are: " + "; ".join(passkeys) + ".")
    overhead = int(chat_ids(tok, question).shape[1]) + sum(len(n) for n in needles) + len(answer)
    room = length - overhead
    if room < 16:
        raise ConfigError(f"DuoAttention's calibration prompts of {length} tokens are too short for {keys} passkeys.")
    start = rng.randrange(0, max(1, len(corpus) - room))
    hay = corpus[start : start + room]
    depths = sorted(rng.randrange(0, len(hay) + 1) for _ in needles)
    pieces: list[int] = []
    last = 0
    for d, n in zip(depths, needles):
        pieces += hay[last:d] + n
        last = d
    pieces += hay[last:]
    context = tok.decode(pieces)
    prompt = chat_ids(tok, context + question)[0].tolist()
    return torch.tensor([prompt + answer]), len(prompt)


def train_gates(
    model: Any,
    samples: list[tuple[Tensor, int]],
    *,
    sink: int,
    recent: int,
    steps: int,
    lr: float = 0.02,
    reg: float = 0.05,
    bar: Any = None,
) -> tuple[Tensor, list[float]]:
    """Optimise one gate per (layer, KV head); returns ``(gates (L, H_kv), loss per step)``."""
    shape = model_shape(model)
    gates = torch.ones(shape.num_layers, shape.num_kv_heads, requires_grad=True)
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    warm = max(1, steps // 5)

    def factor(step: int) -> float:
        if step < warm:
            return 0.1 + 0.9 * step / warm
        if step >= steps - warm:
            return 0.1 + 0.9 * (steps - 1 - step) / warm
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    decoder = model.base_model
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        for step in range(steps):
            ids, start = samples[step % len(samples)]
            sup = slice(start - 1, ids.shape[1] - 1)  # positions whose hidden states predict the answer
            with torch.no_grad():
                h_full = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, sup]
            with gates_active(model, gates, sink, recent):
                h_mix = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, sup]
            loss = (h_full - h_mix).pow(2).mean(-1).mean() + reg * gates.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return gates.detach(), losses


def profile_duo(
    model: Any,
    tok: Any,
    *,
    steps: int = 120,
    length: int = 1024,
    keys: int = 4,
    words: int = 8,
    sink: int = 64,
    recent: int = 256,
    samples: int = 8,
    lr: float = 0.02,
    reg: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> Profile:
    """DuoAttention's profile for ``model``: gates trained for ``steps`` steps over ``samples`` multi-passkey
    prompts of ``length`` tokens (``progress``: a bar on stderr, one step per optimisation step)."""
    if steps < 1 or samples < 1:
        raise ConfigError("DuoAttention's calibration needs at least one step and one sample.")
    shape = model_shape(model)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    corpus = encode(tok, calibration_text())
    data = [passkey_sample(tok, corpus, rng, length, keys, words) for _ in range(samples)]
    bar = tqdm(total=steps, desc=KIND, unit="step", file=sys.stderr, disable=not progress)
    try:
        gates, losses = train_gates(model, data, sink=sink, recent=recent, steps=steps, lr=lr, reg=reg, bar=bar)
    finally:
        bar.close()
    settings = {
        "steps": steps,
        "length": length,
        "passkeys": keys,
        "passkey_words": words,
        "samples": samples,
        "lr": lr,
        "l1": reg,
        "seed": seed,
        "corpus": f"Python {python_version()} standard-library docstrings with passkeys",
    }
    data_out = {
        "gates": [[round(float(g), 6) for g in row] for row in gates.tolist()],
        "sink": sink,
        "recent": recent,
        "loss_first": round(losses[0], 6),
        "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 6),
    }
    from .. import __version__

    return Profile(KIND, shape.key, shape_dict(shape), settings, data_out, version=__version__)
