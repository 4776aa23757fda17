"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP-style ViT with a CLS token, a projector, a Llama-family
decoder; one contiguous run of ``<image>`` tokens per image, 1-D positions. Also the embedded VLM
(``smollm2-135m-llava``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import CapabilityError, ConfigError
from ...methods.visual.base import Stage, VisualContext, VisualGroup, VisualKept
from ...methods.visual.spec import VisualPlan
from .attention import RowRequest, rows_routed
from .base import ImageTokens, VisionAdapter
from .engine import TextStack


def llama_stack(model: Any, lm: Any) -> TextStack:
    """The decoder of a Llama-family language model inside a VLM (``lm`` has ``layers``, ``embed_tokens``,
    ``norm``, ``rotary_emb``)."""
    return TextStack(lm.layers, lm.embed_tokens, lm.norm, model.lm_head, lambda h, p: lm.rotary_emb(h, p))


class ClipTower:
    """A CLIP vision tower run layer by layer, with the vision-stage method after layer ``l``."""

    def __init__(self, tower: Any, feature_layer: int, strategy: str) -> None:
        self.tower = tower
        self.layers = list(tower.encoder.layers)
        n = len(self.layers)
        if not isinstance(feature_layer, int):
            raise CapabilityError("Visual-token pruning supports one vision feature layer (an int), not a list.")
        self.feature = feature_layer if feature_layer >= 0 else n + 1 + feature_layer  # layers whose output is used
        if not 0 <= self.feature <= n:
            raise ConfigError(f"vision_feature_layer {feature_layer} is outside the tower's {n} layers.")
        if strategy not in ("default", "full"):
            raise CapabilityError(f"vision_feature_select_strategy {strategy!r} is not supported.")
        self.strategy = strategy
        cfg = tower.config
        self.side = int(cfg.image_size) // int(cfg.patch_size)

    def attn(self, i: int) -> torch.nn.Module:
        return self.layers[i].self_attn

    def run(self, h: Tensor, lo: int, hi: int) -> Tensor:
        for i in range(lo, hi):
            out = self.layers[i](h, None)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def features(self, pixel_values: Tensor) -> Tensor:
        """``(N_img, tokens, D_vision)`` the selected feature layer's states (CLS dropped with "default")."""
        h = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        h = self.run(h, 0, self.feature)
        return h[:, 1:] if self.strategy == "default" else h

    def pruned(self, pixel: Tensor, spec: Any, seed: int) -> tuple[Tensor, VisualKept]:
        """One image through the tower with the vision-stage method after layer ``l``: the kept patches' features
        ``(k, D_vision)`` (CLS removed) and the method's result."""
        at = spec.method.at_layer
        if at > self.feature:
            raise ConfigError(
                f"{spec.label}: the vision stage acts after a layer <= the feature layer ({self.feature} layers run)."
            )
        h = self.tower.pre_layrnorm(self.tower.embeddings(pixel[None]))
        request = RowRequest()
        needs = type(spec.method).needs
        if "cls_attention" in needs:
            request.rows[id(self.attn(at - 1))] = "first"
        if "keys" in needs:
            request.keys.add(id(self.attn(at - 1)))
        with rows_routed([self.attn(i) for i in range(len(self.layers))], request):
            h = self.run(h, 0, at)
        probs = request.probs.get(id(self.attn(at - 1)))
        keys = request.recorded_keys.get(id(self.attn(at - 1)))
        ctx = VisualContext(
            tokens=h[0, 1:],
            groups=(VisualGroup(0, self.side * self.side, self.side, self.side),),
            stage=Stage.VISION,
            layer=at,
            cls_attention=None if probs is None else probs[0][:, 1:],
            keys=None if keys is None else keys[0][:, 1:],
            seed=seed,
        )
        kept = spec.method.prune(ctx, spec.budget)
        patches = h[0, 1:][kept.index] if kept.tokens is None else kept.tokens.to(h.dtype)
        h = torch.cat([h[:, :1], patches[None]], dim=1)
        h = self.run(h, at, self.feature)
        return h[0, 1:], kept


class LlavaAdapter(VisionAdapter):
    """LLaVA-1.5 and the embedded VLM: vision stage (after CLIP layer l, CLS attention available), projector stage,
    llm stage."""

    family: ClassVar[str] = "llava"
    has_cls: ClassVar[bool] = True
    vision_stage: ClassVar[bool] = True

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        core = model.model
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.clip = ClipTower(core.vision_tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        self.projector = core.multi_modal_projector
        self.stack = llama_stack(model, core.language_model)

    def encode(self, inputs: Mapping[str, Any], plan: VisualPlan, seeds: list[int]) -> list[ImageTokens]:
        pv = inputs["pixel_values"]
        dtype = next(self.projector.parameters()).dtype
        pv = pv.to(dtype)
        side = self.clip.side
        n_patch = side * side
        cls = 1 if self.clip.strategy == "full" else 0
        grid = (VisualGroup(0, n_patch, side, side),)
        prunable = torch.ones(n_patch + cls, dtype=torch.bool, device=pv.device)
        prunable[:cls] = False
        spec = plan.at(Stage.VISION)
        if spec is None:
            feats = self.projector(self.clip.features(pv))
            return [ImageTokens(f, prunable, grid) for f in feats]
        if cls:
            raise CapabilityError("Vision-stage pruning with vision_feature_select_strategy='full' is not supported.")
        out = []
        for i in range(pv.shape[0]):
            h, kept = self.clip.pruned(pv[i], spec, seeds[i])
            proj = self.projector(h[None])[0]
            feats = proj.new_zeros(n_patch, proj.shape[-1])
            feats[kept.index] = proj
            dropped = torch.ones(n_patch, dtype=torch.bool, device=pv.device)
            dropped[kept.index] = False
            k = int(kept.index.numel())
            groups = grid if k == n_patch and kept.tokens is None else (VisualGroup(0, k, 1, k),)
            out.append(ImageTokens(feats, prunable, groups, dropped, kept))
        return out
