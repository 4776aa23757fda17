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
    swap_images: bool = False,
) -> dict[float, Accuracy]:
    """Accuracy per keep fraction. ``swap_images``: the image-swap control — each scene's questions are asked with
    the next scene's image (the last scene's with the first's), so a model that reads its images can only answer as
    well as the questions' words allow."""
    from tqdm import tqdm

    model.eval()
    spec = spec_of(model.config)
    encoder = Encoder(processor.tokenizer, spec.num_visual_tokens)
    results = {f: Accuracy() for f in fractions}
    todo = scenes(split, n_scenes)
    desc = f"eval {split}" + (" (images swapped)" if swap_images else "")
    bar = tqdm(total=n_scenes * len(fractions), desc=desc, disable=not progress, dynamic_ncols=True)
    for b in range(0, n_scenes, batch):
        chunk = todo[b : b + batch]
        shown = [todo[(b + j + 1) % n_scenes] for j in range(len(chunk))] if swap_images else chunk
        vis = image_tokens(model, processor, shown)
        for j, scene in enumerate(chunk):
            qs = questions(scene)
            for f in fractions:
                keep = keep_indices(spec.num_visual_tokens, f, seed * 1_000_003 + scene.seed * 101 + round(f * 1000))
                for q, ok, _ in answer_scene(model, encoder, vis[j], qs, keep):
                    results[f].add(q.type, ok)
                bar.update(1)
    bar.close()
    return results


def question_template(text: str) -> str:
    """A question with its object words (colours, shapes, sizes) replaced by slots: what a prior may condition on
    besides the exact words."""
    from ..data.scenes import COLORS, SHAPES, SIZES

    names = {*COLORS, *SHAPES, *SIZES, *(f"{h}s" for h in SHAPES)}
    return " ".join("_" if w.strip("?") in names else w for w in text.split())


def answer_prior(n_scenes: int = 2000, split: str = "val") -> tuple[dict[str, str], dict[str, str]]:
    """The best image-blind answers: per exact question text and per template (:func:`question_template`), the most
    frequent answer over the questions of ``n_scenes`` scenes of ``split`` (ties: the first seen)."""
    from collections import Counter

    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    by_template: dict[str, Counter[str]] = defaultdict(Counter)
    for scene in scenes(split, n_scenes):
        for q in questions(scene):
            by_text[q.text][q.answer] += 1
            by_template[question_template(q.text)][q.answer] += 1
    return (
        {t: c.most_common(1)[0][0] for t, c in by_text.items()},
        {t: c.most_common(1)[0][0] for t, c in by_template.items()},
    )


def prior_accuracy(n_scenes: int = 100, split: str = "test", prior_scenes: int = 2000) -> Accuracy:
    """Accuracy of answering every question of the evaluation without its image: the most frequent answer to the same
    words among the validation scenes' questions (to its template when those words never occur there)."""
    by_text, by_template = answer_prior(prior_scenes, "val" if split == "test" else "train")
    acc = Accuracy()
    for scene in scenes(split, n_scenes):
        for q in questions(scene):
            guess = by_text.get(q.text, by_template.get(question_template(q.text)))
            acc.add(q.type, guess == q.answer)
    return acc


def as_json(a: Accuracy) -> dict[str, Any]:
    """Machine-readable accuracy: overall, per type, counts and Wilson 95 % intervals."""
    from ..results.stats import wilson

    n, k = a.count(), sum(a.right.values())
    return {
        "overall": a.overall(),
        "per_type": a.per_type(),
        "questions": n,
        "right": k,
        "interval": list(wilson(k, n)),
        "per_type_interval": {t: list(wilson(a.right[t], a.total[t])) for t in QUESTION_TYPES if a.total[t]},
        "per_type_questions": {t: a.total[t] for t in QUESTION_TYPES if a.total[t]},
    }


def control_table(rows: dict[str, Accuracy]) -> str:
    """Markdown: accuracy per question type with Wilson 95 % intervals, one row per condition (the model, the
    image-blind prior, the image-swap control)."""
    from ..results.stats import wilson

    head = "| condition | overall (95 % CI) | " + " | ".join(QUESTION_TYPES) + " | questions |"
    lines = [head, "|" + "---|" * (len(QUESTION_TYPES) + 3)]
    for label, a in rows.items():
        n, k = a.count(), sum(a.right.values())
        lo, hi = wilson(k, n)
        cells = []
        for t in QUESTION_TYPES:
            if a.total[t]:
                tl, th = wilson(a.right[t], a.total[t])
                cells.append(f"{100 * a.right[t] / a.total[t]:.1f} ({100 * tl:.0f}–{100 * th:.0f})")
            else:
                cells.append("—")
        lines.append(
            f"| {label} | **{100 * k / max(n, 1):.1f} %** ({100 * lo:.1f}–{100 * hi:.1f}) | "
            + " | ".join(cells)
            + f" | {n} |"
        )
    return "\n".join(lines)


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


