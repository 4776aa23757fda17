"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP-style ViT with a CLS token, a projector, a Llama-family
decoder; one contiguous run of ``<image>`` tokens per image, 1-D positions. Also the embedded VLM
(``smollm2-135m-llava``)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import CapabilityError, ConfigError
from ...methods.visual.base import Stage, VisualContext, VisualGroup, VisualKept
from ...spec import VisualPlan
from .attention import RowRequest, rows_routed
from .attention import scoped_request as _scoped
from .base import ImageTokens, VisionAdapter
from .segments import TextStack


def llama_stack(model: Any, lm: Any) -> TextStack:
    """The decoder of a Llama-family language model inside a VLM (``lm`` has ``layers``, ``embed_tokens``,
    ``norm``, ``rotary_emb``)."""
    return TextStack(lm.layers, lm.embed_tokens, lm.norm, model.lm_head, lambda h, p: lm.rotary_emb(h, p))


@dataclass
class Crop:
    """One image (or LLaVA-NeXT crop) in flight through the CLIP tower.

    ``h (1, 1 + n, D)``: the CLS token then the patches left; ``orig (n,)``: each patch's index in the full grid;
    ``sizes (n,)``: original patches each stands for (after merges; None: one each); ``passive (n,)``: patches the
    method does not see and never removes (LLaVA-NeXT crop patches that the unpadding discards); ``grid``: the
    visible patches' grid shape while untouched, else None; ``cls (H, n)``: the CLS row of the feature layer."""

    h: Tensor
    orig: Tensor
    sizes: Tensor | None
    passive: Tensor
    grid: tuple[int, int] | None
    cls: Tensor | None = None

    @property
    def active(self) -> Tensor:
        return (~self.passive).nonzero().flatten()


