"""ToDRE: a diverse subset of the projected visual tokens (stage 1), then all visual tokens dropped at a late decoder
layer once the instruction no longer attends to them (stage 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ...errors import ConfigError
from ._diversity import greedy_maxmin, greedy_maxsum, images_of
from .base import Stage, VisualContext, VisualKept, VisualMethod

DIVERSITY = ("maxsum", "kcenter")
PIVOTS = ("cls", "random")


def default_layer(num_layers: int) -> int:
    """ToDRE's stage-2 layer for a decoder of ``num_layers`` layers: ``K = ⌊7L/8⌋`` (LLaVA-7B's 32 → 28, Qwen2-VL-7B's
    28 → 24), kept inside ``1 … L − 1``."""
    return max(1, min(num_layers - 1, (7 * num_layers) // 8))


def instruction_share(ctx: VisualContext) -> float:
    """α_{t→v}: the share of the instruction tokens' attention that goes to the visual tokens, averaged over heads
    and instruction rows (each row is a softmax over the whole prefix, so its total over all keys is 1 and the
    paper's ratio ``Σ_{i∈T,j∈V} A_ij / Σ_{i∈T,j∈all} A_ij`` is the mean visual mass of a row). NaN without rows
    (``text_rows`` None — the engine passes None when no token follows the sample's last image — or ``Q = 0``)."""
    if ctx.text_rows is None or ctx.text_rows.shape[1] == 0:
        return float("nan")
    rows = ctx.text_rows.float()  # (H, Q, N)
    return float(rows.sum(-1).mean())


@register
@dataclass(frozen=True)
class ToDRE(VisualMethod):
    """ToDRE (Li, Yang, Zhang, Shao, Lu, "ToDRE: Effective Visual Token Pruning via Token Diversity and Task
    Relevance", arXiv:2505.18757 v2; v1 "…via Diversity and Task Awareness"). No official code was found; this is
    written from the paper's description.

    **Stage 1** (``stage=projector``, the default): per image, keep ``k`` (the budget) of its projected visual tokens
    ``E_v`` (the language model's input embeddings) chosen greedily for diversity under ``d = 1 − cos``:

    * pivot ``p`` = the token with the highest CLS attention (``cls_attention`` averaged over heads: the CLS row of
      the vision tower's *feature* layer, the one LLaVA projects — LLaVA reads layer −2, so the paper's "last layer"
      is read as "the layer whose output becomes the tokens"). With several grids per image (LLaVA-NeXT AnyRes) the
      argmax runs over the image's first grid, the global thumbnail. Encoders without CLS (Qwen2-VL), or
      ``pivot=random``: a pivot drawn uniformly from the image's first grid by a generator seeded with
      ``seed · 1000003 + ctx.seed`` (images of a sample drawn in order) — the paper's no-CLS fallback (its ablation:
      95.8 % vs 96.0 % with the CLS pivot);
    * ``diversity=maxsum`` (v2, default): ``c = argmax_{v∉C} Σ_{u∈C} d(v, u)`` = ``argmin`` of the running sum of
      cosine similarities; ``diversity=kcenter`` (v1): ``c = argmax_{v∉C} min_{u∈C} d(v, u)`` (farthest point).

    The budget is per image and the selection runs over the whole image — thumbnail and crops together, one
    budget for the image (the paper's 10 % of LLaVA-NeXT = 288 of 2,880), not split per grid. LLaVA-NeXT's
    ``image_newline`` tokens are not candidates and stay. The kept tokens stay in their original order. Positions:
    with no official code, the policy is our choice, following the diversity methods (DivPrune's official code
    renumbers in effect): ``positions`` is ``"renumber"``, so under the adapters' default ``positions="official"``
    the kept tokens — after either stage — are numbered without gaps; ``positions="keep"`` keeps the original
    positions. Ties go to the earlier token.

    **Stage 2** (``stage=llm``): before decoder layer ``K`` (``layer``; 0 = ``⌊7L/8⌋`` of the model, the paper's
    ℓ* = 7L/8, computed by :meth:`layers`), from layer ``K − 1``'s attention: α_{t→v} = the instruction tokens'
    attention mass on the visual tokens, averaged over heads and rows (:func:`instruction_share`). If ``α < tau`` every
    remaining visual token is removed from the hidden states and the KV cache of layers ``K …`` (an empty index);
    otherwise all stay. Choices where the paper is ambiguous:

    * **T** = the instruction: every token after the sample's last visual token (the question and the chat
      template's tail, the last prompt token included). The system prompt and text between images are not T —
      under causal masking they cannot attend to (all of) the image, so counting them would dilute α with
      structural zeros.
    * **α_{v→t} is not computed.** The paper drops when *both* α_{t→v} and α_{v→t} are below τ. With the order
      system → image → question and causal masking a visual query sees only the system prompt and earlier visual
      tokens, never the instruction, so α_{v→t} with T = the instruction is identically 0 and the rule reduces to
      ``α_{t→v} < τ``. (Counting the system prompt as T would make α_{v→t} the visual tokens' attention to the
      BOS/system sink, large in practice, and the rule would almost never fire — not the paper's reported
      behaviour.)
    * No instruction rows (an image at the very end of the prompt; the engine then passes no ``text_rows``):
      nothing to measure, all tokens stay.
    * The stage keeps all or nothing, so its budget means nothing: it is written ``1.0``
      (``todre[stage=llm]:1.0``); any other budget is refused when the stage runs.

    **Both stages.** ``todre:0.1`` written alone is stage 1 with stage 2 brought along as a companion
    (``todre[stage=llm]:1.0`` with the same ``layer`` and ``tau``); ``todre[relevance=false]:0.1`` is stage 1 alone,
    ``todre[stage=llm]:1.0`` stage 2 alone. A parameter the instance would not use is refused at construction
    (stage-1 parameters at ``stage=llm``; ``layer``/``tau`` with ``relevance=false``). Defaults from the paper:
    ``tau = 0.10`` (0.05–0.15 all ≈ 100 %), ``K = 7L/8``, budgets 10 % / 25 %.
    """

    name: ClassVar[str] = "todre"
    paper: ClassVar[str] = (
        "Li et al. 2025, ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance "
        "(arXiv:2505.18757)"
    )
    rule: ClassVar[str] = (
        "stage 1: greedy max-sum (or k-center) diversity, d = 1 - cos, from the CLS-attention pivot; "
        "stage 2 at 7L/8: drop every visual token if the instruction's attention share to them < tau"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.PROJECTOR, Stage.LLM}),
        signals=frozenset({"text_rows"}),
    )
    # the llm stage reads the instruction rows; the projector stage's CLS row is not listed (Qwen2-VL has none and
    # gets the random pivot): the engine passes it at the projector stage wherever the encoder has a CLS token

    stage: str = "projector"
    layer: int = 0
    diversity: str = "maxsum"
    pivot: str = "cls"
    tau: float = 0.10
    relevance: bool = True
    seed: int = 0

    # ------------------------------------------------------------------------------------------ configuration
    def check_params(self) -> None:
        stage = self.where
        if stage not in self.capabilities.stages:
            raise ConfigError(f"Visual method 'todre' acts at llm, projector, not at '{stage.value}'.")
        if self.layer < 0:
            raise ConfigError(f"todre: layer is a decoder layer K >= 1, or 0 for 7L/8; got {self.layer}.")
        if self.diversity not in DIVERSITY:
            raise ConfigError(f"todre: diversity must be one of {', '.join(DIVERSITY)}; got {self.diversity!r}.")
        if self.pivot not in PIVOTS:
            raise ConfigError(f"todre: pivot must be one of {', '.join(PIVOTS)}; got {self.pivot!r}.")
        if not 0.0 <= float(self.tau) <= 1.0:
            raise ConfigError(f"todre: tau is an attention share in [0, 1]; got {self.tau}.")
        # a parameter the instance would not use is refused, not ignored
        if stage is Stage.LLM:
            unused = [f for f, v, d in self._stage1_params() if v != d]
            if unused:
                raise ConfigError(f"todre[stage=llm]: {', '.join(unused)} belong to stage 1 (stage=projector).")
        elif not self.relevance and (self.layer != 0 or float(self.tau) != 0.10):
            raise ConfigError(
                "todre: layer and tau configure stage 2, which relevance=false leaves out; drop them or keep stage 2."
            )

    def _stage1_params(self) -> list[tuple[str, object, object]]:
        return [
            ("diversity", self.diversity, "maxsum"),
            ("pivot", self.pivot, "cls"),
            ("seed", self.seed, 0),
            ("relevance", self.relevance, True),
        ]

    def layers(self, num_layers: int) -> tuple[int, ...]:
        if self.where is not Stage.LLM:
            return (self.layer,)
        K = self.layer or default_layer(num_layers)
        if not 1 <= K < num_layers:
            raise ConfigError(
                f"todre[stage=llm,layer={self.layer}]: the language model has {num_layers} decoder layers, "
                f"so K must be in 1..{num_layers - 1} (or 0 for 7L/8)."
            )
        return (K,)

    def companions(self, budget: Budget) -> tuple[tuple[VisualMethod, Budget], ...]:
        if self.where is not Stage.PROJECTOR or not self.relevance:
            return ()
        stage2 = ToDRE(stage="llm", layer=self.layer, tau=self.tau)
        return ((stage2, Budget.ratio(1.0)),)

    def needed(self, ctx: VisualContext) -> None:
        """Nothing is required: stage 1 falls back to a random pivot without a CLS row, stage 2 keeps every token
        without instruction rows (``text_rows`` is None only when no text follows the last image)."""

    # -------------------------------------------------------------------------------------------------- prune
    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        if self.where is Stage.LLM:
            return self.task_relevance(ctx, budget)
        return self.diverse(ctx, budget)

    def diverse(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        """Stage 1: per image, the greedy diverse subset of the budget's size."""
        dev = ctx.tokens.device
        cls = ctx.cls_attention.float().mean(0) if ctx.cls_attention is not None and self.pivot == "cls" else None
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(ctx.seed))
        greedy = greedy_maxsum if self.diversity == "maxsum" else greedy_maxmin
        kept: list[Tensor] = []
        for im in images_of(ctx):
            n = int(im.index.numel())
            k = min(budget.tokens_for(im.base, larger="clip"), n)
            if cls is not None:  # the first grid's strongest CLS attention (the thumbnail's with AnyRes)
                p = int(torch.argmax(cls[im.index[: im.first]]))
            else:  # drawn for every image, so an image's pivot does not depend on the others' budgets
                p = int(torch.randint(im.first, (1,), generator=gen))
            if k >= n:
                kept.append(im.index)
                continue
            kept.append(im.index[greedy(im.states, p, k)])
        if not kept:
            return VisualKept(torch.zeros(0, dtype=torch.long, device=dev))
        return VisualKept(torch.sort(torch.cat(kept)).values)

    def task_relevance(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        """Stage 2: all visual tokens stay if α_{t→v} ≥ tau (or cannot be measured), none otherwise."""
        if budget.kind != "ratio" or float(budget.value) != 1.0:
            raise ConfigError(
                f"todre[stage=llm] keeps all visual tokens or none, so its budget is written 1.0 "
                f"(todre[stage=llm]:1.0); got {budget}."
            )
        dev = ctx.tokens.device
        alpha = instruction_share(ctx)
        if alpha == alpha and alpha < float(self.tau):  # NaN (no instruction rows): keep
            return VisualKept(torch.zeros(0, dtype=torch.long, device=dev))
        return VisualKept(torch.arange(ctx.n, device=dev))
