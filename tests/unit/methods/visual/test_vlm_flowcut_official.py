"""FlowCut's official LLaVA-NeXT order (``flowcut[order=official]``) on the tiny random LLaVA-NeXT: every crop and the
thumbnail pruned over its whole grid inside the encoder, then the kept crop patches unpadded (those in the padding
discarded) and no ``image_newline`` tokens — checked against a reference written here from the rule (the CLIP layers,
the score, the mosaic and the unpadding recomputed by hand), the language model's logits against transformers' own
decoder on the reference sequence, keep-all, batch = alone, and the refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlm_tiny as vt

from tokensieve.adapters.vision import vision_adapter
from tokensieve.adapters.vision.base import as_plan
from tokensieve.errors import CapabilityError, ConfigError
from tokensieve.spec import VisualPlan, VisualSpec

ATOL = 2e-5
SIZES = [[(40, 70)], [(64, 30), (30, 30)]]  # 40x70: a 2x2 crop mosaic whose top and bottom quarters are padding


@pytest.fixture(scope="module")
def nxt() -> Any:
    return vt.llava_next()


def _layer(layer: torch.nn.Module, h: Tensor) -> Tensor:
    out = layer(h, None)
    return out[0] if isinstance(out, tuple) else out


def _flowcut_keep(model: Any, h0: Tensor, target: int) -> list[Tensor]:
    """Per CLIP image (row of ``h0 (C, 1 + N, D)``), FlowCut's kept patches after encoder layer 1 when that is its
    only step (the tiny tower reads layer 2: F = 2): ``S = (a/Σa + s/Σs) · ‖mean_h v‖₁`` from layer 1's attention —
    ``a`` the CLS row over the patches (head mean), ``s`` the head mean of ``softmax(v_CLS · v)`` over CLS and the
    patches without 1/√d, CLS dropped — and the top ``target`` in index order."""
    layer = model.model.vision_tower.encoder.layers[0]
    attn = layer.self_attn
    C, n1, _ = h0.shape
    H = attn.num_heads
    d = attn.head_dim
    x = layer.layer_norm1(h0)
    q = attn.q_proj(x).view(C, n1, H, d).transpose(1, 2)
    k = attn.k_proj(x).view(C, n1, H, d).transpose(1, 2)
    v = attn.v_proj(x).view(C, n1, H, d).transpose(1, 2)  # (C, H, 1 + N, d)
    probs = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
    out = []
    for c in range(C):
        a = probs[c, :, 0, 1:].mean(0)
        sem = torch.softmax(torch.einsum("hd,hnd->hn", v[c, :, 0], v[c]), dim=-1)[:, 1:].mean(0)
        dens = v[c, :, 1:].mean(0).abs().sum(-1)
        score = (a / a.sum() + sem / sem.sum()) * dens
        out.append(torch.sort(torch.topk(score, target).indices).values)
    return out


def _unpadded_rows_cols(image_size: tuple[int, int], height: int, width: int) -> tuple[range, range]:
    """The rows and columns of a ``height × width`` patch mosaic that survive the unpadding of an image of
    ``image_size = (H, W)`` pixels (the official ``unpad_mask``: the padding is split evenly on both sides)."""
    oh, ow = image_size
    if ow / oh > width / height:
        new_h = int(oh * (width / ow))
        pad = (height - new_h) // 2
        return range(pad, height - pad), range(width)
    new_w = int(ow * (height / oh))
    pad = (width - new_w) // 2
    return range(height), range(pad, width - pad)


def _reference(model: Any, pv: Tensor, image_size: tuple[int, int], T: int) -> tuple[list[int], Tensor]:
    """One image's official result: the kept patches (``grid · side² + patch``, the thumbnail as grid 0, chosen over
    every grid's whole patches) and the language model's input for it — the thumbnail's kept patches, then the
    unpadded crop mosaic's kept patches in raster order, no newline tokens."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    cfg = model.config
    tower = model.model.vision_tower
    side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
    L = side * side
    n = int(image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, int(cfg.vision_config.image_size)))
    h0 = tower.pre_layrnorm(tower.embeddings(pv[:n]))
    keep = _flowcut_keep(model, h0, T // 2)  # int(T/2) per grid: the thumbnail and every crop
    h1 = _layer(tower.encoder.layers[0], h0)
    feats = []
    for c in range(n):  # the feature layer (layer 2) runs on CLS + the kept patches
        h2 = _layer(tower.encoder.layers[1], torch.cat([h1[c : c + 1, :1], h1[c : c + 1, 1 + keep[c]]], dim=1))
        feats.append(model.model.multi_modal_projector(h2[:, 1:])[0])
    kept = [c * L + int(j) for c in range(n) for j in keep[c]]
    rows, cols = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, int(cfg.vision_config.image_size))
    rows, cols = int(rows), int(cols)
    assert rows * cols == n - 1
    ys, xs = _unpadded_rows_cols(image_size, rows * side, cols * side)
    seq = [feats[0]]
    for y in ys:
        for x in xs:
            crop = 1 + (y // side) * cols + (x // side)
            patch = (y % side) * side + (x % side)
            hits = (keep[crop] == patch).nonzero().flatten()
            if hits.numel():
                seq.append(feats[crop][int(hits[0]) : int(hits[0]) + 1])
    return kept, torch.cat(seq)


def _images(inp: dict[str, Tensor]) -> list[tuple[Tensor, tuple[int, int]]]:
    sizes = inp["image_sizes"].tolist()
    return [(inp["pixel_values"][i], (int(h), int(w))) for i, (h, w) in enumerate(sizes)]


def _lm_logits(model: Any, ids: Tensor, images: list[Tensor]) -> Tensor:
    """transformers' own decoder (its embeddings, layers, norm and head) on ``ids`` with each run of image tokens
    replaced by the next of ``images`` (its rows, however many: the prompt's run is the unpruned count), positions
    0, 1, … over the result: ``(S, V)`` logits."""
    lm = model.model.language_model
    text = lm.embed_tokens(ids)
    parts: list[Tensor] = []
    it = iter(images)
    i = 0
    while i < ids.numel():
        if int(ids[i]) == vt.IMG:
            j = i
            while j < ids.numel() and int(ids[j]) == vt.IMG:
                j += 1
            parts.append(next(it).to(text.dtype))
            i = j
        else:
            parts.append(text[i : i + 1])
            i += 1
    embeds = torch.cat(parts)[None]
    S = int(embeds.shape[1])
    mask = torch.ones(1, S, dtype=torch.long)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.arange(S)[None])
    return model.lm_head(out.last_hidden_state)[0].float()


