"""Shared helpers of the progressive llm-stage methods (SparseVLM, PyramidDrop, TransPrune): their layer schedules
(given for a 32-layer LLaVA-7B and scaled to the model's decoder), and per-image spans and targets."""

from __future__ import annotations

import itertools
import math
import re

from ...core.budget import Budget
from ...errors import ConfigError
from .base import VisualContext

#: the decoder depth the papers' layer numbers are given for (LLaVA-1.5-7B's Vicuna-7B)
REFERENCE_LAYERS = 32

_SEP = re.compile(r"[\s,;+\-]+")


def parse_numbers(text: str, what: str, method: str, *, integer: bool) -> tuple[float, ...]:
    """``"8,16,24"``, ``"8-16-24"``, ``"8;16;24"`` or ``"8 16 24"`` → numbers. In a spec string write ``-`` (the
    spec grammar separates parameters with commas): ``pyramiddrop[at=8-16-24]:0.125``."""
    parts = [p for p in _SEP.split(text.strip()) if p]
    out: list[float] = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise ConfigError(f"{method}: cannot read {what}={text!r} (write numbers like 8-16-24).") from None
        if integer and value != int(value):
            raise ConfigError(f"{method}: {what} must be whole layer numbers; got {text!r}.")
        out.append(value)
    if not out:
        raise ConfigError(f"{method}: {what} is empty.")
    return tuple(out)


def parse_layers(text: str, method: str) -> tuple[int, ...]:
    """Explicit decoder layers K (strictly increasing, each >= 1)."""
    layers = tuple(int(v) for v in parse_numbers(text, "at", method, integer=True))
    if layers[0] < 1 or any(b <= a for a, b in itertools.pairwise(layers)):
        raise ConfigError(f"{method}: at={text!r} must be strictly increasing decoder layers K >= 1.")
    return layers


def scale_layer(k: int, num_layers: int) -> int:
    """A layer given for 32 decoder layers, on a decoder of ``num_layers``: ``⌊K·L/32 + ½⌋`` kept in ``1 … L − 1``."""
    return max(1, min(num_layers - 1, math.floor(k * num_layers / REFERENCE_LAYERS + 0.5)))


def schedule(reference: tuple[int, ...], explicit: str, num_layers: int, method: str) -> list[tuple[int, int]]:
    """The method's layers on this model, each with the index of the reference layer it stands for.

    ``explicit`` (the method's ``at`` parameter) names the layers as they are; otherwise the paper's ``reference``
    layers are scaled by :func:`scale_layer`. Layers that coincide after scaling become one, standing for the
    *last* of them (so a collapsed schedule still ends at the paper's final ratio)."""
    if num_layers < 2:
        raise ConfigError(f"{method}: an llm-stage method needs a decoder of >= 2 layers; this one has {num_layers}.")
    if explicit.strip():
        layers = parse_layers(explicit, method)
        if layers[-1] > num_layers - 1:
            raise ConfigError(
                f"{method}: at={explicit!r} names decoder layer {layers[-1]}, but this model's decoder has "
                f"{num_layers} layers (K must be <= {num_layers - 1})."
            )
        return [(k, i) for i, k in enumerate(layers)]
    out: list[tuple[int, int]] = []
    for i, k in enumerate(reference):
        scaled = scale_layer(k, num_layers)
        if out and out[-1][0] >= scaled:
            out[-1] = (out[-1][0], i)
        else:
            out.append((scaled, i))
    return out


def image_spans(ctx: VisualContext) -> list[tuple[int, int]]:
    """``[start, end)`` of each image's tokens, in image order (an image's groups are contiguous)."""
    spans: dict[int, tuple[int, int]] = {}
    last = None
    for g in ctx.groups:
        if g.image in spans:
            if last != g.image:
                raise ValueError("An image's visual groups must be contiguous")
            spans[g.image] = (spans[g.image][0], g.end)
        else:
            spans[g.image] = (g.start, g.end)
        last = g.image
    return [spans[k] for k in sorted(spans)]


def image_targets(ctx: VisualContext, budget: Budget) -> list[int]:
    """Each image's final token count: the budget of the image's tokens at the method's first step, clipped to the
    tokens it has now (0 for an image with no tokens left)."""
    return [min(budget.tokens_for(n0, larger="clip"), n) if n > 0 else 0 for n0, n in zip(ctx.base, ctx.images)]
