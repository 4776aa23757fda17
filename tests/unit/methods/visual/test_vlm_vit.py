"""Vision-stage visual-token methods ToMe, HiPrune and HiRED: reference parity against straightforward loop
implementations of each paper's rule written here, budgets, parameters, and (once the engine acts inside the
encoder) end-to-end runs on the tiny LLaVA / LLaVA-NeXT."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tokensieve.core.budget import Budget
from tokensieve.errors import ConfigError
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup
from tokensieve.registry import create_method

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def vctx(groups: tuple[VisualGroup, ...], seed: int = 0, d: int = 5, heads: int = 2, **kw: Any) -> VisualContext:
    n = groups[-1].end
    g = torch.Generator().manual_seed(seed)
    fields: dict[str, Any] = {
        "tokens": torch.randn(n, d, generator=g),
        "keys": torch.randn(heads, n, 4, generator=g),
        "cls_attention": torch.rand(heads, n, generator=g),
        "mean_attention": torch.rand(heads, n, generator=g),
    }
    fields.update(kw)
    return VisualContext(groups=groups, stage=Stage.VISION, layer=1, **fields)


def grids(*shapes: tuple[int, int], image: int = 0) -> tuple[VisualGroup, ...]:
    out, start = [], 0
    for h, w in shapes:
        out.append(VisualGroup(start, start + h * w, h, w, image))
        start += h * w
    return tuple(out)


# ================================================================================================= ToMe reference
def ref_tome_round(
    x: list[list[float]], metric: list[list[float]], sizes: list[float], r: int
) -> tuple[list[int], list[list[float]], list[float], list[list[float]]]:
    """One round of bipartite soft matching, written from the paper: A = odd offsets, B = even offsets (the encoder
    sequence with CLS first split as [::2] / [1::2]), each A's edge to its most cosine-similar B, the r best edges
    merged by size-weighted averages."""
    n = len(x)
    A = [i for i in range(n) if i % 2 == 1]
    B = [i for i in range(n) if i % 2 == 0]

    def cos(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v)) / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    edges = []
    for a in A:
        best_b, best_s = B[0], -math.inf
        for b in B:
            s = cos(metric[a], metric[b])
            if s > best_s:
                best_b, best_s = b, s
        edges.append((a, best_b, best_s))
    edges.sort(key=lambda e: -e[2])  # Python's sort is stable: the earlier A on ties
    merged = edges[: min(r, len(A))]
    groups: dict[int, list[int]] = {b: [b] for b in B}
    for a, b, _ in merged:
        groups[b].append(a)
    gone = {a for a, _, _ in merged}
    kept = [i for i in range(n) if i not in gone]
    new_x, new_s, new_m = [], [], []
    for i in kept:
        members = groups.get(i, [i])
        tot = sum(sizes[j] for j in members)
        new_x.append([sum(sizes[j] * x[j][c] for j in members) / tot for c in range(len(x[0]))])
        new_m.append([sum(sizes[j] * metric[j][c] for j in members) / tot for c in range(len(metric[0]))])
        new_s.append(tot)
    return kept, new_x, new_s, new_m


def ref_tome_group(
    ctx: VisualContext, g: VisualGroup, rounds: list[int]
) -> tuple[list[int], list[list[float]], list[float]]:
    keys = ctx.keys
    assert keys is not None
    H = keys.shape[0]
    idx = list(range(g.start, g.end))
    x = [ctx.tokens[i].tolist() for i in idx]
    metric = [[sum(float(keys[h, i, c]) for h in range(H)) / H for c in range(keys.shape[2])] for i in idx]
    sizes = [1.0 if ctx.sizes is None else float(ctx.sizes[i]) for i in idx]
    for r in rounds:
        kept, x, sizes, metric = ref_tome_round(x, metric, sizes, r)
        idx = [idx[i] for i in kept]
    return idx, x, sizes


def assert_tome(ctx: VisualContext, budget: Budget, rounds: list[list[int]]) -> None:
    kept = create_method("vis:tome").prune(ctx, budget)
    index, tokens, sizes = [], [], []
    for g, rs in zip(ctx.groups, rounds):
        i, x, s = ref_tome_group(ctx, g, rs)
        index += i
        tokens += x
        sizes += s
    assert kept.index.tolist() == index
    assert kept.tokens is not None
    assert kept.sizes is not None
    torch.testing.assert_close(kept.tokens, torch.tensor(tokens), rtol=1e-5, atol=1e-6)
    assert kept.sizes.tolist() == sizes


def test_tome_parity_one_step_per_grid() -> None:
    # a 4x4 thumbnail and a 4x4 crop of one image: 0.75 of 32 = 24 → 12 per grid → r = 4 in each, within each grid
    ctx = vctx(grids((4, 4), (4, 4)), seed=1)
    assert_tome(ctx, Budget.ratio(0.75), [[4], [4]])


def test_tome_parity_progressive_schedule_and_sizes() -> None:
    # step 0 of 3 on a 6x6 grid, target 12: ⌈24 / 3⌉ = 8 merged now (the remainder at the first layers)
    ctx = vctx(grids((6, 6)), seed=2, steps=3, step=0, memory={}, start=(36,))
    assert_tome(ctx, Budget.tokens(12), [[8]])
    # a later step: 20 tokens left (sizes from earlier merges), 2 steps to go for the stored target 12 → r = 4
    sizes = torch.tensor([1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 4, 1, 1, 2, 1, 1, 3, 1, 1, 8])
    later = vctx((VisualGroup(0, 20, 1, 20),), seed=3, steps=3, step=1, memory={"tome_targets": [12]}, start=(36,))
    later = VisualContext(**{**later.__dict__, "sizes": sizes})
    assert_tome(later, Budget.tokens(12), [[4]])


def test_tome_parity_last_step_runs_extra_rounds() -> None:
    # 16 → 4 in one step: one round merges at most 8 (|A|), a second round merges 4 with the merged keys
    ctx = vctx(grids((4, 4)), seed=4)
    assert_tome(ctx, Budget.ratio(0.25), [[12, 4]])
    kept = create_method("vis:tome").prune(ctx, Budget.ratio(0.25))
    assert kept.sizes is not None
    assert int(kept.sizes.sum()) == 16
    assert kept.index.numel() == 4


def test_tome_targets_per_grid_and_images() -> None:
    # two images (one of two grids), ratio 0.5: image 0 = 16 + 8 tokens → 12 split 8/4... at least one per grid
    groups = (VisualGroup(0, 16, 4, 4, 0), VisualGroup(16, 24, 2, 4, 0), VisualGroup(24, 40, 4, 4, 1))
    ctx = vctx(groups, seed=5)
    t = create_method("vis:tome")
    targets = t.targets(ctx, Budget.ratio(0.5))  # type: ignore[attr-defined]
    assert sum(targets[:2]) == 12
    assert targets[2] == 8
    kept = t.prune(ctx, Budget.ratio(0.5))
    assert kept.index.numel() == 20
    assert kept.sizes is not None
    assert int(kept.sizes.sum()) == 40
    # nothing crosses a grid: each output's tokens come from its own grid (sizes per grid add up)
    per_grid = [int(kept.sizes[(kept.index >= g.start) & (kept.index < g.end)].sum()) for g in groups]
    assert per_grid == [16, 8, 16]


def test_tome_keeps_everything_at_full_budget_and_marks_proportional() -> None:
    t = create_method("vis:tome")
    ctx = vctx(grids((4, 4)), seed=6)
    kept = t.prune(ctx, Budget.ratio(1.0))
    assert kept.index.tolist() == list(range(16))
    assert kept.tokens is None
    assert t.proportional
    assert t.layers(23) == tuple(range(1, 23))
    assert t.layers(1) == (1,)


# =============================================================================================== HiPrune reference
def ref_hiprune_group(obj: list[float], deep: list[float], h: int, w: int, k: int, alpha: float) -> list[int]:
    n = h * w
    n_anchor = round(k * alpha / 5)
    order = sorted(range(n), key=lambda j: (-obj[j], j))
    anchors = order[:n_anchor]
    chosen = set(anchors)
    for a in anchors:
        r, c = a // w, a % w
        for rr, cc in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c)):
            if 0 <= rr < h and 0 <= cc < w:
                chosen.add(rr * w + cc)
    rest = sorted((j for j in range(n) if j not in chosen), key=lambda j: (-deep[j], j))
    chosen |= set(rest[: k - len(chosen)])
    return sorted(chosen)


def head_mean(att: torch.Tensor) -> list[float]:
    H, n = att.shape
    return [sum(float(att[h, j]) for h in range(H)) / H for j in range(n)]


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_hiprune_parity_two_steps(alpha: float) -> None:
    groups = grids((6, 6))
    mem: dict[str, Any] = {}
    obj = vctx(groups, seed=7, steps=2, step=0, memory=mem, start=(36,))
    hp = create_method("vis:hiprune", alpha=alpha, object_layer=1)
    first = hp.prune(obj, Budget.tokens(20))
    assert first.index.tolist() == list(range(36))  # the object layer keeps everything
    deep = vctx(groups, seed=8, steps=2, step=1, memory=mem, start=(36,))
    kept = hp.prune(deep, Budget.tokens(20))
    assert obj.mean_attention is not None
    assert deep.mean_attention is not None
    ref = ref_hiprune_group(head_mean(obj.mean_attention), head_mean(deep.mean_attention), 6, 6, 20, alpha)
    assert kept.index.tolist() == ref
    assert len(ref) == 20


def test_hiprune_parity_per_grid_and_single_step() -> None:
    groups = grids((4, 4), (4, 4))  # LLaVA-NeXT-like: thumbnail + crop, equal shares 8 + 8
    ctx = vctx(groups, seed=9)
    kept = create_method("vis:hiprune", alpha="1.0", object_layer="3").prune(ctx, Budget.ratio(0.5))
    assert ctx.mean_attention is not None
    s = head_mean(ctx.mean_attention)  # one step: anchors and registers both from this layer
    ref = ref_hiprune_group(s[:16], s[:16], 4, 4, 8, 1.0) + [
        16 + j for j in ref_hiprune_group(s[16:], s[16:], 4, 4, 8, 1.0)
    ]
    assert kept.index.tolist() == ref


def test_hiprune_buffers_do_not_wrap_rows() -> None:
    # the anchor ends row 0 of a 3x3 grid: its buffers are 1 (left) and 5 (below) — not 3, which the official
    # code's flat index + 1 would take — and the two registers are the best of the rest (8, 7)
    att = torch.tensor([[0.1, 0.2, 1.0, 0.0, 0.3, 0.4, 0.5, 0.6, 0.7]])
    ctx = vctx(grids((3, 3)), mean_attention=att)
    kept = create_method("vis:hiprune", alpha=1.0, object_layer=1).prune(ctx, Budget.tokens(5))  # round(5/5) = 1 anchor
    assert kept.index.tolist() == [1, 2, 5, 7, 8]


def test_hiprune_parameters_and_layers() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        create_method("vis:hiprune", alpha="1.5")
    with pytest.raises(ConfigError, match="object_layer"):
        create_method("vis:hiprune", object_layer="-1")
    hp = create_method("vis:hiprune")  # the paper's layer 9 of 23, scaled to the tower
    assert hp.layers(23) == (9, 23)
    assert hp.layers(5) == (2, 5)
    assert hp.layers(2) == (1, 2)
    assert hp.layers(1) == (1,)
    assert create_method("vis:hiprune", object_layer=9).layers(9) == (9,)
    with pytest.raises(ConfigError, match="past the encoder's feature layer"):
        create_method("vis:hiprune", object_layer=9).layers(2)
    ctx = vctx(grids((4, 4)), seed=10)
    assert create_method("vis:hiprune", object_layer=1).prune(ctx, Budget.ratio(1.0)).index.tolist() == list(range(16))


# ================================================================================================= HiRED reference
def head_sum(att: torch.Tensor) -> list[float]:
    return [sum(float(att[h, j]) for h in range(att.shape[0])) for j in range(att.shape[1])]


def ref_hired(early: list[float], final: list[float], sizes: list[int], k: int, alpha: float) -> list[int]:
    """The paper's two phases for one image whose first grid is the thumbnail: its share ⌊αk⌋; the crops share the
    rest by how many of the thumbnail's top ⌊(1−α)n⌋ early-attention tokens fall in their chunk of it
    (largest remainders); each grid's top tokens by final CLS attention."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if len(sizes) == 1:
        shares = [k]
    else:
        n = sizes[0]
        k_thumb = min(int(alpha * k), n)
        top = set(sorted(range(n), key=lambda j: (-early[j], j))[: int((1 - alpha) * n)])
        C = len(sizes) - 1
        weights = [sum(1 for j in range(i * n // C, (i + 1) * n // C) if j in top) for i in range(C)]
        rest = k - k_thumb
        exact = [rest * wgt / sum(weights) for wgt in weights]
        shares_c = [math.floor(e) for e in exact]
        by_remainder = sorted(range(C), key=lambda i: (-(exact[i] - shares_c[i]), i))
        for i in by_remainder[: rest - sum(shares_c)]:
            shares_c[i] += 1
        shares = [k_thumb, *shares_c]
    out = []
    for s0, n_g, k_g in zip(starts, sizes, shares):
        order = sorted(range(n_g), key=lambda j: (-final[s0 + j], j))
        out += sorted(s0 + j for j in order[:k_g])
    return out


def test_hired_parity_thumbnail_and_crops() -> None:
    groups = grids((4, 4), (4, 4), (4, 4), (4, 4))  # thumbnail + 3 crops
    mem: dict[str, Any] = {}
    early = vctx(groups, seed=11, steps=2, step=0, memory=mem, start=(64,))
    hr = create_method("vis:hired")
    assert hr.prune(early, Budget.ratio(0.25)).index.tolist() == list(range(64))
    final = vctx(groups, seed=12, steps=2, step=1, memory=mem, start=(64,))
    kept = hr.prune(final, Budget.ratio(0.25))
    assert early.cls_attention is not None
    assert final.cls_attention is not None
    ref = ref_hired(head_sum(early.cls_attention), head_sum(final.cls_attention), [16, 16, 16, 16], 16, 0.5)
    assert kept.index.tolist() == ref
    assert kept.index.numel() == 16
    assert mem["hired_split"][0] == 8  # ⌊0.5 · 16⌋ for the thumbnail


def test_hired_crop_weights_follow_the_thumbnail_chunks() -> None:
    # the thumbnail's early attention is high only in its second half → the second crop takes the crops' share
    early_att = torch.zeros(1, 48)
    early_att[0, 8:16] = 1.0
    groups = grids((4, 4), (4, 4), (4, 4))
    ctx = vctx(groups, seed=13, cls_attention=early_att)
    shares = create_method("vis:hired").split(ctx, Budget.tokens(12))  # type: ignore[attr-defined]
    assert shares == [6, 0, 6]


def test_hired_crop_weights_follow_the_crops_regions_when_the_layout_is_known() -> None:
    """A 2 x 2 crop layout: crop (r, c) is weighted by the marked thumbnail tokens in its quadrant (not in a raster
    band). The thumbnail's early attention is high in its top-right and bottom-left quadrants only."""
    from dataclasses import replace

    early_att = torch.zeros(1, 16 + 4 * 16)
    thumb = torch.zeros(4, 4)
    thumb[0:2, 2:4] = 1.0  # top-right
    thumb[2:4, 0:2] = 1.0  # bottom-left
    early_att[0, :16] = thumb.flatten()
    ctx = vctx(grids((4, 4), (4, 4), (4, 4), (4, 4), (4, 4)), seed=16, cls_attention=early_att)
    hired = create_method("vis:hired")
    # top (1 − α)·16 = 8 thumbnail tokens are the two quadrants; the crops' 10 of 20 go to crops (0, 1) and (1, 0)
    shares = hired.split(replace(ctx, crop_grid=(2, 2)), Budget.tokens(20))  # type: ignore[attr-defined]
    assert shares == [10, 0, 5, 5, 0]
    # without the layout: raster bands of 4 tokens each — rows 0, 1, 2, 3 → 2, 2, 2, 2 marked: equal weights
    bands = hired.split(ctx, Budget.tokens(20))  # type: ignore[attr-defined]
    assert bands == [10, 3, 3, 2, 2]


def test_hired_single_grid_is_top_k_by_final_cls_attention() -> None:
    ctx = vctx(grids((5, 5)), seed=14)
    kept = create_method("vis:hired").prune(ctx, Budget.ratio(0.36))
    assert ctx.cls_attention is not None
    s = head_sum(ctx.cls_attention)
    assert kept.index.tolist() == sorted(sorted(range(25), key=lambda j: (-s[j], j))[:9])


def test_hired_parameters_layers_and_full_budget() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        create_method("vis:hired", alpha="-0.1")
    with pytest.raises(ConfigError, match="early"):
        create_method("vis:hired", early="0")
    assert create_method("vis:hired").layers(23) == (1, 23)
    assert create_method("vis:hired").layers(1) == (1,)
    ctx = vctx(grids((4, 4), (4, 4)), seed=15)
    assert create_method("vis:hired").prune(ctx, Budget.ratio(1.0)).index.tolist() == list(range(32))


def test_weighted_counts_caps_and_exact_totals() -> None:
    from tokensieve.methods.visual.hired import weighted_counts

    assert weighted_counts(10, [1.0, 1.0, 2.0], [10, 10, 10]) == [3, 2, 5]
    assert weighted_counts(10, [0.0, 0.0, 9.0], [4, 4, 4]) == [3, 3, 4]  # the capped part's excess goes on
    assert weighted_counts(5, [0.0, 0.0], [4, 4]) == [3, 2]
    assert sum(weighted_counts(17, [0.3, 0.1, 0.6, 0.0], [5, 5, 5, 5])) == 17


@pytest.mark.parametrize("name", ["tome", "hiprune", "hired"])
def test_counts_match_the_budget(name: str) -> None:
    method = create_method(f"vis:{name}", **({"object_layer": "1"} if name == "hiprune" else {}))
    for budget in (Budget.ratio(0.5), Budget.tokens(7), Budget.ratio(0.3)):
        ctx = vctx(grids((4, 4), (4, 4)), seed=16)
        kept = method.prune(ctx, budget)
        assert kept.index.numel() == method.count(ctx, budget)


# ================================================================================== integration on the tiny models
# The tiny LLaVA / LLaVA-NeXT towers have 3 layers and read layer 2 (F = 2): HiPrune's object layer must be 1.
LLAVA_SPECS = ["tome:0.5", "tome:3", "hiprune[object_layer=1,alpha=1.0]:6", "hired:0.25"]


@pytest.fixture(scope="module")
def llava() -> Any:
    import vlm_tiny as vt

    return vt.llava()


@pytest.fixture(scope="module")
def nxt() -> Any:
    import vlm_tiny as vt

    return vt.llava_next()


def _llava_batch() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    import vlm_tiny as vt

    return vt.llava_batch()


def _eager_attentions(model: Any, pixel_values: torch.Tensor) -> tuple[Any, Any]:
    vcfg = model.config.vision_config
    saved = vcfg._attn_implementation_internal
    vcfg._attn_implementation_internal = "eager"
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        vcfg._attn_implementation_internal = saved
    return out.attentions, out.hidden_states


@pytest.mark.parametrize("spec", LLAVA_SPECS)
def test_llava_batch_equals_alone_and_counts(llava: Any, spec: str) -> None:
    from tokensieve.adapters.vision import vision_adapter

    ad = vision_adapter(llava)
    inp, singles = _llava_batch()
    batch = ad.prefill(inp, spec, seeds=[1, 2, 3])
    budget = Budget.parse(spec.rsplit(":", 1)[1])
    assert batch.visual_tokens["vision"] == [budget.tokens_for(16, larger="clip") * n for n in (1, 2, 0)]
    assert batch.visual_tokens["llm_input"] == batch.visual_tokens["vision"]
    per_image: list[list[int]] = []
    for b, one in enumerate(singles):
        alone = ad.prefill(one, spec, seeds=[b + 1])
        torch.testing.assert_close(batch.logits[b : b + 1], alone.logits, atol=2e-5, rtol=0)
        per_image += [k.index.tolist() for k in alone.kept.get("vision", [])]
    assert [k.index.tolist() for k in batch.kept["vision"]] == per_image


@pytest.mark.parametrize("spec", ["tome:1.0", "hiprune[object_layer=1]:1.0", "hired:1.0"])
def test_full_budget_is_the_unpruned_model(llava: Any, nxt: Any, spec: str) -> None:
    import vlm_tiny as vt

    from tokensieve.adapters.vision import vision_adapter

    _, singles = _llava_batch()
    sizes = [[(40, 70)]]
    nxt_one = vt.next_select(vt.next_inputs(nxt, [2], sizes), 0, sizes)
    for model, one in ((llava, singles[0]), (llava, singles[1]), (nxt, nxt_one)):
        ad = vision_adapter(model)
        ref = ad.prefill(one, None, all_logits=True).all_logits
        got = ad.prefill(one, spec, all_logits=True).all_logits
        assert ref is not None
        assert got is not None
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_hired_and_hiprune_in_the_model_match_eager_attention(llava: Any) -> None:
    from tokensieve.adapters.vision import vision_adapter

    ad = vision_adapter(llava)
    _, singles = _llava_batch()
    one = singles[0]
    att, _ = _eager_attentions(llava, one["pixel_values"])  # att[l]: (1, H, 17, 17) of layer l + 1
    st = ad.prefill(one, "hired:5")
    final = head_sum(att[1][0, :, 0, 1:])
    assert st.kept["vision"][0].index.tolist() == sorted(sorted(range(16), key=lambda j: (-final[j], j))[:5])
    st = ad.prefill(one, "hiprune[object_layer=1,alpha=1.0]:10")  # round(10/5) = 2 anchors
    obj = head_mean(att[0][0].mean(1)[:, 1:])  # attention received: mean over queries (CLS included), then heads
    deep = head_mean(att[1][0].mean(1)[:, 1:])
    assert st.kept["vision"][0].index.tolist() == ref_hiprune_group(obj, deep, 4, 4, 10, 1.0)


def test_tome_in_the_model_matches_the_reference_on_layer_one_keys(llava: Any) -> None:
    from tokensieve.adapters.vision import vision_adapter

    ad = vision_adapter(llava)
    _, singles = _llava_batch()
    one = singles[0]
    _, hidden = _eager_attentions(llava, one["pixel_values"])
    layer = llava.model.vision_tower.encoder.layers[0]
    H = llava.config.vision_config.num_attention_heads
    with torch.no_grad():
        k = layer.self_attn.k_proj(layer.layer_norm1(hidden[0]))[0, 1:]  # (16, D): layer 1's keys of the patches
    keys = k.view(16, H, -1).transpose(0, 1)
    ctx = VisualContext(tokens=hidden[1][0, 1:], groups=grids((4, 4)), stage=Stage.VISION, keys=keys)
    idx, _, sizes = ref_tome_group(ctx, ctx.groups[0], [8])
    st = ad.prefill(one, "tome:0.5")  # 16 → 8 after layer 1, the feature layer 2 runs on 8
    (kept,) = st.kept["vision"]
    assert kept.index.tolist() == idx
    assert kept.sizes is not None
    assert kept.sizes.tolist() == sizes
    assert st.visual_tokens["llm_input"] == [8]


@pytest.mark.parametrize("spec", ["tome:0.5", "hiprune[object_layer=1]:0.25", "hired:0.25", "hired:9"])
def test_llava_next_runs_per_grid_and_batch_equals_alone(nxt: Any, spec: str) -> None:
    import vlm_tiny as vt

    from tokensieve.adapters.vision import vision_adapter

    ad = vision_adapter(nxt)
    sizes = [[(40, 70)], [(64, 30), (30, 30)]]
    inp = vt.next_inputs(nxt, [2, 3], sizes)
    singles = [vt.next_select(inp, b, sizes) for b in range(2)]
    batch = ad.prefill(inp, spec, seeds=[5, 6])
    budget = Budget.parse(spec.rsplit(":", 1)[1])
    for b, one in enumerate(singles):
        alone = ad.prefill(one, spec, seeds=[5 + b])
        torch.testing.assert_close(batch.logits[b : b + 1], alone.logits, atol=2e-5, rtol=0)
        assert alone.visual_tokens == {k: [v[b]] for k, v in batch.visual_tokens.items()}
        # each image keeps its budget of the patches the method sees: its thumbnail and the crop patches that
        # survive the unpadding (what reaches the LM unpruned)
        expected = 0
        for size in sizes[b]:
            image = vt.next_select(vt.next_inputs(nxt, [2], [[size]]), 0, [[size]])
            expected += budget.tokens_for(ad.prefill(image, None).visual_tokens["llm_input"][0], larger="clip")
        assert alone.visual_tokens["vision"] == [expected]
        assert alone.visual_tokens["llm_input"] == [expected]


def test_qwen2_vl_has_no_vision_stage() -> None:
    import vlm_tiny as vt

    from tokensieve.adapters.vision import vision_adapter
    from tokensieve.errors import CapabilityError

    qwen = vt.qwen2_vl()
    for spec in ("tome:0.5", "hiprune[object_layer=1]:0.5", "hired:0.5"):
        with pytest.raises(CapabilityError, match="vision-stage"):
            vision_adapter(qwen).prefill(vt.qwen_inputs([2], [[(4, 4)]]), spec)


def test_hiprune_object_layer_past_the_tiny_tower_is_refused(llava: Any) -> None:
    from tokensieve.adapters.vision import vision_adapter

    _, singles = _llava_batch()
    with pytest.raises(ConfigError, match=r"object_layer=9 is past the encoder's feature layer \(2\)"):
        vision_adapter(llava).prefill(singles[0], "hiprune[object_layer=9]:0.5")
    # the default scales the paper's layer to the tower: layer 1 of this 2-layer feature stack
    st = vision_adapter(llava).prefill(singles[0], "hiprune:0.5")
    assert st.visual_tokens["vision"] == [8]
