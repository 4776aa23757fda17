"""Tiny random-weight VLMs of four families, built from configs in-process (no hub), and their inputs."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 120
IMG = 100  # image token id in every tiny model


def _llama(**kw: Any) -> Any:
    from transformers import LlamaConfig

    base = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    }
    base.update(kw)
    return LlamaConfig(**base)


def _qwen_text() -> dict[str, Any]:
    """The tiny text model of both Qwen-VL families (M-RoPE sections over head_dim 8)."""
    return {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    }


def _eval(model: Any) -> Any:
    model.eval()
    model.config._attn_implementation_internal = "sdpa"
    for sub in ("text_config", "vision_config"):
        c = getattr(model.config, sub, None)
        if c is not None:
            c._attn_implementation_internal = "sdpa"
    return model


def _clip() -> Any:
    """The tiny CLIP tower of both LLaVA families: 3 layers (LLaVA reads layer 2), 32 px / 8 px → 16 patches."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )


def llava(seed: int = 0, strategy: str = "default") -> Any:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = _clip()
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_llama(),
        image_token_index=IMG,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    return _eval(LlavaForConditionalGeneration(cfg))


def llava_inputs(n_text: list[int], n_images: list[int], seed: int = 0, per_image: int = 16) -> dict[str, torch.Tensor]:
    """A left-padded batch: sample b has ``n_images[b]`` images (runs of ``per_image`` image tokens) between text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for nt, ni in zip(n_text, n_images):
        row: list[int] = torch.randint(1, IMG, (2,), generator=g).tolist()
        for _ in range(ni):
            row += [IMG] * per_image + torch.randint(1, IMG, (2,), generator=g).tolist()
        row += torch.randint(1, IMG, (nt,), generator=g).tolist()
        rows.append(row)
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    pv = torch.randn(sum(n_images), 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


def select(inputs: dict[str, torch.Tensor], b: int, images_before: int, n_images: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` alone, without its padding."""
    m = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, m], "attention_mask": inputs["attention_mask"][b : b + 1, m]}
    out["pixel_values"] = inputs["pixel_values"][images_before : images_before + n_images]
    return out


