"""Visual-token methods on pure tensors: registry, spec grammar, and reference parity of the baselines
(random, pool, FastV) against straightforward implementations written here."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.adapters.vision.attention import row_probs
from tokensieve.core.budget import Budget
from tokensieve.errors import ConfigError, UnknownNameError
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup
from tokensieve.methods.visual.base import split_counts, top_k
from tokensieve.methods.visual.pool import pooled_grid
from tokensieve.registry import create_method, method_names
from tokensieve.spec import Spec, VisualPlan, VisualSpec


def ctx_of(n: int, groups: tuple[VisualGroup, ...] | None = None, **kw: object) -> VisualContext:
    g = torch.Generator().manual_seed(n)
    groups = groups or (VisualGroup(0, n, 1, n),)
    return VisualContext(tokens=torch.randn(n, 6, generator=g), groups=groups, stage=Stage.PROJECTOR, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- registry / spec
def test_registry_lists_the_baselines_and_rejects_mistakes() -> None:
    assert {"random", "pool", "fastv"} <= set(method_names("visual"))
    with pytest.raises(UnknownNameError, match="fastv"):
        create_method("vis:fastvv")
    with pytest.raises(ConfigError, match="no parameter 'k'"):
        create_method("vis:fastv", k="3")
    with pytest.raises(ConfigError, match="acts at projector, vision"):
        create_method("vis:pool", stage="llm")
    with pytest.raises(ConfigError, match="K >= 1"):
        create_method("vis:fastv", layer="0")
    assert create_method("vis:random", stage="c", layer="3").where is Stage.LLM


def test_fastv_stage_parameter_is_refused() -> None:
    with pytest.raises(ConfigError, match="no parameter 'stage'"):
        create_method("vis:fastv", stage="llm")


def test_spec_parse_label_and_budget_per_image() -> None:
    s = VisualSpec.parse("fastv[layer=3]:0.25")
    assert s.method.at_layer == 3
    assert s.stage is Stage.LLM
    assert s.label == "fastv[layer=3]:0.25"
    assert VisualSpec.parse("vis:fastv[layer=2]:25%").label == "fastv:0.25"  # default dropped
    assert VisualSpec.parse("pool:64").budget == Budget.tokens(64)
    with pytest.raises(ConfigError, match="no budget"):
        VisualSpec.parse("fastv[layer=2]")
    # the budget is per image: 2 images of 16 tokens at 0.25 keep 4 + 4; 64 tokens clip to each image's 16
    ctx = ctx_of(32, (VisualGroup(0, 16, 4, 4, 0), VisualGroup(16, 32, 4, 4, 1)))
    assert create_method("vis:random").count(ctx, Budget.ratio(0.25)) == 8
    assert create_method("vis:random").count(ctx, Budget.tokens(64)) == 32


def test_plan_orders_stages_and_refuses_two_at_one_stage() -> None:
    plan = VisualPlan.parse(["fastv:0.5", "pool:64"])
    assert [s.stage for s in plan.specs] == [Stage.PROJECTOR, Stage.LLM]
    assert plan.label == "pool:64/fastv:0.5"
    with pytest.raises(ConfigError, match="one per stage"):
        VisualPlan.parse(["pool:64", "vis:random:0.5"])


def test_one_spec_holds_visual_methods_and_a_kv_spec() -> None:
    s = Spec.parse("pool:128/snapkv:0.25")
    assert s.visual.label == "pool:128"
    assert s.kv.label == "snapkv:0.25"
    assert s.label == "pool:128/snapkv:0.25"
    s = Spec.parse("fastv[layer=2]:0.25")
    assert s.visual.label == "fastv:0.25"
    assert s.kv.is_full
    assert s.label == "fastv:0.25"
    s = Spec.parse("random:0.5")  # 'random' is a KV method too: without vis: it is the KV one
    assert s.visual.is_empty
    assert s.label == "random:0.5"
    s = Spec.parse("pool:4/vis:random[stage=vision,layer=1,seed=3]:0.5/snapkv[window=8]:0.5+quest:0.5")
    assert s.visual.label == "random[layer=1,seed=3,stage=vision]:0.5/pool:4"  # in stage order
    assert s.kv.label == "snapkv[window=8]:0.5+quest:0.5"
    assert Spec.parse(s.label) == s
    with pytest.raises(ConfigError, match="come first"):
        Spec.parse("snapkv:0.25/pool:4")
    with pytest.raises(ConfigError, match="come first"):
        Spec.parse("snapkv:0.25/h2o:0.5")


# ----------------------------------------------------------------------------------------------- selection
def test_top_k_sorted_and_ties_to_the_earlier_token() -> None:
    s = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert top_k(s, 2).tolist() == [1, 2]
    assert top_k(s, 9).tolist() == [0, 1, 2, 3, 4]
    assert split_counts(12, [16, 32]) == [4, 8]
    assert sum(split_counts(7, [5, 5, 5])) == 7


def test_random_parity() -> None:
    ctx = ctx_of(40, seed=5)
    kept = create_method("vis:random", seed="2").prune(ctx, Budget.ratio(0.25))
    g = torch.Generator().manual_seed(2 * 1_000_003 + 5)
    u = torch.rand(40, generator=g)
    ref = sorted(range(40), key=lambda j: -float(u[j]))[:10]
    assert kept.index.tolist() == sorted(ref)
    # another sample seed draws another subset; the same seed the same one
    other = create_method("vis:random", seed="2").prune(ctx_of(40, seed=6), Budget.ratio(0.25))
    assert other.index.tolist() != kept.index.tolist()


def _pool_reference(x: torch.Tensor, h: int, w: int, a: int, b: int) -> tuple[list[list[float]], list[int], list[int]]:
    """Adaptive average pooling written out: cell (i, j) covers rows floor(i·h/a) … ceil((i+1)·h/a) − 1."""
    grid = x.reshape(h, w, -1)
    out, index, sizes = [], [], []
    for i in range(a):
        r0, r1 = (i * h) // a, math.ceil((i + 1) * h / a)
        for j in range(b):
            c0, c1 = (j * w) // b, math.ceil((j + 1) * w / b)
            cell = [grid[r, c] for r in range(r0, r1) for c in range(c0, c1)]
            out.append((sum(cell) / len(cell)).tolist())
            index.append(r0 * w + c0)
            sizes.append(len(cell))
    return out, index, sizes


@pytest.mark.parametrize(("h", "w", "k", "grid"), [(6, 6, 9, (3, 3)), (5, 7, 6, (2, 3)), (4, 4, 16, (4, 4))])
def test_pool_parity(h: int, w: int, k: int, grid: tuple[int, int]) -> None:
    assert pooled_grid(h, w, k) == grid
    ctx = ctx_of(h * w, (VisualGroup(0, h * w, h, w),))
    kept = create_method("vis:pool").prune(ctx, Budget.tokens(k))
    if k == h * w:  # the whole grid: nothing pooled, nothing replaced
        assert kept.index.tolist() == list(range(h * w))
        assert kept.tokens is None
        return
    ref, index, sizes = _pool_reference(ctx.tokens, h, w, *grid)
    assert kept.index.tolist() == index
    assert kept.sizes is not None
    assert kept.sizes.tolist() == sizes
    assert kept.tokens is not None
    torch.testing.assert_close(kept.tokens, torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_pool_splits_an_images_budget_over_its_grids() -> None:
    # one image = a 4x4 thumbnail and a 4x8 crop grid (LLaVA-NeXT-like); 0.25 of 48 = 12 → 4 + 8 → 2x2 and 2x4
    groups = (VisualGroup(0, 16, 4, 4, 0), VisualGroup(16, 48, 4, 8, 0))
    ctx = ctx_of(48, groups)
    kept = create_method("vis:pool").prune(ctx, Budget.ratio(0.25))
    _, i1, _ = _pool_reference(ctx.tokens[:16], 4, 4, 2, 2)
    _, i2, _ = _pool_reference(ctx.tokens[16:], 4, 8, 2, 4)
    assert kept.index.tolist() == i1 + [16 + i for i in i2]


def test_fastv_parity_with_gqa_and_a_causal_row() -> None:
    """FastV's score from the attention row the adapter computes (one query, GQA, causal) against a plain loop."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, d = 1, 4, 2, 12, 8
    q = torch.randn(B, Hq, T, d, generator=g)
    k = torch.randn(B, Hkv, T, d, generator=g)
    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    probs = row_probs(module, q, k, None, d**-0.5, "last")  # (B, Hq, T)
    vis = torch.arange(3, 9)  # visual tokens 3..8
    ctx = VisualContext(
        tokens=torch.zeros(6, 4),
        groups=(VisualGroup(0, 6, 2, 3),),
        stage=Stage.LLM,
        layer=2,
        text_attention=probs[0][:, vis],
    )
    kept = create_method("vis:fastv").prune(ctx, Budget.ratio(0.5))
    # reference: softmax over every key for the last query of each head, its KV head h // (Hq / Hkv)
    ref_scores = []
    for j in vis.tolist():
        total = 0.0
        for h in range(Hq):
            logits = [float(q[0, h, -1] @ k[0, h // (Hq // Hkv), t]) * d**-0.5 for t in range(T)]
            m = max(logits)
            z = sum(math.exp(x - m) for x in logits)
            total += math.exp(logits[j] - m) / z
        ref_scores.append(total / Hq)
    ref = sorted(sorted(range(6), key=lambda i: -ref_scores[i])[:3])
    assert kept.index.tolist() == ref


def test_a_method_missing_its_signal_says_so() -> None:
    from tokensieve.errors import CapabilityError

    with pytest.raises(CapabilityError, match="text attention"):
        create_method("vis:fastv").prune(ctx_of(8), Budget.ratio(0.5))
