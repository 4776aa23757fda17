"""Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``): a SigLIP-style
encoder without CLS, a pixel-shuffle connector (``scale_factor``² patches → one token), and image splitting: an image
becomes several tiles plus a downscaled global view, each tile one run of ``image_seq_len`` image tokens between
row/column marker tokens. 1-D positions.

Each tile is one grid (``side / scale_factor`` square, raster order after the pixel shuffle) and counts as one image
for budgets (a ratio applies to every tile; a token count is per tile)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ...methods.visual.base import VisualGroup
from ...spec import VisualPlan
from .base import ImageTokens, VisionAdapter
from .llava import llama_stack


class Idefics3Adapter(VisionAdapter):
    """Idefics3 and SmolVLM: projector stage (after the pixel-shuffle connector) and llm stage, per tile."""

    family: ClassVar[str] = "idefics3"

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.core = model.model
        self.image_token_id = int(model.config.image_token_id)
        self.seq_len = int(self.core.image_seq_len)
        self.side = math.isqrt(self.seq_len)
        self.stack = llama_stack(model, self.core.text_model)

    def encode(self, inputs: Mapping[str, Any], plan: VisualPlan, seeds: list[int]) -> list[ImageTokens]:
        feats = self.core.get_image_features(
            inputs["pixel_values"], inputs.get("pixel_attention_mask"), return_dict=True
        ).pooler_output
        out = []
        grid = (VisualGroup(0, self.seq_len, self.side, self.seq_len // self.side),)
        for f in feats:
            for tile in f.split(self.seq_len) if f.shape[0] else ():
                out.append(ImageTokens(tile, torch.ones(tile.shape[0], dtype=torch.bool, device=tile.device), grid))
        return out
