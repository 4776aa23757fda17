"""Training and evaluation inputs made from procedural scenes: token sequences with answer positions, pixel values
and the dense per-patch targets of the vision tower's auxiliary heads."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters.vlm import IMAGE_TOKEN, SYSTEM_PROMPT
from ..data.scenes import COLORS, MAX_OBJECTS, QUESTION_TYPES, SHAPES, SIZES, WORD_LABEL, WORDS, Question, Scene

COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}  # 0 = no object
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
SIZE_IDS = {s: i + 1 for i, s in enumerate(SIZES)}
WORD_IDS = {w: i + 1 for i, w in enumerate(WORDS)}  # 0 = no word

# (name, number of classes) of the dense heads (one target per patch) and of the CLS heads (one per image)
PATCH_HEADS = (
    ("color", len(COLORS) + 1),
    ("shape", len(SHAPES) + 1),
    ("size", len(SIZES) + 1),
    ("word", len(WORDS) + 1),
    ("centre", 2),
)
COUNT_CLASSES = MAX_OBJECTS + 1
CLS_HEADS = tuple(
    [(f"n_{c}", COUNT_CLASSES) for c in COLORS]
    + [(f"n_{s}", COUNT_CLASSES) for s in SHAPES]
    + [(f"n_{z}", COUNT_CLASSES) for z in SIZES]
    + [("n_all", COUNT_CLASSES), ("word", len(WORDS) + 1)]
)


def patch_targets(scene: Scene, grid: int) -> dict[str, np.ndarray]:
    """Per patch (grid × grid, row-major): the attributes of the object covering most of it (≥ 1/8 of its pixels),
    the word when ≥ 3 of its pixels are ink, and whether an object's centre falls in it."""
    lab = scene.label_map()
    p = lab.shape[0] // grid
    blocks = lab.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, p * p)
    out = {name: np.zeros(grid * grid, dtype=np.int64) for name, _ in PATCH_HEADS}
    n_obj = len(scene.objects)
    counts = np.stack([(blocks == i + 1).sum(1) for i in range(n_obj)], 1) if n_obj else np.zeros((grid * grid, 0))
    if n_obj:
        best = counts.argmax(1)
        has = counts.max(1) >= (p * p) // 8
        for k in np.nonzero(has)[0]:
            o = scene.objects[int(best[k])]
            out["color"][k], out["shape"][k], out["size"][k] = COLOR_IDS[o.color], SHAPE_IDS[o.shape], SIZE_IDS[o.size]
    ink = (blocks == WORD_LABEL).sum(1) >= 3
    out["word"][ink] = WORD_IDS[scene.word]
    for o in scene.objects:
        out["centre"][(o.y // p) * grid + o.x // p] = 1
    return out


def cls_targets(scene: Scene) -> dict[str, int]:
    t = {f"n_{c}": sum(o.color == c for o in scene.objects) for c in COLORS}
    t.update({f"n_{s}": sum(o.shape == s for o in scene.objects) for s in SHAPES})
    t.update({f"n_{z}": sum(o.size == z for o in scene.objects) for z in SIZES})
    t["n_all"] = len(scene.objects)
    t["word"] = WORD_IDS[scene.word]
    return t


def pixel_values(processor: Any, images: list[Any]) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def vision_batch(processor: Any, scenes: list[Scene], grid: int) -> dict[str, torch.Tensor]:
    """Pixel values and the auxiliary heads' targets of some scenes."""
    batch: dict[str, torch.Tensor] = {"pixel_values": pixel_values(processor, [s.render() for s in scenes])}
    pts = [patch_targets(s, grid) for s in scenes]
    for name, _ in PATCH_HEADS:
        batch[f"patch_{name}"] = torch.from_numpy(np.stack([p[name] for p in pts]))
    cts = [cls_targets(s) for s in scenes]
    for name, _ in CLS_HEADS:
        batch[f"cls_{name}"] = torch.tensor([c[name] for c in cts])
    return batch


@dataclass
class Encoded:
    ids: list[int]
    targets: list[int]  # -100 where no loss; the next-token target at answer positions otherwise
    qtypes: list[str]  # per answer position with a target, its question's type
    # packed questions (Encoder.packed): per token its branch (0 = the shared prefix, i = question i) and position
    branch: list[int] | None = None
    positions: list[int] | None = None


class Encoder:
    """Token ids of conversations about one image, with the positions whose next token is an answer token.

    Segments are tokenized separately and concatenated; a unit test checks this equals tokenizing the whole prompt.
    """

    def __init__(self, tokenizer: Any, num_visual_tokens: int) -> None:
        self.tok = tokenizer
        self.image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.n_visual = num_visual_tokens
        self.head = self._ids(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
        self.im_end = self._ids("<|im_end|>")
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def cached(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self._ids(text)
        return self._cache[text]

    def prefix(self) -> list[int]:
        """System prompt, user header and the image's tokens: what every question about an image shares."""
        return self.head + [self.image_id] * self.n_visual

    def question(self, q: str, first: bool) -> list[int]:
        lead = "\n" if first else "<|im_start|>user\n"
        return self.cached(f"{lead}{q}<|im_end|>\n<|im_start|>assistant\n")

    def conversation(self, qs: list[Question]) -> Encoded:
        ids = self.prefix()
        targets = [-100] * len(ids)
        qtypes: list[str] = []
        for i, q in enumerate(qs):
            if i > 0:
                ids += self.cached("\n")
                targets += [-100]
            part = self.question(q.text, first=i == 0)
            ids += part
            targets += [-100] * len(part)
            ans = [*self.cached(q.answer), *self.im_end]
            # position t predicts token t + 1: the last question token predicts the first answer token
            targets[-1] = ans[0]
            for j, a in enumerate(ans):
                ids.append(a)
                targets.append(ans[j + 1] if j + 1 < len(ans) else -100)
            qtypes += [q.type] * len(ans)
        return Encoded(ids, targets, qtypes)

    def packed(self, qs: list[Question]) -> Encoded:
        """The image prefix once, then every question as its own branch: each question (and its answer) attends to
        the prefix and to itself only, at the positions it would have alone after the prefix. One pass over the
        visual tokens then teaches every answer exactly as it is asked at evaluation (one question per prompt), with
        no question seeing another's answer. :func:`collate` turns the branches into a 4-D attention mask."""
        ids = self.prefix()
        p = len(ids)
        targets = [-100] * p
        branch = [0] * p
        positions = list(range(p))
        qtypes: list[str] = []
        for i, q in enumerate(qs, start=1):
            part = self.question(q.text, first=True)
            ans = [*self.cached(q.answer), *self.im_end]
            seq = part + ans
            tgt = [-100] * len(seq)
            for j in range(len(ans)):  # position t predicts token t + 1
                tgt[len(part) - 1 + j] = ans[j]
            ids += seq
            targets += tgt
            branch += [i] * len(seq)
            positions += list(range(p, p + len(seq)))
            qtypes += [q.type] * len(ans)
        return Encoded(ids, targets, qtypes, branch, positions)


def training_questions(scene: Scene, counting: Question | None, rng: random.Random, n: int) -> list[Question]:
    """``n`` distinct questions about a training scene: its balanced counting question (when given), the count of
    all objects, then attribute, existence, spatial and reading questions drawn uniformly (resampled where the scene
    allows none). The counting questions come only from the balanced draw, whose answers the words do not tell."""
    from ..data.scenes import ask

    out: list[Question] = []
    seen: set[str] = set()

    def add(q: Question | None) -> None:
        if q is not None and q.text not in seen and len(out) < n:
            seen.add(q.text)
            out.append(q)

    add(counting)
    add(Question("counting", "How many objects are there?", str(len(scene.objects))))
    tries = 0
    while len(out) < n and tries < n * 6:
        tries += 1
        add(ask(scene, rng.choice(("attribute", "existence", "spatial", "reading")), rng))
    return out


def sample_questions(scene: Scene, rng: random.Random, turns: int) -> list[Question]:
    """``turns`` questions about a scene, types drawn uniformly (resampled where a scene allows none)."""
    from ..data.scenes import ask

    out: list[Question] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < turns and tries < turns * 6:
        tries += 1
        q = ask(scene, rng.choice(QUESTION_TYPES), rng)
        if q is not None and q.text not in seen:
            seen.add(q.text)
            out.append(q)
    return out


def collate(encoded: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, targets and attention mask. Packed conversations (:meth:`Encoder.packed`) get a 4-D additive
    mask — token i sees token j ≤ i of the prefix or of its own branch — and their position ids; a padding row sees
    only the first token (its output is never used, and a row with nothing to see would be NaN)."""
    n = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    targets = torch.full((len(encoded), n), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        targets[i, : len(e.targets)] = torch.tensor(e.targets)
        mask[i, : len(e.ids)] = 1
    out = {"input_ids": ids, "targets": targets, "attention_mask": mask}
    if any(e.branch is not None for e in encoded):
        if not all(e.branch is not None and e.positions is not None for e in encoded):
            raise ValueError("collate: packed and plain conversations cannot share a batch")
        branch = torch.full((len(encoded), n), -1, dtype=torch.long)
        pos = torch.zeros((len(encoded), n), dtype=torch.long)
        for i, e in enumerate(encoded):
            assert e.branch is not None
            assert e.positions is not None
            branch[i, : len(e.branch)] = torch.tensor(e.branch)
            pos[i, : len(e.positions)] = torch.tensor(e.positions)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        bq, bk = branch.unsqueeze(2), branch.unsqueeze(1)
        allowed = causal & (bk >= 0) & ((bk == 0) | (bk == bq))
        allowed[:, :, 0] |= branch < 0  # padding rows
        additive = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        out["attention_mask"] = additive.unsqueeze(1)
        out["position_ids"] = pos
    return out
