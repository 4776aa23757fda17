"""ToDRE and DivPrune on pure tensors: reference parity against plain loops written from the papers' formulas, the
two ToDRE stages and their companion, edge cases and parameter errors."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.core.budget import Budget
from tokensieve.errors import ConfigError
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup
from tokensieve.methods.visual._diversity import greedy_maxmin, greedy_maxsum
from tokensieve.registry import create_method
from tokensieve.spec import VisualPlan

# ------------------------------------------------------------------------------------------ plain references


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / (nu * nv)


def _dist(x: torch.Tensor) -> list[list[float]]:
    rows = x.tolist()
    return [[1.0 - _cos(u, v) for v in rows] for u in rows]


def ref_maxsum(x: torch.Tensor, first: int, k: int) -> list[int]:
    """Greedy max-sum diversification: add the token with the largest sum of distances to the chosen ones."""
    d = _dist(x)
    chosen = [first]
    while len(chosen) < k:
        best, best_v = -1, -math.inf
        for v in range(len(d)):
            if v in chosen:
                continue
            total = sum(d[v][u] for u in chosen)
            if total > best_v:
                best, best_v = v, total
        chosen.append(best)
    return chosen


def ref_maxmin(x: torch.Tensor, first: int | None, k: int) -> list[int]:
    """Greedy max-min: add the token farthest from its nearest chosen token; ``first=None``: DivPrune's first token,
    the one farthest from its nearest other token."""
    d = _dist(x)
    n = len(d)
    if first is None:
        first = max(range(n), key=lambda v: (min(d[v][u] for u in range(n) if u != v), -v))
    chosen = [first]
    while len(chosen) < k:
        best, best_v = -1, -math.inf
        for v in range(n):
            if v in chosen:
                continue
            m = min(d[v][u] for u in chosen)
            if m > best_v:
                best, best_v = v, m
        chosen.append(best)
    return chosen


def k_of(r: float, n: int) -> int:
    return max(1, min(n, math.floor(r * n + 0.5)))


def ctx_of(
    n: int, groups: tuple[VisualGroup, ...] | None = None, d: int = 8, seed: int = 0, **kw: object
) -> VisualContext:
    g = torch.Generator().manual_seed(100 + n + d)
    return VisualContext(
        tokens=torch.randn(n, d, generator=g),
        groups=groups or (VisualGroup(0, n, 1, n),),
        stage=Stage.PROJECTOR,
        seed=seed,
        **kw,  # type: ignore[arg-type]
    )


def cls_rows(n: int, heads: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(heads, n, generator=g), dim=-1)


# ------------------------------------------------------------------------------------------- ToDRE stage 1
@pytest.mark.parametrize(("diversity", "ref"), [("maxsum", ref_maxsum), ("kcenter", ref_maxmin)])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_todre_stage1_parity_with_the_cls_pivot(diversity: str, ref: object, ratio: float) -> None:
    n = 36
    cls = cls_rows(n)
    ctx = ctx_of(n, (VisualGroup(0, n, 6, 6),), cls_attention=cls)
    kept = create_method("vis:todre", diversity=diversity).prune(ctx, Budget.ratio(ratio))
    head_mean = [sum(float(cls[h, j]) for h in range(cls.shape[0])) / cls.shape[0] for j in range(n)]
    pivot = max(range(n), key=lambda j: head_mean[j])
    expected = ref(ctx.tokens, pivot, k_of(ratio, n))  # type: ignore[operator]
    assert kept.index.tolist() == sorted(expected)
    assert kept.index.numel() == k_of(ratio, n)
    assert kept.tokens is None


def test_todre_anyres_pivot_from_the_thumbnail_and_one_budget_per_image() -> None:
    # image 0 = a 3x3 thumbnail + a 3x6 crop grid (27 tokens), image 1 = one 4x4 grid (16 tokens)
    groups = (VisualGroup(0, 9, 3, 3, 0), VisualGroup(9, 27, 3, 6, 0), VisualGroup(27, 43, 4, 4, 1))
    cls = cls_rows(43)
    cls[:, 20] = 5.0  # the strongest CLS attention sits in a crop: not a pivot candidate
    ctx = ctx_of(43, groups, cls_attention=cls)
    kept = create_method("vis:todre", relevance="false").prune(ctx, Budget.ratio(0.25))
    mean = cls.mean(0).tolist()
    p0 = max(range(9), key=lambda j: mean[j])
    p1 = 27 + max(range(16), key=lambda j: mean[27 + j])
    exp0 = ref_maxsum(ctx.tokens[:27], p0, k_of(0.25, 27))
    exp1 = [27 + i for i in ref_maxsum(ctx.tokens[27:], p1 - 27, k_of(0.25, 16))]
    assert kept.index.tolist() == sorted(exp0 + exp1)
    assert max(range(27), key=lambda j: mean[j]) == 20  # over the whole image the pivot would have been in the crop
    assert p0 != 20


def test_todre_without_cls_draws_a_seeded_pivot() -> None:
    groups = (VisualGroup(0, 16, 4, 4, 0), VisualGroup(16, 40, 4, 6, 1))
    ctx = ctx_of(40, groups, seed=7)
    method = create_method("vis:todre", seed="3")
    kept = method.prune(ctx, Budget.tokens(5))
    g = torch.Generator().manual_seed(3 * 1_000_003 + 7)
    p0 = int(torch.randint(16, (1,), generator=g))
    p1 = int(torch.randint(24, (1,), generator=g))
    exp = ref_maxsum(ctx.tokens[:16], p0, 5) + [16 + i for i in ref_maxsum(ctx.tokens[16:], p1, 5)]
    assert kept.index.tolist() == sorted(exp)
    # the same sample seed keeps the same tokens; pivot=random ignores a CLS row that is there
    assert method.prune(ctx, Budget.tokens(5)).index.tolist() == kept.index.tolist()
    with_cls = ctx_of(40, groups, seed=7, cls_attention=cls_rows(40))
    assert create_method("vis:todre", seed="3", pivot="random").prune(
        with_cls, Budget.tokens(5)
    ).index.tolist() == sorted(exp)


def test_todre_budget_edges() -> None:
    ctx = ctx_of(12, cls_attention=cls_rows(12))
    method = create_method("vis:todre")
    assert method.prune(ctx, Budget.ratio(1.0)).index.tolist() == list(range(12))
    assert method.prune(ctx, Budget.tokens(50)).index.tolist() == list(range(12))
    one = method.prune(ctx, Budget.tokens(1)).index.tolist()
    assert one == [int(torch.argmax(ctx.cls_attention.mean(0)))]  # type: ignore[union-attr]
    for k in range(1, 13):
        assert method.prune(ctx, Budget.tokens(k)).index.numel() == k


@pytest.mark.parametrize("rule", [greedy_maxsum, greedy_maxmin])
def test_gram_and_matrix_vector_paths_agree(rule: object) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 64, generator=g)
    a = rule(x, 17, 40, gram=True)  # type: ignore[operator]
    b = rule(x, 17, 40, gram=False)  # type: ignore[operator]
    assert a.tolist() == b.tolist()
    assert len(set(a.tolist())) == 40


# ------------------------------------------------------------------------------------------- ToDRE stage 2
def llm_ctx(vis_mass: list[list[float]], n: int = 5) -> VisualContext:
    """Instruction rows whose visual part carries the given mass per (head, row), spread over the n tokens."""
    rows = torch.tensor(vis_mass)[..., None] * torch.softmax(torch.arange(n, dtype=torch.float32), 0)
    return VisualContext(
        tokens=torch.randn(n, 4), groups=(VisualGroup(0, n, 1, n),), stage=Stage.LLM, layer=3, text_rows=rows
    )


def test_todre_stage2_keeps_all_or_nothing_by_the_instruction_share() -> None:
    stage2 = create_method("vis:todre", stage="llm")
    # 2 heads x 3 instruction rows; alpha = mean of the visual mass = (0.02+0.1+0.03+0.05+0.2+0.02)/6 = 0.07 < 0.10
    low = llm_ctx([[0.02, 0.1, 0.03], [0.05, 0.2, 0.02]])
    high = llm_ctx([[0.3, 0.1, 0.03], [0.05, 0.2, 0.02]])  # 0.7 / 6 = 0.117
    rows = low.text_rows
    assert rows is not None
    alpha = sum(float(rows[h, i, j]) for h in range(2) for i in range(3) for j in range(5)) / (2 * 3)
    assert alpha == pytest.approx(0.07, abs=1e-6)
    assert stage2.prune(low, Budget.ratio(1.0)).index.numel() == 0
    assert stage2.prune(high, Budget.ratio(1.0)).index.tolist() == list(range(5))
    assert create_method("vis:todre", stage="llm", tau="0.05").prune(low, Budget.ratio(1.0)).index.numel() == 5
    assert create_method("vis:todre", stage="llm", tau="0").prune(low, Budget.ratio(1.0)).index.numel() == 5
    # no instruction rows: nothing measured, everything stays
    empty = VisualContext(
        tokens=torch.randn(5, 4),
        groups=(VisualGroup(0, 5, 1, 5),),
        stage=Stage.LLM,
        layer=3,
        text_rows=torch.zeros(2, 0, 5),
    )
    assert stage2.prune(empty, Budget.ratio(1.0)).index.numel() == 5
    with pytest.raises(ConfigError, match=r"todre\[stage=llm\]:1.0"):
        stage2.prune(low, Budget.ratio(0.5))
    no_rows = VisualContext(torch.randn(5, 4), (VisualGroup(0, 5, 1, 5),), Stage.LLM, 3)  # no text after the image
    assert stage2.prune(no_rows, Budget.ratio(1.0)).index.numel() == 5


def test_todre_stage2_layer_is_seven_eighths() -> None:
    stage2 = create_method("vis:todre", stage="llm")
    assert [stage2.layers(L)[0] for L in (32, 28, 24, 4, 2)] == [28, 24, 21, 3, 1]
    assert create_method("vis:todre", stage="llm", layer="20").layers(32) == (20,)
    with pytest.raises(ConfigError, match=r"1\.\.3"):
        create_method("vis:todre", stage="llm", layer="4").layers(4)


def test_todre_companion_and_parameters() -> None:
    assert VisualPlan.parse("todre:0.1").label == "todre:0.1/todre[stage=llm]:1"
    assert VisualPlan.parse("todre[layer=20,tau=0.05]:0.1").label == (
        "todre[layer=20,tau=0.05]:0.1/todre[layer=20,stage=llm,tau=0.05]:1"
    )
    assert VisualPlan.parse("todre[relevance=false]:0.1").label == "todre[relevance=false]:0.1"
    assert VisualPlan.parse("todre[stage=llm]:1.0").label == "todre[stage=llm]:1"
    # a method named at the llm stage replaces the companion
    assert VisualPlan.parse(["todre:0.1", "fastv:0.5"]).label == "todre:0.1/fastv:0.5"
    for bad in ({"diversity": "dpp"}, {"pivot": "max"}, {"tau": "1.5"}, {"layer": "-1"}, {"stage": "vision"}):
        with pytest.raises(ConfigError):
            create_method("vis:todre", **bad)
    # parameters the instance would not use are refused, not ignored
    with pytest.raises(ConfigError, match="belong to stage 1"):
        create_method("vis:todre", stage="llm", diversity="kcenter")
    with pytest.raises(ConfigError, match="relevance=false leaves out"):
        create_method("vis:todre", relevance="false", tau="0.2")


# ------------------------------------------------------------------------------------------------ DivPrune
@pytest.mark.parametrize("ratio", [0.098, 0.25, 0.5])
def test_divprune_parity(ratio: float) -> None:
    n = 30
    ctx = ctx_of(n, (VisualGroup(0, n, 5, 6),), d=6)
    kept = create_method("vis:divprune").prune(ctx, Budget.ratio(ratio))
    assert kept.index.tolist() == sorted(ref_maxmin(ctx.tokens, None, k_of(ratio, n)))


def test_divprune_per_image_over_all_its_grids() -> None:
    groups = (VisualGroup(0, 4, 2, 2, 0), VisualGroup(4, 12, 2, 4, 0), VisualGroup(12, 21, 3, 3, 1))
    ctx = ctx_of(21, groups)
    kept = create_method("vis:divprune").prune(ctx, Budget.ratio(0.34))
    exp = ref_maxmin(ctx.tokens[:12], None, k_of(0.34, 12)) + [
        12 + i for i in ref_maxmin(ctx.tokens[12:], None, k_of(0.34, 9))
    ]
    assert kept.index.tolist() == sorted(exp)
    assert create_method("vis:divprune").prune(ctx, Budget.tokens(12)).index.tolist() == list(range(21))


def test_divprune_first_token_is_the_most_isolated() -> None:
    # three near-duplicates and one outlier: the outlier comes first, then the duplicates' side
    x = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.98, 0.02], [-1.0, 0.1]])
    ctx = VisualContext(tokens=x, groups=(VisualGroup(0, 4, 1, 4),), stage=Stage.PROJECTOR)
    assert create_method("vis:divprune").prune(ctx, Budget.tokens(1)).index.tolist() == [3]
    assert create_method("vis:divprune").prune(ctx, Budget.tokens(2)).index.tolist() in ([0, 3], [1, 3], [2, 3])
    with pytest.raises(ConfigError, match="no parameter 'stage'"):
        create_method("vis:divprune", stage="llm")
