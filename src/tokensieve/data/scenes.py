"""Procedural CLEVR-style scenes drawn with Pillow, and questions about them with their answers.

A scene is a 128 × 128 picture of 3–7 flat objects — a shape (circle, square, triangle), a colour (seven), a size
(small or large) and a position; some objects touch another one — and one short English word written somewhere in
black. Everything follows from one integer seed through :class:`random.Random` (the same on every machine), and
the word is drawn with Pillow's built-in scalable font (``ImageFont.load_default(size)``, Aileron Regular, embedded
in Pillow ≥ 10.1 with FreeType), so no system font is read and every machine with the pinned Pillow draws the same
pixels.

Questions come in five types (:data:`QUESTION_TYPES`): *attribute* (colour, shape or size of an object named by
its other attributes), *existence* (yes / no), *counting* (0–7), *spatial* relation of two objects (left, right,
above, below; asked only where one axis clearly dominates) and *reading* the word. Every answer is one or two
tokens of the SmolLM2 vocabulary; an object is only named when the words used name exactly one object.

Splits never share a scene: ``train``, ``val`` and ``test`` draw seeds from disjoint ranges (:data:`SPLITS`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

IMAGE_SIZE = 128

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 80, 225),
    "green": (35, 165, 60),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 190),
    "orange": (245, 135, 25),
    "gray": (115, 115, 115),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (5, 7), "large": (10, 13)}  # radius range, pixels
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "tree", "fish", "book", "rain", "bird", "door", "milk", "gold", "ship", "king",
    "rose", "wolf", "bear", "lion", "boat", "hat", "cup", "key", "pen", "box", "car", "bus", "egg", "sky", "sea",
    "map", "owl", "fox",
)  # fmt: skip
QUESTION_TYPES: tuple[str, ...] = ("attribute", "existence", "counting", "spatial", "reading")
SPATIAL = ("left", "right", "above", "below")
MIN_OBJECTS, MAX_OBJECTS = 3, 7

# Seed ranges of the splits: disjoint, so no scene is shared between them.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "val": (1_000_000_000, 1_001_000_000),
    "test": (2_000_000_000, 2_001_000_000),
}

# Values of a label map (see label_map): 0 background, 1..n objects in scene order, WORD_LABEL the word's pixels.
WORD_LABEL = 255


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int  # centre, pixels from the left
    y: int  # centre, pixels from the top
    r: int  # radius of the object's circumscribed circle, pixels
    rgb: tuple[int, int, int]  # the drawn colour: COLORS[color] with a small jitter

    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    word: str
    word_xy: tuple[int, int]  # top-left corner where the word is drawn
    font_size: int
    background: tuple[int, int, int]
    touching: tuple[tuple[int, int], ...]  # pairs of object indices placed touching each other

    def describe(self) -> str:
        """A plain-text description from which every question's answer follows."""
        lines = [f"{o.words()} at ({o.x}, {o.y})" for o in self.objects]
        lines.append(f'word "{self.word}" at ({self.word_xy[0]}, {self.word_xy[1]})')
        return "\n".join(lines)

    def render(self) -> Any:
        """The scene as an RGB ``PIL.Image`` of IMAGE_SIZE × IMAGE_SIZE pixels."""
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), self.background)
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            if o.shape == "circle":
                draw.ellipse(_box(o), fill=o.rgb)
            else:
                draw.polygon(_outline(o), fill=o.rgb)
        draw.text(self.word_xy, self.word, fill=(10, 10, 10), font=_font(self.font_size))
        return img

    def label_map(self) -> np.ndarray:
        """(IMAGE_SIZE, IMAGE_SIZE) uint8: 0 background, i + 1 where object i is drawn, WORD_LABEL on the word."""
        from PIL import Image, ImageDraw

        img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw = ImageDraw.Draw(img)
        draw.fontmode = "1"  # no anti-aliasing: the word's pixels are exactly WORD_LABEL, never an object's label
        for i, o in enumerate(self.objects):
            if o.shape == "circle":
                draw.ellipse(_box(o), fill=i + 1)
            else:
                draw.polygon(_outline(o), fill=i + 1)
        draw.text(self.word_xy, self.word, fill=WORD_LABEL, font=_font(self.font_size))
        return np.asarray(img, dtype=np.uint8).copy()


@dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str


# ------------------------------------------------------------------------------------------------------ drawing
@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _box(o: SceneObject) -> tuple[int, int, int, int]:
    return (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)


def _outline(o: SceneObject) -> list[tuple[float, float]]:
    if o.shape == "square":
        h = o.r * 0.8
        return [(o.x - h, o.y - h), (o.x + h, o.y - h), (o.x + h, o.y + h), (o.x - h, o.y + h)]
    # an upward triangle inscribed in the circle of radius r (slightly enlarged so that it reads as large)
    rr = o.r * 1.1
    return [(o.x, o.y - rr), (o.x + rr * 0.866, o.y + rr * 0.5), (o.x - rr * 0.866, o.y + rr * 0.5)]


def _word_box(word: str, xy: tuple[int, int], font_size: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = _font(font_size).getbbox(word)
    return (xy[0] + x0, xy[1] + y0, xy[0] + x1, xy[1] + y1)


# ------------------------------------------------------------------------------------------------------ scenes
def split_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of a split."""
    lo, hi = SPLITS[split]
    if not 0 <= index < hi - lo:
        raise ValueError(f"index {index} is outside split {split!r}, which holds {hi - lo} scenes")
    return lo + index


def split_of(seed: int) -> str:
    for name, (lo, hi) in SPLITS.items():
        if lo <= seed < hi:
            return name
    raise ValueError(f"seed {seed} belongs to no split")


# An object's wanted attributes for make_scene(objects=...): (shape, colour, size), each None for "any".
ObjectSpec = tuple[str | None, str | None, str | None]


def make_scene(seed: int, objects: list[ObjectSpec] | None = None) -> Scene:
    """The scene of one seed (deterministic on every machine).

    ``objects`` (training scenes only) asks for exactly these objects instead of 3–7 random ones: one (shape, colour,
    size) per object, each None for "drawn at random". An object that finds no free place after 2,000 attempts is
    left out, so a caller reads what it got from the returned scene, never from its request.
    """
    rng = random.Random(seed)
    font_size = rng.randint(14, 17)
    word = rng.choice(WORDS)
    # the word first, anywhere it fits; objects then avoid it
    wx0, wy0, wx1, wy1 = _font(font_size).getbbox(word)
    xy = (rng.randint(2 - wx0, IMAGE_SIZE - 2 - wx1), rng.randint(2 - wy0, IMAGE_SIZE - 2 - wy1))
    wbox = _word_box(word, xy, font_size)
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS) if objects is None else len(objects)
    placed: list[SceneObject] = []
    touching: list[tuple[int, int]] = []
    attempts = 0
    while len(placed) < n and attempts < 2000:
        attempts += 1
        size = rng.choice(list(SIZES))
        want = objects[len(placed)] if objects is not None else (None, None, None)
        size = want[2] or size
        r = rng.randint(*SIZES[size])
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        shape, color = want[0] or shape, want[1] or color
        touch = bool(placed) and rng.random() < 0.3
        if touch:
            j = rng.randrange(len(placed))
            other = placed[j]
            angle = rng.uniform(0, 2 * np.pi)
            dist = other.r + r + 1
            x, y = round(other.x + dist * np.cos(angle)), round(other.y + dist * np.sin(angle))
        else:
            x, y = rng.randint(r + 2, IMAGE_SIZE - r - 3), rng.randint(r + 2, IMAGE_SIZE - r - 3)
        if not (r + 1 <= x <= IMAGE_SIZE - r - 2 and r + 1 <= y <= IMAGE_SIZE - r - 2):
            continue
        if any(np.hypot(x - o.x, y - o.y) < o.r + r + (0.5 if touch and k == j else 3) for k, o in enumerate(placed)):
            continue
        if x + r + 2 > wbox[0] and x - r - 2 < wbox[2] and y + r + 2 > wbox[1] and y - r - 2 < wbox[3]:
            continue
        base = COLORS[color]
        rgb = tuple(int(np.clip(c + rng.randint(-12, 12), 0, 255)) for c in base)
        if touch:
            touching.append((j, len(placed)))
        placed.append(SceneObject(shape, color, size, x, y, r, (rgb[0], rgb[1], rgb[2])))
    g = rng.randint(190, 225)
    background = (g + rng.randint(-6, 6), g + rng.randint(-6, 6), g + rng.randint(-6, 6))
    return Scene(seed, tuple(placed), word, xy, font_size, background, tuple(touching))


def scenes(split: str, n: int, start: int = 0) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of a split."""
    return [make_scene(split_seed(split, i)) for i in range(start, start + n)]


# --------------------------------------------------------------------------------------------------- questions
def _unique(scene: Scene, **attrs: str) -> SceneObject | None:
    hits = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def _name(scene: Scene, o: SceneObject) -> str | None:
    """The shortest words that name ``o`` alone in the scene: 'red circle' or 'large red circle'."""
    if _unique(scene, color=o.color, shape=o.shape) is o:
        return f"{o.color} {o.shape}"
    if _unique(scene, size=o.size, color=o.color, shape=o.shape) is o:
        return f"{o.size} {o.color} {o.shape}"
    return None


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where ``a`` is relative to ``b`` when one axis clearly dominates (≥ 2× and ≥ 10 px), else None."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= 10:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= 10:
        return "above" if dy < 0 else "below"
    return None


def _attribute(scene: Scene, rng: random.Random) -> Question | None:
    options: dict[str, list[tuple[str, str]]] = {"color": [], "shape": [], "size": []}
    for o in scene.objects:
        if _unique(scene, size=o.size, shape=o.shape) is o:
            options["color"].append((f"What color is the {o.size} {o.shape}?", o.color))
        if _unique(scene, shape=o.shape) is o:
            options["color"].append((f"What color is the {o.shape}?", o.color))
        if _unique(scene, color=o.color) is o:
            options["shape"].append((f"What shape is the {o.color} object?", o.shape))
        if _unique(scene, size=o.size, color=o.color) is o:
            options["shape"].append((f"What shape is the {o.size} {o.color} object?", o.shape))
        if _unique(scene, color=o.color, shape=o.shape) is o:
            options["size"].append((f"What size is the {o.color} {o.shape}?", o.size))
    kinds = [k for k, v in options.items() if v]
    if not kinds:
        return None
    text, answer = rng.choice(options[rng.choice(kinds)])
    return Question("attribute", text, answer)


def _existence(scene: Scene, rng: random.Random) -> Question:
    with_size = rng.random() < 0.3
    want = rng.random() < 0.5
    present: set[tuple[str, ...]] = {
        (o.size, o.color, o.shape) if with_size else (o.color, o.shape) for o in scene.objects
    }
    triples: list[tuple[str, ...]] = [(s, c, h) for s in SIZES for c in COLORS for h in SHAPES]
    pairs: list[tuple[str, ...]] = [(c, h) for c in COLORS for h in SHAPES]
    universe = triples if with_size else pairs
    pool = sorted(present) if want else [u for u in universe if u not in present]
    pick = rng.choice(pool)
    article = "an" if pick[0][0] in "aeiou" else "a"
    return Question("existence", f"Is there {article} {' '.join(pick)}?", "yes" if want else "no")


def _counting(scene: Scene, rng: random.Random) -> Question:
    kind = rng.choice(["all", "color", "shape", "size"])
    if kind == "all":
        return Question("counting", "How many objects are there?", str(len(scene.objects)))
    if kind == "color":
        c = rng.choice([o.color for o in scene.objects] if rng.random() < 0.8 else list(COLORS))
        n = sum(o.color == c for o in scene.objects)
        return Question("counting", f"How many {c} objects are there?", str(n))
    if kind == "shape":
        s = rng.choice(SHAPES)
        return Question("counting", f"How many {s}s are there?", str(sum(o.shape == s for o in scene.objects)))
    z = rng.choice(list(SIZES))
    return Question("counting", f"How many {z} objects are there?", str(sum(o.size == z for o in scene.objects)))


def _spatial(scene: Scene, rng: random.Random) -> Question | None:
    pairs = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            na, nb, rel = _name(scene, a), _name(scene, b), relation(a, b)
            if na and nb and rel:
                pairs.append((na, nb, rel))
    if not pairs:
        return None
    na, nb, rel = rng.choice(pairs)
    return Question("spatial", f"Where is the {na} relative to the {nb}?", rel)


def _reading(scene: Scene, rng: random.Random) -> Question:
    text = rng.choice(["What word is written in the image?", "What does the text say?"])
    return Question("reading", text, scene.word)


def ask(scene: Scene, qtype: str, rng: random.Random) -> Question | None:
    """One question of a type about a scene, or None when the scene allows none (no uniquely named object)."""
    if qtype == "attribute":
        return _attribute(scene, rng)
    if qtype == "existence":
        return _existence(scene, rng)
    if qtype == "counting":
        return _counting(scene, rng)
    if qtype == "spatial":
        return _spatial(scene, rng)
    if qtype == "reading":
        return _reading(scene, rng)
    raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QUESTION_TYPES)}")


