"""Procedural scenes: deterministic, disjoint splits, questions whose answers follow from the scene's description."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest

from tokensieve.data import scenes as S


def test_scenes_are_deterministic_from_their_seed():
    a, b = S.make_scene(12345), S.make_scene(12345)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert S.questions(a, 2) == S.questions(b, 2)
    assert S.make_scene(12346) != a


def test_splits_are_disjoint_ranges_and_hold_different_scenes():
    ranges = sorted(S.SPLITS.values())
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi <= lo
    seen: dict[str, str] = {}
    for split in S.SPLITS:
        for i in range(200):
            seed = S.split_seed(split, i)
            assert S.split_of(seed) == split
            key = S.make_scene(seed).describe()
            assert seen.setdefault(key, split) == split, f"scene of {split} #{i} also in {seen[key]}"
    with pytest.raises(ValueError, match="outside split"):
        S.split_seed("val", S.SPLITS["val"][1] - S.SPLITS["val"][0])


def test_scenes_have_the_promised_content():
    scenes = S.scenes("train", 300)
    counts = [len(s.objects) for s in scenes]
    assert min(counts) >= S.MIN_OBJECTS
    assert max(counts) <= S.MAX_OBJECTS
    assert sum(bool(s.touching) for s in scenes) > 100  # some objects touch
    assert {o.size for s in scenes for o in s.objects} == set(S.SIZES)
    for s in scenes[:50]:
        img = np.asarray(s.render())
        assert img.shape == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
        lab = s.label_map()
        assert (lab == S.WORD_LABEL).sum() > 20  # the word is drawn, in ink
        for i, o in enumerate(s.objects):
            assert lab[o.y, o.x] == i + 1  # every object is drawn where it is said to be, not covered
        for i, j in s.touching:  # touching objects are within a pixel of each other
            a, b = s.objects[i], s.objects[j]
            assert np.hypot(a.x - b.x, a.y - b.y) <= a.r + b.r + 2


def _solve(description: str, question: str) -> str:
    """Answer a question from the scene's plain-text description alone (an independent reading of the words)."""
    objs = []
    word = ""
    for line in description.splitlines():
        m = re.match(r"(\w+) (\w+) (\w+) at \((\d+), (\d+)\)", line)
        if m:
            size, color, shape, x, y = m.groups()
            objs.append({"size": size, "color": color, "shape": shape, "x": int(x), "y": int(y)})
        else:
            word = re.match(r'word "(\w+)"', line).group(1)  # type: ignore[union-attr]

    def match(words: list[str]) -> list[dict]:
        out = []
        for o in objs:
            if all(w in (o["size"], o["color"], o["shape"], "object") for w in words):
                out.append(o)
        return out

    def the(phrase: str) -> dict:
        hits = match(phrase.split())
        assert len(hits) == 1, f"'{phrase}' names {len(hits)} objects"
        return hits[0]

    if m := re.fullmatch(r"What (color|shape|size) is the (.+)\?", question):
        return str(the(m.group(2))[m.group(1)])
    if m := re.fullmatch(r"Is there an? (.+)\?", question):
        return "yes" if match(m.group(1).split()) else "no"
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(len(match([m.group(1)])))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(len(match([m.group(1)])))
    if m := re.fullmatch(r"Where is the (.+) relative to the (.+)\?", question):
        a, b = the(m.group(1)), the(m.group(2))
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        if abs(dx) >= 2 * abs(dy):
            return "left" if dx < 0 else "right"
        assert abs(dy) >= 2 * abs(dx)
        return "above" if dy < 0 else "below"
    if question in ("What word is written in the image?", "What does the text say?"):
        return word
    raise AssertionError(f"unknown question {question!r}")


def test_every_answer_follows_from_the_description():
    seen_types: set[str] = set()
    for s in S.scenes("val", 150):
        for q in S.questions(s, per_type=2):
            assert _solve(s.describe(), q.text) == q.answer, (s.describe(), q)
            assert q.answer in S.answer_words()
            seen_types.add(q.type)
    assert seen_types == set(S.QUESTION_TYPES)


def test_question_types_and_answers_are_varied():
    rng = random.Random(0)
    answers: dict[str, set[str]] = {t: set() for t in S.QUESTION_TYPES}
    for s in S.scenes("train", 300):
        for t in S.QUESTION_TYPES:
            q = S.ask(s, t, rng)
            if q is not None:
                answers[t].add(q.answer)
    assert answers["existence"] == {"yes", "no"}
    assert answers["spatial"] == set(S.SPATIAL)
    assert {"1", "2", "3", "4", "5"} <= answers["counting"]
    assert set(S.COLORS) | set(S.SHAPES) | set(S.SIZES) <= answers["attribute"]
    assert len(answers["reading"]) > 25
    with pytest.raises(ValueError, match="unknown question type"):
        S.ask(S.make_scene(0), "colour", rng)
