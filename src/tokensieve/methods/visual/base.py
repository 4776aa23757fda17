"""Visual-token methods: score → select → apply on one sample's visual tokens, at one of three stages.

A visual-token method sees the *prunable* visual tokens of one sample — every image's patch (or merged-patch) tokens
in sequence order, without separators such as LLaVA-NeXT's ``image_newline`` — as a :class:`VisualContext` of pure
tensors, and returns which of them stay (:class:`VisualKept`). The adapter (``tokensieve.adapters.vision``) builds the
context at the method's stage and applies the result to the model's sequence:

* ``vision`` (stage a): inside the vision encoder, after encoder layer ``layer`` (1-based count of layers run); the
  tokens are the encoder's hidden states; ``cls_attention`` (the CLS query's attention row in that layer) and ``keys``
  are available where the encoder has a CLS token;
* ``projector`` (stage b): after the projector, before the language model; the tokens are the language model's input
  embeddings of the visual tokens;
* ``llm`` (stage c): inside the language model, before decoder layer ``layer`` (0-based: ``layer = K`` prunes after
  the K-th layer, as FastV's K); the tokens are the hidden states entering layer K, ``text_attention`` is the
  attention row of the last prompt token in layer K − 1 (softmax over the whole prefix, restricted to the visual
  tokens).

**Progressive methods** act at several layers of their stage (FlowCut every second encoder layer, ToMe every encoder
block, PyramidDrop and SparseVLM at several decoder layers): :meth:`VisualMethod.layers` names them, and the adapter
calls :meth:`VisualMethod.prune` once per layer (``ctx.step`` of ``ctx.steps``) on the tokens left by the previous
step. ``ctx.start`` holds each image's prunable tokens at the first step, so a ratio budget keeps meaning "of the
tokens that reached the stage"; ``ctx.memory`` is a dict that persists across one sample's steps (a running score);
``ctx.sizes`` how many original tokens each current token stands for (merging methods return the new sizes in
:class:`VisualKept`). A method names the signals it reads in its capabilities (``signals``); the adapter computes
only those, in the layer the method acts after (vision) or before (llm: layer K − 1):

==================  ===========================================================================================
``cls_attention``   ``(H, N)`` the CLS query's attention to the tokens (vision encoders with a CLS token); at the
                    projector stage: the CLS row of the vision encoder's feature layer
``mean_attention``  ``(H, N)`` the attention each token receives, averaged over every query of the layer (vision)
``keys``/``values`` ``(H_kv, N, d)`` the tokens' attention keys / values in that layer
``anchor_value``    ``(H_kv, d)`` the value of the anchor query's token (the CLS token; the last prompt token)
``text_attention``  ``(H, N)`` the last prompt token's attention row (llm)
``text_rows``       ``(H, Q, N)`` the attention rows of the Q instruction tokens — the text after the sample's last
                    image — to the visual tokens (llm; rows are softmaxed over the whole prefix)
``text_tokens``     ``(Q, D)`` the instruction tokens' hidden states entering the layer (llm)
``previous``        ``(N, D)`` the tokens' states one layer earlier (entering layer K − 1; vision: entering the
                    layer just run), for methods that measure how a layer transforms a token
==================  ===========================================================================================

The methods are frozen dataclasses of the ``visual`` family, registered with
:func:`tokensieve.core.registry.register` in the one registry (a visual method keeps or merges *sequence positions*
before or inside the forward pass, a KV method keeps *cache entries* after it), and written in the one spec grammar
(``todre:0.1/snapkv:0.25``, :mod:`tokensieve.spec`). This module is part of the library floors: no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase, Stage
from ...core.method import VISUAL, Method
from ...errors import CapabilityError, ConfigError


@dataclass(frozen=True)
class VisualGroup:
    """One grid of visual tokens inside a sample's prunable tokens: ``[start, end)``, ``height × width`` of them in
    raster order; ``image`` is the index of the image (within the sample) the grid belongs to (several grids per
    image: LLaVA-NeXT's thumbnail and crops, Idefics3's tiles)."""

    start: int
    end: int
    height: int
    width: int
    image: int = 0

    def __post_init__(self) -> None:
        if self.end - self.start != self.height * self.width:
            raise ValueError(f"A visual group of {self.end - self.start} tokens is no {self.height}x{self.width} grid")

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class VisualContext:
    """One sample's prunable visual tokens at a stage.

    Attributes:
        tokens: ``(N, D)`` their states at the stage.
        groups: the grids covering ``[0, N)`` in order.
        stage, layer: where the method is being run.
        cls_attention: ``(H, N)`` the CLS query's attention probabilities to these tokens (vision stage, encoders
            with a CLS token), or None.
        text_attention: ``(H, N)`` the last prompt token's attention probabilities to these tokens in the layer
            before the pruning layer (llm stage), or None. Rows are softmaxed over the whole prefix, so they need
            not sum to one over the visual tokens.
        keys: ``(H, N, d)`` the attention keys of these tokens in the same layer, or None.
        seed: a per-sample seed given by the caller (methods that draw random numbers use it).
        values, anchor_value, mean_attention, text_rows, text_tokens, previous: further signals (module docstring),
            each None unless the method names it in its ``signals``.
        sizes: ``(N,)`` original tokens each token stands for (after merging steps), or None (one each).
        step, steps: this call's index among the method's layers, and their number.
        start: prunable tokens per image at the first step (None: the current counts).
        memory: a dict kept across one sample's steps (None for single-step methods run alone).
        crop_grid: vision stage of an any-resolution image (LLaVA-NeXT): ``(rows, cols)`` of its crops — the groups
            after the first (the thumbnail) are the crops in raster order; None otherwise.
    """

    tokens: Tensor
    groups: tuple[VisualGroup, ...]
    stage: Stage
    layer: int = 0
    cls_attention: Tensor | None = None
    text_attention: Tensor | None = None
    keys: Tensor | None = None
    seed: int = 0
    values: Tensor | None = None
    anchor_value: Tensor | None = None
    mean_attention: Tensor | None = None
    text_rows: Tensor | None = None
    text_tokens: Tensor | None = None
    previous: Tensor | None = None
    sizes: Tensor | None = None
    step: int = 0
    steps: int = 1
    start: tuple[int, ...] | None = None
    memory: dict[str, Any] | None = None
    crop_grid: tuple[int, int] | None = None

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def last_step(self) -> bool:
        return self.step >= self.steps - 1

    @property
    def base(self) -> list[int]:
        """Each image's prunable tokens at the method's first step (the base of a ratio budget)."""
        return list(self.start) if self.start is not None else self.images

    @property
    def images(self) -> list[int]:
        """The prunable tokens of each image (in image order)."""
        out: dict[int, int] = {}
        for g in self.groups:
            out[g.image] = out.get(g.image, 0) + g.size
        return [out[k] for k in sorted(out)]


@dataclass(frozen=True)
class VisualKept:
    """What a visual-token method keeps.

    Attributes:
        index: ``(k,)`` sorted indices into the context's tokens: the kept tokens, or for merging methods the token
            each output stands at (its position is that token's position).
        tokens: ``(k, D)`` replacement states (merging methods), or None for the kept tokens' own states.
        sizes: ``(k,)`` how many original tokens each output stands for (None: one each).
    """

    index: Tensor
    tokens: Tensor | None = None
    sizes: Tensor | None = None

    def __post_init__(self) -> None:
        if self.index.dim() != 1:
            raise ValueError("VisualKept.index must be 1-D")
        if self.index.numel() > 1 and bool((self.index[1:] <= self.index[:-1]).any()):
            raise ValueError("VisualKept.index must be strictly increasing")
        if self.tokens is not None and self.tokens.shape[0] != self.index.shape[0]:
            raise ValueError("VisualKept.tokens must have one row per index")


def top_k(scores: Tensor, k: int) -> Tensor:
    """The ``k`` highest scores' indices, sorted by index; ties go to the earlier token (deterministic)."""
    n = int(scores.shape[0])
    k = max(0, min(k, n))
    # stable descending sort: equal scores keep index order, so the earlier token wins a tie
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def split_counts(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over parts of ``sizes`` in proportion, largest remainders first (sums to ``total``, each part
    at most its size)."""
    n = sum(sizes)
    total = max(0, min(total, n))
    if n == 0:
        return [0 for _ in sizes]
    exact = [total * s / n for s in sizes]
    out = [min(s, int(e)) for s, e in zip(sizes, exact)]
    rest = total - sum(out)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in order:
        if rest == 0:
            break
        if out[i] < sizes[i]:
            out[i] += 1
            rest -= 1
    return out


@dataclass(frozen=True)
class VisualMethod(Method):
    """Base of the visual-token methods: the ``visual`` family of :class:`~tokensieve.core.method.Method` (frozen
    dataclasses; the fields are the method's parameters, checked when the method is made).

    Class attributes: ``name`` (registry key), ``paper`` (citation), ``rule`` (one line) and ``capabilities``, the
    one declaration: ``stages`` (where it may act), ``signals`` (what the context must carry besides the tokens: the
    module docstring's table) and ``apply`` (``drop``, or ``merge`` for a method that folds tokens into others).

    A method that can act at several stages has a ``stage`` field; ``layer`` is the encoder layer (vision stage) or
    the decoder layer K (llm stage) it acts at.
    """

    family: ClassVar[str] = VISUAL
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.DROP, stages=frozenset(Stage)
    )
    #: vision stage: later encoder layers attend with proportional attention (``+ log size`` on each key's logit,
    #: ToMe) once tokens have been merged
    proportional: ClassVar[bool] = False
    #: the language model's positions after this method prunes, as its official code leaves them (the adapters'
    #: default policy, ``positions="official"``): ``"renumber"`` — the kept tokens numbered without gaps, what LLaVA's
    #: input preparation does to any shortened sequence — or ``"keep"`` — each kept token at its original position
    positions: ClassVar[Literal["keep", "renumber"]] = "renumber"

    @classmethod
    def summary(cls) -> str:
        order = [Stage.VISION, Stage.PROJECTOR, Stage.LLM]
        bits = ["+".join(s.value for s in order if s in cls.capabilities.stages), cls.capabilities.apply.value]
        if cls.capabilities.signals:
            bits.append("reads " + "+".join(sorted(cls.capabilities.signals)))
        return ", ".join(bits)

    @property
    def prune_before_unpad(self) -> bool:
        """Vision stage on LLaVA-NeXT: True when this instance selects over each crop's whole grid *before* the
        unpadding (the adapter then discards the kept patches that fall in the padding, so a crop can reach the
        language model with fewer than its share) and a multi-crop image reaches the language model without
        ``image_newline`` tokens — the order of FlowCut's official code. False (the default): only the crop
        patches that survive the unpadding are candidates and the newline tokens stay, unpruned."""
        return False

    # --------------------------------------------------------------------------------------------- where
    @property
    def where(self) -> Stage:
        """The stage this instance acts at (its ``stage`` field, else its only stage)."""
        value = getattr(self, "stage", None)
        if value is not None:
            return Stage.parse(value)
        if len(self.capabilities.stages) != 1:
            raise ConfigError(f"Visual method '{self.name}' needs a stage.")
        return next(iter(self.capabilities.stages))

    @property
    def at_layer(self) -> int:
        return int(getattr(self, "layer", 0))

    def __post_init__(self) -> None:
        self.check_params()

    def check_params(self) -> None:
        """Validate the parameters (stage allowed, layer sensible); raise ConfigError naming the problem."""
        stage = self.where
        if stage not in self.capabilities.stages:
            allowed = ", ".join(sorted(s.value for s in self.capabilities.stages))
            raise ConfigError(f"Visual method '{self.name}' acts at {allowed}, not at '{stage.value}'.")
        if type(self).layers is not VisualMethod.layers:
            return  # a method that names its layers checks them itself (the adapter checks them against the model)
        if stage is Stage.VISION and self.at_layer < 1:
            raise ConfigError(f"{self.name}: a vision-stage method acts after encoder layer >= 1; got {self.at_layer}.")
        if stage is Stage.LLM and self.at_layer < 1:
            raise ConfigError(
                f"{self.name}: an llm-stage method acts before decoder layer K >= 1; got {self.at_layer}."
            )

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers this method acts at, in order: encoder layers (vision stage, 1-based count of layers run,
        ``num_layers`` = the encoder layers the model's features come from) or decoder layers K (llm stage,
        ``num_layers`` = the decoder's layers). Default: ``(layer,)``; progressive methods override."""
        return (self.at_layer,)

    def companions(self, budget: Budget) -> tuple[tuple[VisualMethod, Budget], ...]:
        """Methods at other stages that this one brings along when written alone in a spec (a two-stage method
        such as ToDRE: ``todre:0.1`` is its projector stage plus its llm stage). A companion is skipped when the
        plan names a method at its stage explicitly. Default: none."""
        return ()

    def needed(self, ctx: VisualContext) -> None:
        for what in self.capabilities.signals:
            if getattr(ctx, what) is None:
                raise CapabilityError(
                    f"Visual method '{self.name}' needs {what.replace('_', ' ')}, which this model does not provide "
                    f"at the {ctx.stage.value} stage"
                    + (" (its vision encoder has no CLS token)." if what == "cls_attention" else ".")
                )

    # ------------------------------------------------------------------------------------- three steps
    def count(self, ctx: VisualContext, budget: Budget) -> int:
        """How many tokens the sample keeps: the budget per image (a ratio of each image's tokens at the method's
        first step, or a token count per image, clipped to the image's tokens now), summed over its images."""
        now = ctx.images
        return sum(min(budget.tokens_for(n0, larger="clip"), n) for n0, n in zip(ctx.base, now) if n > 0)

    def score(self, ctx: VisualContext) -> Tensor:
        """``(N,)`` importance of each token (higher stays)."""
        raise NotImplementedError

    def select(self, ctx: VisualContext, scores: Tensor, k: int) -> Tensor:
        """Indices of the kept tokens, sorted (default: the ``k`` highest scores over the whole sample)."""
        return top_k(scores, k)

    def apply(self, ctx: VisualContext, keep: Tensor) -> VisualKept:
        """What happens to the rest (default: dropped)."""
        return VisualKept(keep)

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        """score → select → apply for one sample."""
        self.needed(ctx)
        k = self.count(ctx, budget)
        if k >= ctx.n:
            return VisualKept(torch.arange(ctx.n, device=ctx.tokens.device))
        scores = self.score(ctx)
        keep = self.select(ctx, scores, k)
        return self.apply(ctx, keep)


__all__ = [
    "Stage",
    "VisualContext",
    "VisualGroup",
    "VisualKept",
    "VisualMethod",
    "split_counts",
    "top_k",
]
