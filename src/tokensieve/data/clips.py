"""Procedural video clips for the embedded video DiT: one shape of the scene generator moving in a named direction.

A clip is ``frames`` RGB frames of ``size`` × ``size`` pixels (default 8 × 64 × 64): a plain light background (jittered
grey, as :mod:`tokensieve.data.scenes` draws it) and one object — a shape of :data:`~tokensieve.data.scenes.SHAPES` in a
colour of :data:`~tokensieve.data.scenes.COLORS` (with the same small per-object jitter) — that moves a constant
2–4 pixels per frame to the left, right, up or down (slower when a long clip would otherwise leave the frame), and
stays inside the frame. Its prompt names what is drawn:
``"a red circle moving right"``. Everything follows from one integer seed through :class:`random.Random`; training and
evaluation draw seeds from disjoint ranges (:data:`SPLITS`).

:func:`gate` is the quality gate of generated clips, in plain numpy: the object's pixels are those far from the
frame's background colour; the named colour must *dominate* them (at least half of the object pixels are nearest to
the named colour among the seven), and the object's centroid must move in the named direction (the displacement
from the first to the last frame that shows the object is at least 3 pixels along the named axis, with that sign,
and larger than along the other axis).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

from .scenes import COLORS, SHAPES

DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
FRAMES, SIZE = 8, 64
RADIUS = (6, 9)  # pixels
SPEED = (2, 4)  # pixels per frame
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 1_000_000_000), "test": (2_000_000_000, 2_001_000_000)}
_PROMPT = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+moving\s+(\w+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Clip:
    """One clip: its frames ``(F, H, W, 3)`` uint8, its prompt and what the prompt names."""

    seed: int
    frames: np.ndarray
    color: str
    shape: str
    direction: str
    centers: tuple[tuple[float, float], ...]  # object centre per frame (x, y), pixels

    @property
    def prompt(self) -> str:
        return prompt_of(self.color, self.shape, self.direction)


def prompt_of(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def parse_prompt(prompt: str) -> tuple[str, str, str] | None:
    """``(colour, shape, direction)`` of a prompt of the form "a red circle moving right", or None."""
    m = _PROMPT.match(prompt)
    if m is None:
        return None
    color, shape, direction = (w.lower() for w in m.groups())
    if color in COLORS and shape in SHAPES and direction in DIRECTIONS:
        return color, shape, direction
    return None


def all_prompts() -> list[str]:
    """Every prompt a clip can have (7 colours × 3 shapes × 4 directions)."""
    return [prompt_of(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def split_seed(split: str, index: int) -> int:
    lo, hi = SPLITS[split]
    if not 0 <= index < hi - lo:
        raise ValueError(f"index {index} is outside split {split!r}")
    return lo + index


def _draw(img: object, shape: str, x: float, y: float, r: float, rgb: tuple[int, int, int]) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)  # type: ignore[arg-type]
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        h = r * 0.8
        draw.polygon([(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)], fill=rgb)
    else:
        rr = r * 1.1
        draw.polygon([(x, y - rr), (x + rr * 0.866, y + rr * 0.5), (x - rr * 0.866, y + rr * 0.5)], fill=rgb)


def make_clip(
    seed: int,
    frames: int = FRAMES,
    size: int = SIZE,
    color: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
) -> Clip:
    """The clip of one seed; ``color`` / ``shape`` / ``direction`` fix what is drawn (None: drawn from the seed)."""
    from PIL import Image

    rng = random.Random(seed * 9176 + 11)
    color = color or rng.choice(list(COLORS))
    shape = shape or rng.choice(SHAPES)
    direction = direction or rng.choice(list(DIRECTIONS))
    r = rng.randint(*RADIUS) * size / SIZE
    speed = rng.randint(*SPEED) * size / SIZE
    dx, dy = DIRECTIONS[direction]
    margin = r + 2
    speed = min(speed, (size - 2 * margin) / max(frames - 1, 1))  # long clips: the whole path stays inside the frame
    travel = speed * (frames - 1)
    # the start position: anywhere the whole path stays inside the frame
    lo_x, hi_x = margin + max(0.0, -dx * travel), size - margin - max(0.0, dx * travel)
    lo_y, hi_y = margin + max(0.0, -dy * travel), size - margin - max(0.0, dy * travel)
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    base = COLORS[color]
    rgb = tuple(int(np.clip(c + rng.randint(-12, 12), 0, 255)) for c in base)
    g = rng.randint(190, 225)
    bg = (g + rng.randint(-6, 6), g + rng.randint(-6, 6), g + rng.randint(-6, 6))
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    centers = []
    for f in range(frames):
        x, y = x0 + dx * speed * f, y0 + dy * speed * f
        img = Image.new("RGB", (size, size), bg)
        _draw(img, shape, x, y, r, (rgb[0], rgb[1], rgb[2]))
        out[f] = np.asarray(img, dtype=np.uint8)
        centers.append((x, y))
    return Clip(seed, out, color, shape, direction, tuple(centers))


# ------------------------------------------------------------------------------------------------ the quality gate
OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object
MIN_OBJECT_PIXELS = 6  # a frame shows the object when it has at least this many object pixels
MIN_TRAVEL = 3.0  # pixels along the named axis, first to last frame that shows the object


@dataclass(frozen=True)
class GateResult:
    color_ok: bool
    motion_ok: bool
    color_share: float  # fraction of object pixels nearest to the named colour
    displacement: tuple[float, float]  # (dx, dy) of the centroid, pixels (nan when fewer than 2 frames show it)


def object_pixels(frames: np.ndarray) -> np.ndarray:
    """``(F, H, W)`` bool: pixels farther than OBJECT_DISTANCE from their frame's background (its median colour)."""
    x = frames.astype(np.float32)
    bg = np.median(x.reshape(x.shape[0], -1, 3), axis=1)  # (F, 3): the object covers far less than half a frame
    return np.linalg.norm(x - bg[:, None, None, :], axis=-1) > OBJECT_DISTANCE


