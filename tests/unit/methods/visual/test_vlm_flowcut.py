"""FlowCut and VisionZip: reference parity against plain loops written from the papers' formulas (and the
official code's details), edge cases, parameters, schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tokensieve.core.budget import Budget
from tokensieve.errors import CapabilityError, ConfigError
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup
from tokensieve.methods.visual.flowcut import FlowCut
from tokensieve.methods.visual.visionzip import VisionZip
from tokensieve.registry import create_method
from tokensieve.spec import VisualPlan


# ------------------------------------------------------------------------------------------------ references
def ref_vision_score(att: torch.Tensor, val: torch.Tensor, anchor: torch.Tensor, scaled: bool = False) -> list[float]:
    """S_j = (a_j / Σa + s_j / Σs) · Σ_d |mean_h v_hjd| with a_j = mean_h A[h, j] and s_j = mean_h of the softmax of
    v_CLS·v_i over i ∈ {CLS} ∪ patches (at j), written with loops."""
    H, N, d = val.shape
    scale = 1 / math.sqrt(d) if scaled else 1.0
    a = [sum(float(att[h, j]) for h in range(H)) / H for j in range(N)]
    s = [0.0] * N
    for h in range(H):
        z_cls = sum(float(anchor[h, t]) ** 2 for t in range(d)) * scale
        z = [sum(float(anchor[h, t]) * float(val[h, j, t]) for t in range(d)) * scale for j in range(N)]
        m = max([z_cls, *z])
        denom = math.exp(z_cls - m) + sum(math.exp(x - m) for x in z)
        for j in range(N):
            s[j] += math.exp(z[j] - m) / denom / H
    dens = [sum(abs(sum(float(val[h, j, t]) for h in range(H)) / H) for t in range(d)) for j in range(N)]
    sa, ss = sum(a), sum(s)
    return [(a[j] / sa + s[j] / ss) * dens[j] for j in range(N)]


def ref_count(att: torch.Tensor, target: int, rem: int) -> float:
    H, N = att.shape
    a = [sum(float(att[h, j]) for h in range(H)) / H for j in range(N)]
    p = [x / sum(a) for x in a]
    ent = -sum(x * math.log(x) for x in p if x > 0)
    return (N - target) / math.sqrt(rem) * (1 - (ent / math.log(N)) ** 2)


def ref_topk(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k])


class Encoder:
    """Random per-layer signals for a fixed set of original tokens (what a CLIP layer gives for the tokens left)."""

    def __init__(self, n0: int, heads: int = 2, dim: int = 4, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.n0, self.heads, self.dim = n0, heads, dim

    def layer(self, alive: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = torch.randn(self.heads, self.n0 + 1, generator=self.g) * 2
        vals = torch.randn(self.heads, self.n0, self.dim, generator=self.g)
        anchor = torch.randn(self.heads, self.dim, generator=self.g)
        cols = torch.tensor([0] + [j + 1 for j in alive])
        att = torch.softmax(logits[:, cols], dim=-1)[:, 1:]  # the CLS row over CLS + the live patches
        return att, vals[:, alive], anchor


# ------------------------------------------------------------------------------------------------ FlowCut, vision
@pytest.mark.parametrize(("F", "T", "seed"), [(8, 5, 0), (7, 3, 1), (2, 4, 2)])
def test_flowcut_vision_parity_over_the_schedule(F: int, T: int, seed: int) -> None:
    """Every step of the progressive schedule against a loop: EMA of the scores after every layer, pruning when the
    remaining layers are even, entropy-driven counts, straight to T at the last step."""
    n0 = 25
    method = create_method("vis:flowcut")
    steps = method.layers(F)
    assert steps == tuple(range(1, F))
    enc = Encoder(n0, seed=seed)
    memory: dict[str, object] = {}
    alive = list(range(n0))  # method's view, as original indices
    ref_alive = list(range(n0))
    ref_cum: list[float] | None = None
    for step, layer in enumerate(steps):
        att, vals, anchor = enc.layer(alive)
        groups = (VisualGroup(0, 25, 5, 5),) if step == 0 else (VisualGroup(0, len(alive), 1, len(alive)),)
        ctx = VisualContext(
            tokens=torch.zeros(len(alive), 3), groups=groups, stage=Stage.VISION, layer=layer,
            cls_attention=att, values=vals, anchor_value=anchor, step=step, steps=len(steps), start=(n0,),
            memory=memory,
        )  # fmt: skip
        kept = method.prune(ctx, Budget.tokens(T))
        alive = [alive[i] for i in kept.index.tolist()]
        # reference
        if len(ref_alive) > T:
            s = ref_vision_score(att, vals, anchor)
            ref_cum = s if ref_cum is None else [0.5 * c + 0.5 * x for c, x in zip(ref_cum, s)]
            rem = F - 1 - layer
            if rem % 2 == 0:
                n_keep = T if rem == 0 else max(len(ref_alive) - round(ref_count(att, T, rem)), T)
                keep = ref_topk(ref_cum, n_keep)
                ref_alive = [ref_alive[i] for i in keep]
                ref_cum = [ref_cum[i] for i in keep]
        assert alive == ref_alive, f"step {step} (layer {layer})"
    assert len(alive) == T  # the feature layer runs on exactly T patches


def test_flowcut_prunes_progressively_before_the_last_step() -> None:
    """With peaked CLS attention (low entropy) the count is large: tokens go before the last step."""
    n0, F, T = 36, 8, 4
    method = create_method("vis:flowcut")
    memory: dict[str, object] = {}
    sizes = []
    n = n0
    g = torch.Generator().manual_seed(3)
    for step, layer in enumerate(method.layers(F)):
        logits = torch.randn(2, n, generator=g)
        logits[:, 0] += 12  # one token takes almost all the attention
        ctx = VisualContext(
            tokens=torch.zeros(n, 3), groups=(VisualGroup(0, n, 1, n),), stage=Stage.VISION, layer=layer,
            cls_attention=torch.softmax(logits, -1), values=torch.randn(2, n, 4, generator=g),
            anchor_value=torch.randn(2, 4, generator=g), step=step, steps=F - 1, start=(n0,), memory=memory,
        )  # fmt: skip
        n = int(method.prune(ctx, Budget.tokens(T)).index.numel())
        sizes.append(n)
    assert sizes[0] < n0
    assert sizes[-1] == T
    assert sizes[1] == sizes[0]  # an odd number of layers left: score only
    assert all(a >= b for a, b in itertools.pairwise(sizes))


def test_flowcut_multi_grid_image_keeps_crop_share_per_grid_in_lockstep() -> None:
    """LLaVA-NeXT: thumbnail + crop, each pruned to int(T/2) with one count per step (the max over the grids)."""
    F, T = 6, 6
    method = create_method("vis:flowcut")
    encs = [Encoder(16, seed=10), Encoder(16, seed=11)]
    memory: dict[str, object] = {}
    alive = [list(range(16)), list(range(16))]
    ref = [list(range(16)), list(range(16))]
    ref_cum: list[list[float]] = [[], []]
    for step, layer in enumerate(method.layers(F)):
        sig = [e.layer(a) for e, a in zip(encs, alive)]
        n = [len(a) for a in alive]
        if step == 0:
            groups = (VisualGroup(0, 16, 4, 4, 0), VisualGroup(16, 32, 4, 4, 0))
        else:
            groups = (VisualGroup(0, n[0], 1, n[0], 0), VisualGroup(n[0], n[0] + n[1], 1, n[1], 0))
        ctx = VisualContext(
            tokens=torch.zeros(sum(n), 3), groups=groups, stage=Stage.VISION, layer=layer,
            cls_attention=torch.cat([s[0] for s in sig], 1), values=torch.cat([s[1] for s in sig], 1),
            anchor_value=torch.stack([s[2] for s in sig]), step=step, steps=F - 1, start=(32,), memory=memory,
        )  # fmt: skip
        kept = method.prune(ctx, Budget.tokens(T)).index.tolist()
        alive = [[alive[0][i] for i in kept if i < n[0]], [alive[1][i - n[0]] for i in kept if i >= n[0]]]
        # reference: per grid scores; one count = max over grids, rounded
        rem = F - 1 - layer
        if len(ref[0]) > T // 2:
            for gi in range(2):
                s = ref_vision_score(*sig[gi])
                ref_cum[gi] = s if step == 0 else [0.5 * c + 0.5 * x for c, x in zip(ref_cum[gi], s)]
            if rem % 2 == 0:
                if rem == 0:
                    n_keep = T // 2
                else:
                    p = round(max(ref_count(sig[gi][0], T // 2, rem) for gi in range(2)))
                    n_keep = max(len(ref[0]) - p, T // 2)
                for gi in range(2):
                    keep = ref_topk(ref_cum[gi], n_keep)
                    ref[gi] = [ref[gi][i] for i in keep]
                    ref_cum[gi] = [ref_cum[gi][i] for i in keep]
        assert alive == ref, f"step {step}"
        assert len(alive[0]) == len(alive[1])
    assert [len(a) for a in alive] == [3, 3]


def test_flowcut_semantic_scale_option() -> None:
    enc = Encoder(12, dim=16, seed=5)
    att, vals, anchor = enc.layer(list(range(12)))
    ctx = VisualContext(
        tokens=torch.zeros(12, 3), groups=(VisualGroup(0, 12, 3, 4),), stage=Stage.VISION, layer=1,
        cls_attention=att, values=vals, anchor_value=anchor,
    )  # fmt: skip
    for scaled in (False, True):
        method = FlowCut(semantic_scale=scaled)
        got, _ = method.vision_score(ctx, 0, 12, 0)
        torch.testing.assert_close(got, torch.tensor(ref_vision_score(att, vals, anchor, scaled)), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------- FlowCut, llm
def test_flowcut_llm_stage_parity() -> None:
    """r from the last prompt token's row over the whole prefix renormalised over the visual tokens = the softmax over
    the visual keys; s = softmax(v_last·V/√d); score (r + s)·‖mean_h v‖₁."""
    g = torch.Generator().manual_seed(7)
    H, Hkv, T, d = 4, 2, 14, 8
    vis = list(range(3, 11))
    q = torch.randn(H, d, generator=g)
    k = torch.randn(Hkv, T, d, generator=g)
    v = torch.randn(Hkv, T, d, generator=g)
    probs = torch.softmax(torch.einsum("hd,htd->ht", q, k.repeat_interleave(H // Hkv, 0)) / math.sqrt(d), -1)
    ctx = VisualContext(
        tokens=torch.zeros(len(vis), 3), groups=(VisualGroup(0, 8, 2, 4),), stage=Stage.LLM, layer=2,
        text_attention=probs[:, vis], values=v[:, vis], anchor_value=v[:, -1],
    )  # fmt: skip
    kept = create_method("vis:flowcut", stage="llm").prune(ctx, Budget.tokens(3))
    r = [0.0] * len(vis)
    s = [0.0] * len(vis)
    for h in range(H):  # query head h reads KV head h // 2: its softmax over the visual keys only
        z = [float(q[h] @ k[h // 2, j]) / math.sqrt(d) for j in vis]
        e = [math.exp(x - max(z)) for x in z]
        for i in range(len(vis)):
            r[i] += e[i] / sum(e) / H
    for h in range(Hkv):
        z = [float(v[h, -1] @ v[h, j]) / math.sqrt(d) for j in vis]
        e = [math.exp(x - max(z)) for x in z]
        for i in range(len(vis)):
            s[i] += e[i] / sum(e) / Hkv
    dens = [sum(abs(float(v[0, j, t] + v[1, j, t]) / 2) for t in range(d)) for j in vis]
    score = [(r[i] + s[i]) * dens[i] for i in range(len(vis))]
    assert kept.index.tolist() == ref_topk(score, 3)


# ------------------------------------------------------------------------------------------------ FlowCut, set-up
def test_flowcut_parameters_schedule_and_companion() -> None:
    with pytest.raises(ConfigError, match="momentum"):
        create_method("vis:flowcut", momentum="1.0")
    with pytest.raises(ConfigError, match="K"):
        create_method("vis:flowcut", stage="llm", layer="0")
    with pytest.raises(ConfigError, match="interval"):
        create_method("vis:flowcut", interval="0")
    with pytest.raises(ConfigError, match="crop_share"):
        create_method("vis:flowcut", crop_share="0")
    with pytest.raises(ConfigError, match="acts at llm, vision"):
        create_method("vis:flowcut", stage="projector")
    m = create_method("vis:flowcut")
    assert m.layers(23) == tuple(range(1, 23))  # LLaVA-1.5: scored after 1..22, pruned after 22, 20, ..., 2
    assert m.layers(1) == (1,)
    assert create_method("vis:flowcut", stage="llm").layers(32) == (2,)
    plan = VisualPlan.parse("flowcut:64")
    assert plan.label == "flowcut:64/flowcut[stage=llm]:64"
    assert VisualPlan.parse("flowcut:0.1").label == "flowcut:0.1"  # ratio: no companion (documented)
    assert VisualPlan.parse(["flowcut:64", "fastv:0.5"]).label == "flowcut:64/fastv:0.5"


def test_flowcut_keeps_everything_when_the_budget_covers_the_tokens() -> None:
    enc = Encoder(9)
    att, vals, anchor = enc.layer(list(range(9)))
    for stage, kw in ((Stage.VISION, {"cls_attention": att}), (Stage.LLM, {"text_attention": att})):
        ctx = VisualContext(
            tokens=torch.zeros(9, 3), groups=(VisualGroup(0, 9, 3, 3),), stage=stage, layer=2,
            values=vals, anchor_value=anchor, steps=1, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        method = create_method("vis:flowcut", stage=stage.value)
        for budget in (Budget.ratio(1.0), Budget.tokens(9), Budget.tokens(50)):
            assert method.prune(ctx, budget).index.tolist() == list(range(9))
    # a single step run alone (no memory) prunes straight to the budget
    ctx = VisualContext(
        tokens=torch.zeros(9, 3), groups=(VisualGroup(0, 9, 3, 3),), stage=Stage.VISION, layer=1,
        cls_attention=att, values=vals, anchor_value=anchor,
    )  # fmt: skip
    assert create_method("vis:flowcut").prune(ctx, Budget.ratio(1 / 3)).index.numel() == 3


def test_flowcut_without_its_signals_says_so() -> None:
    ctx = VisualContext(tokens=torch.zeros(4, 3), groups=(VisualGroup(0, 4, 2, 2),), stage=Stage.VISION, layer=1)
    with pytest.raises(CapabilityError, match="no CLS token"):
        create_method("vis:flowcut").prune(ctx, Budget.tokens(2))
    ctx = VisualContext(tokens=torch.zeros(4, 3), groups=(VisualGroup(0, 4, 2, 2),), stage=Stage.LLM, layer=2)
    with pytest.raises(CapabilityError, match="text attention"):
        create_method("vis:flowcut", stage="llm").prune(ctx, Budget.tokens(2))


# ----------------------------------------------------------------------------------------------------- VisionZip
def ref_visionzip(
    h: torch.Tensor, att: torch.Tensor, keys: torch.Tensor, k: int, share: float, merge: str
) -> tuple[list[int], list[list[float]], list[int]]:
    """VisionZip with loops: dominant = top (k - C) of Σ_h A[h, j]; the rest in order, every ⌊R/C⌋-th a target;
    each other rest token to its most cosine-similar target (head-mean keys)."""
    H, N, _ = keys.shape
    c = math.floor(share * k + 0.5)
    a = [sum(float(att[hh, j]) for hh in range(H)) for j in range(N)]
    dom = ref_topk(a, k - c)
    rest = [j for j in range(N) if j not in dom]
    step = max(1, len(rest) // c)
    targets = [rest[i] for i in range(0, len(rest), step)][:c]
    others = [j for j in rest if j not in targets]
    metric = [[sum(float(keys[hh, j, t]) for hh in range(H)) / H for t in range(keys.shape[2])] for j in range(N)]
    norm = [math.sqrt(sum(x * x for x in m)) for m in metric]
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for j in others:
        sims = [sum(x * y for x, y in zip(metric[j], metric[t])) / (norm[j] * norm[t]) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda i: (sims[i], -i))]].append(j)
    out: dict[int, tuple[list[float], int]] = {j: (h[j].tolist(), 1) for j in dom}
    for t, js in groups.items():
        if not js:
            out[t] = (h[t].tolist(), 1)
        elif merge == "add":
            mean = [sum(float(h[j, x]) for j in js) / len(js) for x in range(h.shape[1])]
            out[t] = ([float(h[t, x]) + mean[x] for x in range(h.shape[1])], 1 + len(js))
        else:
            rows = [t, *js]
            out[t] = ([sum(float(h[j, x]) for j in rows) / len(rows) for x in range(h.shape[1])], len(rows))
    order = sorted(out)
    return order, [out[j][0] for j in order], [out[j][1] for j in order]


@pytest.mark.parametrize(("k", "share", "merge"), [(8, 0.25, "add"), (12, 0.15625, "add"), (7, 0.4, "mean")])
def test_visionzip_parity(k: int, share: float, merge: str) -> None:
    g = torch.Generator().manual_seed(k)
    N, H, d = 36, 3, 5
    h = torch.randn(N, 6, generator=g)
    att = torch.softmax(torch.randn(H, N + 1, generator=g), -1)[:, 1:]
    keys = torch.randn(H, N, d, generator=g)
    ctx = VisualContext(
        tokens=h, groups=(VisualGroup(0, N, 6, 6),), stage=Stage.VISION, layer=2, cls_attention=att, keys=keys
    )
    kept = create_method("vis:visionzip", contextual=str(share), merge=merge).prune(ctx, Budget.tokens(k))
    index, states, sizes = ref_visionzip(h, att, keys, k, share, merge)
    assert kept.index.tolist() == index
    assert kept.sizes is not None
    assert kept.sizes.tolist() == sizes
    assert sum(sizes) == N  # every token is kept or merged once
    assert kept.tokens is not None
    torch.testing.assert_close(kept.tokens, torch.tensor(states), rtol=1e-5, atol=1e-6)


def test_visionzip_paper_splits_and_grids() -> None:
    m = VisionZip()
    assert [m.split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert m.layers(23) == (23,)  # after the feature layer
    assert create_method("vis:visionzip", layer="20").layers(23) == (20,)
    # LLaVA-NeXT: thumbnail + crop, each zipped on its own with half of the image's budget
    g = torch.Generator().manual_seed(1)
    h = torch.randn(32, 4, generator=g)
    att = torch.rand(2, 32, generator=g)
    keys = torch.randn(2, 32, 3, generator=g)
    groups = (VisualGroup(0, 16, 4, 4, 0), VisualGroup(16, 32, 4, 4, 0))
    ctx = VisualContext(tokens=h, groups=groups, stage=Stage.VISION, layer=2, cls_attention=att, keys=keys)
    kept = create_method("vis:visionzip", contextual="0.25").prune(ctx, Budget.tokens(16))
    i1, s1, z1 = ref_visionzip(h[:16], att[:, :16], keys[:, :16], 8, 0.25, "add")
    i2, s2, z2 = ref_visionzip(h[16:], att[:, 16:], keys[:, 16:], 8, 0.25, "add")
    assert kept.index.tolist() == i1 + [16 + i for i in i2]
    assert kept.sizes is not None
    assert kept.sizes.tolist() == z1 + z2
    assert kept.tokens is not None
    torch.testing.assert_close(kept.tokens, torch.tensor(s1 + s2), rtol=1e-5, atol=1e-6)


def test_visionzip_edges_and_parameters() -> None:
    g = torch.Generator().manual_seed(2)
    ctx = VisualContext(
        tokens=torch.randn(9, 4, generator=g), groups=(VisualGroup(0, 9, 3, 3),), stage=Stage.VISION, layer=1,
        cls_attention=torch.rand(2, 9, generator=g), keys=torch.randn(2, 9, 3, generator=g),
    )  # fmt: skip
    m = create_method("vis:visionzip")
    for budget in (Budget.ratio(1.0), Budget.tokens(9), Budget.tokens(20)):
        kept = m.prune(ctx, budget)
        assert kept.index.tolist() == list(range(9))
        assert kept.tokens is None
    for k in range(1, 9):  # counts match the budget; the sizes cover every token once
        kept = create_method("vis:visionzip", contextual="0.5").prune(ctx, Budget.tokens(k))
        assert kept.index.numel() == k
        assert kept.sizes is not None
        assert int(kept.sizes.sum()) == 9
    with pytest.raises(ConfigError, match="contextual"):
        create_method("vis:visionzip", contextual="1")
    with pytest.raises(ConfigError, match="merge"):
        create_method("vis:visionzip", merge="max")
    with pytest.raises(ConfigError, match="layer"):
        create_method("vis:visionzip", layer="-1")
    with pytest.raises(CapabilityError, match="no CLS token"):
        m.prune(
            VisualContext(
                tokens=torch.zeros(4, 2),
                groups=(VisualGroup(0, 4, 2, 2),),
                stage=Stage.VISION,
                keys=torch.zeros(1, 4, 2),
            ),
            Budget.tokens(2),
        )
