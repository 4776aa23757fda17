"""Qwen2-VL / Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``): a ViT
without CLS on dynamic-resolution patches, a 2 × 2 patch merger, one run of image tokens per image, and **3-D M-RoPE
positions** (temporal, height, width) from ``get_rope_index``. Pruning keeps each kept visual token's 3-D position
(``positions="keep"``; renumbering is refused) and text after the image keeps its positions, so a kept token sits
exactly where it sat in the unpruned sequence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...methods.visual.base import VisualGroup
from ...spec import VisualPlan
from .base import ImageTokens, VisionAdapter
from .segments import TextStack


class Qwen2VLAdapter(VisionAdapter):
    """Qwen2-VL and Qwen2.5-VL: projector stage (after the patch merger) and llm stage, M-RoPE positions kept."""

    family: ClassVar[str] = "qwen2_vl"
    mrope: ClassVar[bool] = True

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        core = model.model
        self.core = core
        self.image_token_id = int(model.config.image_token_id)
        self.merge = int(model.config.vision_config.spatial_merge_size)
        lm = core.language_model
        self.stack = TextStack(lm.layers, lm.embed_tokens, lm.norm, model.lm_head, lambda h, p: lm.rotary_emb(h, p))

    def encode(self, inputs: Mapping[str, Any], plan: VisualPlan, seeds: list[int]) -> list[ImageTokens]:
        grid = inputs["image_grid_thw"]
        feats = self.core.get_image_features(inputs["pixel_values"], grid, return_dict=True).pooler_output
        out = []
        for f, (t, h, w) in zip(feats, grid.tolist()):
            hh, ww = int(t) * (int(h) // self.merge), int(w) // self.merge  # frames stacked along the height
            out.append(
                ImageTokens(
                    f, torch.ones(f.shape[0], dtype=torch.bool, device=f.device), (VisualGroup(0, hh * ww, hh, ww),)
                )
            )
        return out

    def positions(self, inputs: Mapping[str, Any], ids: Tensor, valid: Tensor) -> Tensor:
        types = (ids == self.image_token_id).to(torch.int32)
        pos, _ = self.core.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=inputs.get("image_grid_thw"), attention_mask=valid.long()
        )
        return pos.masked_fill(~valid[None], 0)
