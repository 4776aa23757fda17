"""Greedy diversity selection over token states with the cosine distance ``d(u, v) = 1 − cos(u, v)``, shared by
ToDRE (max-sum, or k-center in its v1) and DivPrune (max-min).

Both rules grow a set ``C`` from a first element, one token at a time, and return the chosen indices **in the order
they were chosen** (callers sort them). Each step needs the new member's cosine similarities to every token: either
one matrix-vector product of the ``(n, d)`` normalised states (``O(k · n · d)`` in all, memory-bound: the states are
read ``k`` times) or a column of the ``(n, n)`` Gram matrix formed once by one matrix product (``O(n² · d)``,
compute-bound, ``4n²`` bytes). :func:`use_gram` picks the second when the states do not fit in cache and ``k`` is a
sizeable share of ``n`` (measured on the 2-core CPU: 2,880 × 4,096 states, ``k`` = 288 — 1.09 s by products, 0.81 s
with the Gram matrix; 576 × 4,096, ``k`` = 58: 25 ms vs 40 ms). Ties go to the earlier token (``argmin``/``argmax``
return the first extreme).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import VisualContext, VisualGroup


def unit_rows(x: Tensor) -> Tensor:
    """``(n, d)`` rows scaled to unit length in float32 (an all-zero row stays zero: cosine 0 to everything)."""
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def use_gram(n: int, d: int, k: int) -> bool:
    """Form the Gram matrix when the states exceed ~32 MB (no longer cache-resident), ``k ≥ n / 16`` (enough
    passes to pay for it) and the matrix stays below 256 MB."""
    return n * d * 4 > 32 * 2**20 and 16 * k >= n and n * n * 4 <= 256 * 2**20


class Similarities:
    """Cosine similarities of every token to token ``c``: a row of the Gram matrix, or one matrix-vector product."""

    def __init__(self, x: Tensor, gram: bool | None = None, k: int = 0) -> None:
        self.xs = unit_rows(x)
        n, d = int(x.shape[0]), int(x.shape[1])
        self.gram = self.xs @ self.xs.T if (use_gram(n, d, k) if gram is None else gram) else None

    def __call__(self, c: int) -> Tensor:
        return self.gram[c].clone() if self.gram is not None else self.xs @ self.xs[c]


def greedy_maxsum(x: Tensor, first: int, k: int, gram: bool | None = None, sim: Similarities | None = None) -> Tensor:
    """Greedy max-sum diversification: ``c = argmax_{v ∉ C} Σ_{u ∈ C} d(v, u)``.

    With ``d = 1 − cos`` the sum is ``|C| − Σ_{u∈C} cos(v, u)``, so the rule is ``argmin`` of the running sum of
    cosine similarities ``S = X Σ_{u∈C} x_u`` (chosen tokens set to +∞). ``x``: ``(n, d)`` states (normalised here);
    ``gram``: force (True) or forbid (False) the Gram matrix, None = :func:`use_gram`; ``sim``: similarities already
    prepared for ``x`` (then ``gram`` is not read).
    """
    n = int(x.shape[0])
    k = max(0, min(k, n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    sim = sim if sim is not None else Similarities(x, gram, k)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = first
    sims = sim(first)
    sims[first] = float("inf")
    for i in range(1, k):
        c = int(torch.argmin(sims))
        chosen[i] = c
        sims += sim(c)
        sims[c] = float("inf")  # earlier members stay +inf (inf + finite)
    return chosen


def greedy_maxmin(x: Tensor, first: int, k: int, gram: bool | None = None, sim: Similarities | None = None) -> Tensor:
    """Greedy max-min (farthest point, k-center): ``c = argmax_{v ∉ C} min_{u ∈ C} d(v, u)``. ``x``: ``(n, d)``;
    ``gram`` as in :func:`greedy_maxsum`."""
    n = int(x.shape[0])
    k = max(0, min(k, n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    sim = sim if sim is not None else Similarities(x, gram, k)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = first
    nearest = 1.0 - sim(first)  # distance of every token to its nearest chosen token
    nearest[first] = float("-inf")
    for i in range(1, k):
        c = int(torch.argmax(nearest))
        chosen[i] = c
        nearest = torch.minimum(nearest, 1.0 - sim(c))
        nearest[c] = float("-inf")  # earlier members stay -inf (min with -inf)
    return chosen


def most_isolated(sim: Similarities) -> int:
    """The token farthest from its nearest other token: ``argmax_v min_{u ≠ v} d(v, u)`` (DivPrune's first pick),
    from similarities prepared with the Gram matrix (``Similarities(x, gram=True)``)."""
    assert sim.gram is not None, "most_isolated reads the whole Gram matrix"
    n = int(sim.gram.shape[0])
    if n <= 1:
        return 0
    dist = 1.0 - sim.gram
    dist.fill_diagonal_(float("inf"))
    return int(torch.argmax(dist.min(dim=1).values))


@dataclass(frozen=True)
class ImageTokens:
    """One image's tokens in a context: their indices, their states (a view when they are contiguous, as the
    adapters lay them out), the size of the image's first grid (its first tokens) and the image's tokens at the
    method's first step (the base of a ratio budget)."""

    index: Tensor
    states: Tensor
    first: int
    base: int


def images_of(ctx: VisualContext) -> list[ImageTokens]:
    """The context's images in order (grids grouped by ``VisualGroup.image``)."""
    spans: dict[int, list[VisualGroup]] = {}
    for g in sorted(ctx.groups, key=lambda g: g.start):
        spans.setdefault(g.image, []).append(g)
    out = []
    for (_, gs), n0 in zip(sorted(spans.items()), ctx.base):
        index = [i for g in gs for i in range(g.start, g.end)]
        if not index:
            continue
        idx = torch.tensor(index, dtype=torch.long, device=ctx.tokens.device)
        contiguous = index[-1] - index[0] + 1 == len(index)
        states = ctx.tokens[index[0] : index[-1] + 1] if contiguous else ctx.tokens[idx]
        out.append(ImageTokens(idx, states, gs[0].size, n0))
    return out
