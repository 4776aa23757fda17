"""CompressKV's two calibrations: semantic retrieval heads per layer, and per-layer eviction error.

1. **Semantic retrieval heads (SRH).** Needle-in-a-haystack (passkey) prompts are answered greedily with the full
   cache. At every decode step whose generated token is one of the answer's tokens, the attention of that step's
   query on the *whole* answer span in the context (every occurrence) is added to its (layer, query head). Only
   successful trials count (more than half of the answer recovered, the paper's ROUGE-1 recall > 50 %). Heads
   are ranked per layer.
2. **Layer error.** On natural text (the standard-library docstring corpus) and on passkey prompts, each decode
   step's attention output with the full cache is compared with the output over only the tokens CompressKV would
   keep at a budget of ``probe_budget`` (32) entries: ``‖o_sel − o_full‖_F / ‖o_full‖_F``, averaged over steps and
   samples, then L1-normalised over layers. Layers that lose more get larger budgets.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..adapters.models import model_shape
from ..adapters.profiles import Profile, shape_dict
from ..cache.storage import DenseKV, KVStore
from ..core.context import LayerContext, ModelShape, grouped_logits
from ..data.prompts import encode
from ..data.tasks import get_task
from ..data.text import calibration_text, python_version
from ..errors import ConfigError, TokensieveError
from ..scorers.attention import window_scores
from .probe import Probe

KIND = "compresskv"


class CalibrationError(TokensieveError):
    """A calibration could not produce a profile (the message says what failed and what to try)."""


def _spans(ids: list[int], answer: list[int]) -> list[int]:
    """Positions of every occurrence of the answer's token sequence in ``ids``."""
    out: list[int] = []
    n = len(answer)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == answer:
            out.extend(range(i, i + n))
    return out


def _dense_keys(store: KVStore) -> tuple[Tensor, Tensor]:
    if not isinstance(store, DenseKV):  # profiles are made with the full cache
        raise RuntimeError("profiling expects the full (dense) cache")
    return store.keys, store.values


def semantic_retrieval_heads(
    model: Any, tok: Any, shape: ModelShape, lengths: list[int], samples: int, seed: int, bar: Any = None
) -> tuple[Tensor, int]:
    """Accumulated answer-span attention per (layer, query head) ``(L, H_q)`` and the number of successful trials."""
    from ..engine import Compressor

    task = get_task("passkey")
    rng = random.Random(seed)
    total = torch.zeros(shape.num_layers, shape.num_q_heads, dtype=torch.float64)
    successes = 0
    press = Compressor(model, "full")
    for length in lengths:
        for s in range(samples):
            sample = task.make(tok, length, rng.random(), seed * 1000 + s)
            ids = sample.ids(tok).full
            answer = encode(tok, sample.answers[0])
            span = _spans(ids, answer)
            if not span:
                continue
            span_t = torch.tensor(span)
            step = torch.zeros(shape.num_layers, shape.num_q_heads, dtype=torch.float64)
            trial = torch.zeros_like(step)

            def observe(layer: int, q: Tensor, store: KVStore, step: Tensor = step, span_t: Tensor = span_t) -> None:
                k, _ = _dense_keys(store)
                probs = torch.softmax(grouped_logits(q[:1], k[:1], shape.head_dim**-0.5), -1)[0, :, -1]  # (H_q, n)
                step[layer] = probs[:, span_t].sum(-1).double()

            def on_token(
                row: int, token: int, step: Tensor = step, trial: Tensor = trial, answer: list[int] = answer
            ) -> None:
                if token in answer:
                    trial.add_(step)

            ctx = press.prefill(torch.tensor([ids]))
            ctx.cache.observers.append(observe)
            gen = press.decode(ctx, len(answer) + 8, eos_token_ids=[tok.eos_token_id], on_token=on_token)
            out = tok.decode(gen.tokens[0])
            recall = sum(1 for ch in set(sample.answers[0]) if ch in out) / len(set(sample.answers[0]))
            if recall > 0.5:
                total += trial
                successes += 1
            if bar is not None:
                bar.update(1)
    return total, successes