class ClipTower:
    """A CLIP vision tower run layer by layer, with the vision-stage method after each of its layers."""

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

    def run(self, h: Tensor, lo: int, hi: int, mask: Tensor | None = None) -> Tensor:
        for i in range(lo, hi):
            out = self.layers[i](h, mask)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def features(self, pixel_values: Tensor) -> Tensor:
        """``(N_img, tokens, D_vision)`` the selected feature layer's states (CLS dropped with "default")."""
        h = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        h = self.run(h, 0, self.feature)
        return h[:, 1:] if self.strategy == "default" else h

    def features_with_cls(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`features` and ``(N_img, H, side²)`` the CLS row of the feature layer over the patches."""
        request = RowRequest()
        request.rows[id(self.attn(self.feature - 1))] = "first"
        with rows_routed([self.attn(self.feature - 1)], request):
            feats = self.features(pixel_values)
        return feats, request.probs[id(self.attn(self.feature - 1))][:, :, 1:]

    def step_layers(self, spec: Any) -> list[int]:
        ls = [int(x) for x in spec.method.layers(self.feature)]
        for x in ls:
            if not 1 <= x <= self.feature:
                raise ConfigError(
                    f"{spec.label}: the vision stage acts after encoder layers 1..{self.feature} (the layers whose "
                    f"output the model reads); got {x}."
                )
        if any(b <= a for a, b in itertools.pairwise(ls)):
            raise ConfigError(f"{spec.label}: its encoder layers must increase; got {ls}.")
        return ls

    def pruned(
        self,
        pixels: Tensor,
        spec: Any,
        seed: int,
        visible: list[Tensor | None] | None = None,
        crop_grid: tuple[int, int] | None = None,
    ) -> tuple[list[Crop], VisualKept]:
        """The crops of one image (``pixels (C, 3, H, W)``: LLaVA-1.5's one image, or LLaVA-NeXT's thumbnail and
        crops) through the tower with the vision-stage method after each of its layers, all crops in lockstep in one
        context (a group per crop). ``visible[c]``: the patches of crop c the method may see (None: all);
        ``crop_grid``: the crops' ``(rows, cols)`` after the thumbnail (``VisualContext.crop_grid``).

        Returns the crops (their patches' states at the feature layer, CLS removed) and the image's result: the kept
        patches' indices into the crops' concatenated grids (crop · side² + patch) and their sizes."""
        method = spec.method
        steps = self.step_layers(spec)
        needs = type(method).capabilities.signals
        side = self.side
        n0 = side * side
        h0 = self.tower.pre_layrnorm(self.tower.embeddings(pixels))
        crops: list[Crop] = []
        for c in range(pixels.shape[0]):
            vis = None if visible is None else visible[c]
            passive = torch.zeros(n0, dtype=torch.bool, device=pixels.device)
            grid: tuple[int, int] | None = (side, side)
            if vis is not None:
                passive[:] = True
                passive[vis] = False
                rows = sorted({int(i) // side for i in vis.tolist()})
                cols = sorted({int(i) % side for i in vis.tolist()})
                grid = (len(rows), len(cols)) if len(rows) * len(cols) == int(vis.numel()) else None
            crops.append(Crop(h0[c : c + 1], torch.arange(n0, device=pixels.device), None, passive, grid))
        memory: dict[str, Any] = {}
        start: tuple[int, ...] | None = None
        proportional = bool(type(method).proportional)
        last = self.feature - 1
        modules = [self.attn(i) for i in range(len(self.layers))]
        with rows_routed(modules, RowRequest()):
            for i in range(self.feature):
                layer = i + 1
                acting = layer in steps
                signals: list[RowRequest] = []
                previous: list[Tensor] = []
                for crop in crops:
                    request = RowRequest()
                    mod = id(self.attn(i))
                    if (acting and "cls_attention" in needs) or i == last:
                        request.rows[mod] = "first"
                    if acting and "mean_attention" in needs:
                        request.means.add(mod)
                    if acting and "keys" in needs:
                        request.keys.add(mod)
                    if acting and ("values" in needs or "anchor_value" in needs):
                        request.values.add(mod)
                    mask = None
                    if proportional and crop.sizes is not None:
                        bias = torch.cat([crop.sizes.new_ones(1), crop.sizes]).to(crop.h.dtype).log()
                        mask = bias.view(1, 1, 1, -1)
                    previous.append(crop.h[0, 1:])
                    with _scoped(request):
                        crop.h = self.run(crop.h, i, layer, mask)
                    if i == last:
                        crop.cls = request.probs[mod][0, :, 1:]
                    signals.append(request)
                if not acting:
                    continue
                ctx = self._context(crops, signals, previous, id(self.attn(i)), needs)
                ctx = replace(ctx, layer=layer, step=steps.index(layer), steps=len(steps), memory=memory, seed=seed)
                ctx = replace(ctx, start=start, crop_grid=crop_grid)
                if start is None:
                    start = tuple(ctx.images)
                    ctx = replace(ctx, start=start)
                kept = method.prune(ctx, spec.budget)
                self._apply(crops, kept)
        index = torch.cat([c.orig + j * n0 for j, c in enumerate(crops)])
        sizes = None
        if any(c.sizes is not None for c in crops):
            sizes = torch.cat([c.sizes if c.sizes is not None else c.orig.new_ones(c.orig.shape) for c in crops])
        return crops, VisualKept(index, None, sizes)

    @staticmethod
    def _context(
        crops: list[Crop], signals: list[RowRequest], previous: list[Tensor], mod: int, needs: frozenset[str]
    ) -> VisualContext:
        """The context over the crops' visible patches (a group per crop) with the signals recorded in ``mod``."""
        groups, tokens, prev = [], [], []
        cls: list[Tensor] = []
        mean: list[Tensor] = []
        keys: list[Tensor] = []
        values: list[Tensor] = []
        anchors: list[Tensor] = []
        sizes: list[Tensor] = []
        off = 0
        for crop, req, before in zip(crops, signals, previous):
            a = crop.active
            n = int(a.numel())
            grid = crop.grid if crop.grid is not None and crop.grid[0] * crop.grid[1] == n else (1, n)
            groups.append(VisualGroup(off, off + n, grid[0], grid[1]))
            off += n
            tokens.append(crop.h[0, 1:][a])
            prev.append(before[a])
            sizes.append((crop.sizes if crop.sizes is not None else crop.orig.new_ones(crop.orig.shape))[a])
            if mod in req.probs:
                cls.append(req.probs[mod][0, :, 1:][:, a])
            if mod in req.mean_probs:
                mean.append(req.mean_probs[mod][0, :, 1:][:, a])
            if mod in req.recorded_keys:
                keys.append(req.recorded_keys[mod][0, :, 1:][:, a])
            if mod in req.recorded_values:
                values.append(req.recorded_values[mod][0, :, 1:][:, a])
                anchors.append(req.recorded_values[mod][0, :, 0])
        full = len(crops)
        return VisualContext(
            tokens=torch.cat(tokens),
            groups=tuple(groups),
            stage=Stage.VISION,
            cls_attention=torch.cat(cls, 1) if len(cls) == full and "cls_attention" in needs else None,
            mean_attention=torch.cat(mean, 1) if len(mean) == full else None,
            keys=torch.cat(keys, 1) if len(keys) == full else None,
            values=torch.cat(values, 1) if len(values) == full and "values" in needs else None,
            anchor_value=(anchors[0] if full == 1 else torch.stack(anchors))
            if len(anchors) == full and "anchor_value" in needs
            else None,
            previous=torch.cat(prev) if "previous" in needs else None,
            sizes=None if all(c.sizes is None for c in crops) else torch.cat(sizes),
        )

    @staticmethod
    def _apply(crops: list[Crop], kept: VisualKept) -> None:
        """Apply one step's result (indices into the crops' concatenated visible patches) to every crop."""
        off = 0
        for crop in crops:
            a = crop.active
            n = int(a.numel())
            inside = (kept.index >= off) & (kept.index < off + n)
            rows = (kept.index[inside] - off).long()
            sel = a[rows]  # positions among the crop's patches
            keep = crop.passive.clone()
            keep[sel] = True
            patches = crop.h[0, 1:].clone()
            if kept.tokens is not None:
                patches[sel] = kept.tokens[inside].to(patches.dtype)
            sizes = crop.sizes
            if kept.sizes is not None:
                sizes = (sizes if sizes is not None else crop.orig.new_ones(crop.orig.shape)).clone()
                sizes[sel] = kept.sizes[inside].to(sizes.dtype)
            idx = keep.nonzero().flatten()
            changed = int(idx.numel()) < int(crop.orig.numel()) or kept.tokens is not None
            crop.h = torch.cat([crop.h[:, :1], patches[idx][None]], dim=1)
            crop.orig = crop.orig[idx]
            crop.sizes = None if sizes is None else sizes[idx]
            crop.passive = crop.passive[idx]
            if crop.cls is not None:
                crop.cls = crop.cls[:, idx]
            if changed:
                crop.grid = None
            off += n


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
            if plan.at(Stage.PROJECTOR) is not None and not cls:
                feats, cls_rows = self.clip.features_with_cls(pv)
                proj = self.projector(feats)
                return [ImageTokens(f, prunable, grid, cls_attention=r) for f, r in zip(proj, cls_rows)]
            feats = self.projector(self.clip.features(pv))
            return [ImageTokens(f, prunable, grid) for f in feats]
        if cls:
            raise CapabilityError("Vision-stage pruning with vision_feature_select_strategy='full' is not supported.")
        out = []
        for i in range(pv.shape[0]):
            crops, kept = self.clip.pruned(pv[i : i + 1], spec, seeds[i])
            crop = crops[0]
            proj = self.projector(crop.h[:, 1:])[0]
            feats = proj.new_zeros(n_patch, proj.shape[-1])
            feats[crop.orig] = proj
            dropped = torch.ones(n_patch, dtype=torch.bool, device=pv.device)
            dropped[crop.orig] = False
            k = int(crop.orig.numel())
            groups = grid if crop.grid is not None and k == n_patch else (VisualGroup(0, k, 1, k),)
            rows: Tensor | None = None
            if crop.cls is not None:
                rows = crop.cls.new_zeros(crop.cls.shape[0], n_patch)
                rows[:, crop.orig] = crop.cls
            out.append(ImageTokens(feats, prunable, groups, dropped, kept, cls_attention=rows))
        return out