# ------------------------------------------------------------------------------------- visual-token methods
def visual_specs(methods: str, budgets: str) -> list[str]:
    """The visual specs to evaluate (``full`` first): every method of ``methods`` (comma-separated; ``all`` = every
    registered visual method) at every budget of ``budgets``; a method given with its budget keeps it. Parsed now,
    so a typo fails before any work."""
    from ..errors import ConfigError
    from ..spec import VisualPlan
    from ..spec import split_specs as split_list

    items = split_list(methods)
    if items == ["all"]:
        from ..registry import method_names

        kv = set(method_names())  # a visual method named like a KV method is written vis:name
        items = [f"vis:{n}" if n in kv else n for n in method_names("visual")]
    bs = [b.strip() for b in budgets.split(",") if b.strip()]
    out = ["full"]
    for item in items:
        body = item[4:] if item.lower().startswith("vis:") else item
        has_budget = ":" in body.rsplit("]", 1)[-1]
        if not has_budget and not bs:
            raise ConfigError(f"'{item}' gives no budget: write e.g. {item}:0.22 or give --budgets.")
        for text in [item] if has_budget else [f"{item}:{b}" for b in bs]:
            VisualPlan.parse([p for p in text.split("/") if p.strip()])
            if text not in out:
                out.append(text)
    return out


@dataclass
class Answered:
    """One question of a scene answered under one visual spec (:func:`answer_questions`).

    Token counts are per prompt, as if it were prefilled alone: ``prompt_tokens`` at the language model's input
    before any pruning; ``image_tokens`` the image's visual tokens there; ``visual_tokens`` the visual tokens at each
    stage that ran (``vision``, ``projector``: after that stage; ``llm_input``: at the first decoder layer;
    ``llm:K``: after the pruning at decoder layer K; ``llm``: after the last one); ``kv_bytes`` / ``stored_entries``
    what the prefill left in the cache (keys and values of every layer; entries = tokens × KV heads, summed over
    layers) and ``full_kv_bytes`` / ``full_entries`` the same without pruning."""

    question: Question
    right: bool
    output: str  # the greedy answer's text, up to <|im_end|>
    tokens: int  # greedy tokens generated up to and with <|im_end|> (or the limit)
    prompt_tokens: int
    image_tokens: int
    visual_tokens: dict[str, int]
    kv_bytes: int
    stored_entries: int
    full_kv_bytes: int
    full_entries: int

    @property
    def kept_tokens(self) -> int:
        """Visual tokens that reach the language model's last decoder layer."""
        return self.visual_tokens.get("llm", self.visual_tokens.get("llm_input", self.image_tokens))


def scene_batch(encoder: Encoder, processor: Any, scene: Scene, qs: list[Question]) -> dict[str, torch.Tensor]:
    """The prompts of ``qs`` about ``scene`` (system prompt, image, question) as one left-padded batch."""
    rows = [encoder.prefix() + encoder.question(q.text, first=True) for q in qs]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    pv = pixel_values(processor, [scene.render()] * len(rows))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


@torch.no_grad()
def answer_questions(
    adapter: Any, encoder: Encoder, inputs: dict[str, torch.Tensor], qs: list[Question], spec: str, seed: int,
    image_token_id: int,
) -> list[Answered]:  # fmt: skip
    """Answer the questions of one :func:`scene_batch` under a visual spec (``"full"``: no pruning): prefill with
    the spec's methods (random ones draw from ``seed``), greedy decoding; right when the answer's tokens and then
    ``<|im_end|>`` come out exactly."""
    end = encoder.im_end[0]
    answers = [[*encoder.cached(q.answer), end] for q in qs]
    state = adapter.prefill(inputs, None if spec == "full" else spec, seeds=[seed] * len(qs))
    kv = _kv_per_sample(state, inputs["attention_mask"])
    out = adapter.generate(state, max(len(a) for a in answers), eos_token_id=end)
    valid = inputs["attention_mask"].bool()
    done = []
    for i, (q, a) in enumerate(zip(qs, answers)):
        got = out[i].tolist()
        n = got.index(end) + 1 if end in got else len(got)
        n_image = int((inputs["input_ids"][i][valid[i]] == image_token_id).sum())
        done.append(
            Answered(
                question=q,
                right=got[: len(a)] == a,
                output=encoder.tok.decode(got[: n - 1] if end in got else got, skip_special_tokens=True),
                tokens=n,
                prompt_tokens=int(valid[i].sum()),
                image_tokens=n_image,
                visual_tokens={k: int(v[i]) for k, v in state.visual_tokens.items()},
                **kv[i],
            )
        )
    return done


