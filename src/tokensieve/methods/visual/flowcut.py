"""FlowCut: progressive pruning inside the vision encoder by the CLS token's information flow (+ one LLM step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from ...core.budget import Budget
from ...core.capabilities import Apply, Capabilities, Phase
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from .base import Stage, VisualContext, VisualKept, VisualMethod, top_k

_VISION_NEEDS = ("cls_attention", "values", "anchor_value")
_LLM_NEEDS = ("text_attention", "values", "anchor_value")
#: LLaVA-NeXT vision stage: candidates among the unpadded crop patches with the newlines kept (default), or the
#: official code's order (whole crops pruned before the unpadding, no newlines)
ORDERS = ("unpadded", "official")


def flow_score(attention: Tensor, semantic: Tensor, values: Tensor) -> Tensor:
    """FlowCut's per-token score ``(Ĩ_a + Ĩ_s) ⊙ I_d``: ``attention`` and ``semantic`` ``(N,)`` are renormalised to
    sum to one over the tokens, ``I_d = ‖mean_h v_j‖₁`` from ``values`` ``(H, N, d)``."""
    a = attention / attention.sum()
    s = semantic / semantic.sum()
    return (a + s) * values.float().mean(0).abs().sum(-1)


def prune_count(attention: Tensor, target: int, remaining: int) -> float:
    """FlowCut's entropy-driven prune count before rounding: ``(N − T)/√remaining · (1 − (H(p)/log N)²)`` with
    ``p`` = ``attention`` ``(N,)`` normalised (``0·log 0 = 0``)."""
    n = int(attention.shape[0])
    p = attention.float() / attention.float().sum()
    entropy = -torch.special.xlogy(p, p).sum()
    ratio = entropy / math.log(n)
    return float((n - target) / math.sqrt(remaining) * (1.0 - ratio**2))


@register
@dataclass(frozen=True)
class FlowCut(VisualMethod):
    """FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
    Models", NeurIPS 2025, arXiv:2505.19536; official code TungChintao/FlowCut @a2ecd24, read to check every detail).

    **Vision stage** (default; CLIP towers: LLaVA-1.5, LLaVA-NeXT). After every encoder layer ``l`` before the
    feature layer the CLS token's information flow scores each patch token ``j``:

    * attention ``I_a(j) = mean_h A_h[CLS, j]`` (the CLS row of layer ``l``, softmax over CLS + patches);
    * semantic ``I_s(j) = mean_h softmax_{i ∈ {CLS} ∪ patches}(v_CLS^h · v_i^h)_j`` — the softmax runs over the CLS
      token and the patches, as in the official code (the CLS self-term ``‖v_CLS^h‖²`` is computed from
      ``anchor_value``), then CLS is dropped; **no 1/√d** (see choices);
    * density ``I_d(j) = ‖mean_h v_j^h‖₁``;
    * ``S = (I_a/ΣI_a + I_s/ΣI_s) ⊙ I_d``; running score ``S_cum = S`` at the first layer, then
      ``S_cum ← momentum·S_cum + (1 − momentum)·S`` after **every** layer (``momentum = 0.5``) while a grid is above
      its target.

    Pruning happens every ``interval`` (2) layers, counted back from the feature layer: with ``F`` the encoder
    layers whose output the model reads (LLaVA-1.5: 23 of CLIP-L's 24), the method runs after layers
    ``1 … F − 1`` (``layers(F)``), ``rem = F − 1 − l`` layers remain before the last step, and it prunes when
    ``rem % interval == 0`` — after layers ``F − 1, F − 3, …`` (LLaVA-1.5: 2, 4, …, 22 counted from 1 = the
    official code's 0-based 1, 3, …, 21), so the feature layer runs on exactly the target + CLS. Prune count
    ``P = round((N − T)/√rem · (1 − (H(Ĩ_a)/log N)²))`` (N patches now, T the target, H the entropy of the
    normalised CLS attention); keep ``max(N − P, T)`` tokens with the highest ``S_cum`` in their original order; at
    ``rem = 0`` keep exactly ``T``. The running score lives in ``ctx.memory["flowcut"]`` and is re-indexed by the
    kept tokens. ``F = 1``: one step after layer 1 straight to ``T``.

    **LLaVA-NeXT** (thumbnail + crops, each its own CLIP run): every grid of a multi-grid image is pruned to
    ``int(crop_share · T)`` patches (``crop_share = 0.5``: the official code's ``int(target/2)`` per crop), with one
    prune count per step for the image — the maximum over its grids (the official code takes it over the CLIP
    batch, which is exactly the image's grids) — so the grids stay in lockstep. A single-grid image keeps ``T``.
    Which crop patches are candidates, and whether the image keeps its ``image_newline`` tokens, is ``order``:

    * ``order=official`` — what the official code does: the thumbnail and every crop is pruned over its **whole**
      grid (all 576 patches on CLIP-L/336; target ``int(T/2) + 1`` with CLS) inside the encoder, *then* the kept crop
      patches are scattered into the ``(rows·24) × (cols·24)`` crop mosaic and unpadded: kept patches that fall in
      the padding are discarded, so a crop can reach the LM with fewer than ``int(T/2)``. A multi-crop image's
      sequence is the thumbnail's kept patches, then the unpadded mosaic's kept patches in raster order, with **no**
      ``image_newline`` tokens. The ratio base is the thumbnail's and all crops' patches (5 × 576 at most).
      ``state.kept["vision"]`` records the method's choice (``grid · 576 + patch``), the patches the unpadding then
      discards included; ``state.visual_tokens["vision"]`` counts the patches that reach the LM.
    * ``order=unpadded`` (default) — only the crop patches that survive the unpadding are candidates (the method
      never sees the padding, so every kept patch reaches the LM), and the image keeps its ``image_newline`` token
      after every mosaic row, unpruned. The ratio base is the thumbnail and the crops' patches that survive the
      unpadding. It is the default because it keeps the token layout LLaVA-NeXT was trained with (the newline
      separators) and spends no budget on padding; ``order=official`` is the pipeline behind the paper's
      LLaVA-NeXT numbers.

    On LLaVA-1.5 (one grid, no padding, no newline) both orders are the same. ``order`` is a vision-stage
    parameter: ``flowcut[stage=llm,order=…]`` is refused, and the LLM companion is ``flowcut[stage=llm]`` either way.

    **LLM stage** (``stage=llm``; LLaVA-NeXT and Qwen2-VL in the paper, after decoder layer index 1: ``layer = K =
    2``): ``r = mean_h softmax_{j ∈ V}(q_last·k_j/√d)`` — the adapter's ``text_attention`` is softmaxed over the
    whole prefix, so each head's row is renormalised over the visual tokens, which is exactly the softmax over the
    visual keys; ``s = mean_h softmax_{j ∈ V}(v_last·v_j/√d)`` (``anchor_value`` = the last prompt token's value);
    score ``(r + s) ⊙ ‖mean_h v_j‖₁``; the top ``k`` over the whole sample stay. Means over KV heads equal the
    official code's means over the repeated query heads.

    **Two stages.** ``flowcut:T`` with a token count brings ``flowcut[stage=llm]:T`` along (the paper's NeXT
    recipe: crops to T/2 in the encoder, then T at decoder layer 2); on LLaVA-1.5 exactly T tokens reach the LM, so
    that step keeps everything. With a ratio budget there is no companion (the LLM step's base would be the tokens
    that survived the encoder): write it, e.g. ``vis:flowcut:0.0556/flowcut[stage=llm]:160``.

    **Qwen2-VL.** Its vision tower has no CLS and the adapters have no Qwen vision stage, so ``flowcut`` at the
    vision stage fails there with the adapter's CapabilityError; ``flowcut[stage=llm]`` runs (the LLM-stage part of
    the paper's Qwen recipe; the pseudo-CLS ViT part is not implemented).

    Choices where the paper/code are ambiguous (the paper's text was not readable here: the formulas follow a summary
    of the paper's algorithm and were checked line by line against the official code):

    * ``√d`` in the semantic term: absent at the vision stage (the official CLIP code — the numbers published for
      LLaVA-1.5), present at the LLM stage (the official LLM code); ``semantic_scale=true`` adds it in the encoder.
    * The prune count is per image (the official code takes the maximum over the whole batch, so a sample's result
      depends on its batch-mates; here batch = single); multi-grid images take the maximum over their grids.
    * Entropy uses ``0·log 0 = 0`` (the LLaVA code has no epsilon, the Qwen code adds 1e-7).
    * The schedule is derived from ``F`` (the code hard-codes ``select_layer = 24 − 2``); LLaVA's feature layer
      runs on ``T`` patches + CLS; layers after ``l = F − 1`` are not scored.
    * The budget is visual tokens per image: a ratio is of the image's patches the method sees at its first step.
      On NeXT the official code prunes the thumbnail and each crop over its full 576 patches before the unpadding
      and then drops the kept patches that fall in the padding; ours does the same with ``order=official`` (base:
      up to 5 × 576), while the default ``order=unpadded`` chooses only among the patches that survive the
      unpadding (base: the thumbnail and those patches), so no kept patch is lost to the padding. Ties in the top-k
      go to the earlier token (the code's ``topk`` leaves them unspecified).
    * LLM stage on NeXT: the official sequence has **no** ``image_newline`` tokens at all (see ``order``), so its
      LLM step scores patches only. With ``order=official`` ours is the same; with the default ``order=unpadded``
      the newline tokens are in the sequence, are not scored and stay as extra, unpruned tokens next to the ``T``
      kept patches (separators of the trained layout, not image content). "last" = the last prompt token (the
      code's ``last_instruct_pos − 1``).
    * Positions: the official code renumbers after both steps — the vision stage through LLaVA's input preparation
      (an ``arange`` over the pruned sequence), the LLM step by renumbering the kept tokens (and lowering the decode
      positions by the tokens removed). ``positions="official"`` (the adapters' default) does the same
      (``positions`` = ``"renumber"``); layers 0 … K − 1 keep every visual token in the cache, as in the code.
    """

    name: ClassVar[str] = "flowcut"
    paper: ClassVar[str] = (
        "Tong et al. 2025, FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models "
        "(arXiv:2505.19536)"
    )
    rule: ClassVar[str] = (
        "S=(a_cls/sum + sem/sum)*|mean_h v|_1, S_cum EMA 0.5; every 2nd encoder layer drop "
        "round((N-T)/sqrt(rem)*(1-(H/logN)^2)) by S_cum, last step to T; llm: (r+s)*|v|_1 at layer K"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.DROP,
        stages=frozenset({Stage.VISION, Stage.LLM}),
        signals=frozenset(_VISION_NEEDS + _LLM_NEEDS),
    )
    stage: str = "vision"
    layer: int = 2
    momentum: float = 0.5
    interval: int = 2
    crop_share: float = 0.5
    semantic_scale: bool = False
    order: str = "unpadded"

    # ------------------------------------------------------------------------------------------------ set-up
    def check_params(self) -> None:
        super().check_params()
        if self.at_layer < 1:
            raise ConfigError(f"flowcut: layer (the decoder layer K of the llm stage) must be >= 1; got {self.layer}.")
        if not 0.0 <= float(self.momentum) < 1.0:
            raise ConfigError(f"flowcut: momentum must be in [0, 1); got {self.momentum}.")
        if int(self.interval) < 1:
            raise ConfigError(f"flowcut: interval (prune every n-th layer) must be >= 1; got {self.interval}.")
        if not 0.0 < float(self.crop_share) <= 1.0:
            raise ConfigError(f"flowcut: crop_share must be in (0, 1]; got {self.crop_share}.")
        if self.order not in ORDERS:
            raise ConfigError(f"flowcut: order must be one of {', '.join(ORDERS)}; got {self.order!r}.")
        if self.where is Stage.LLM and self.order != ORDERS[0]:
            raise ConfigError(
                "flowcut[stage=llm]: order chooses the vision stage's candidates on LLaVA-NeXT (the whole crops or "
                "the unpadded ones) and whether the newline tokens stay; the llm stage scores whatever reaches it. "
                "Write it at the vision stage: flowcut[order=official]:T."
            )

    @property
    def prune_before_unpad(self) -> bool:
        return self.where is Stage.VISION and self.order == "official"

    def layers(self, num_layers: int) -> tuple[int, ...]:
        if self.where is Stage.LLM:
            return (self.at_layer,)
        return tuple(range(1, max(int(num_layers), 2)))

    def companions(self, budget: Budget) -> tuple[tuple[VisualMethod, Budget], ...]:
        if self.where is Stage.VISION and budget.kind == "tokens":
            return ((replace(self, stage=Stage.LLM.value, order=ORDERS[0]), budget),)
        return ()

    def needed(self, ctx: VisualContext) -> None:
        for what in _LLM_NEEDS if ctx.stage is Stage.LLM else _VISION_NEEDS:
            if getattr(ctx, what) is None:
                raise CapabilityError(
                    f"Visual method '{self.name}' needs {what.replace('_', ' ')}, which this model does not provide "
                    f"at the {ctx.stage.value} stage"
                    + (" (its vision encoder has no CLS token)." if what == "cls_attention" else ".")
                )

    # ------------------------------------------------------------------------------------------------ llm stage
    def score(self, ctx: VisualContext) -> Tensor:
        """The LLM-stage score ``(r + s) ⊙ ‖mean_h v_j‖₁`` of every visual token."""
        assert ctx.text_attention is not None
        assert ctx.values is not None
        assert ctx.anchor_value is not None
        p = ctx.text_attention.float()
        r = (p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).mean(0)
        v = ctx.values.float()
        logits = torch.einsum("hnd,hd->hn", v, ctx.anchor_value.float()) / math.sqrt(v.shape[-1])
        s = torch.softmax(logits, dim=-1).mean(0)
        return flow_score(r, s, v)

    # --------------------------------------------------------------------------------------------- vision stage
    def vision_score(self, ctx: VisualContext, start: int, end: int, group: int) -> tuple[Tensor, Tensor]:
        """``S`` of the tokens ``[start, end)`` (one grid with its own CLS) and their head-mean CLS attention."""
        assert ctx.cls_attention is not None
        assert ctx.values is not None
        assert ctx.anchor_value is not None
        a = ctx.cls_attention[:, start:end].float().mean(0)
        v = ctx.values[:, start:end].float()  # (H, n, d)
        anchor = ctx.anchor_value.float()
        if anchor.dim() == 3:  # one CLS value per grid (LLaVA-NeXT's thumbnail and crops)
            anchor = anchor[group]
        scale = 1.0 / math.sqrt(v.shape[-1]) if self.semantic_scale else 1.0
        logits = torch.einsum("hnd,hd->hn", v, anchor) * scale
        self_logit = (anchor * anchor).sum(-1, keepdim=True) * scale  # v_CLS · v_CLS: CLS is in the softmax
        sem = torch.softmax(torch.cat([self_logit, logits], dim=-1), dim=-1)[:, 1:].mean(0)
        return flow_score(a, sem, v), a

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        self.needed(ctx)
        if ctx.stage is Stage.LLM:
            k = self.count(ctx, budget)
            if k >= ctx.n:
                return VisualKept(torch.arange(ctx.n, device=ctx.tokens.device))
            return VisualKept(top_k(self.score(ctx), k))
        return self._vision(ctx, budget)

    def group_targets(self, ctx: VisualContext, budget: Budget) -> list[int]:
        """Each grid's target: its image's budget ``T`` (one grid) or ``int(crop_share · T)`` (several grids)."""
        images = sorted({g.image for g in ctx.groups})
        base = dict(zip(images, ctx.base))
        per_image = {i: sum(1 for g in ctx.groups if g.image == i) for i in images}
        out = []
        for g in ctx.groups:
            t = budget.tokens_for(base[g.image], larger="clip")
            if per_image[g.image] > 1:
                t = int(float(self.crop_share) * t)
            out.append(max(1, t))
        return out

    def _vision(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        dev = ctx.tokens.device
        memory = ctx.memory if ctx.memory is not None else {}
        targets = self.group_targets(ctx, budget)
        active = [gi for gi, g in enumerate(ctx.groups) if g.size > targets[gi]]
        if not active:
            memory.pop(self.name, None)
            return VisualKept(torch.arange(ctx.n, device=dev))
        previous: Tensor | None = memory.get(self.name)
        if previous is not None and previous.shape[0] != ctx.n:
            raise RuntimeError("flowcut: the running score does not match the tokens (steps out of order?)")
        cumulative = torch.zeros(ctx.n, device=dev) if previous is None else previous.clone()
        attention: dict[int, Tensor] = {}
        m = float(self.momentum)
        for gi in active:
            g = ctx.groups[gi]
            s, a = self.vision_score(ctx, g.start, g.end, gi)
            attention[gi] = a
            cumulative[g.start : g.end] = s if previous is None else m * cumulative[g.start : g.end] + (1 - m) * s
        remaining = max(0, ctx.steps - 1 - ctx.step)
        if remaining % int(self.interval) != 0:
            memory[self.name] = cumulative
            return VisualKept(torch.arange(ctx.n, device=dev))
        # one prune count per image: the maximum over its grids still above their targets
        counts: dict[int, float] = {}
        for gi in active:
            g = ctx.groups[gi]
            p = math.inf if remaining == 0 else prune_count(attention[gi], targets[gi], remaining)
            counts[g.image] = max(counts.get(g.image, -math.inf), p)
        keep: list[Tensor] = []
        for gi, g in enumerate(ctx.groups):
            if gi not in attention:
                keep.append(torch.arange(g.start, g.end, device=dev))
                continue
            p = counts[g.image]
            n_keep = targets[gi] if math.isinf(p) else max(g.size - round(p), targets[gi])
            keep.append(g.start + top_k(cumulative[g.start : g.end], n_keep))
        index = torch.cat(keep)
        memory[self.name] = cumulative[index]
        return VisualKept(index)
