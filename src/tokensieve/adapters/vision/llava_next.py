"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution images — a thumbnail (the whole image at the
encoder's size) and a grid of crops, unpadded to the image's aspect, with an ``image_newline`` token after every row
of the crop grid. An image's placeholder run holds ``thumbnail (s × s)`` then ``H' rows × (W' + 1)``.

The prunable tokens are the thumbnail's and the crop grid's patches; the newline tokens stay (they are separators,
not image content) — except with a vision-stage method that prunes before the unpadding
(:attr:`~tokensieve.methods.visual.base.VisualMethod.prune_before_unpad`: ``flowcut[order=official]``), which sees
every crop's whole grid; its kept patches that fall in the padding are discarded and a multi-crop image reaches the
language model without newline tokens, as FlowCut's official code builds it. The layout (which run entry is which
patch, or a newline) is found by packing an index tensor with the model's own ``pack_image_features``, so it follows
transformers' unpadding exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import CapabilityError
from ...methods.visual.base import Stage, VisualGroup
from ...spec import VisualPlan
from .attention import RowRequest, rows_routed
from .base import ImageTokens, VisionAdapter
from .llava import ClipTower, llama_stack


class LlavaNextAdapter(VisionAdapter):
    """LLaVA-NeXT: vision stage (the thumbnail and every crop through the CLIP tower in lockstep, a group per crop),
    projector stage and llm stage over the thumbnail and crop grids (newlines kept)."""

    family: ClassVar[str] = "llava_next"
    has_cls: ClassVar[bool] = True
    vision_stage: ClassVar[bool] = True

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.core = model.model
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        if not isinstance(cfg.vision_feature_layer, int):
            raise CapabilityError("Visual-token pruning supports one vision feature layer (an int), not a list.")
        self.side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        self.stack = llama_stack(model, self.core.language_model)
        self.clip = ClipTower(self.core.vision_tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)

    def layout(self, n_crops: int, image_size: torch.Tensor) -> torch.Tensor:
        """``(n,)`` for each entry of an image's run: its index into the crops' patches (crop · s² + patch), or −1
        for a newline."""
        L = self.side * self.side
        extra = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        ids = torch.arange(n_crops * (L + extra), dtype=torch.float32).view(n_crops, L + extra, 1)
        if extra:
            ids = ids[:, 1:]
        packed, _ = self.core.pack_image_features(
            [ids], image_size[None], self.model.config.vision_feature_select_strategy, torch.tensor([-1.0])
        )
        return packed[0][:, 0].round().long()

    def encode(self, inputs: Mapping[str, Any], plan: VisualPlan, seeds: list[int]) -> list[ImageTokens]:
        cfg = self.model.config
        pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n_crops = [
            int(image_size_to_num_patches(sizes[i], cfg.image_grid_pinpoints, int(cfg.vision_config.image_size)))
            for i in range(int(sizes.shape[0]))
        ]
        plan = plan if plan is not None else VisualPlan()
        if plan.at(Stage.VISION) is not None:
            return self._encode_pruned(pv, sizes, n_crops, plan, seeds)
        request = RowRequest()
        attn = self.clip.attn(self.clip.feature - 1)
        want_cls = plan.at(Stage.PROJECTOR) is not None and cfg.vision_feature_select_strategy == "default"
        if want_cls:
            request.rows[id(attn)] = "first"
        with rows_routed([attn], request) if want_cls else contextlib.nullcontext(request):
            feats = self.core.get_image_features(
                pv,
                sizes,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                return_dict=True,
            ).pooler_output
        probs = request.probs.get(id(attn))
        out = []
        L = self.side * self.side
        off = 0
        for i, f in enumerate(feats):
            lay = self.layout(n_crops[i], sizes[i]).to(f.device)
            cls = None
            if probs is not None:
                flat = probs[off : off + n_crops[i], :, 1:].permute(1, 0, 2).reshape(probs.shape[1], -1)
                cls = self._at_run(flat, lay)
            off += n_crops[i]
            out.append(ImageTokens(f, lay >= 0, self.groups(lay, L), cls_attention=cls))
        return out

    @staticmethod
    def _at_run(flat: Tensor, lay: Tensor) -> Tensor:
        """``(H, n_run)``: a per-patch row over the crops' concatenated grids placed at the run (0 at newlines)."""
        out = flat.new_zeros(flat.shape[0], int(lay.numel()))
        hit = lay >= 0
        out[:, hit] = flat[:, lay[hit]]
        return out

    def groups(self, lay: Tensor, L: int) -> tuple[VisualGroup, ...]:
        """The thumbnail's grid and the unpadded crop grid (rows of the run between newlines)."""
        prunable = lay >= 0
        n_thumb = min(L, int(prunable.sum()))
        groups = [VisualGroup(0, n_thumb, self.side, self.side)] if n_thumb == L else []
        rows = int((~prunable).sum())
        rest = int(prunable.sum()) - n_thumb
        if rows and rest:
            groups.append(VisualGroup(n_thumb, n_thumb + rest, rows, rest // rows))
        elif rest:
            groups.append(VisualGroup(n_thumb, n_thumb + rest, 1, rest))
        return tuple(groups)

    def _encode_pruned(
        self, pv: Tensor, sizes: Tensor, n_crops: list[int], plan: VisualPlan, seeds: list[int]
    ) -> list[ImageTokens]:
        """The vision stage: each image's thumbnail and crops through the tower in lockstep with the method (a
        group per crop; the crop patches the unpadding discards are invisible to it), then the projector, then the
        run assembled from the kept patches (the kept states at their places, newlines kept).

        A method that prunes before the unpadding (``prune_before_unpad``) sees every crop's whole grid instead; the
        run keeps its kept patches that survive the unpadding (in the run's order: the thumbnail's, then the
        unpadded crop mosaic's in raster order) and, for a multi-crop image, marks the newline tokens dropped."""
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise CapabilityError("Vision-stage pruning with vision_feature_select_strategy='full' is not supported.")
        spec = plan.at(Stage.VISION)
        assert spec is not None
        L = self.side * self.side
        newline = self.core.image_newline
        whole = bool(spec.method.prune_before_unpad)
        out = []
        for i in range(int(sizes.shape[0])):
            lay = self.layout(n_crops[i], sizes[i]).to(pv.device)
            seen = lay[lay >= 0]
            visible: list[Tensor | None] = []
            for c in range(n_crops[i]):
                mine = seen[(seen >= c * L) & (seen < (c + 1) * L)] - c * L
                visible.append(None if whole or int(mine.numel()) == L else torch.sort(mine).values)
            from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

            rows, cols = get_anyres_image_grid_shape(
                sizes[i], cfg.image_grid_pinpoints, int(cfg.vision_config.image_size)
            )  # (rows, cols) of the crops, as pack_image_features reads them
            grid = (int(rows), int(cols)) if int(rows) * int(cols) == n_crops[i] - 1 else None
            crops, kept = self.clip.pruned(pv[i, : n_crops[i]].to(newline.dtype), spec, seeds[i], visible, grid)
            full: Tensor | None = None
            dropped_full = torch.ones(n_crops[i] * L, dtype=torch.bool, device=pv.device)
            cls_full: Tensor | None = None
            for c, crop in enumerate(crops):
                proj = self.core.multi_modal_projector(crop.h[:, 1:])[0]
                if full is None:
                    full = proj.new_zeros(n_crops[i] * L, proj.shape[-1])
                full[c * L + crop.orig] = proj
                dropped_full[c * L + crop.orig] = False
                if crop.cls is not None:
                    if cls_full is None:
                        cls_full = crop.cls.new_zeros(crop.cls.shape[0], n_crops[i] * L)
                    cls_full[:, c * L + crop.orig] = crop.cls
            assert full is not None
            hit = lay >= 0
            feats = full.new_zeros(int(lay.numel()), full.shape[-1])
            feats[hit] = full[lay[hit]]
            feats[~hit] = newline.to(feats.dtype)
            dropped = torch.zeros(int(lay.numel()), dtype=torch.bool, device=pv.device)
            dropped[hit] = dropped_full[lay[hit]]  # kept patches in the padding are not in the run at all
            if whole and n_crops[i] > 1:  # the official multi-crop sequence has no newline tokens
                dropped[~hit] = True
            k = int((hit & ~dropped).sum())
            untouched = k == int(hit.sum()) and all(c.grid is not None for c in crops)
            groups = self.groups(lay, L) if untouched else (VisualGroup(0, k, 1, k),)
            cls = None if cls_full is None else self._at_run(cls_full, lay)
            out.append(ImageTokens(feats, hit, groups, dropped, kept, cls_attention=cls))
        return out