def layer_errors(
    model: Any,
    tok: Any,
    shape: ModelShape,
    srh: list[list[int]],
    texts: list[list[int]],
    steps: int,
    probe_budget: int,
    window: int,
    kernel: int,
    bar: Any = None,
) -> Tensor:
    """Mean relative attention-output error per layer ``(L,)`` when keeping only CompressKV's tokens."""
    from ..engine import Compressor

    errors = torch.zeros(shape.num_layers, dtype=torch.float64)
    counts = torch.zeros(shape.num_layers, dtype=torch.float64)
    G = shape.group
    for ids in texts:
        prompt, cont = ids[:-steps], ids[-steps:]
        kept: dict[int, Tensor] = {}

        def on_layer(ctx: LayerContext, kept: dict[int, Tensor] = kept) -> None:
            s = window_scores(ctx, window, kernel)[0, srh[ctx.layer_idx]].mean(0)  # (T,)
            T = s.shape[0]
            s[T - window :] = float("inf")
            kept[ctx.layer_idx] = s.topk(min(probe_budget, T)).indices.sort().values

        def observe(
            layer: int, q: Tensor, store: KVStore, kept: dict[int, Tensor] = kept, n0: int = len(prompt)
        ) -> None:
            k, v = _dense_keys(store)
            idx = torch.cat([kept[layer], torch.arange(n0, k.shape[2])])
            scale = shape.head_dim**-0.5
            qg = q[:1].reshape(1, shape.num_kv_heads, G, q.shape[-1])  # (1, H_kv, G, D)
            full = torch.nn.functional.scaled_dot_product_attention(qg, k[:1], v[:1], scale=scale)
            sel = torch.nn.functional.scaled_dot_product_attention(qg, k[:1, :, idx], v[:1, :, idx], scale=scale)
            errors[layer] += float((sel - full).norm() / full.norm().clamp_min(1e-12))
            counts[layer] += 1

        press = Compressor(model, Probe(callback=on_layer), 1.0)
        ctx = press.prefill(torch.tensor([prompt]))
        ctx.cache.observers.append(observe)
        for t in cont:  # teacher-forced decode, one token per step
            press.extend(ctx, torch.tensor([[t]]))
        if bar is not None:
            bar.update(1)
    return errors / counts.clamp_min(1)


def profile_compresskv(
    model: Any,
    tok: Any,
    *,
    lengths: list[int],
    samples: int = 8,
    seed: int = 0,
    heads_per_layer: int = 4,
    probe_budget: int = 32,
    window: int = 8,
    kernel: int = 5,
    text_tokens: int = 1024,
    steps: int = 32,
    progress: bool = False,
) -> Profile:
    """CompressKV's profile: passkey trials at each of ``lengths`` (``samples`` each), then layer errors on
    ``samples`` texts and ``samples // 2`` passkey prompts of ``text_tokens`` tokens (``progress``: a bar on stderr,
    one step per prompt)."""
    if not lengths or samples < 1:
        raise ConfigError("CompressKV's calibration needs at least one length and one sample.")
    if text_tokens <= steps + probe_budget:
        raise ConfigError(
            f"CompressKV's calibration texts of {text_tokens} tokens are too short: they need more than "
            f"{steps + probe_budget} tokens ({steps} teacher-forced steps after a prompt longer than the probe budget "
            f"of {probe_budget})."
        )
    shape = model_shape(model)
    n_texts = samples + max(1, samples // 2)
    bar = tqdm(total=len(lengths) * samples + n_texts, desc=KIND, unit="prompt", file=sys.stderr,
               disable=not progress)  # fmt: skip
    try:
        return _profile_compresskv(model, tok, shape, lengths, samples, seed, heads_per_layer, probe_budget, window,
                                   kernel, text_tokens, steps, bar)  # fmt: skip
    finally:
        bar.close()


def _profile_compresskv(
    model: Any,
    tok: Any,
    shape: ModelShape,
    lengths: list[int],
    samples: int,
    seed: int,
    heads_per_layer: int,
    probe_budget: int,
    window: int,
    kernel: int,
    text_tokens: int,
    steps: int,
    bar: Any,
) -> Profile:
    srh_scores, successes = semantic_retrieval_heads(model, tok, shape, lengths, samples, seed, bar)
    if successes == 0:
        raise CalibrationError(
            f"CompressKV's calibration failed: the model retrieved the passkey in none of its {len(lengths) * samples} "
            f"trials (lengths {', '.join(map(str, lengths))}; {samples} samples each; a trial counts when more than "
            "half of the passkey is answered), so there are no semantic retrieval heads to rank. Try shorter lengths "
            "(--lengths 256,512) or more samples (--samples), or use a method that needs no profile (snapkv, adakv)."
        )
    n_srh = min(heads_per_layer, shape.num_q_heads)
    srh = srh_scores.argsort(dim=-1, descending=True)[:, :n_srh].tolist()
    # Layer error on natural text and on passkey prompts.
    corpus = encode(tok, calibration_text())
    texts = [corpus[i * text_tokens : (i + 1) * text_tokens] for i in range(samples)]
    task = get_task("passkey")
    for s in range(max(1, samples // 2)):
        texts.append(task.make(tok, text_tokens, (s + 0.5) / max(1, samples // 2), seed + s).ids(tok).full)
    err = layer_errors(model, tok, shape, srh, texts, steps, probe_budget, window, kernel, bar)
    layer_score = err / err.sum()
    data = {
        "srh": srh,
        "srh_scores": [[round(float(x), 6) for x in row] for row in srh_scores.tolist()],
        "layer_error": [round(float(x), 6) for x in err.tolist()],
        "layer_score": [round(float(x), 6) for x in layer_score.tolist()],
        "successful_trials": successes,
    }
    settings = {
        "lengths": list(lengths),
        "samples": samples,
        "seed": seed,
        "heads_per_layer": n_srh,
        "probe_budget": probe_budget,
        "window": window,
        "kernel": kernel,
        "text_tokens": text_tokens,
        "steps": steps,
        "corpus": f"Python {python_version()} standard-library docstrings + passkey prompts",
    }
    from .. import __version__

    return Profile(KIND, shape.key, shape_dict(shape), settings, data, version=__version__)
