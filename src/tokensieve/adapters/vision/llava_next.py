"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution images — a thumbnail (the whole image at the
encoder's size) and a grid of crops, unpadded to the image's aspect, with an ``image_newline`` token after every row
of the crop grid. An image's placeholder run holds ``thumbnail (s × s)`` then ``H' rows × (W' + 1)``.

The prunable tokens are the thumbnail's and the crop grid's patches; the newline tokens always stay (they are
separators, not image content). The layout (which run entry is which patch, or a newline) is found by packing an
index tensor with the model's own ``pack_image_features``, so it follows transformers' unpadding exactly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ...errors import CapabilityError
from ...methods.visual.base import VisualGroup
from ...methods.visual.spec import VisualPlan
from .base import ImageTokens, VisionAdapter
from .llava import llama_stack


class LlavaNextAdapter(VisionAdapter):
    """LLaVA-NeXT: projector stage and llm stage over the thumbnail and crop grids (newlines kept)."""

    family: ClassVar[str] = "llava_next"
    has_cls: ClassVar[bool] = True

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.core = model.model
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        if not isinstance(cfg.vision_feature_layer, int):
            raise CapabilityError("Visual-token pruning supports one vision feature layer (an int), not a list.")
        self.side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        self.stack = llama_stack(model, self.core.language_model)

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
        feats = self.core.get_image_features(
            pv,
            sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        out = []
        L = self.side * self.side
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        for i, f in enumerate(feats):
            n_crops = image_size_to_num_patches(sizes[i], cfg.image_grid_pinpoints, int(cfg.vision_config.image_size))
            lay = self.layout(int(n_crops), sizes[i])
            prunable = lay >= 0
            n_thumb = min(L, int(prunable.sum()))
            groups = [VisualGroup(0, n_thumb, self.side, self.side)] if n_thumb == L else []
            rows = int((~prunable).sum())
            rest = int(prunable.sum()) - n_thumb
            if rows and rest:
                groups.append(VisualGroup(n_thumb, n_thumb + rest, rows, rest // rows))
            elif rest:
                groups.append(VisualGroup(n_thumb, n_thumb + rest, 1, rest))
            out.append(ImageTokens(f, prunable.to(f.device), tuple(groups)))
        return out
