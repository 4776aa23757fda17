"""ToDRE and DivPrune inside the tiny random-weight VLMs (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL): selections recomputed from
the models' own tensors (eager CLIP attention, projected features, eager decoder attention) with the plain loops of
test_vlm_todre, keep-all = the unpruned logits, left-padded batches = one sample at a time, counts per budget."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlm_tiny as vt

from tokensieve.adapters.vision import vision_adapter
from tokensieve.core.budget import Budget
from tokensieve.methods.visual import VisualContext, VisualKept
from tokensieve.methods.visual.todre import ToDRE
from tokensieve.spec import VisualPlan, VisualSpec

from .test_vlm_todre import k_of, ref_maxmin, ref_maxsum

ATOL = 2e-5


def layer_lengths(cache: Any) -> list[int]:
    """Entries each decoder layer's cache holds (padding included): what its attention masks follow."""
    return [cache.seq_length(i) for i in range(len(cache.layers))]


LLAVA_TEXT, LLAVA_IMAGES = [3, 7, 1], [1, 2, 0]
NEXT_TEXT, NEXT_SIZES = [3, 1, 4], [[(32, 64)], [(40, 64), (64, 64)], []]
QWEN_TEXT, QWEN_GRIDS = [3, 1, 5], [[(4, 4)], [(4, 8), (4, 4)], []]
Batch = tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]


@pytest.fixture(scope="module")
def llava() -> Batch:
    model = vt.llava()
    inp = vt.llava_inputs(LLAVA_TEXT, LLAVA_IMAGES)
    return model, inp, [vt.select(inp, b, sum(LLAVA_IMAGES[:b]), LLAVA_IMAGES[b]) for b in range(3)]


@pytest.fixture(scope="module")
def nxt() -> Batch:
    model = vt.llava_next()
    inp = vt.next_inputs(model, NEXT_TEXT, NEXT_SIZES)
    return model, inp, [vt.next_select(inp, b, NEXT_SIZES) for b in range(3)]


@pytest.fixture(scope="module")
def qwen() -> Batch:
    model = vt.qwen2_vl()
    inp = vt.qwen_inputs(QWEN_TEXT, QWEN_GRIDS)
    singles = [vt.qwen_select(inp, b, QWEN_GRIDS) for b in range(3)]
    for s in singles:
        if s["image_grid_thw"].numel() == 0:
            del s["image_grid_thw"], s["pixel_values"]
    return model, inp, singles


def family(name: str, llava: Batch, nxt: Batch, qwen: Batch) -> Batch:
    return {"llava": llava, "next": nxt, "qwen": qwen}[name]


def hf_logits(model: Any, one: dict[str, torch.Tensor]) -> torch.Tensor:
    extra = {"mm_token_type_ids": (one["input_ids"] == vt.IMG).int()} if "image_grid_thw" in one else {}
    with torch.no_grad():
        return model(**one, **extra).logits.float()


RECORDED: list[VisualContext] = []


@dataclass(frozen=True)
class RecordingToDRE(ToDRE):
    """ToDRE that keeps the contexts it is given (test only, not registered)."""

    name: ClassVar[str] = "todre_recording_test"

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        RECORDED.append(ctx)
        return super().prune(ctx, budget)


