"""Accuracy of the embedded VLM on held-out scenes, with all visual tokens or a random fraction of them
(``tokensieve train vlm-eval``).

Per test scene: one question of each type (:func:`tokensieve.data.scenes.questions`). The image's visual tokens are
computed once; for a keep fraction ``f`` a random ``round(f · 256)`` of them (drawn from a generator seeded by the
scene and the fraction) stay, in their original order, and the others are *removed* from the language model's input,
whose positions then run on without gaps. The system prompt, image and question are one prefix pass; the questions of
a scene share it through the KV cache. An answer is right when, fed the prompt, the model's greedy next token is
each token of the answer in turn and then ``<|im_end|>`` (teacher forcing: the same as greedy decoding stopping at
``<|im_end|>`` with exactly the answer).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.vlm import spec_of
from ..data.scenes import QUESTION_TYPES, Question, Scene, questions, scenes
from .batches import Encoder, pixel_values


@dataclass
class Accuracy:
    right: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, qtype: str, ok: bool) -> None:
        self.right[qtype] += int(ok)
        self.total[qtype] += 1

    def overall(self) -> float:
        n = sum(self.total.values())
        return sum(self.right.values()) / n if n else float("nan")

    def per_type(self) -> dict[str, float]:
        return {t: self.right[t] / self.total[t] for t in QUESTION_TYPES if self.total[t]}

    def count(self) -> int:
        return sum(self.total.values())


def keep_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a random ``round(fraction · n)`` of ``n`` tokens (at least one)."""
    if fraction >= 1.0:
        return torch.arange(n)
    k = max(1, round(fraction * n))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


@torch.no_grad()
def answer_scene(
    model: Any, encoder: Encoder, visual: torch.Tensor, qs: list[Question], keep: torch.Tensor
) -> list[tuple[Question, bool, str]]:
    """(question, right?, the model's greedy answer under teacher forcing) for the questions of one scene."""
    from transformers import DynamicCache

    lm = model.model.language_model
    emb = lm.embed_tokens
    head = torch.tensor(encoder.head)
    prefix = torch.cat([emb(head), visual[keep]], 0).unsqueeze(0)
    cache = DynamicCache(config=model.config.text_config)
    lm(inputs_embeds=prefix, past_key_values=cache, use_cache=True)
    p = prefix.shape[1]
    seqs, spans = [], []
    for q in qs:
        qi = encoder.question(q.text, first=True)
        ans = [*encoder.cached(q.answer), *encoder.im_end]
        seqs.append(qi + ans)
        spans.append((len(qi) - 1, ans))
    n = max(len(s) for s in seqs)
    pad = encoder.tok.pad_token_id
    ids = torch.full((len(qs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(qs), p + n), dtype=torch.long)
    mask[:, :p] = 1
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, p : p + len(s)] = 1
    cache.batch_repeat_interleave(len(qs))
    pos = torch.arange(p, p + n).unsqueeze(0).expand(len(qs), n)
    hidden = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    logits = model.lm_head(hidden.last_hidden_state)
    out = []
    for i, (q, (start, ans)) in enumerate(zip(qs, spans)):
        pred = logits[i, start : start + len(ans)].argmax(-1).tolist()
        ok = pred == ans
        out.append((q, ok, encoder.tok.decode(pred[: len(ans) - 1])))
    return out


@torch.no_grad()
def image_tokens(model: Any, processor: Any, scenes_: list[Scene]) -> torch.Tensor:
    """(n, visual tokens, hidden) projected visual tokens of some scenes, exactly as the model computes them."""
    pv = pixel_values(processor, [s.render() for s in scenes_])
    feats = model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
    return torch.stack(list(feats))


@torch.no_grad()
def evaluate(
    model: Any,
    processor: Any,
    *,
    n_scenes: int = 100,
    fractions: tuple[float, ...] = (1.0, 0.33, 0.11),
    split: str = "test",
    seed: int = 0,
    progress: bool = True,
    batch: int = 8,
) -> dict[float, Accuracy]:
    from tqdm import tqdm

    model.eval()
    spec = spec_of(model.config)
    encoder = Encoder(processor.tokenizer, spec.num_visual_tokens)
    results = {f: Accuracy() for f in fractions}
    todo = scenes(split, n_scenes)
    bar = tqdm(total=n_scenes * len(fractions), desc=f"eval {split}", disable=not progress, dynamic_ncols=True)
    for b in range(0, n_scenes, batch):
        chunk = todo[b : b + batch]
        vis = image_tokens(model, processor, chunk)
        for j, scene in enumerate(chunk):
            qs = questions(scene)
            for f in fractions:
                keep = keep_indices(spec.num_visual_tokens, f, seed * 1_000_003 + scene.seed * 101 + round(f * 1000))
                for q, ok, _ in answer_scene(model, encoder, vis[j], qs, keep):
                    results[f].add(q.type, ok)
                bar.update(1)
    bar.close()
    return results


def markdown_table(results: dict[float, Accuracy]) -> str:
    fr = sorted(results, reverse=True)
    head = "| visual tokens kept | overall | " + " | ".join(QUESTION_TYPES) + " | questions |"
    lines = [head, "|" + "---|" * (len(QUESTION_TYPES) + 3)]
    for f in fr:
        a = results[f]
        per = a.per_type()
        cells = [f"{100 * per[t]:.1f} %" if t in per else "—" for t in QUESTION_TYPES]
        label = "all (256)" if f >= 1 else f"{100 * f:.0f} % random ({max(1, round(f * 256))})"
        lines.append(f"| {label} | **{100 * a.overall():.1f} %** | " + " | ".join(cells) + f" | {a.count()} |")
    return "\n".join(lines)