# ---------------------------------------------------------------------------------------------- the reference
@torch.no_grad()
def test_official_order_equals_the_reference(nxt: Any) -> None:
    """The kept patches, the language model's input (order, states, no newline tokens, positions without gaps) and,
    with every kept patch reaching the language model (no llm step), its logits."""
    ad = vision_adapter(nxt)
    inp = vt.next_inputs(nxt, [2, 3], SIZES)
    T = 8
    for b in range(len(SIZES)):
        one = vt.next_select(inp, b, SIZES)
        refs = [_reference(nxt, pv, size, T) for pv, size in _images(one)]
        seq, kept, counts = ad.build(one, as_plan(f"flowcut[order=official]:{T}"))
        assert [k.index.tolist() for k in kept["vision"]] == [r[0] for r in refs]
        assert counts["vision"] == [sum(int(r[1].shape[0]) for r in refs)]
        image = seq.image[0] >= 0
        assert bool((seq.visual[0] == image).all())  # every image token is a patch: no newline separators
        got = seq.embeds[0, image]
        torch.testing.assert_close(got, torch.cat([r[1] for r in refs]), atol=ATOL, rtol=0)
        newline = nxt.model.image_newline.to(got.dtype)
        assert not bool(((got - newline).abs().amax(-1) < 1e-6).any())
        valid = seq.valid[0]
        assert seq.pos[0, 0, valid].tolist() == list(range(int(valid.sum())))  # the official code renumbers
        if b == 0:  # the 40x70 image: kept crop patches in the padding are discarded
            assert int(refs[0][1].shape[0]) < len(refs[0][0])
        # the same plan without the llm step (an explicit one that keeps everything): the decoder on the reference
        ref_logits = _lm_logits(nxt, one["input_ids"][0], [r[1] for r in refs])
        st = ad.prefill(one, f"flowcut[order=official]:{T}/fastv:1.0", all_logits=True)
        assert st.all_logits is not None
        torch.testing.assert_close(st.all_logits[0], ref_logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_official_order_llm_step_sees_no_newline_tokens(nxt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The companion llm step (decoder layer 2, T per image) scores exactly the patches that reached the language
    model — no newline tokens — and keeps T of each image that has more."""
    from tokensieve.methods.visual.flowcut import FlowCut

    ad = vision_adapter(nxt)
    inp = vt.next_inputs(nxt, [2, 3], SIZES)
    one = vt.next_select(inp, 0, SIZES)
    seen: list[int] = []
    original = FlowCut.prune

    def spy(self: FlowCut, ctx: Any, budget: Any) -> Any:
        if ctx.stage.value == "llm":
            seen.append(ctx.n)
        return original(self, ctx, budget)

    monkeypatch.setattr(FlowCut, "prune", spy)
    st = ad.prefill(one, "flowcut[order=official]:8")
    (ref,) = [_reference(nxt, pv, size, 8) for pv, size in _images(one)]
    n = int(ref[1].shape[0])
    assert seen == [n]
    assert st.visual_tokens["vision"] == [n]
    assert st.visual_tokens["llm"] == [min(8, n)]
    default = ad.prefill(one, "flowcut:8")
    assert default.visual_tokens["vision"] == [20]  # default order: 4 of each grid's visible patches, all reach the LM


# ------------------------------------------------------------------------------------ keep-all, batch = alone
@torch.no_grad()
def test_official_order_keep_all_is_the_model_without_newline_tokens(nxt: Any) -> None:
    """Keeping every patch, the official order is the unpruned model with the newline tokens taken out (the
    features transformers packs, minus the newline rows, positions 0, 1, …)."""
    ad = vision_adapter(nxt)
    inp = vt.next_inputs(nxt, [2, 3], SIZES)
    for b in range(len(SIZES)):
        one = vt.next_select(inp, b, SIZES)
        feats = nxt.model.get_image_features(one["pixel_values"], one["image_sizes"], return_dict=True).pooler_output
        newline = nxt.model.image_newline
        patches = [f[(f - newline.to(f.dtype)).abs().amax(-1) > 0] for f in feats]
        assert all(int(p.shape[0]) < int(f.shape[0]) for p, f in zip(patches, feats))
        ref = _lm_logits(nxt, one["input_ids"][0], patches)
        for spec in ("flowcut[order=official]:1.0", "flowcut[order=official]:100"):
            st = ad.prefill(one, spec, all_logits=True)
            assert st.all_logits is not None
            torch.testing.assert_close(st.all_logits[0], ref, atol=ATOL, rtol=0, msg=spec)


def test_official_order_batch_equals_alone(nxt: Any) -> None:
    ad = vision_adapter(nxt)
    inp = vt.next_inputs(nxt, [2, 3], SIZES)
    singles = [vt.next_select(inp, b, SIZES) for b in range(2)]
    for spec in ("flowcut[order=official]:8", "vis:flowcut[order=official]:0.2"):
        st = ad.prefill(inp, spec)
        per_image: list[list[int]] = []
        for b, one in enumerate(singles):
            alone = ad.prefill(one, spec)
            torch.testing.assert_close(st.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0, msg=f"{spec} {b}")
            per_image += [k.index.tolist() for k in alone.kept["vision"]]
            if "llm" in st.kept:
                assert st.kept["llm"][b].index.tolist() == alone.kept["llm"][0].index.tolist()
            assert {k: v[b] for k, v in st.visual_tokens.items()} == {k: v[0] for k, v in alone.visual_tokens.items()}
        assert [k.index.tolist() for k in st.kept["vision"]] == per_image


# ------------------------------------------------------------------------------------- other families, refusals
def test_official_order_on_llava_1_5_is_the_same_as_the_default() -> None:
    """One grid, no padding, no newline: both orders keep the same patches and give the same logits; keep-all is
    the unpruned model."""
    model = vt.llava()
    ad = vision_adapter(model)
    _, singles = vt.llava_batch()
    for one in singles[:2]:
        a = ad.prefill(one, "flowcut[order=official]:4", all_logits=True)
        b = ad.prefill(one, "flowcut:4", all_logits=True)
        assert [k.index.tolist() for k in a.kept["vision"]] == [k.index.tolist() for k in b.kept["vision"]]
        assert a.all_logits is not None
        assert b.all_logits is not None
        torch.testing.assert_close(a.all_logits, b.all_logits, atol=0, rtol=0)
        full = ad.prefill(one, None, all_logits=True).all_logits
        got = ad.prefill(one, "flowcut[order=official]:1.0", all_logits=True).all_logits
        assert full is not None
        assert got is not None
        torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


def test_official_order_refusals_and_spec() -> None:
    plan = VisualPlan.parse("flowcut[order=official]:8")
    assert plan.label == "flowcut[order=official]:8/flowcut[stage=llm]:8"  # the llm companion has no order
    assert [s.method.prune_before_unpad for s in plan.specs] == [True, False]
    assert not VisualSpec.parse("flowcut:8").method.prune_before_unpad
    with pytest.raises(ConfigError, match="order must be one of"):
        VisualSpec.parse("flowcut[order=sideways]:8")
    with pytest.raises(ConfigError, match="vision stage"):
        VisualSpec.parse("flowcut[stage=llm,order=official]:8")
    qwen = vt.qwen2_vl()
    inp = vt.qwen_inputs([3], [[(4, 4)]])
    with pytest.raises(CapabilityError, match="vision-stage"):
        vision_adapter(qwen).prefill(inp, "flowcut[order=official]:2")
