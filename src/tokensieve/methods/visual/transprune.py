"""TransPrune: rank visual tokens by how much the decoder layers transform them (token transition variation) plus the
instruction's attention to them, pruning progressively at a few middle layers."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ...errors import ConfigError
from ._llmstage import image_spans, image_targets, parse_layers, parse_numbers, schedule
from .base import Stage, VisualContext, VisualKept, VisualMethod, top_k

PAPER_LAYERS = (7, 9, 12)
PAPER_RATIOS = (0.875, 0.625, 0.125)


def transition_variation(before: Tensor, after: Tensor, kind: str = "update") -> Tensor:
    """One layer's token transition variation of ``N`` tokens: ``‖out‖/‖in‖ · softmax_j(1 − cos(in_j, out_j))``.

    ``kind="update"``: ``in`` = the token entering the layer, ``out`` = what the layer adds to it (``after −
    before``; the official code's module input vs module output); ``kind="state"``: ``out`` = the token leaving the
    layer. The softmax runs over the ``N`` tokens given (the sample's visual tokens)."""
    x = before.float()
    y = after.float() - x if kind == "update" else after.float()
    nx = x.norm(dim=-1).clamp_min(1e-12)
    ny = y.norm(dim=-1)
    direction = 1.0 - (x * y).sum(-1) / (nx * ny).clamp_min(1e-12)
    return ny / nx * torch.softmax(direction, dim=0)


def prune_points(ratios: tuple[float, ...], reference: tuple[int, ...], steps: int) -> dict[int, float]:
    """Which of ``steps`` consecutive accumulation steps prune, and to which paper ratio: the reference layers'
    offsets from the first, scaled onto ``steps − 1`` (exact when the layers are the reference ones); steps that
    coincide keep the later ratio."""
    span = reference[-1] - reference[0]
    out: dict[int, float] = {}
    for k, r in zip(reference, ratios):
        i = 0 if span == 0 else math.floor((k - reference[0]) * (steps - 1) / span + 0.5)
        out[i] = r
    return out


def keep_count(n0: int, final: int, ratio: float, last_ratio: float) -> int:
    """Tokens kept at a pruning step whose paper ratio is ``ratio`` when the last step's is ``last_ratio``: the same
    share of the tokens to remove, ``n0 − (n0 − final)·(1 − ratio)/(1 − last_ratio)``, rounded half up."""
    removed = (n0 - final) * (1.0 - ratio) / (1.0 - last_ratio)
    return max(final, n0 - math.floor(removed + 0.5))


@register
@dataclass(frozen=True)
class TransPrune(VisualMethod):
    """TransPrune (Li et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model",
    CVPR 2026, arXiv:2507.20630; official code github.com/liaolea/TransPrune).

    Score of visual token j at a pruning layer: ``TTV_j + IGA_j`` (each normalised to sum 1 over the image's
    visual tokens; ``alpha`` weighs them, ``alpha·TTV + (1 − alpha)·IGA``, 0.5 = the official equal sum):

    * **TTV** (token transition variation), accumulated over every decoder layer from the first pruning layer's
      to the last's: per layer ``‖out‖/‖in‖ · exp(1 − cos(in, out)) / Σ exp(1 − cos)`` — how much the layer
      changes the token's magnitude times how much it turns it (the official ``compute_transf_weight``);
    * **IGA** (instruction-guided attention): the attention of the instruction tokens (every token after the image,
      the last prompt token included) to the visual token, averaged over heads and instruction tokens
      (``ctx.text_rows``).

    Schedule (official LLaVA scripts): prune after layers 7, 9, 12 of 32 (``K = 7, 9, 12``: before 0-based layer
    K) keeping 87.5 %, 62.5 %, 12.5 % of the visual tokens; TTV accumulated over layers 7 … 12 (1-based, i.e. the
    transitions of 0-based layers 6 … 11). The method therefore acts at every K from 7 to 12 — the steps in
    between only accumulate TTV and keep every token.

    Choices (record of what differs from the official code, and why):

    * **budget = the tokens each image keeps after the last pruning layer**; the earlier layers remove the same
      shares of what is to be removed as the paper (1/7 and 3/7 of it at 7 and 9): ``keep = n0 − (n0 − k)·(1 −
      ρ_i)/(1 − ρ_last)`` with the paper's ``ρ = 0.875, 0.625, 0.125`` (``ratios``), so ``transprune:0.125`` is the
      paper's setting (576 → 504 → 360 → 72).
    * **layers**: ``at=7-9-12`` names the pruning layers K; accumulation runs over every layer from the first to the
      last of them. Without ``at``, the first and last are scaled to the model's ``L`` layers as ``⌊K·L/32 + ½⌋``
      (in ``1 … L − 1``) and the middle pruning layer keeps its relative place between them.
    * **layer granularity of TTV**: the official code measures the attention block (normalised input → attention
      output) and the MLP block (normalised input → MLP output) separately and adds them. The adapters give the
      states entering layers K − 1 and K (``ctx.previous``, ``ctx.tokens``), so TTV is measured once per layer:
      ``transition=update`` (default) compares the token entering the layer with the update the layer adds to it
      (``tokens − previous``: the sum of both blocks' outputs, the closest to the official module input/output);
      ``transition=state`` compares the token entering with the token leaving the layer (the paper's wording "change
      of the token representation"). The RMSNorm scales are not applied to the input (not available here).
    * **softmax domain**: the official softmax of ``1 − cos`` runs over the whole sequence; here over the sample's
      visual tokens (the only states given) — it changes only the relative weight of layers in the sum.
    * **IGA layer**: the official code recomputes the rows with the *next* layer's projections on the states entering
      layer K; here the rows are layer ``K − 1``'s (the layer just run).
    * **per image**: each image keeps its own count and is normalised on its own (the official code has one image
      per sample).
    * **positions**: the official code renumbers the kept tokens after each pruning layer (the later layers'
      positions run 0, 1, … over the shortened sequence, and the decoding positions are lowered by the tokens each
      step removed); ``positions`` is ``"renumber"``, so the adapters' default ``positions="official"`` does the same
      per segment (``positions="keep"`` keeps the original positions).
    """

    name: ClassVar[str] = "transprune"
    paper: ClassVar[str] = "Li et al. 2026, TransPrune: Token Transition Pruning (CVPR 2026, arXiv:2507.20630)"
    rule: ClassVar[str] = (
        "s_j = alpha*TTV_j/sum + (1-alpha)*IGA_j/sum; TTV = sum over layers of |out|/|in| * softmax(1-cos(in,out)); "
        "prune at 7/9/12 of 32 to 87.5/62.5/12.5 % (last = budget)"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.LLM}),
        signals=frozenset({"text_rows", "previous"}),
    )
    at: str = ""
    ratios: str = ""
    alpha: float = 0.5
    transition: Literal["update", "state"] = "update"

    # ------------------------------------------------------------------------------------------- schedule
    def _reference(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        layers = parse_layers(self.at, self.name) if self.at.strip() else PAPER_LAYERS
        ratios = parse_numbers(self.ratios, "ratios", self.name, integer=False) if self.ratios.strip() else PAPER_RATIOS
        return layers, ratios

    @property
    def at_layer(self) -> int:
        return self._reference()[0][0]

    def check_params(self) -> None:
        layers, ratios = self._reference()
        if len(ratios) != len(layers):
            raise ConfigError(
                f"{self.name}: {len(layers)} pruning layers need as many ratios (ratios=…, e.g. 0.875-0.625-0.125); "
                f"got {len(ratios)}."
            )
        if not all(0.0 < r < 1.0 for r in ratios) or any(b >= a for a, b in itertools.pairwise(ratios)):
            raise ConfigError(f"{self.name}: ratios must decrease strictly inside (0, 1); got {ratios}.")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"{self.name}: alpha (the weight of TTV) must be in [0, 1]; got {self.alpha}.")
        if self.transition not in ("update", "state"):
            raise ConfigError(f"{self.name}: transition must be 'update' or 'state'; got {self.transition!r}.")
        super().check_params()

    def layers(self, num_layers: int) -> tuple[int, ...]:
        layers, _ = self._reference()
        sched = schedule(layers, self.at, num_layers, self.name)
        return tuple(range(sched[0][0], sched[-1][0] + 1))

    # ---------------------------------------------------------------------------------------------- prune
    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        assert ctx.previous is not None
        assert ctx.text_rows is not None
        memory = ctx.memory if ctx.memory is not None else {}
        ttv = transition_variation(ctx.previous, ctx.tokens, self.transition)
        acc = memory.get("ttv")
        acc = ttv if acc is None or acc.shape != ttv.shape else acc.to(ttv.device) + ttv
        layers, ratios = self._reference()
        points = prune_points(ratios, layers, ctx.steps)
        everything = torch.arange(ctx.n, device=ctx.tokens.device)
        if ctx.step not in points:
            memory["ttv"] = acc
            return VisualKept(everything)
        iga = ctx.text_rows.float().mean(0).mean(0)  # (N,): mean over heads and instruction tokens
        alpha = float(self.alpha)
        keep: list[Tensor] = []
        for (a, b), n0, final in zip(image_spans(ctx), ctx.base, image_targets(ctx, budget)):
            k = min(b - a, keep_count(n0, final, points[ctx.step], ratios[-1]))
            if ctx.step == max(points):
                k = final
            t, g = acc[a:b], iga[a:b]
            score = alpha * t / (t.sum() + 1e-8) + (1.0 - alpha) * g / (g.sum() + 1e-8)
            keep.append(top_k(score, k) + a)
        index = torch.cat(keep) if keep else everything[:0]
        memory["ttv"] = acc[index]
        return VisualKept(index)
