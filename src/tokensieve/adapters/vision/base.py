"""The VLM adapter interface: one class per family turns a batch of (input_ids, images) into the language model's
packed input (:class:`~.segments.Seq`), running the vision encoder with the vision-stage method, and hands it to the
segments runner with the projector- and llm-stage methods.

A family adapter says:

* where each image's placeholder tokens are in ``input_ids`` (:meth:`VisionAdapter.image_runs`; by default each run
  of the image token is one image);
* :meth:`VisionAdapter.encode` — every image's language-model input states, which of them are prunable (not
  separators such as LLaVA-NeXT's ``image_newline``), their grids, and which were already removed at the vision
  stage;
* :meth:`VisionAdapter.positions` — the unpruned sequence's positions (1-D, or M-RoPE's 3-D);
* its language model as a :class:`~.segments.TextStack`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...cache.sieve_cache import SieveCache
from ...core.decoding import greedy
from ...errors import CapabilityError, ConfigError, PromptError
from ...methods.visual.base import Stage, VisualGroup, VisualKept
from ...spec import VisualPlan, VisualSpec, visual_plan
from . import segments
from .segments import PositionPolicy, Seq, TextStack, VisionState


@dataclass
class ImageTokens:
    """One image at the language model's input.

    Attributes:
        features: ``(n, D)`` one row per placeholder token of the image (rows of dropped tokens are ignored).
        prunable: ``(n,)`` bool, the tokens a method may drop (False: separators, a CLS feature).
        groups: the grids over the image's prunable tokens that remain (``image`` = 0; the adapter renumbers).
        dropped: ``(n,)`` bool, tokens removed at the vision stage (LLaVA-NeXT: with a method that prunes before
            the unpadding, the ``image_newline`` separators too), or None.
        kept: the vision-stage method's result for this image, or None.
        cls_attention: ``(H, n)`` the CLS row of the vision encoder's feature layer at each token (zero at
            separators and dropped tokens), or None (no CLS token, or not asked for).
    """

    features: Tensor
    prunable: Tensor
    groups: tuple[VisualGroup, ...]
    dropped: Tensor | None = None
    kept: VisualKept | None = None
    cls_attention: Tensor | None = None


def runs(row: Tensor, token_id: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of ``token_id`` in a 1-D row."""
    hit = (row == token_id).to(torch.int8)
    d = torch.diff(hit, prepend=hit.new_zeros(1), append=hit.new_zeros(1))
    starts = (d == 1).nonzero().flatten().tolist()
    ends = (d == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def as_plan(spec: VisualPlan | VisualSpec | str | Sequence[str] | None) -> VisualPlan:
    """The visual plan of a spec text (visual parts only), a list of visual parts, a :class:`VisualSpec` or a plan."""
    if isinstance(spec, VisualSpec):
        return VisualPlan.of([spec])
    if spec is not None and not isinstance(spec, (str, VisualPlan)):
        return visual_plan("/".join(spec))
    return visual_plan(spec)


class VisionAdapter:
    """Visual-token pruning on one VLM family (see the module docstring). Build with
    :func:`tokensieve.adapters.vision.vision_adapter`.

    ``prefill(inputs, spec, positions=…)`` runs the three stages; ``extend`` appends a follow-up turn;
    ``generate`` decodes greedily. ``inputs`` is what the family's processor returns (``input_ids``,
    ``attention_mask`` with left padding, ``pixel_values`` and the family's image metadata).
    """

    family: ClassVar[str] = ""
    mrope: ClassVar[bool] = False
    has_cls: ClassVar[bool] = False
    vision_stage: ClassVar[bool] = False

    def __init__(self, model: Any) -> None:
        self.model = model
        self.image_token_id: int = -1
        self.stack: TextStack

    # ------------------------------------------------------------------------------------------ family parts
    def image_runs(self, ids: Tensor, valid: Tensor) -> list[Tensor]:
        """Per image of one sample (in order), the indices of its placeholder tokens."""
        return [
            torch.arange(s, e, device=ids.device) for s, e in runs(ids.masked_fill(~valid, -1), self.image_token_id)
        ]

    def encode(self, inputs: Mapping[str, Any], plan: VisualPlan, seeds: list[int]) -> list[ImageTokens]:
        """Every image of the batch (sample by sample, in order) at the language model's input."""
        raise NotImplementedError

    def positions(self, inputs: Mapping[str, Any], ids: Tensor, valid: Tensor) -> Tensor:
        """``(P, B, T)`` positions of the unpruned sequence (0 at padding)."""
        return segments.renumbered(valid, 1)

    # ------------------------------------------------------------------------------------------------- spans
    def spans(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[list[tuple[int, int]]]:
        """Per sample, the ``[start, end)`` runs of image placeholder tokens in ``input_ids`` (left padding
        ignored)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return [runs(input_ids[b].masked_fill(~valid[b], -1), self.image_token_id) for b in range(input_ids.shape[0])]

    # ------------------------------------------------------------------------------------------------- build
    def check_plan(self, plan: VisualPlan, policy: PositionPolicy) -> None:
        if policy not in segments.POLICIES:
            raise ConfigError(f"positions must be one of {', '.join(segments.POLICIES)}; got {policy!r}.")
        if self.mrope and policy == "renumber":
            raise CapabilityError(
                f"{self.family} uses M-RoPE: its 3-D positions encode the image grid, so pruning keeps them "
                "(positions='keep'); renumbering is not defined."
            )
        a = plan.at(Stage.VISION)
        if a is not None and not self.vision_stage:
            raise CapabilityError(
                f"{self.family}: vision-stage pruning ({a.label}) is not supported for this family yet."
            )
        if a is not None and "cls_attention" in type(a.method).capabilities.signals and not self.has_cls:
            raise CapabilityError(f"{a.label} reads CLS attention; the {self.family} vision encoder has no CLS token.")

    def build(
        self,
        inputs: Mapping[str, Any],
        plan: VisualPlan,
        policy: PositionPolicy = "official",
        seeds: Sequence[int] | None = None,
    ) -> tuple[Seq, dict[str, list[VisualKept]], dict[str, list[int]]]:
        """The language model's packed input after the vision and projector stages."""
        ids = inputs["input_ids"]
        B, T = ids.shape
        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        seed_list = [int(s) for s in seeds] if seeds is not None else [0] * B
        if len(seed_list) != B:
            raise ConfigError(f"seeds: one per sample ({B}); got {len(seed_list)}.")
        self.check_plan(plan, policy)
        per_sample = [self.image_runs(ids[b], valid[b]) for b in range(B)]
        image_seeds = [seed_list[b] for b in range(B) for _ in per_sample[b]]
        images = self.encode(inputs, plan, image_seeds) if any(per_sample) else []
        if len(images) != sum(len(p) for p in per_sample):
            raise PromptError(
                f"The prompts have {sum(len(p) for p in per_sample)} images' placeholder runs, the inputs "
                f"{len(images)} images."
            )
        embeds = self.stack.embed(ids.masked_fill(~valid, 0) if mask is not None else ids).clone()
        visual = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
        image = torch.full((B, T), -1, dtype=torch.long, device=ids.device)
        dropped = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
        groups: list[tuple[VisualGroup, ...]] = []
        cls_full: list[Tensor | None] = [None] * B
        it = iter(images)
        kept_a: list[VisualKept] = []
        for b in range(B):
            gs: list[VisualGroup] = []
            offset = 0
            for j, idx in enumerate(per_sample[b]):
                im = next(it)
                if int(im.features.shape[0]) != int(idx.numel()):
                    raise PromptError(
                        f"Sample {b}, image {j}: {idx.numel()} placeholder tokens in the prompt, "
                        f"{im.features.shape[0]} visual tokens from the image (not this model's processor's prompt?)."
                    )
                embeds[b, idx] = im.features.to(embeds.dtype)
                visual[b, idx] = im.prunable
                image[b, idx] = j
                if im.dropped is not None:
                    dropped[b, idx] = im.dropped
                    visual[b, idx] &= ~im.dropped
                if im.kept is not None:
                    kept_a.append(im.kept)
                if im.cls_attention is not None:
                    row = cls_full[b]
                    if row is None:
                        row = cls_full[b] = im.cls_attention.new_zeros(im.cls_attention.shape[0], T)
                    row[:, idx] = im.cls_attention.to(row.dtype)
                for g in im.groups:
                    gs.append(VisualGroup(g.start + offset, g.end + offset, g.height, g.width, j))
                offset += sum(g.size for g in im.groups)
            groups.append(tuple(gs))
        cls_rows = [None if r is None else r[:, visual[b].nonzero().flatten()] for b, r in enumerate(cls_full)]
        pos = self.positions(inputs, ids, valid)
        seq = Seq(embeds, valid, pos, visual, image, groups)
        counts: dict[str, list[int]] = {}
        if bool(dropped.any()):
            at_vision = segments.resolve(policy, plan.at(Stage.VISION), int(pos.shape[0]))
            seq = segments.compact(seq, [valid[b] & ~dropped[b] for b in range(B)], at_vision, groups)
        if plan.at(Stage.VISION) is not None:
            counts["vision"] = [int(seq.visual[b].sum()) for b in range(B)]
        seq, kept_b = segments.stage_b(seq, plan.at(Stage.PROJECTOR), policy, seed_list, cls_rows)
        kept: dict[str, list[VisualKept]] = {}
        if kept_a:
            kept["vision"] = kept_a
        if kept_b is not None:
            kept["projector"] = kept_b
            counts["projector"] = [int(seq.visual[b].sum()) for b in range(B)]
        return seq, kept, counts

    # ------------------------------------------------------------------------------------------------ running
    @torch.inference_mode()
    def prefill(
        self,
        inputs: Mapping[str, Any],
        spec: VisualPlan | VisualSpec | str | Sequence[str] | None = None,
        *,
        positions: PositionPolicy = "official",
        cache: SieveCache | None = None,
        seeds: Sequence[int] | None = None,
        all_logits: bool = False,
        forced: Sequence[Tensor] | None = None,
    ) -> VisionState:
        """Prefill a (left-padded) batch with visual-token pruning.

        Args:
            inputs: the processor's output (``input_ids``, ``attention_mask``, ``pixel_values`` and the family's
                image metadata such as ``image_grid_thw`` or ``image_sizes``).
            spec: the visual plan (``"fastv[layer=2]:0.25"``, ``"pool:64/fastv:0.5"``, a :class:`VisualPlan`), or
                None for no pruning.
            positions: ``"official"`` (each method's official choice: FastV keeps positions, the others renumber),
                ``"keep"`` (original positions) or ``"renumber"`` (see :mod:`.segments`).
            cache: a SieveCache (``Compressor.new_cache()``) to compose with a KV method: the kept tokens are
                compressed by it; None keeps every kept token's keys and values.
            seeds: one per sample, for methods that draw random numbers (default 0 each).
            forced: per sample, the kept indices at the llm stage instead of the method's choice.
        """
        plan = as_plan(spec)
        seq, kept, counts = self.build(inputs, plan, positions, seeds)
        state = segments.prefill(
            self.stack, seq, plan, policy=positions, cache=cache, seeds=seeds, all_logits=all_logits, forced=forced
        )
        state.kept = {**kept, **state.kept}
        state.visual_tokens = {**counts, **state.visual_tokens}
        return state

    @torch.inference_mode()
    def extend(self, state: VisionState, input_ids: Tensor, *, all_logits: bool = False) -> Tensor:
        """Append a follow-up chunk to a prefilled state (see :func:`.segments.extend`)."""
        return segments.extend(
            self.stack, state, input_ids, image_token_ids=[self.image_token_id], all_logits=all_logits
        )

    @torch.inference_mode()
    def generate(self, state: VisionState, max_new_tokens: int = 16, *, eos_token_id: int | None = None) -> Tensor:
        """Greedy decoding from a prefilled state by the library's one loop (:func:`~tokensieve.core.decoding.greedy`):
        ``(B, ≤ max_new_tokens)`` token ids, a finished row padded with ``eos_token_id`` as transformers pads it."""
        eos = set() if eos_token_id is None else {int(eos_token_id)}
        gen, _ = greedy(state.logits, lambda nxt: self.extend(state, nxt[:, None]), max_new_tokens, eos)
        return gen.padded(-1 if eos_token_id is None else int(eos_token_id))
