"""Which patches each visual-token method keeps, drawn over the images (``tokensieve train vlm-eval --overlays``).

For one sample the kept *original* patches are found by composing the stages' results in order: the vision stage's
indices (into the image's patch grid), then the projector stage's and every llm-stage step's (each into the tokens
that reached it). A merged token is drawn at the patch it stands at; an llm-stage method's patches are those whose
tokens still reach the last decoder layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def kept_patches(state: Any, n_patch: int, sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_patch,)`` bools for a one-image sample: the original patches whose tokens reach the language model, and
    those whose tokens survive every stage (the last decoder layers)."""
    ids = torch.arange(n_patch)
    vision = state.kept.get("vision")
    if vision is not None:
        ids = vision[sample].index.cpu()
    if "projector" in state.kept:
        ids = ids[state.kept["projector"][sample].index.cpu()]
    at_input = torch.zeros(n_patch, dtype=torch.bool)
    at_input[ids] = True
    steps = sorted((int(k.split(":")[1]), v) for k, v in state.kept.items() if k.startswith("llm:"))
    for _, kept in steps:
        ids = ids[kept[sample].index.cpu()]
    at_end = torch.zeros(n_patch, dtype=torch.bool)
    at_end[ids] = True
    return at_input, at_end


def tile_path(out: Path, spec: str) -> Path:
    """Where :func:`overlay_figure` writes one configuration's column — its kept patches on every scene, one above the
    other — as its own PNG (``<figure>_tiles/<label>.png``), for the interactive report's hover."""
    from ..results.render import slug
    from ..spec import visual_label

    return out.with_name(out.stem + "_tiles") / f"{slug(visual_label(spec))}.png"


def overlay_figure(
    model: Any, processor: Any, specs: list[str], out: Path, *, n_scenes: int = 3, split: str = "test"
) -> Path:
    """A grid of the first ``n_scenes`` held-out scenes (rows) × the specs (columns): patches dropped before the
    language model darkest, patches dropped inside it half-dimmed, patches kept to the end clear; the scene's first
    question in the prompt (query-aware methods see it). Each column is also written alone (:func:`tile_path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..adapters.vision import vision_adapter
    from ..adapters.vlm import spec_of
    from ..data.scenes import questions, scenes
    from .batches import Encoder, pixel_values

    geo = spec_of(model.config)
    side = geo.image_size // geo.patch_size
    n_patch = side * side
    encoder = Encoder(processor.tokenizer, geo.num_visual_tokens)
    adapter = vision_adapter(model)
    todo = scenes(split, n_scenes)
    columns: list[list[Any]] = [[] for _ in specs]
    fig, axes = plt.subplots(
        len(todo), len(specs), figsize=(1.9 * len(specs), 2.1 * len(todo)), squeeze=False, constrained_layout=True
    )
    for r, scene in enumerate(todo):
        q = questions(scene)[0]
        ids = torch.tensor([encoder.prefix() + encoder.question(q.text, first=True)])
        image = scene.render()
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixel_values(processor, [image]),
        }
        pixels = np.asarray(image.convert("RGB").resize((geo.image_size, geo.image_size))).astype(float) / 255.0
        for c, spec in enumerate(specs):
            with torch.no_grad():
                state = adapter.prefill(inputs, None if spec == "full" else spec, seeds=[scene.seed])
            at_input, at_end = (m.view(side, side).numpy().astype(float) for m in kept_patches(state, n_patch))
            level = 0.2 + 0.35 * at_input + 0.45 * at_end  # dropped before the LM / inside it / kept throughout
            shade = np.kron(level, np.ones((geo.patch_size, geo.patch_size)))[..., None]
            ax = axes[r][c]
            ax.imshow(pixels * shade)
            columns[c].append(pixels * shade)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(spec, fontsize=7)
            if c == 0:
                ax.set_ylabel(q.text if len(q.text) < 40 else q.text[:37] + "…", fontsize=6)
            n_in, n_end = int(at_input.sum()), int(at_end.sum())
            label = f"{n_in} of {n_patch} to the LM" + (f", {n_end} to the end" if n_end != n_in else "")
            ax.set_xlabel(label, fontsize=6)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    from PIL import Image

    for spec, column in zip(specs, columns):
        gap = np.ones((4, *column[0].shape[1:]))
        strip = np.concatenate([part for image in column for part in (image, gap)][:-1], axis=0)
        path = tile_path(out, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(strip, 0, 1) * 255).astype(np.uint8)).save(path)
    return out