def questions(scene: Scene, per_type: int = 1, types: tuple[str, ...] = QUESTION_TYPES) -> list[Question]:
    """Up to ``per_type`` distinct questions of each type about a scene, deterministic from its seed."""
    rng = random.Random(scene.seed * 7919 + 17)
    out: list[Question] = []
    for qtype in types:
        seen: set[str] = set()
        for _ in range(per_type * 4):
            if len(seen) >= per_type:
                break
            q = ask(scene, qtype, rng)
            if q is not None and q.text not in seen:
                seen.add(q.text)
                out.append(q)
    return out


# ------------------------------------------------------------------------------------------ training distribution
def balanced_scene(seed: int, lo: int = 1, hi: int = MAX_OBJECTS) -> tuple[Scene, Question]:
    """A training scene of ``lo``–``hi`` objects built around one counting question whose answer is uniformly
    distributed given the question's words (the language model cannot learn it from its words alone).

    The question asks for all objects (answer uniform in ``lo``–``hi``) or for the objects of one colour, shape or
    size (answer uniform in 0–``hi``: that many objects get the value, the others a different one); the answer is
    counted on the scene as drawn. Only for training: the held-out splits use :func:`make_scene`.
    """
    rng = random.Random(seed * 7 + 3)
    kind = rng.choice(("all", "color", "shape", "size"))
    if kind == "all":
        scene = make_scene(seed, [(None, None, None)] * rng.randint(lo, hi))
        return scene, Question("counting", "How many objects are there?", str(len(scene.objects)))
    field_ = {"color": 1, "shape": 0, "size": 2}[kind]
    values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[kind]
    value = rng.choice(values)
    k = rng.randint(0, hi)
    n = rng.randint(max(k, lo), hi)
    specs: list[ObjectSpec] = []
    for i in range(n):
        got = value if i < k else rng.choice([v for v in values if v != value])
        spec: list[str | None] = [None, None, None]
        spec[field_] = got
        specs.append((spec[0], spec[1], spec[2]))
    rng.shuffle(specs)
    scene = make_scene(seed, specs)
    count = sum(getattr(o, kind) == value for o in scene.objects)
    text = f"How many {value}s are there?" if kind == "shape" else f"How many {value} objects are there?"
    return scene, Question("counting", text, str(count))


def caption(scene: Scene) -> Question:
    """A dense training target: every object's size, colour and shape, from left to right."""
    order = sorted(scene.objects, key=lambda o: (o.x, o.y))
    return Question("caption", "List the objects.", ", ".join(o.words() for o in order))


def answer_words() -> list[str]:
    """Every answer any question can have."""
    counts = [str(i) for i in range(MAX_OBJECTS + 1)]
    return [*COLORS, *SHAPES, *SIZES, "yes", "no", *counts, *SPATIAL, *WORDS]
