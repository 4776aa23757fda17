"""FlowCut and VisionZip end to end on the tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2-VL models: the counts that
reach the LM, batch = alone, keep-all = the unpruned model, and the CapabilityError where a family cannot run them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import itertools

import vlm_tiny as vt

from tokensieve.adapters.vision import vision_adapter
from tokensieve.errors import CapabilityError

ATOL = 2e-5
TEXT, IMAGES = [3, 7, 1], [1, 2, 0]
NEXT_SIZES = [[(40, 70)], [(64, 30), (30, 30)]]


@pytest.fixture(scope="module")
def llava() -> Any:
    return vt.llava()


@pytest.fixture(scope="module")
def nxt() -> Any:
    return vt.llava_next()


@pytest.fixture(scope="module")
def qwen() -> Any:
    return vt.qwen2_vl()


def _llava_batch() -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    return vt.llava_batch(tuple(TEXT), tuple(IMAGES))


def _batch_equals_alone(ad: Any, inp: dict[str, Tensor], singles: list[dict[str, Tensor]], spec: str) -> Any:
    st = ad.prefill(inp, spec, seeds=[1, 2, 3][: len(singles)])
    per_image: list[list[int]] = []
    for b, one in enumerate(singles):
        alone = ad.prefill(one, spec, seeds=[b + 1])
        torch.testing.assert_close(st.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0, msg=f"{spec} {b}")
        for key, kept in st.kept.items():
            if key.startswith("vision"):
                per_image += [k.index.tolist() for k in alone.kept.get(key, [])]
            else:
                assert kept[b].index.tolist() == alone.kept[key][0].index.tolist(), (spec, key, b)
        assert {k: v[b] for k, v in st.visual_tokens.items()} == {k: v[0] for k, v in alone.visual_tokens.items()}
    if "vision" in st.kept:
        assert [k.index.tolist() for k in st.kept["vision"]] == per_image
    return st


# ---------------------------------------------------------------------------------------------------- LLaVA-1.5
def test_llava_counts_and_batch_equals_alone(llava: Any) -> None:
    ad = vision_adapter(llava)
    inp, singles = _llava_batch()
    st = _batch_equals_alone(ad, inp, singles, "flowcut:4")
    assert st.visual_tokens["vision"] == [4, 8, 0]  # 4 of 16 patches per image reach the LM
    assert st.visual_tokens["llm"] == [4, 8, 0]  # the LLM companion keeps them all (already at the budget)
    st = _batch_equals_alone(ad, inp, singles, "vis:flowcut:0.25")
    assert st.visual_tokens["vision"] == [4, 8, 0]
    assert "llm" not in st.kept  # a ratio budget brings no LLM step
    st = _batch_equals_alone(ad, inp, singles, "visionzip:6")
    assert st.visual_tokens["vision"] == [6, 12, 0]
    for kept in st.kept["vision"]:  # 5 dominant + 1 contextual standing for the other 11 patches
        assert kept.sizes is not None
        assert sorted(kept.sizes.tolist()) == [1, 1, 1, 1, 1, 11]
    st = _batch_equals_alone(ad, inp, singles, "flowcut[stage=llm]:0.25")
    assert st.visual_tokens["llm"] == [4, 8, 0]


def test_llava_keep_all_equals_the_unpruned_model(llava: Any) -> None:
    ad = vision_adapter(llava)
    _, singles = _llava_batch()
    for one in singles[:2]:
        ref = ad.prefill(one, None, all_logits=True).all_logits
        assert ref is not None
        for spec in ("flowcut:1.0", "flowcut:16", "visionzip:1.0", "flowcut[stage=llm]:1.0"):
            got = ad.prefill(one, spec, all_logits=True).all_logits
            assert got is not None
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=spec)


def test_llava_flowcut_keeps_what_the_method_selects(llava: Any) -> None:
    """The engine's kept patches are the method's choice on the signals it was handed (one step on the tiny tower:
    F = 2, so after layer 1 straight to the budget)."""
    ad = vision_adapter(llava)
    _, singles = _llava_batch()
    st = ad.prefill(singles[0], "vis:flowcut:0.25")
    (kept,) = st.kept["vision"]
    assert kept.index.numel() == 4
    assert kept.sizes is None


# --------------------------------------------------------------------------------------------------- LLaVA-NeXT
def test_llava_next_crops_to_half_then_the_llm_step_to_the_budget(nxt: Any) -> None:
    ad = vision_adapter(nxt)
    inp = vt.next_inputs(nxt, [2, 3], NEXT_SIZES)
    singles = [vt.next_select(inp, b, NEXT_SIZES) for b in range(2)]
    st = _batch_equals_alone(ad, inp, singles, "flowcut:8")
    # each grid keeps int(8/2) = 4 of its visible patches in the encoder, then 8 per image at decoder layer 2:
    # the 40x70 image is a 4x4 thumbnail + 4 crops with 2x4 visible patches each -> 5 x 4 = 20
    assert st.visual_tokens["vision"] == [20, 24]
    assert st.visual_tokens["llm"] == [8, 16]
    st = _batch_equals_alone(ad, inp, singles, "visionzip:8")
    assert st.visual_tokens["vision"] == [8, 16]
    for one in singles:
        ref = ad.prefill(one, None, all_logits=True).all_logits
        assert ref is not None
        for spec in ("flowcut:1.0", "visionzip:1.0"):
            got = ad.prefill(one, spec, all_logits=True).all_logits
            assert got is not None
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=spec)


# ------------------------------------------------------------------------------------------------------ Qwen2-VL
def test_qwen2_vl_runs_the_llm_step_and_refuses_the_vision_stage(qwen: Any) -> None:
    ad = vision_adapter(qwen)
    grids = [[(4, 4)], [(4, 8), (4, 4)], []]
    inp = vt.qwen_inputs([3, 1, 5], grids)
    singles = [vt.qwen_select(inp, b, grids) for b in range(3)]
    for s in singles:
        if s["image_grid_thw"].numel() == 0:
            del s["image_grid_thw"], s["pixel_values"]
    st = _batch_equals_alone(ad, inp, singles, "flowcut[stage=llm]:0.5")
    assert st.visual_tokens["llm"] == [2, 6, 0]  # half of each image's merged tokens (4; 8 + 4)
    ref = ad.prefill(singles[0], None, all_logits=True).all_logits
    got = ad.prefill(singles[0], "flowcut[stage=llm]:1.0", all_logits=True).all_logits
    assert ref is not None
    assert got is not None
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    for spec in ("flowcut:4", "vis:flowcut:0.25", "visionzip:4"):
        with pytest.raises(CapabilityError, match="vision-stage"):
            ad.prefill(inp, spec)


# ------------------------------------------------------------------------------- a deeper tower: the schedule
def _deep_llava() -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=2, image_size=48,
        patch_size=8, projection_dim=32,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision, text_config=vt._llama(), image_token_index=vt.IMG, image_seq_length=36,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    model = vt._eval(LlavaForConditionalGeneration(cfg))
    with torch.no_grad():  # sharper attention than random weights give, so the entropy lets early steps prune
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.k_proj.weight.mul_(6.0)
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


def _deep_inputs(n_text: list[int], n_images: list[int]) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(4)
    rows = []
    for nt, ni in zip(n_text, n_images):
        row = [5, 6] + ([vt.IMG] * 36 + [7]) * ni + torch.randint(1, vt.IMG, (nt,), generator=g).tolist()
        rows.append(row)
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r)
        mask[b, T - len(r) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(sum(n_images), 3, 48, 48, generator=g),
    }


def test_flowcut_schedule_on_a_deeper_tower(monkeypatch: pytest.MonkeyPatch) -> None:
    """F = 6 (7 CLIP layers, feature layer -2): FlowCut runs after layers 1..5 with one running score per image,
    prunes after 5, 3, 1 and hands the feature layer exactly the budget; batch = alone; keep-all = unpruned."""
    from tokensieve.methods.visual.flowcut import FlowCut

    model = _deep_llava()
    ad = vision_adapter(model)
    inp = _deep_inputs([3, 5], [1, 2])
    singles = [vt.select(inp, 0, 0, 1), vt.select(inp, 1, 1, 2)]
    seen: list[tuple[int, int, int, int]] = []
    original = FlowCut.prune

    def spy(self: FlowCut, ctx: Any, budget: Any) -> Any:
        out = original(self, ctx, budget)
        if ctx.stage.value == "vision":
            seen.append((ctx.layer, ctx.step, ctx.n, int(out.index.numel())))
        return out

    monkeypatch.setattr(FlowCut, "prune", spy)
    st = _batch_equals_alone(ad, inp, singles, "flowcut:5")
    assert st.visual_tokens["vision"] == [5, 10]
    first_image = seen[:5]
    assert [s[:2] for s in first_image] == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    assert first_image[-1][3] == 5
    assert first_image[0][3] < 36  # peaked CLS attention: the first step already prunes (31 here)
    for layer, _, n_in, n_out in first_image:
        if layer in (2, 4):  # an odd number of layers left: scored, nothing pruned
            assert n_out == n_in
    assert all(a[3] >= b[3] for a, b in itertools.pairwise(first_image))
    for one in singles:
        ref = ad.prefill(one, None, all_logits=True).all_logits
        got = ad.prefill(one, "flowcut:36", all_logits=True).all_logits
        assert ref is not None
        assert got is not None
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