def _kv_per_sample(state: Any, mask: torch.Tensor) -> list[dict[str, int]]:
    """Per sample of a prefilled batch: the bytes and entries of keys and values its prompt left in each layer's cache
    (without the batch's left padding: what a prefill of that prompt alone stores), and the same unpruned."""
    per_layer = []  # (bytes per token, KV heads) of each layer
    for k, v in ((s.keys, s.values) for s in state.cache.stores()):
        per_layer.append(((k.shape[1] * k.shape[3] * k.element_size() + v.shape[1] * v.shape[3] * v.element_size()),
                          int(k.shape[1])))  # fmt: skip
    out = []
    for b in range(int(mask.shape[0])):
        n_full = int(mask[b].sum())
        row = {"kv_bytes": 0, "stored_entries": 0, "full_kv_bytes": 0, "full_entries": 0}
        for seg in state.segments:
            n = int(seg.valid[b].sum())
            for layer in range(seg.start, seg.end):
                nbytes, heads = per_layer[layer]
                row["kv_bytes"] += n * nbytes
                row["stored_entries"] += n * heads
        for nbytes, heads in per_layer:
            row["full_kv_bytes"] += n_full * nbytes
            row["full_entries"] += n_full * heads
        out.append(row)
    return out


@torch.no_grad()
def evaluate_specs(
    model: Any,
    processor: Any,
    specs: list[str],
    *,
    n_scenes: int = 100,
    split: str = "test",
    progress: bool = True,
) -> dict[str, Accuracy]:
    """Accuracy of the VLM under each visual spec (``"full"``: no pruning) on held-out scenes, one question of each
    type per scene, through the visual-token pruning adapters (:mod:`tokensieve.adapters.vision`: every stage, the
    question in the prompt, so query-aware methods see it). The five questions of a scene are one left-padded batch
    (batched = one at a time is tested for every method). An answer is right when greedy decoding gives exactly its
    tokens and then ``<|im_end|>``; the random methods draw from the scene's seed. (:mod:`.vlm_store` writes the
    same measurements, one row per question, to a results store.)"""
    from tqdm import tqdm

    from ..adapters.vision import vision_adapter

    model.eval()
    spec = spec_of(model.config)
    encoder = Encoder(processor.tokenizer, spec.num_visual_tokens)
    adapter = vision_adapter(model)
    results = {s: Accuracy() for s in specs}
    bar = tqdm(total=n_scenes * len(specs), desc=f"vlm eval {split}", disable=not progress, dynamic_ncols=True)
    for scene in scenes(split, n_scenes):
        qs = questions(scene)
        inputs = scene_batch(encoder, processor, scene, qs)
        for s in specs:
            for a in answer_questions(adapter, encoder, inputs, qs, s, scene.seed, model.config.image_token_id):
                results[s].add(a.question.type, a.right)
            bar.update(1)
    bar.close()
    return results


def spec_table(results: dict[str, Accuracy], retained: dict[str, int] | None = None) -> str:
    """Markdown: accuracy per question type and overall with Wilson 95 % intervals, one row per spec."""
    from ..results.stats import wilson

    head = "| visual spec | overall (95 % CI) | " + " | ".join(QUESTION_TYPES) + " | questions |"
    lines = [head, "|" + "---|" * (len(QUESTION_TYPES) + 3)]
    for label, a in results.items():
        n = a.count()
        k = sum(a.right.values())
        lo, hi = wilson(k, n)
        cells = []
        for t in QUESTION_TYPES:
            if a.total[t]:
                tl, th = wilson(a.right[t], a.total[t])
                cells.append(f"{100 * a.right[t] / a.total[t]:.0f} ({100 * tl:.0f}–{100 * th:.0f})")
            else:
                cells.append("—")
        lines.append(
            f"| {label} | **{100 * k / max(n, 1):.1f} %** ({100 * lo:.1f}–{100 * hi:.1f}) | "
            + " | ".join(cells)
            + f" | {n} |"
        )
    return "\n".join(lines)