def llava_batch(
    n_text: tuple[int, ...] = (3, 7, 1), n_images: tuple[int, ...] = (1, 2, 0)
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A left-padded LLaVA batch (sample b: ``n_images[b]`` images, ``n_text[b]`` text tokens at the end) and each
    sample alone (unpadded) — the standard batch of the VLM tests (one sample without an image)."""
    inp = llava_inputs(list(n_text), list(n_images))
    return inp, [select(inp, b, sum(n_images[:b]), n_images[b]) for b in range(len(n_text))]


def qwen2_vl(seed: int = 0) -> Any:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=_qwen_text(),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "mlp_ratio": 2,
        },
        image_token_id=IMG,
        video_token_id=IMG + 1,
        vision_start_token_id=IMG + 2,
        vision_end_token_id=IMG + 3,
    )
    return _eval(Qwen2VLForConditionalGeneration(cfg))


def qwen_inputs(n_text: list[int], grids: list[list[tuple[int, int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Sample b has images of patch grids ``grids[b]`` (h, w patches, multiples of 2) → h·w/4 tokens each."""
    g = torch.Generator().manual_seed(seed)
    rows, thw = [], []
    for nt, gs in zip(n_text, grids):
        row: list[int] = torch.randint(1, IMG, (2,), generator=g).tolist()
        for h, w in gs:
            row += [IMG + 2] + [IMG] * (h * w // 4) + [IMG + 3] + torch.randint(1, IMG, (1,), generator=g).tolist()
            thw.append([1, h, w])
        row += torch.randint(1, IMG, (nt,), generator=g).tolist()
        rows.append(row)
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    n_patch = sum(h * w for gs in grids for h, w in gs)
    pv = torch.randn(n_patch, 3 * 2 * 4 * 4, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pv,
        "image_grid_thw": torch.tensor(thw, dtype=torch.long),
    }


def qwen_select(inputs: dict[str, torch.Tensor], b: int, grids: list[list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    m = inputs["attention_mask"][b].bool()
    before = sum(len(gs) for gs in grids[:b])
    p0 = sum(h * w for gs in grids[:b] for h, w in gs)
    p1 = p0 + sum(h * w for h, w in grids[b])
    return {
        "input_ids": inputs["input_ids"][b : b + 1, m],
        "attention_mask": inputs["attention_mask"][b : b + 1, m],
        "pixel_values": inputs["pixel_values"][p0:p1],
        "image_grid_thw": inputs["image_grid_thw"][before : before + len(grids[b])],
    }


def llava_next(seed: int = 0) -> Any:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = _clip()
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=_llama(),
        image_token_index=IMG,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = _eval(LlavaNextForConditionalGeneration(cfg))
    with torch.no_grad():
        model.model.image_newline.normal_()
    return model


def next_inputs(
    model: Any, n_text: list[int], sizes: list[list[tuple[int, int]]], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Sample b has images of original sizes ``sizes[b]`` (H, W); each image is 1 + its crops at 32 px (padded
    to 5 crops); the placeholder count is what the model packs."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    flat = [s for ss in sizes for s in ss]
    n_crops = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 32) for s in flat]
    pv = torch.zeros(len(flat), 5, 3, 32, 32)
    for i, n in enumerate(n_crops):
        pv[i, :n] = torch.randn(n, 3, 32, 32, generator=g)
    image_sizes = torch.tensor(flat, dtype=torch.long)
    counts = []
    with torch.no_grad():
        for i in range(len(flat)):
            f = model.model.get_image_features(pv[i : i + 1], image_sizes[i : i + 1], return_dict=True).pooler_output
            counts.append(int(f[0].shape[0]))
    rows, k = [], 0
    for nt, ss in zip(n_text, sizes):
        row: list[int] = torch.randint(1, IMG, (2,), generator=g).tolist()
        for _ in ss:
            row += [IMG] * counts[k] + torch.randint(1, IMG, (2,), generator=g).tolist()
            k += 1
        row += torch.randint(1, IMG, (nt,), generator=g).tolist()
        rows.append(row)
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_sizes": image_sizes}


def next_select(inputs: dict[str, torch.Tensor], b: int, sizes: list[list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    m = inputs["attention_mask"][b].bool()
    i0 = sum(len(s) for s in sizes[:b])
    i1 = i0 + len(sizes[b])
    out = {"input_ids": inputs["input_ids"][b : b + 1, m], "attention_mask": inputs["attention_mask"][b : b + 1, m]}
    if i1 > i0:
        out["pixel_values"] = inputs["pixel_values"][i0:i1]
        out["image_sizes"] = inputs["image_sizes"][i0:i1]
    return out


def idefics3(seed: int = 0) -> Any:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
        },
        text_config=_llama().to_dict(),
        scale_factor=2,
        image_token_id=IMG,
    )
    return _eval(Idefics3ForConditionalGeneration(cfg))


def idefics_inputs(n_text: list[int], n_tiles: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Sample b has ``n_tiles[b]`` tiles (runs of 16 image tokens between marker tokens), pixel values padded with
    all-zero tiles to the largest count."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for nt, n in zip(n_text, n_tiles):
        row: list[int] = torch.randint(1, IMG, (2,), generator=g).tolist()
        for _ in range(n):
            row += [IMG + 2, IMG + 3] + [IMG] * 16 + [IMG + 2]
        row += torch.randint(1, IMG, (nt,), generator=g).tolist()
        rows.append(row)
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    pv = torch.zeros(len(rows), max(max(n_tiles), 1), 3, 64, 64)
    for b, n in enumerate(n_tiles):
        pv[b, :n] = torch.randn(n, 3, 64, 64, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


def idefics_select(inputs: dict[str, torch.Tensor], b: int, n_tiles: list[int]) -> dict[str, torch.Tensor]:
    m = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, m], "attention_mask": inputs["attention_mask"][b : b + 1, m]}
    if n_tiles[b]:
        out["pixel_values"] = inputs["pixel_values"][b : b + 1, : n_tiles[b]]
    return out


def qwen2_5_vl(seed: int = 0) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text(),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 32,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
        },
        image_token_id=IMG,
        video_token_id=IMG + 1,
        vision_start_token_id=IMG + 2,
        vision_end_token_id=IMG + 3,
    )
    return _eval(Qwen2_5_VLForConditionalGeneration(cfg))
