"""VLM adapters on tiny random-weight models of each family: visual spans, keep-100 % = the unpruned model's logits,
left-padded batches = one sample at a time, positions (keep / renumber / M-RoPE), the three stages, the KV cache
after stage-c pruning, decoding after pruning, and composition with a KV method."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vlm_tiny as vt

from tokensieve.adapters.vision import vision_adapter
from tokensieve.adapters.vision.segments import renumbered
from tokensieve.errors import CapabilityError, ConfigError

ATOL = 2e-5


def layer_lengths(cache: Any) -> list[int]:
    """Entries each decoder layer's cache holds (padding included): what its attention masks follow."""
    return [cache.seq_length(i) for i in range(len(cache.layers))]


LLAVA_SPECS = [
    "fastv[layer=1]:3",
    "vis:random[stage=vision,layer=1,seed=4]:0.5",
    "pool[stage=vision,layer=2]:6",
    "pool:9/fastv[layer=3]:0.5",
]
QWEN_SPECS = ["fastv:0.5", "pool:4", "vis:random[stage=llm,layer=3]:0.25"]


@pytest.fixture(scope="module")
def llava() -> Any:
    return vt.llava()


@pytest.fixture(scope="module")
def qwen() -> Any:
    return vt.qwen2_vl()


def _hf_logits(model: Any, inputs: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    extra = {"mm_token_type_ids": (inputs["input_ids"] == vt.IMG).int()} if family == "qwen" else {}
    with torch.no_grad():
        return model(**inputs, **extra).logits.float()  # type: ignore[no-any-return]


# -------------------------------------------------------------------------------------------------- batches
LLAVA_TEXT, LLAVA_IMAGES = [3, 7, 1], [1, 2, 0]
QWEN_TEXT, QWEN_GRIDS = [3, 1, 5], [[(4, 4)], [(4, 8), (4, 4)], []]


def llava_batch() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    inp = vt.llava_inputs(LLAVA_TEXT, LLAVA_IMAGES)
    singles = [vt.select(inp, b, sum(LLAVA_IMAGES[:b]), LLAVA_IMAGES[b]) for b in range(3)]
    return inp, singles


def qwen_batch() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    inp = vt.qwen_inputs(QWEN_TEXT, QWEN_GRIDS)
    singles = [vt.qwen_select(inp, b, QWEN_GRIDS) for b in range(3)]
    for s in singles:
        if s["image_grid_thw"].numel() == 0:
            del s["image_grid_thw"], s["pixel_values"]
    return inp, singles


def test_spans_per_sample_with_left_padding(llava: Any, qwen: Any) -> None:
    inp, _ = llava_batch()
    spans = vision_adapter(llava).spans(inp["input_ids"], inp["attention_mask"])
    T = inp["input_ids"].shape[1]
    assert [len(s) for s in spans] == [1, 2, 0]
    assert all(e - s == 16 for row in spans for s, e in row)
    assert spans[1][0][0] == 2  # sample 1 is the longest row: no padding, its image starts after 2 text tokens
    assert spans[0][0][1] == T - 3 - 2  # sample 0: image, 2 text tokens, then its 3 text tokens at the right end
    qin, _ = qwen_batch()
    qspans = vision_adapter(qwen).spans(qin["input_ids"], qin["attention_mask"])
    assert [[e - s for s, e in row] for row in qspans] == [[4], [8, 4], []]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_keep_everything_equals_the_unpruned_model(family: str, llava: Any, qwen: Any) -> None:
    model = llava if family == "llava" else qwen
    ad = vision_adapter(model)
    _, singles = llava_batch() if family == "llava" else qwen_batch()
    specs = [None, "fastv:1.0", "pool:1.0", "vis:random:1.0"]
    if family == "llava":
        specs += ["vis:random[stage=vision,layer=1]:1.0"]
    for one in singles[:2]:
        ref = _hf_logits(model, one, family)
        for spec in specs:
            st = ad.prefill(one, spec, all_logits=True)
            assert st.all_logits is not None
            torch.testing.assert_close(st.all_logits, ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(st.logits, ref[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_left_padded_batch_equals_one_at_a_time(family: str, llava: Any, qwen: Any) -> None:
    model = llava if family == "llava" else qwen
    ad = vision_adapter(model)
    inp, singles = llava_batch() if family == "llava" else qwen_batch()
    for spec in [None, *(LLAVA_SPECS if family == "llava" else QWEN_SPECS)]:
        seeds = [11, 12, 13]
        batch = ad.prefill(inp, spec, seeds=seeds)
        per_image: list[list[int]] = []
        for b, one in enumerate(singles):
            alone = ad.prefill(one, spec, seeds=[seeds[b]])
            torch.testing.assert_close(batch.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0, msg=f"{spec} {b}")
            for stage, kept in batch.kept.items():
                if stage == "vision":  # one result per image of the batch
                    per_image += [k.index.tolist() for k in alone.kept.get(stage, [])]
                else:  # one result per sample
                    assert kept[b].index.tolist() == alone.kept[stage][0].index.tolist(), (spec, stage, b)
            assert {k: v[b] for k, v in batch.visual_tokens.items()} == {
                k: v[0] for k, v in alone.visual_tokens.items()
            }
        if "vision" in batch.kept:
            assert [k.index.tolist() for k in batch.kept["vision"]] == per_image


def test_budgets_count_visual_tokens_per_image(llava: Any) -> None:
    ad = vision_adapter(llava)
    inp, _ = llava_batch()
    st = ad.prefill(inp, "pool:4/fastv:0.5")
    assert st.visual_tokens["projector"] == [4, 8, 0]
    assert st.visual_tokens["llm_input"] == [4, 8, 0]  # what reaches the language model
    assert st.visual_tokens["llm"] == [2, 4, 0]
    st = ad.prefill(inp, "vis:random[stage=vision,layer=2]:0.25")
    assert st.visual_tokens["vision"] == [4, 8, 0]


# ------------------------------------------------------------------------------------------------ positions
def test_position_policy_keep_and_renumber(llava: Any) -> None:
    ad = vision_adapter(llava)
    _, singles = llava_batch()
    one = singles[0]
    T = one["input_ids"].shape[1]
    keep = ad.prefill(one, "pool:4", positions="keep")
    ren = ad.prefill(one, "pool:4", positions="renumber")
    kept = keep.kept["projector"][0].index  # representatives of the 2x2 cells of the 4x4 grid
    assert kept.tolist() == [0, 2, 8, 10]
    start = 2  # the image follows two text tokens
    pos_keep = keep.segments[0].pos[0, 0]
    expected = list(range(start)) + [start + i for i in kept.tolist()] + list(range(start + 16, T))
    assert pos_keep.tolist() == expected  # original positions, with gaps
    assert ren.segments[0].pos[0, 0].tolist() == list(range(T - 12))  # renumbered without gaps
    assert not torch.allclose(keep.logits, ren.logits)  # the policy matters, and is what was asked
    # with nothing pruned both policies are the unpruned model
    torch.testing.assert_close(
        ad.prefill(one, positions="renumber").logits, _hf_logits(llava, one, "llava")[:, -1], atol=ATOL, rtol=0
    )
    with pytest.raises(ConfigError, match="official, keep, renumber"):
        ad.prefill(one, "pool:4", positions="compact")  # type: ignore[arg-type]


def test_official_positions_follow_each_methods_code(llava: Any) -> None:
    """By default each stage's positions are what its method's official code leaves: FastV keeps them, the methods
    that prune before the language model renumber (LLaVA's input preparation numbers the shortened sequence)."""
    ad = vision_adapter(llava)
    _, singles = llava_batch()
    one = singles[0]
    T = one["input_ids"].shape[1]
    for spec, same_as in (("pool:4", "renumber"), ("divprune:4", "renumber"), ("fastv:0.25", "keep")):
        default = ad.prefill(one, spec)
        explicit = ad.prefill(one, spec, positions=same_as)  # type: ignore[arg-type]
        assert [s.pos.tolist() for s in default.segments] == [s.pos.tolist() for s in explicit.segments], spec
        torch.testing.assert_close(default.logits, explicit.logits, atol=0, rtol=0)
    # stages mix: pool renumbers before the language model, then FastV keeps those positions inside it
    mixed = ad.prefill(one, "pool:8/fastv:0.5")
    assert mixed.segments[0].pos[0, 0].tolist() == list(range(T - 8))
    kept = mixed.kept["llm"][0].index.tolist()
    assert mixed.segments[1].pos[0, 0].tolist() == [0, 1] + [2 + i for i in kept] + list(range(10, T - 8))


def test_stage_c_positions_per_segment(llava: Any) -> None:
    ad = vision_adapter(llava)
    _, singles = llava_batch()
    one = singles[0]
    T = one["input_ids"].shape[1]
    keep = ad.prefill(one, "fastv:0.25", positions="keep")
    ren = ad.prefill(one, "fastv:0.25", positions="renumber")
    assert keep.segments[0].pos[0, 0].tolist() == list(range(T))  # layers < K: every token, original positions
    kept = keep.kept["llm"][0].index.tolist()
    assert keep.segments[1].pos[0, 0].tolist() == [0, 1] + [2 + i for i in kept] + list(range(18, T))
    assert ren.segments[1].pos[0, 0].tolist() == list(range(T - 12))
    # the next token continues each segment: the unpruned length (keep) or the segment's own (renumber)
    assert [int(s.next_positions()[0]) for s in keep.segments] == [T, T]
    assert [int(s.next_positions()[0]) for s in ren.segments] == [T, T - 12]


def test_mrope_keeps_the_3d_positions(qwen: Any) -> None:
    ad = vision_adapter(qwen)
    inp, _ = qwen_batch()
    full = ad.prefill(inp)
    rope = full.segments[0].pos  # (3, B, T) as get_rope_index gives them
    ref, _ = qwen.model.get_rope_index(
        inp["input_ids"],
        mm_token_type_ids=(inp["input_ids"] == vt.IMG).int(),
        image_grid_thw=inp["image_grid_thw"],
        attention_mask=inp["attention_mask"],
    )
    valid = inp["attention_mask"].bool()
    assert torch.equal(rope[:, valid], ref[:, valid])
    st = ad.prefill(inp, "pool:1")
    for b in range(2):
        vis = (inp["input_ids"][b] == vt.IMG).nonzero().flatten()
        kept = st.kept["projector"][b].index
        seg_pos = st.segments[0].pos[:, b]
        seg_vis = st.segments[0].valid[b].nonzero().flatten()
        # every kept entry's (t, h, w) is one the unpruned sequence had, in order
        orig = [tuple(ref[:, b, i].tolist()) for i in range(ref.shape[2]) if valid[b, i]]
        now = [tuple(seg_pos[:, i].tolist()) for i in seg_vis.tolist()]
        assert set(now) <= set(orig)
        assert len(now) == len(orig) - (len(vis) - len(kept))
        # pooled visual token j stands at its cell's top-left token: that token's 3-D position
        for j in kept.tolist():
            assert tuple(ref[:, b, int(vis[j])].tolist()) in now
    with pytest.raises(CapabilityError, match="M-RoPE"):
        ad.prefill(inp, "pool:4", positions="renumber")
    with pytest.raises(CapabilityError, match="vision-stage"):
        ad.prefill(inp, "vis:random[stage=vision,layer=1]:0.5")


# ------------------------------------------------------------------------------------ stage c, cache, decode
@pytest.mark.parametrize(("family", "policy"), [("llava", "keep"), ("llava", "renumber"), ("qwen", "keep")])
def test_decode_after_stage_c_pruning(family: str, policy: str, llava: Any, qwen: Any) -> None:
    """The cache of layers >= K holds only the kept tokens, and every decoded token's logits equal a fresh prefill
    of prompt + decoded tokens with the same kept set (the reference for "generate continues correctly")."""
    model = llava if family == "llava" else qwen
    ad = vision_adapter(model)
    inp, _ = llava_batch() if family == "llava" else qwen_batch()
    st = ad.prefill(inp, "fastv:0.25", positions=policy)  # type: ignore[arg-type]
    T = inp["input_ids"].shape[1]
    n_vis = st.visual_tokens["llm_input"]
    n_kept = st.visual_tokens["llm"]
    dropped = max(n_vis[b] - n_kept[b] for b in range(3))
    pad = [int((~st.segments[1].valid[b]).sum()) for b in range(3)]
    assert layer_lengths(st.cache)[:2] == [T, T]
    real = inp["attention_mask"].sum(-1).tolist()
    assert layer_lengths(st.cache)[2:] == [max(real[b] - (n_vis[b] - n_kept[b]) for b in range(3))] * 2
    assert min(pad) == 0
    assert dropped > 0
    kept = [k.index for k in st.kept["llm"]]
    gen = ad.generate(st, 4)
    assert gen.shape == (3, 4)
    assert layer_lengths(st.cache) == [T + 3, T + 3] + [layer_lengths(st.cache)[2]] * 2
    ids = torch.cat([inp["input_ids"], gen[:, :3]], dim=1)
    full_inp = {**inp, "input_ids": ids, "attention_mask": torch.cat([inp["attention_mask"], torch.ones(3, 3)], 1)}
    ref = ad.prefill(full_inp, "fastv:0.25", positions=policy, forced=kept, all_logits=True)  # type: ignore[arg-type]
    assert ref.all_logits is not None
    assert torch.equal(ref.all_logits[:, -4:].argmax(-1), gen)
    # a follow-up turn: appended after the pruned prompt, as a prefill of the whole conversation would see it
    st2 = ad.prefill(inp, "fastv:0.25", positions=policy)  # type: ignore[arg-type]
    turn = torch.randint(1, vt.IMG, (3, 5), generator=torch.Generator().manual_seed(1))
    out = ad.extend(st2, turn, all_logits=True)
    conv = {**inp, "input_ids": torch.cat([inp["input_ids"], turn], 1)}
    conv["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones(3, 5, dtype=torch.long)], 1)
    ref2 = ad.prefill(conv, "fastv:0.25", positions=policy, forced=kept, all_logits=True)  # type: ignore[arg-type]
    assert ref2.all_logits is not None
    torch.testing.assert_close(out, ref2.all_logits[:, -5:], atol=ATOL, rtol=0)
    with pytest.raises(CapabilityError, match="image tokens"):
        ad.extend(st2, torch.full((3, 1), vt.IMG))


def test_fastv_selection_matches_eager_attention(llava: Any) -> None:
    """The row FastV reads (computed for the last token only, SDPA elsewhere) gives the same kept tokens as the
    eager attention weights of the whole layer."""
    ad = vision_adapter(llava)
    _, singles = llava_batch()
    one = singles[1]
    K = 2
    st = ad.prefill(one, f"fastv[layer={K}]:0.25")
    text_cfg = llava.config.text_config
    saved = text_cfg._attn_implementation_internal
    text_cfg._attn_implementation_internal = "eager"
    try:
        with torch.no_grad():
            att = llava(**one, output_attentions=True).attentions[K - 1]  # (1, H, T, T)
    finally:
        text_cfg._attn_implementation_internal = saved
    vis = (one["input_ids"][0] == vt.IMG).nonzero().flatten()
    scores = att[0, :, -1, vis].mean(0)
    ref = torch.sort(torch.topk(scores, 8).indices).values
    assert st.kept["llm"][0].index.tolist() == ref.tolist()


def test_vision_stage_reads_the_cls_row(llava: Any) -> None:
    """A vision-stage method gets the CLS query's attention row of layer l (compared with eager CLIP attention)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from tokensieve.core.budget import Budget
    from tokensieve.core.capabilities import Capabilities
    from tokensieve.methods.visual import Stage, VisualContext, VisualMethod
    from tokensieve.spec import VisualPlan, VisualSpec

    @dataclass(frozen=True)
    class ClsTop(VisualMethod):
        """Test method: keep the patches CLS attends to most."""

        name: ClassVar[str] = "cls_top_test"
        paper: ClassVar[str] = "test"
        capabilities: ClassVar[Capabilities] = Capabilities(
            stages=frozenset({Stage.VISION}), signals=frozenset({"cls_attention", "keys"})
        )
        layer: int = 2

        def score(self, ctx: VisualContext) -> torch.Tensor:
            assert ctx.keys is not None
            assert ctx.keys.shape[:2] == (2, 16)
            assert ctx.cls_attention is not None
            return ctx.cls_attention.mean(0)

    ad = vision_adapter(llava)
    _, singles = llava_batch()
    one = singles[0]
    st = ad.prefill(one, VisualPlan((VisualSpec(ClsTop(), Budget.tokens(5)),)))
    vcfg = llava.config.vision_config
    saved = vcfg._attn_implementation_internal
    vcfg._attn_implementation_internal = "eager"
    try:
        with torch.no_grad():
            att = llava.model.vision_tower(one["pixel_values"], output_attentions=True).attentions[1]
    finally:
        vcfg._attn_implementation_internal = saved
    ref = torch.sort(torch.topk(att[0, :, 0, 1:].mean(0), 5).indices).values
    assert st.kept["vision"][0].index.tolist() == ref.tolist()
    assert st.visual_tokens["vision"] == [5]


def test_stage_c_layer_out_of_range(llava: Any) -> None:
    ad = vision_adapter(llava)
    _, singles = llava_batch()
    with pytest.raises(ConfigError, match="has a KV part"):
        ad.prefill(singles[0], "pool:4/snapkv:0.5")
    with pytest.raises(ConfigError, match=r"K must be in 1\.\.3"):
        ad.prefill(singles[0], "fastv[layer=4]:0.5")


# ------------------------------------------------------------------------------------------ KV composition
def test_composes_with_a_kv_method(llava: Any) -> None:
    """Visual pruning, then a KV method on what remains: the SieveCache sees only the kept tokens."""
    from tokensieve.engine import compress

    ad = vision_adapter(llava)
    inp, _ = llava_batch()
    plain = ad.prefill(inp, "pool:8")
    press = compress(llava, "pool:8/full")
    routed = press.prefill(inp)
    torch.testing.assert_close(routed.logits, plain.logits, atol=ATOL, rtol=0)
    assert press.decode(routed, 3).padded(-1).tolist() == ad.generate(plain, 3).tolist()
    press = compress(llava, "pool:8/snapkv[window=2]:0.5")
    ctx = press.prefill(inp)
    assert ctx.vision is not None
    n_real = [int(v) for v in ctx.vision.segments[0].valid.sum(-1)]
    layer0 = ctx.cache.layers[0].store
    assert layer0 is not None
    assert [int(x) for x in layer0.lengths().float().mean(-1).round()] == [int(n / 2 + 0.5) for n in n_real]
    assert press.decode(ctx, 3).padded(-1).shape == (3, 3)


def test_renumbered_helper() -> None:
    valid = torch.tensor([[False, True, True], [True, True, True]])
    assert renumbered(valid, 1)[0].tolist() == [[0, 0, 1], [0, 1, 2]]
