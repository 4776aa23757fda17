"""The engine's progressive steps and signals, with probe methods defined here: several
decoder layers K, several encoder layers, merges with sizes, the signals each stage hands a method, LLaVA-NeXT's
vision stage over the thumbnail and crops, and keep-all = the unpruned model at every stage."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlm_tiny as vt

from tokensieve.adapters.vision import vision_adapter
from tokensieve.core.budget import Budget
from tokensieve.core.capabilities import Apply, Capabilities
from tokensieve.errors import CapabilityError, ConfigError
from tokensieve.methods.visual.base import Stage, VisualContext, VisualKept, VisualMethod, top_k
from tokensieve.spec import VisualPlan, VisualSpec

ATOL = 2e-5
SEEN: list[VisualContext] = []


@dataclass(frozen=True)
class Probe(VisualMethod):
    """Keeps the highest token norms; at each of ``at`` layers prunes a share of the way to the budget."""

    name: ClassVar[str] = "probe"
    paper: ClassVar[str] = "test probe"
    capabilities: ClassVar[Capabilities] = Capabilities(stages=frozenset(Stage), signals=frozenset())
    stage: str = "llm"
    at: tuple[int, ...] = (1, 2)
    layer: int = 1

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return self.at

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        SEEN.append(ctx)
        assert ctx.memory is not None
        ctx.memory["calls"] = ctx.memory.get("calls", 0) + 1
        final = self.count(ctx, budget)
        k = final if ctx.last_step else max(final, (ctx.n + final) // 2)
        return VisualKept(top_k(ctx.tokens.float().norm(dim=-1), k))


@dataclass(frozen=True)
class Everything(Probe):
    capabilities: ClassVar[Capabilities] = Capabilities(
        stages=frozenset(Stage),
        signals=frozenset({"text_attention", "text_rows", "text_tokens", "keys", "values", "anchor_value", "previous"}),
    )


@dataclass(frozen=True)
class VisionSignals(Probe):
    capabilities: ClassVar[Capabilities] = Capabilities(
        stages=frozenset(Stage),
        signals=frozenset({"cls_attention", "mean_attention", "keys", "values", "anchor_value", "previous"}),
    )
    stage: str = "vision"


@dataclass(frozen=True)
class PairMerge(VisualMethod):
    """Merges each even token into its right neighbour (size-weighted mean) at every listed encoder layer."""

    name: ClassVar[str] = "pairmerge"
    paper: ClassVar[str] = "test probe"
    capabilities: ClassVar[Capabilities] = Capabilities(apply=Apply.MERGE, stages=frozenset({Stage.VISION}))
    proportional: ClassVar[bool] = True
    stage: str = "vision"
    at: tuple[int, ...] = (1, 2)

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return self.at

    def prune(self, ctx: VisualContext, budget: Budget) -> VisualKept:
        n = ctx.n - ctx.n % 2
        sizes = ctx.sizes if ctx.sizes is not None else torch.ones(ctx.n, dtype=torch.long)
        a, b = torch.arange(0, n, 2), torch.arange(1, n, 2)
        w = torch.stack([sizes[a], sizes[b]], 1).float()
        merged = (ctx.tokens[a] * w[:, :1] + ctx.tokens[b] * w[:, 1:]) / w.sum(1, keepdim=True)
        return VisualKept(b, merged, sizes[a] + sizes[b])


def _spec(method: VisualMethod, budget: float | int) -> VisualPlan:
    return VisualPlan((VisualSpec(method, Budget.parse(str(budget))),))


@pytest.fixture(scope="module")
def llava() -> Any:
    return vt.llava()


@pytest.fixture(scope="module")
def nxt() -> Any:
    return vt.llava_next()


def _llava_batch() -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    return vt.llava_batch()


def test_several_decoder_layers_prune_in_turn_and_batch_equals_alone(llava: Any) -> None:
    ad = vision_adapter(llava)
    inp, singles = _llava_batch()
    plan = _spec(Probe(at=(1, 3)), 0.25)
    st = ad.prefill(inp, plan)
    assert st.visual_tokens["llm_input"] == [16, 32, 0]
    assert st.visual_tokens["llm:1"] == [10, 20, 0]  # halfway to the budget
    assert st.visual_tokens["llm:3"] == st.visual_tokens["llm"] == [4, 8, 0]
    assert [s.start for s in st.segments] == [0, 1, 3]
    for b, one in enumerate(singles):
        alone = ad.prefill(one, plan)
        torch.testing.assert_close(st.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0)
        for key in ("llm:1", "llm:3"):
            assert st.kept[key][b].index.tolist() == alone.kept[key][0].index.tolist()
    # decoding continues through the three segments
    out = ad.generate(st, 3)
    assert out.shape == (3, 3)


def test_keep_all_at_several_layers_equals_the_unpruned_model(llava: Any) -> None:
    ad = vision_adapter(llava)
    _, singles = _llava_batch()
    for one in singles[:2]:
        ref = ad.prefill(one, None, all_logits=True).all_logits
        for plan in (_spec(Probe(at=(1, 2, 3)), 1.0), _spec(VisionSignals(at=(1, 2)), 1.0)):
            got = ad.prefill(one, plan, all_logits=True).all_logits
            assert ref is not None
            assert got is not None
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_llm_stage_signals_have_the_documented_shapes(llava: Any) -> None:
    ad = vision_adapter(llava)
    inp, _ = _llava_batch()
    SEEN.clear()
    ad.prefill(inp, _spec(Everything(at=(2,)), 0.5))
    ctx = [c for c in SEEN if c.n > 0]
    assert len(ctx) == 2
    cfg = llava.config.text_config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    d = D // H
    for c, q in zip(ctx, [3 + 2, 7 + 2]):  # instruction = text after the last image (2 fixed tokens + the sample's)
        assert c.text_attention is not None
        assert c.text_attention.shape == (H, c.n)
        assert c.text_rows is not None
        assert c.text_rows.shape == (H, q, c.n)
        torch.testing.assert_close(c.text_rows[:, -1], c.text_attention)  # the last instruction row is the last token
        assert c.text_tokens is not None
        assert c.text_tokens.shape == (q, D)
        assert c.keys is not None
        assert c.keys.shape == (Hkv, c.n, d)
        assert c.values is not None
        assert c.values.shape == (Hkv, c.n, d)
        assert c.anchor_value is not None
        assert c.anchor_value.shape == (Hkv, d)
        assert c.previous is not None
        assert c.previous.shape == c.tokens.shape
        assert not torch.allclose(c.previous, c.tokens)


def test_vision_stage_steps_signals_and_counts(llava: Any) -> None:
    ad = vision_adapter(llava)
    inp, singles = _llava_batch()
    SEEN.clear()
    plan = _spec(VisionSignals(at=(1, 2)), 4)
    st = ad.prefill(inp, plan, seeds=[1, 2, 3])
    assert st.visual_tokens["vision"] == [4, 8, 0]  # 4 per image
    vcfg = llava.config.vision_config
    H = vcfg.num_attention_heads
    d = vcfg.hidden_size // H
    first, second = SEEN[0], SEEN[1]
    assert (first.step, first.steps, second.step) == (0, 2, 1)
    assert first.n == 16
    assert second.n == 10
    assert second.start == (16,)
    assert first.memory is second.memory
    assert first.memory == {"calls": 2}
    for c in (first, second):
        assert c.cls_attention is not None
        assert c.cls_attention.shape == (H, c.n)
        assert c.mean_attention is not None
        assert c.mean_attention.shape == (H, c.n)
        assert c.keys is not None
        assert c.keys.shape == (H, c.n, d)
        assert c.values is not None
        assert c.anchor_value is not None
        assert c.anchor_value.shape == (H, d)
    # batch = alone
    for b, one in enumerate(singles):
        alone = ad.prefill(one, plan, seeds=[b + 1])
        torch.testing.assert_close(st.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0)


def test_merges_compose_sizes_and_positions(llava: Any) -> None:
    ad = vision_adapter(llava)
    _, singles = _llava_batch()
    st = ad.prefill(singles[0], _spec(PairMerge(at=(1, 2)), 1.0))
    (kept,) = st.kept["vision"]
    # 16 → 8 → 4 tokens, each standing for 4 patches, at the right one of each merged pair of pairs
    assert kept.index.tolist() == [3, 7, 11, 15]
    assert kept.sizes is not None
    assert kept.sizes.tolist() == [4, 4, 4, 4]
    assert st.visual_tokens["llm_input"] == [4]


def test_projector_stage_gets_the_cls_row(llava: Any) -> None:
    ad = vision_adapter(llava)
    inp, _ = _llava_batch()
    SEEN.clear()

    @dataclass(frozen=True)
    class AtProjector(Probe):
        stage: str = "projector"
        at: tuple[int, ...] = field(default=(0,))

    ad.prefill(inp, _spec(AtProjector(), 0.5))
    H = llava.config.vision_config.num_attention_heads
    assert [c.cls_attention.shape if c.cls_attention is not None else None for c in SEEN] == [
        (H, 16),
        (H, 32),
    ]
    # each image's row is a softmax over the CLS token and its 16 patches: the patch part sums to less than one
    row = SEEN[1].cls_attention
    assert row is not None
    assert float(row[:, :16].sum(-1).max()) < 1.0
    assert float(row[:, :16].sum(-1).min()) > 0.0


def test_llava_next_vision_stage_over_thumbnail_and_crops(nxt: Any) -> None:
    ad = vision_adapter(nxt)
    sizes = [[(40, 70)], [(64, 30), (30, 30)]]
    inp = vt.next_inputs(nxt, [2, 3], sizes)
    singles = [vt.next_select(inp, b, sizes) for b in range(2)]
    for one in singles:
        ref = ad.prefill(one, None, all_logits=True).all_logits
        got = ad.prefill(one, _spec(VisionSignals(at=(1,)), 1.0), all_logits=True).all_logits
        assert ref is not None
        assert got is not None
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    SEEN.clear()
    plan = _spec(VisionSignals(at=(1,)), 0.5)
    st = ad.prefill(inp, plan, seeds=[5, 6])
    first = SEEN[0]
    assert first.groups[0].size == 16
    assert (first.groups[0].height, first.groups[0].width) == (4, 4)
    assert len(first.groups) >= 2  # and its crops
    assert first.crop_grid is not None  # the crops' arrangement, as LLaVA-NeXT packs them
    assert first.crop_grid[0] * first.crop_grid[1] == len(first.groups) - 1
    assert first.anchor_value is not None
    assert first.anchor_value.shape[0] == len(first.groups)
    whole = [sum(g.size for g in c.groups) for c in SEEN]
    assert st.visual_tokens["vision"] == [whole[0] // 2, whole[1] // 2 + whole[2] // 2]
    for b, one in enumerate(singles):
        alone = ad.prefill(one, plan, seeds=[5 + b])
        torch.testing.assert_close(st.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0)


def test_bad_step_layers_are_refused_before_work(llava: Any) -> None:
    ad = vision_adapter(llava)
    inp, _ = _llava_batch()
    with pytest.raises(ConfigError, match="must increase"):
        ad.prefill(inp, _spec(Probe(at=(2, 1)), 0.5))
    with pytest.raises(ConfigError, match="K must be in"):
        ad.prefill(inp, _spec(Probe(at=(1, 9)), 0.5))
    with pytest.raises(ConfigError, match="encoder layers 1"):
        ad.prefill(inp, _spec(VisionSignals(at=(7,)), 0.5))
    qwen = vt.qwen2_vl()
    with pytest.raises(CapabilityError, match="vision-stage"):
        vision_adapter(qwen).prefill(vt.qwen_inputs([2], [[(4, 4)]]), _spec(VisionSignals(at=(1,)), 0.5))


def test_proportional_attention_makes_a_merged_duplicate_invisible(llava: Any) -> None:
    """ToMe's proportional attention (+ log size on a key's logit), as the encoder runs it after a merge: a token
    standing for two identical patches attends and is attended to as the two did, so every other token's output is
    unchanged."""
    from tokensieve.adapters.vision.llava import ClipTower

    tower = ClipTower(llava.model.vision_tower, -2, "default")
    torch.manual_seed(3)
    h = torch.randn(1, 6, llava.config.vision_config.hidden_size)
    h[0, 4] = h[0, 3]  # patches 3 and 4 identical
    with torch.no_grad():
        ref = tower.run(h, 0, 1)
        merged = torch.cat([h[:, :4], h[:, 5:]], dim=1)  # 4 folded into 3
        sizes = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0])  # CLS, 1, 2, 3 (+4), 5
        got = tower.run(merged, 0, 1, sizes.log().view(1, 1, 1, -1))
        plain = tower.run(merged, 0, 1)
    torch.testing.assert_close(got[0, [0, 1, 2, 3, 4]], ref[0, [0, 1, 2, 3, 5]], atol=1e-5, rtol=0)
    assert not torch.allclose(plain[0, [0, 1, 2, 4]], ref[0, [0, 1, 2, 5]], atol=1e-5)  # without it they differ