def gate(frames: np.ndarray, prompt: str) -> GateResult:
    """The quality gate of one generated clip ``(F, H, W, 3)`` uint8 against its prompt (see the module docstring)."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a clip prompt: {prompt!r}")
    color, _, direction = parsed
    obj = object_pixels(frames)
    pix = frames[obj].astype(np.float32)  # (N, 3)
    if len(pix):
        names = list(COLORS)
        palette = np.array([COLORS[c] for c in names], dtype=np.float32)
        nearest = np.argmin(((pix[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        share = float((nearest == names.index(color)).mean())
    else:
        share = 0.0
    shown = [f for f in range(obj.shape[0]) if obj[f].sum() >= MIN_OBJECT_PIXELS]
    d = (float("nan"), float("nan"))
    motion = False
    if len(shown) >= 2:
        ys0, xs0 = np.nonzero(obj[shown[0]])
        ys1, xs1 = np.nonzero(obj[shown[-1]])
        d = (float(xs1.mean() - xs0.mean()), float(ys1.mean() - ys0.mean()))
        ax, ay = DIRECTIONS[direction]
        along = d[0] * ax + d[1] * ay
        across = abs(d[1]) if ax else abs(d[0])
        motion = along >= MIN_TRAVEL and along > across
    return GateResult(share >= 0.5, motion, share, d)


def gate_rates(results: list[GateResult]) -> tuple[float, float]:
    """(colour pass rate, motion pass rate) over clips."""
    n = max(len(results), 1)
    return sum(r.color_ok for r in results) / n, sum(r.motion_ok for r in results) / n


# -------------------------------------------------------------------------------------------------- fidelity
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two uint8 videos of one shape (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 videos ``(F, H, W, 3)`` (Wang et al. 2004: 7 × 7 uniform windows, per frame and channel,
    K1 = 0.01, K2 = 0.03, as scikit-image's default ``structural_similarity``)."""
    from numpy.lib.stride_tricks import sliding_window_view

    x = a.astype(np.float64)
    y = b.astype(np.float64)
    win = 7
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def mean(z: np.ndarray) -> np.ndarray:
        return sliding_window_view(z, (win, win), axis=(1, 2)).mean(axis=(-1, -2))

    mx, my = mean(x), mean(y)
    n = win * win
    cov = n / (n - 1)  # sample covariance, as scikit-image
    vx = (mean(x * x) - mx * mx) * cov
    vy = (mean(y * y) - my * my) * cov
    vxy = (mean(x * y) - mx * my) * cov
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