# ----------------------------------------------------------------------------------- selections vs the model
def llava_projected_and_cls(model: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected patch tokens ``(I, 16, D)`` and the feature layer's CLS rows ``(I, H, 16)`` (eager CLIP)."""
    vcfg = model.config.vision_config
    saved = vcfg._attn_implementation_internal
    vcfg._attn_implementation_internal = "eager"
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
            feats = out.hidden_states[-2][:, 1:]  # vision_feature_layer = -2, CLS dropped ("default")
            proj = model.model.multi_modal_projector(feats)
    finally:
        vcfg._attn_implementation_internal = saved
    n_layers = len(out.attentions)
    cls = out.attentions[n_layers - 2][:, :, 0, 1:]  # the layer whose output is hidden_states[-2]
    return proj, cls


@pytest.mark.parametrize(("spec", "diversity"), [("todre[relevance=false]:0.25", "maxsum"),
                                                 ("todre[relevance=false,diversity=kcenter]:0.4", "kcenter"),
                                                 ("divprune:0.25", "divprune")])  # fmt: skip
def test_llava_selection_is_the_papers_on_the_projected_tokens(spec: str, diversity: str, llava: Batch) -> None:
    model, _, singles = llava
    ad = vision_adapter(model)
    ratio = float(spec.rsplit(":", 1)[1])
    for one in singles[:2]:
        proj, cls = llava_projected_and_cls(model, one["pixel_values"])
        st = ad.prefill(one, spec)
        expected: list[int] = []
        for i in range(proj.shape[0]):  # one budget per image
            k = k_of(ratio, 16)
            if diversity == "divprune":
                chosen = ref_maxmin(proj[i], None, k)
            else:
                pivot = int(torch.argmax(cls[i].mean(0)))
                chosen = (ref_maxsum if diversity == "maxsum" else ref_maxmin)(proj[i], pivot, k)
            expected += [16 * i + j for j in chosen]
        assert st.kept["projector"][0].index.tolist() == sorted(expected), spec
        assert st.visual_tokens["llm_input"] == [k_of(ratio, 16) * proj.shape[0]]


def test_next_pivot_comes_from_the_thumbnail(nxt: Batch) -> None:
    model, _, singles = nxt
    ad = vision_adapter(model)
    RECORDED.clear()
    ad.prefill(singles[1], VisualPlan((VisualSpec(RecordingToDRE(relevance=False), Budget.ratio(0.25)),)))
    (ctx,) = RECORDED
    kept = RecordingToDRE(relevance=False).prune(ctx, Budget.ratio(0.25)).index.tolist()
    assert ctx.cls_attention is not None
    # two images, each a 4x4 thumbnail then its crop grid; one budget per image over thumbnail + crops
    assert [(g.image, g.height, g.width) for g in ctx.groups] == [(0, 4, 4), (0, 6, 8), (1, 4, 4), (1, 8, 8)]
    # the thumbnail's CLS row is the eager CLIP attention of its own CLS at the feature layer
    vcfg = model.config.vision_config
    saved = vcfg._attn_implementation_internal
    vcfg._attn_implementation_internal = "eager"
    try:
        with torch.no_grad():
            att = model.model.vision_tower(singles[1]["pixel_values"][0, :1], output_attentions=True).attentions
    finally:
        vcfg._attn_implementation_internal = saved
    torch.testing.assert_close(ctx.cls_attention[:, :16], att[len(att) - 2][0, :, 0, 1:], atol=1e-5, rtol=0)
    expected: list[int] = []
    for start, end in ((0, 64), (64, 144)):
        mean = ctx.cls_attention[:, start : start + 16].mean(0)
        pivot = int(torch.argmax(mean))
        expected += [start + j for j in ref_maxsum(ctx.tokens[start:end], pivot, k_of(0.25, end - start))]
        assert start + pivot in kept
    assert kept == sorted(expected)


def test_qwen_has_no_cls_so_the_pivot_is_drawn(qwen: Batch) -> None:
    model, _, singles = qwen
    ad = vision_adapter(model)
    RECORDED.clear()
    method = RecordingToDRE(relevance=False, seed=4)
    st = ad.prefill(singles[1], VisualPlan((VisualSpec(method, Budget.ratio(0.5)),)), seeds=[9])
    (ctx,) = RECORDED
    assert ctx.cls_attention is None
    g = torch.Generator().manual_seed(4 * 1_000_003 + 9)
    expected: list[int] = []
    for start, end in ((0, 8), (8, 12)):
        pivot = int(torch.randint(end - start, (1,), generator=g))
        expected += [start + j for j in ref_maxsum(ctx.tokens[start:end], pivot, k_of(0.5, end - start))]
    assert st.kept["projector"][0].index.tolist() == sorted(expected)


def instruction_share(model: Any, one: dict[str, torch.Tensor], K: int) -> float:
    """α_{t→v} of layer K − 1 from the eager attention weights: the rows of the tokens after the last image
    placeholder, their mass on the prunable visual tokens, averaged over heads and rows. (LLaVA-NeXT's
    ``image_newline`` tokens are image placeholders but not prunable: neither columns nor rows.)"""
    from tokensieve.adapters.vision.base import as_plan

    text_cfg = model.config.text_config
    saved = text_cfg._attn_implementation_internal
    text_cfg._attn_implementation_internal = "eager"
    extra = {"mm_token_type_ids": (one["input_ids"] == vt.IMG).int()} if "image_grid_thw" in one else {}
    try:
        with torch.no_grad():
            att = model(**one, **extra, output_attentions=True).attentions[K - 1][0]  # (H, T, T)
    finally:
        text_cfg._attn_implementation_internal = saved
    seq, _, _ = vision_adapter(model).build(one, as_plan(None))
    vis = seq.visual[0].nonzero().flatten()
    if "image_sizes" not in one:  # LLaVA and Qwen2-VL: every image placeholder is prunable
        assert vis.tolist() == (one["input_ids"][0] == vt.IMG).nonzero().flatten().tolist()
    last = int((one["input_ids"][0] == vt.IMG).nonzero().flatten()[-1])
    rows = att[:, last + 1 :, :][:, :, vis]
    return float(rows.sum(-1).mean())


@pytest.mark.parametrize("name", ["llava", "next", "qwen"])
def test_stage2_fires_exactly_below_tau(name: str, llava: Batch, nxt: Batch, qwen: Batch) -> None:
    model, _, singles = family(name, llava, nxt, qwen)
    ad = vision_adapter(model)
    one = singles[0]
    K = 3  # 7L/8 of the tiny models' 4 decoder layers
    alpha = instruction_share(model, one, K)
    n = ad.prefill(one).visual_tokens["llm_input"][0]
    assert 0.0 < alpha < 1.0
    above = ad.prefill(one, f"todre[stage=llm,tau={alpha + 1e-4:.6f}]:1.0")
    below = ad.prefill(one, f"todre[stage=llm,tau={alpha - 1e-4:.6f}]:1.0")
    assert above.visual_tokens["llm"] == [0]
    assert above.kept["llm"][0].index.numel() == 0
    assert below.visual_tokens["llm"] == [n]
    torch.testing.assert_close(below.logits, hf_logits(model, one)[:, -1], atol=ATOL, rtol=0)
    assert not torch.allclose(above.logits, below.logits, atol=1e-3)
    # the same through the companion of `todre:1.0` (stage 1 keeps all at 1.0)
    assert ad.prefill(one, f"todre[tau={alpha + 1e-4:.6f}]:1.0").visual_tokens["llm"] == [0]


# ------------------------------------------------------------------------------------- engine-level contracts
@pytest.mark.parametrize("name", ["llava", "next", "qwen"])
def test_keep_all_is_the_unpruned_model(name: str, llava: Batch, nxt: Batch, qwen: Batch) -> None:
    model, _, singles = family(name, llava, nxt, qwen)
    ad = vision_adapter(model)
    for one in singles[:2]:
        ref = hf_logits(model, one)
        for spec in ["todre[relevance=false]:1.0", "todre[tau=0]:1.0", "todre[stage=llm,tau=0]:1.0", "divprune:1.0"]:
            st = ad.prefill(one, spec, all_logits=True)
            assert st.all_logits is not None
            torch.testing.assert_close(st.all_logits, ref, atol=ATOL, rtol=0, msg=spec)


BATCH_SPECS = [
    "todre:0.25",
    "todre[diversity=kcenter,tau=0.3]:0.5",
    "todre[stage=llm,tau=0.3]:1.0",
    "vis:todre[pivot=random,seed=2]:3",
    "divprune:0.25",
]


@pytest.mark.parametrize("name", ["llava", "next", "qwen"])
def test_batch_equals_one_at_a_time(name: str, llava: Batch, nxt: Batch, qwen: Batch) -> None:
    model, inp, singles = family(name, llava, nxt, qwen)
    ad = vision_adapter(model)
    for spec in BATCH_SPECS:
        seeds = [11, 12, 13]
        batch = ad.prefill(inp, spec, seeds=seeds)
        for b, one in enumerate(singles):
            alone = ad.prefill(one, spec, seeds=[seeds[b]])
            torch.testing.assert_close(batch.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0, msg=f"{spec} {b}")
            for stage, kept in batch.kept.items():
                assert kept[b].index.tolist() == alone.kept[stage][0].index.tolist(), (spec, stage, b)
            assert {k: v[b] for k, v in batch.visual_tokens.items()} == {
                k: v[0] for k, v in alone.visual_tokens.items()
            }


@pytest.mark.parametrize(
    ("name", "per_image"),
    [("llava", [[16], [16, 16], []]), ("next", [[48], [64, 80], []]), ("qwen", [[4], [8, 4], []])],
)
def test_counts_follow_the_budget_per_image(
    name: str, per_image: list[list[int]], llava: Batch, nxt: Batch, qwen: Batch
) -> None:
    model, inp, _ = family(name, llava, nxt, qwen)
    ad = vision_adapter(model)
    assert ad.prefill(inp).visual_tokens["llm_input"] == [sum(p) for p in per_image]
    for ratio in (0.25, 0.5):
        want = [sum(k_of(ratio, n) for n in p) for p in per_image]
        for spec in (f"todre:{ratio}", f"divprune:{ratio}"):
            st = ad.prefill(inp, spec)
            assert st.visual_tokens["projector"] == want, spec
            assert st.visual_tokens["llm_input"] == want, spec
            if spec.startswith("todre"):  # stage 2: all or nothing per sample
                assert all(n in (0, w) for n, w in zip(st.visual_tokens["llm"], want)), st.visual_tokens


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_decoding_after_stage2_dropped_every_visual_token(name: str, llava: Batch, qwen: Batch) -> None:
    """tau = 1 always fires: layers >= K cache no visual token, and each decoded token is the one a fresh prefill
    of prompt + decoded tokens (the same empty kept set forced) predicts."""
    model, inp, _ = llava if name == "llava" else qwen
    ad = vision_adapter(model)
    spec = "divprune:0.5/todre[stage=llm,tau=1]:1.0"  # DivPrune at the projector, ToDRE's stage 2 in the decoder
    st = ad.prefill(inp, spec)
    assert st.visual_tokens["llm"] == [0, 0, 0]
    assert st.visual_tokens["llm_input"][:2] != [0, 0]
    T = inp["input_ids"].shape[1]
    lengths = layer_lengths(st.cache)
    assert lengths[3] < lengths[2] <= T  # layer 3 = K holds the prompt without its visual tokens
    gen = ad.generate(st, 3)
    ids = torch.cat([inp["input_ids"], gen[:, :2]], dim=1)
    full = {**inp, "input_ids": ids, "attention_mask": torch.cat([inp["attention_mask"], torch.ones(3, 2)], 1)}
    empty = [torch.zeros(0, dtype=torch.long)] * 3
    ref = ad.prefill(full, spec, forced=empty, all_logits=True)
    assert ref.all_logits is not None
    assert torch.equal(ref.all_logits[:, -3:].argmax(-1), gen)


def test_idefics3_tiles_run_both_methods() -> None:
    """Idefics3 (SigLIP, no CLS): the drawn pivot, batch = alone, keep-all = the unpruned logits."""
    model = vt.idefics3()
    tiles = [1, 3, 0]
    inp = vt.idefics_inputs([3, 1, 4], tiles)
    singles = [vt.idefics_select(inp, b, tiles) for b in range(3)]
    ad = vision_adapter(model)
    for spec in ("todre:0.25", "divprune:0.25"):
        batch = ad.prefill(inp, spec, seeds=[1, 2, 3])
        assert batch.visual_tokens["llm_input"] == [4, 12, 0]  # a quarter of each 16-token tile
        for b, one in enumerate(singles):
            alone = ad.prefill(one, spec, seeds=[b + 1])
            torch.testing.assert_close(batch.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0, msg=f"{spec} {b}")
            assert batch.kept["projector"][b].index.tolist() == alone.kept["projector"][0].index.tolist()
    for spec in ("todre[tau=0]:1.0", "divprune:1.0"):
        st = ad.prefill(singles[1], spec, all_logits=True)
        assert st.all_logits is not None
        with torch.no_grad():
            ref = model(**singles[1]).logits.float()
        torch.testing.assert_close(st.all_logits, ref, atol=ATOL, rtol=0, msg=spec)
