"""LLaVA-NeXT and Idefics3 adapters on tiny random-weight models: visual spans, keep-100 % = the unpruned model's
logits, left-padded batches = one sample at a time (projector and llm stages), and the family's layout (NeXT's
thumbnail + unpadded crop grid with newline tokens kept; Idefics3's tiles)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vlm_tiny as vt

from tokensieve.adapters.vision import vision_adapter

ATOL = 2e-5
NEXT_SIZES = [[(32, 64)], [(40, 64), (64, 64)], []]
TILES = [1, 3, 0]


@pytest.fixture(scope="module")
def nxt() -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    model = vt.llava_next()
    inp = vt.next_inputs(model, [3, 1, 4], NEXT_SIZES)
    return model, inp, [vt.next_select(inp, b, NEXT_SIZES) for b in range(3)]


@pytest.fixture(scope="module")
def idf() -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    model = vt.idefics3()
    inp = vt.idefics_inputs([3, 1, 4], TILES)
    return model, inp, [vt.idefics_select(inp, b, TILES) for b in range(3)]


@pytest.mark.parametrize("family", ["next", "idefics3"])
def test_keep_everything_equals_the_unpruned_model(family: str, nxt: Any, idf: Any) -> None:
    model, _, singles = nxt if family == "next" else idf
    ad = vision_adapter(model)
    for one in singles[:2]:
        with torch.no_grad():
            ref = model(**one).logits.float()
        for spec in [None, "fastv:1.0", "pool:1.0"]:
            st = ad.prefill(one, spec, all_logits=True)
            assert st.all_logits is not None
            torch.testing.assert_close(st.all_logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["next", "idefics3"])
def test_left_padded_batch_equals_one_at_a_time(family: str, nxt: Any, idf: Any) -> None:
    model, inp, singles = nxt if family == "next" else idf
    ad = vision_adapter(model)
    for spec in [None, "fastv:0.5", "pool:0.25", "vis:random[stage=llm,layer=1]:0.25"]:
        batch = ad.prefill(inp, spec, seeds=[1, 2, 3])
        for b, one in enumerate(singles):
            alone = ad.prefill(one, spec, seeds=[b + 1])
            torch.testing.assert_close(batch.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0, msg=f"{spec} {b}")
            for stage, kept in batch.kept.items():
                assert kept[b].index.tolist() == alone.kept[stage][0].index.tolist()
    gen = ad.generate(ad.prefill(inp, "fastv:0.5"), 3)
    assert gen.shape == (3, 3)


def test_next_layout_thumbnail_crops_and_newlines(nxt: Any) -> None:
    model, inp, singles = nxt
    ad = vision_adapter(model)
    spans = ad.spans(inp["input_ids"], inp["attention_mask"])
    # (32, 64): thumbnail 4x4 + 1x2 crops = a 4x8 grid with a newline after each of 4 rows → 16 + 36;
    # (40, 64): the 4x8 grid unpadded to 40/64 of its height keeps 6 of 8 rows (2x2 crops) → 16 + 6 * 9
    assert [[e - s for s, e in row] for row in spans] == [[52], [70, 88], []]
    images = ad.encode(singles[1], None, [0, 0])  # type: ignore[arg-type]
    assert [[(g.height, g.width) for g in im.groups] for im in images] == [[(4, 4), (6, 8)], [(4, 4), (8, 8)]]
    assert [int((~im.prunable).sum()) for im in images] == [6, 8]  # the newline tokens
    # pruning removes patches only: every newline token survives, at its original position with positions="keep"
    from tokensieve.adapters.vision.base import as_plan

    seq, _, counts = ad.build(singles[1], as_plan("pool:0.25"), "keep")
    assert counts["projector"] == [36]  # 0.25 of 64 + 0.25 of 80 (newlines are not counted)
    is_newline = (seq.embeds[0] == model.model.image_newline).all(-1)
    assert int(is_newline.sum()) == 6 + 8
    ids = singles[1]["input_ids"][0]
    original = [i for i in range(ids.shape[0]) if ids[i] == vt.IMG]
    full, _, _ = ad.build(singles[1], as_plan(None))
    full_newline = (full.embeds[0] == model.model.image_newline).all(-1).nonzero().flatten()
    assert set(full_newline.tolist()) <= set(original)
    assert seq.pos[0, 0, is_newline].tolist() == full.pos[0, 0, full_newline].tolist()
    default, _, _ = ad.build(singles[1], as_plan("pool:0.25"))  # positions="official": pool renumbers
    assert default.pos[0, 0].tolist() == list(range(int(default.valid[0].sum())))
    # the vision stage prunes inside the encoder (thumbnail and crops in lockstep): newlines stay, the kept
    # patches count against each image's visible patches (the unpadding's discarded crop patches are not counted)
    st = ad.prefill(singles[1], "vis:random[stage=vision,layer=1]:0.25")
    assert st.visual_tokens["vision"] == [36]
    seq, _, _ = ad.build(singles[1], as_plan("vis:random[stage=vision,layer=1]:0.25"))
    assert int((~seq.visual[0] & (seq.image[0] >= 0)).sum()) == 6 + 8  # the newlines


def test_idefics3_tiles_are_grids(idf: Any) -> None:
    model, inp, singles = idf
    ad = vision_adapter(model)
    spans = ad.spans(inp["input_ids"], inp["attention_mask"])
    assert [[e - s for s, e in row] for row in spans] == [[16], [16, 16, 16], []]
    images = ad.encode(singles[1], None, [0, 0, 0])  # type: ignore[arg-type]
    assert [[(g.height, g.width) for g in im.groups] for im in images] == [[(4, 4)]] * 3
    st = ad.prefill(inp, "pool:4")
    assert st.visual_tokens["projector"] == [4, 12, 0]  # per tile


def test_qwen2_5_vl_shares_the_qwen2_vl_adapter() -> None:
    """Qwen2.5-VL (windowed vision attention, same merger and M-RoPE): keep-100 % = the model, batch = single."""
    model = vt.qwen2_5_vl()
    grids = [[(4, 4)], [(4, 8), (4, 4)]]
    inp = vt.qwen_inputs([3, 1], grids)
    ad = vision_adapter(model)
    assert ad.family == "qwen2_vl"
    singles = [vt.qwen_select(inp, b, grids) for b in range(2)]
    for one in singles:
        with torch.no_grad():
            ref = model(**one, mm_token_type_ids=(one["input_ids"] == vt.IMG).int()).logits.float()
        st = ad.prefill(one, all_logits=True)
        assert st.all_logits is not None
        torch.testing.assert_close(st.all_logits, ref, atol=ATOL, rtol=0)
    for spec in ["fastv:0.5", "pool:4"]:
        batch = ad.prefill(inp, spec)
        for b, one in enumerate(singles):
            torch.testing.assert_close(batch.logits[b : b + 1], ad.prefill(one, spec).logits, atol=ATOL, rtol=0)


def test_the_readme_vlm_calls() -> None:
    """README's VLM example (a visual-token method and a KV method in one spec, then prefill and decode) on a tiny
    LLaVA: the visual tokens are pruned to the budget, and the answer is four tokens, the same on a second run."""
    import tokensieve as ts

    model = vt.llava()
    enc = vt.llava_inputs([3], [1])
    press = ts.compress(model, "todre:0.25/snapkv[window=2]:0.5")
    ctx = press.prefill(enc)
    assert ctx.visual_tokens["projector"] == [4]  # 1/4 of the image's 16 patch tokens
    out = press.decode(ctx, 4).tokens
    again = press.decode(press.prefill(enc), 4).tokens
    assert len(out[0]) == 4
    assert out == again
