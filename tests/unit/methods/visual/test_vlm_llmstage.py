"""Progressive llm-stage visual methods (SparseVLM, PyramidDrop, TransPrune): reference parity against plain-loop
implementations of the papers' rules written here, schedules, budgets and parameter checks; end to end on the tiny
LLaVA and Qwen2-VL models."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tokensieve.core.budget import Budget
from tokensieve.errors import ConfigError
from tokensieve.methods.visual import Stage, VisualContext, VisualGroup, VisualKept
from tokensieve.methods.visual._llmstage import scale_layer
from tokensieve.methods.visual.sparsevlm import split_keep
from tokensieve.registry import create_method
from tokensieve.spec import VisualSpec


# --------------------------------------------------------------------------------------------- a method-level loop
def signals(n: int, q: int, d: int, heads: int, seed: int) -> dict[str, torch.Tensor]:
    """Random llm-stage signals for ``n`` visual tokens: states, instruction states and rows, last row, previous."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(heads, q, n, generator=g) / n
    return {
        "tokens": torch.randn(n, d, generator=g),
        "previous": torch.randn(n, d, generator=g),
        "text_tokens": torch.randn(q, d, generator=g),
        "text_rows": rows,
        "text_attention": rows[:, -1],
    }


def run_steps(
    method: Any, budget: Budget, images: list[int], steps: int, q: int = 5, d: int = 8, heads: int = 3
) -> tuple[list[list[int]], list[dict[str, torch.Tensor]], list[VisualKept]]:
    """Drive ``method`` through ``steps`` steps like the engine: each step sees the tokens left by the previous one
    (fresh random signals per step). Returns, per step, the original ids of the tokens it saw, its signals and its
    result."""
    ids = list(range(sum(images)))
    counts = list(images)
    memory: dict[str, Any] = {}
    sizes: torch.Tensor | None = None
    seen, sigs, results = [], [], []
    for step in range(steps):
        n = len(ids)
        s = signals(n, q, d, heads, seed=100 + step)
        groups, at = [], 0
        for i, c in enumerate(counts):
            groups.append(VisualGroup(at, at + c, 1, c, i))
            at += c
        ctx = VisualContext(
            tokens=s["tokens"],
            groups=tuple(groups),
            stage=Stage.LLM,
            layer=step + 1,
            text_attention=s["text_attention"],
            text_rows=s["text_rows"],
            text_tokens=s["text_tokens"],
            previous=s["previous"],
            sizes=sizes,
            step=step,
            steps=steps,
            start=tuple(images),
            memory=memory,
        )
        kept = method.prune(ctx, budget)
        seen.append(list(ids))
        sigs.append(s)
        results.append(kept)
        index = kept.index.tolist()
        bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
        counts = [sum(1 for j in index if bounds[i] <= j < bounds[i + 1]) for i in range(len(counts))]
        ids = [ids[j] for j in index]
        sizes = kept.sizes if kept.sizes is not None else (sizes[kept.index] if sizes is not None else None)
    return seen, sigs, results


def ranked(scores: list[float], k: int) -> list[int]:
    """The k highest scores' positions, ties to the earlier one, in position order (plain sort)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


# ------------------------------------------------------------------------------------------------- PyramidDrop
def test_pyramiddrop_schedule_scales_with_depth_and_takes_explicit_layers() -> None:
    m = create_method("vis:pyramiddrop")
    assert m.layers(32) == (8, 16, 24)
    assert m.layers(28) == (7, 14, 21)
    assert m.layers(4) == (1, 2, 3)
    assert m.layers(2) == (1,)
    assert create_method("vis:pyramiddrop", at="2,3").layers(4) == (2, 3)
    assert VisualSpec.parse("pyramiddrop[at=1-3]:0.125").method.layers(4) == (1, 3)
    with pytest.raises(ConfigError, match="decoder has 4 layers"):
        create_method("vis:pyramiddrop", at="2-4").layers(4)
    assert scale_layer(7, 28) == 6
    assert scale_layer(12, 28) == 11


@pytest.mark.parametrize("bad", [{"lam": "1.5"}, {"at": "0-3"}, {"at": "5-3"}, {"at": "a-b"}])
def test_pyramiddrop_refuses_bad_parameters(bad: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        create_method("vis:pyramiddrop", **bad)


def test_pyramiddrop_matches_a_plain_reference() -> None:
    """Three stages at λ = 0.5 (budget 0.125 of 32 → 16, 8, 4) on two images of 32 and 16 tokens; each stage keeps
    the image's top tokens by the head-mean last-token attention."""
    images = [32, 16]
    seen, sigs, results = run_steps(create_method("vis:pyramiddrop"), Budget.ratio(0.125), images, steps=3)
    alive = {0: list(range(32)), 1: list(range(32, 48))}
    for step in range(3):
        row = sigs[step]["text_attention"]
        pos = {t: j for j, t in enumerate(seen[step])}
        expect: list[int] = []
        for img, n0 in enumerate(images):
            k = math.floor(n0 * 0.5 ** (step + 1) + 0.5)
            scores = [sum(float(row[h, pos[t]]) for h in range(row.shape[0])) / row.shape[0] for t in alive[img]]
            alive[img] = [alive[img][j] for j in ranked(scores, k)]
            expect += alive[img]
        got = [seen[step][j] for j in results[step].index.tolist()]
        assert got == expect
    assert [len(alive[0]), len(alive[1])] == [4, 2]


def test_pyramiddrop_fixed_lambda_and_token_budgets() -> None:
    # lam fixes the stage ratios; the last stage lands on the budget (a token count per image)
    _, _, results = run_steps(create_method("vis:pyramiddrop", lam="0.75"), Budget.tokens(5), [40], steps=3)
    assert [int(r.index.numel()) for r in results] == [30, 23, 5]
    _, _, results = run_steps(create_method("vis:pyramiddrop"), Budget.ratio(1.0), [10, 6], steps=3)
    assert all(r.index.tolist() == list(range(16)) for r in results)


# -------------------------------------------------------------------------------------------------- TransPrune
def test_transprune_schedule_accumulates_between_pruning_layers() -> None:
    m = create_method("vis:transprune")
    assert m.layers(32) == (7, 8, 9, 10, 11, 12)
    assert m.layers(28) == (6, 7, 8, 9, 10, 11)
    assert m.layers(4) == (1, 2)
    assert create_method("vis:transprune", at="1-2-3").layers(4) == (1, 2, 3)
    with pytest.raises(ConfigError, match="as many ratios"):
        create_method("vis:transprune", at="1-3")
    assert create_method("vis:transprune", at="1-3", ratios="0.5-0.25").layers(4) == (1, 2, 3)


@pytest.mark.parametrize(
    "bad", [{"alpha": "2"}, {"ratios": "0.5-0.6-0.1"}, {"ratios": "1.0-0.5-0.1"}, {"transition": "sideways"}]
)
def test_transprune_refuses_bad_parameters(bad: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        create_method("vis:transprune", **bad)


def ttv_reference(before: list[list[float]], after: list[list[float]], update: bool) -> list[float]:
    """One layer's TTV by the formula, with plain loops."""
    outs, dirs = [], []
    for x, y in zip(before, after):
        out = [b - a for a, b in zip(x, y)] if update else list(y)
        nx = math.sqrt(sum(v * v for v in x))
        ny = math.sqrt(sum(v * v for v in out))
        cos = sum(a * b for a, b in zip(x, out)) / (nx * ny)
        outs.append(ny / nx)
        dirs.append(math.exp(1.0 - cos))
    total = sum(dirs)
    return [r * e / total for r, e in zip(outs, dirs)]


@pytest.mark.parametrize("transition", ["update", "state"])
def test_transprune_matches_a_plain_reference(transition: str) -> None:
    """Pruning at K = 2, 3, 5 (accumulating TTV at 2, 3, 4, 5) to 87.5/62.5/12.5 %-shaped counts: 16 → 14 → 10 → 2
    for a budget of 2; score = ½·TTV/ΣTTV + ½·IGA/ΣIGA over the surviving tokens."""
    m = create_method("vis:transprune", at="2-3-5", transition=transition)
    seen, sigs, results = run_steps(m, Budget.tokens(2), [16], steps=4)
    acc = dict.fromkeys(range(16), 0.0)
    alive = list(range(16))
    counts = {0: 14, 1: 10, 3: 2}
    for step in range(4):
        s = sigs[step]
        pos = {t: j for j, t in enumerate(seen[step])}
        assert seen[step] == alive
        layer = ttv_reference(s["previous"].tolist(), s["tokens"].tolist(), transition == "update")
        for t in alive:
            acc[t] += layer[pos[t]]
        got = [seen[step][j] for j in results[step].index.tolist()]
        if step not in counts:
            assert got == alive
            continue
        rows = s["text_rows"]
        h, q = rows.shape[0], rows.shape[1]
        iga = [sum(float(rows[a, b, pos[t]]) for a in range(h) for b in range(q)) / (h * q) for t in alive]
        ttv = [acc[t] for t in alive]
        score = [0.5 * a / (sum(ttv) + 1e-8) + 0.5 * b / (sum(iga) + 1e-8) for a, b in zip(ttv, iga)]
        alive = [alive[j] for j in ranked(score, counts[step])]
        assert got == alive
    assert len(alive) == 2


def test_transprune_paper_counts_and_keep_all() -> None:
    m = create_method("vis:transprune")
    # LLaVA-7B: 576 tokens, budget 12.5 % → 504 after layer 7, 360 after 9, 72 after 12 (six steps 7…12)
    _, _, results = run_steps(m, Budget.ratio(0.125), [576], steps=6, d=4, heads=1, q=2)
    assert [int(r.index.numel()) for r in results] == [504, 504, 360, 360, 360, 72]
    _, _, results = run_steps(m, Budget.ratio(1.0), [12], steps=6)
    assert all(r.index.tolist() == list(range(12)) for r in results)


# --------------------------------------------------------------------------------------------------- SparseVLM
def test_sparsevlm_schedule_and_parameters() -> None:
    m = create_method("vis:sparsevlm")
    assert m.layers(32) == (3, 7, 16, 20)  # the v1 code's pruning_loc 2, 6, 15, 19
    assert m.layers(28) == (3, 6, 14, 18)
    assert m.layers(4) == (1, 2, 3)
    assert create_method("vis:sparsevlm", at="3-7-16").layers(32) == (3, 7, 16)  # v1.5's
    assert create_method("vis:sparsevlm", at="1-2-3").layers(4) == (1, 2, 3)
    for bad in ({"recycle": "1.5"}, {"cluster": "-1"}, {"scale": "-2"}, {"at": "3-3"}):
        with pytest.raises(ConfigError):
            create_method("vis:sparsevlm", **bad)


def test_split_keep_lands_exactly_on_the_total() -> None:
    for n in range(1, 60):
        for total in range(1, n + 1):
            kept, merged = split_keep(n, total, 0.3, 0.1)
            assert kept + merged == total
            assert merged in (0, total) or merged == (math.floor((math.floor(0.3 * (n - kept)) + 1) * 0.1) + 1)
    assert split_keep(576, 192, 0.3, 0.1) == (180, 12)


def dpc_reference(x: list[list[float]], c: int) -> list[list[int]]:
    """DPC-kNN clusters (lists of member positions, in centre order), with plain loops."""
    n, dim = len(x), len(x[0])
    d = [[math.dist(x[i], x[j]) / math.sqrt(dim) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[: min(c, n)]) / min(c, n)) for i in range(n)]
    dmax = max(max(r) for r in d)
    delta = []
    for i in range(n):
        cands = [d[i][j] for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(cands) if cands else dmax)
    centres = sorted(range(n), key=lambda i: (-delta[i] * rho[i], i))[:c]
    members: list[list[int]] = [[] for _ in centres]
    for i in range(n):
        if i in centres:
            members[centres.index(i)].append(i)
            continue
        best = min(range(len(centres)), key=lambda a: (d[centres[a]][i], a))
        members[best].append(i)
    return [[centres[a], *[i for i in members[a] if i != centres[a]]] for a in range(len(centres))]


def sparsevlm_reference(
    tokens: list[list[float]],
    text: list[list[float]],
    rows: torch.Tensor,
    sizes: list[int],
    raters: list[int] | None,
    target: int,
    scale: float,
    last: bool,
) -> tuple[list[int], list[list[float]], list[int], list[int]]:
    """One SparseVLM step on one image, with plain loops: (output positions, output states, sizes, raters)."""
    n, q = len(tokens), len(text)
    if raters is None:
        rel = [0.0] * q
        for v in tokens:
            logits = [sum(a * b for a, b in zip(v, t)) for t in text]
            mx = max(logits)
            ex = [math.exp(z - mx) for z in logits]
            for j in range(q):
                rel[j] += ex[j] / sum(ex) / n
        mean = sum(rel) / q
        raters = [j for j in range(q) if rel[j] > mean] or list(range(q))
    h = rows.shape[0]
    p = [[sum(float(rows[a, r, j]) for a in range(h)) / h for j in range(n)] for r in raters]
    score = [sum(p[r][j] for r in range(len(raters))) / len(raters) for j in range(n)]
    sv = torch.linalg.svdvals(torch.tensor(p, dtype=torch.float32))
    rank = int((sv > sv.max() * max(len(raters), n) * torch.finfo(torch.float32).eps).sum())

    def merged_for(deleted: int) -> tuple[int, int]:
        if deleted == 0:
            return 0, 0
        m = min(deleted, int(0.3 * deleted) + 1)
        return m, min(m, int(m / 10) + 1)

    def fit(total: int) -> int:
        kept = total
        while kept > 0 and kept + merged_for(n - kept)[1] > total:
            kept -= 1
        return kept

    if last:
        kept = fit(target)
    else:
        kept = n if rank >= n else min(n - 1, int(scale * rank))
        if kept + merged_for(n - kept)[1] < target:
            kept = fit(target)
    if kept >= n:
        return list(range(n)), tokens, sizes, raters
    keep = ranked(score, kept)
    deleted = [j for j in range(n) if j not in keep]
    m, c = merged_for(len(deleted))
    if kept == 0:
        c = target
    recycled = [deleted[j] for j in ranked([score[j] for j in deleted], m)]
    out = {j: (tokens[j], sizes[j]) for j in keep}
    for cluster in dpc_reference([tokens[j] for j in recycled], c):
        members = [recycled[i] for i in cluster]
        mean = [sum(tokens[j][e] for j in members) / len(members) for e in range(len(tokens[0]))]
        out[members[0]] = (mean, sum(sizes[j] for j in members))
    order = sorted(out)
    return order, [out[j][0] for j in order], [out[j][1] for j in order], raters


def test_sparsevlm_matches_a_plain_reference() -> None:
    """Two steps on one image of 120 tokens, budget 30: the first step keeps ⌊scale·rank(P)⌋ = 12·rank tokens by the
    raters' attention and recycles the top 30 % of the rest into ⌊m/10⌋ + 1 = 3 DPC-kNN clusters; the second lands
    on 30 (kept + merged). Raters come from the first step's states and are reused."""
    m = create_method("vis:sparsevlm", at="1-2", scale="12")
    _seen, sigs, results = run_steps(m, Budget.tokens(30), [120], steps=2, q=6, d=8, heads=2)
    tokens = sigs[0]["tokens"].tolist()
    sizes = [1] * 120
    raters = None
    for step in range(2):
        s = sigs[step]
        pos, states, sizes_out, raters = sparsevlm_reference(
            tokens,
            s["text_tokens"].tolist(),
            s["text_rows"],
            sizes,
            raters,
            30,
            12.0,
            last=step == 1,
        )
        got = results[step]
        assert got.index.tolist() == pos
        assert got.tokens is not None
        assert got.sizes is not None
        assert torch.allclose(got.tokens, torch.tensor(states), atol=1e-6)
        assert got.sizes.tolist() == sizes_out
        # the next step's states are fresh random ones; sizes carry over
        sizes = sizes_out
        if step == 0:
            tokens = sigs[1]["tokens"].tolist()
            assert 30 < len(pos) < 120
            assert sum(1 for v in sizes_out if v > 1) == 3
    assert int(results[-1].index.numel()) == 30
    assert int(results[-1].sizes.sum()) < 120  # type: ignore[union-attr]  # the unrecycled rest is gone


def test_sparsevlm_keeps_everything_at_full_budget_and_when_p_has_full_rank() -> None:
    m = create_method("vis:sparsevlm", at="1-2")
    _, _, results = run_steps(m, Budget.ratio(1.0), [8, 6], steps=2)
    assert all(r.index.tolist() == list(range(14)) and r.tokens is None for r in results)
    # more raters than visual tokens: rank(P) = N, so the first step prunes nothing; the last lands on the budget
    _, _, results = run_steps(m, Budget.tokens(2), [4, 4], steps=2, q=30)
    assert results[0].index.tolist() == list(range(8))
    assert int(results[1].index.numel()) == 4


def test_sparsevlm_recycles_per_image_and_counts_the_budget() -> None:
    m = create_method("vis:sparsevlm", at="1-2-3", scale="3")
    seen, _, results = run_steps(m, Budget.ratio(0.25), [48, 32], steps=3, q=8)
    last = [seen[-1][j] for j in results[-1].index.tolist()]  # merged tokens carry their centre's id
    assert sum(1 for t in last if t < 48) == 12
    assert len(last) == 12 + 8
    assert results[-1].sizes is not None
    assert int(results[-1].sizes.sum()) <= 80


def test_no_recycling_is_plain_pruning() -> None:
    m = create_method("vis:sparsevlm", at="1-2", recycle="0")
    _, _, results = run_steps(m, Budget.tokens(3), [20], steps=2)
    assert all(r.tokens is None and r.sizes is None for r in results)
    assert int(results[-1].index.numel()) == 3


# ------------------------------------------------------------------------------------------ on the tiny models
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlm_tiny as vt  # noqa: E402

ATOL = 2e-5
# the tiny decoders have 4 layers: explicit layers, and the paper schedules scaled (pyramiddrop → 1, 2, 3;
# transprune → 1, 2; sparsevlm → 1, 2, 3)
SPECS = [
    "pyramiddrop:0.25",
    "pyramiddrop[at=1-3]:0.25",
    "transprune[at=1-2-3]:0.25",
    "transprune[transition=state]:0.25",
    "sparsevlm[scale=2]:0.25",
    "sparsevlm[at=1-2-3,scale=1]:0.25",
]


@pytest.fixture(scope="module")
def llava() -> Any:
    return vt.llava()


@pytest.fixture(scope="module")
def qwen() -> Any:
    return vt.qwen2_vl()


@pytest.fixture(scope="module")
def nxt() -> Any:
    return vt.llava_next()


NEXT_SIZES = [[(32, 64)], [(40, 64), (64, 64)], []]


def _batch(family: str, models: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    if family == "llava":
        return (models["llava"], *_llava_batch())
    if family == "qwen":
        return (models["qwen"], *_qwen_batch())
    inp = vt.next_inputs(models["next"], [3, 1, 4], NEXT_SIZES)
    return models["next"], inp, [vt.next_select(inp, b, NEXT_SIZES) for b in range(3)]


def _llava_batch() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    return vt.llava_batch()


def _qwen_batch() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    grids = [[(4, 4)], [(4, 8), (4, 4)], []]
    inp = vt.qwen_inputs([3, 1, 5], grids)
    singles = [vt.qwen_select(inp, b, grids) for b in range(3)]
    for s in singles:
        if s["image_grid_thw"].numel() == 0:
            del s["image_grid_thw"], s["pixel_values"]
    return inp, singles


@pytest.mark.parametrize("family", ["llava", "qwen", "next"])
def test_batch_equals_each_sample_alone(family: str, llava: Any, qwen: Any, nxt: Any) -> None:
    from tokensieve.adapters.vision import vision_adapter

    model, inp, singles = _batch(family, {"llava": llava, "qwen": qwen, "next": nxt})
    ad = vision_adapter(model)
    for spec in SPECS if family == "llava" else SPECS[::2]:
        batch = ad.prefill(inp, spec)
        steps = [k for k in batch.kept if k.startswith("llm:")]
        assert len(steps) == len(VisualSpec.parse(spec).method.layers(4)), spec
        for b, one in enumerate(singles):
            alone = ad.prefill(one, spec)
            torch.testing.assert_close(batch.logits[b : b + 1], alone.logits, atol=ATOL, rtol=0, msg=f"{spec} {b}")
            for key in steps:
                assert batch.kept[key][b].index.tolist() == alone.kept[key][0].index.tolist(), (spec, key, b)
            assert {k: v[b] for k, v in batch.visual_tokens.items()} == {
                k: v[0] for k, v in alone.visual_tokens.items()
            }


def test_visual_tokens_after_each_step_follow_the_schedules(llava: Any) -> None:
    from tokensieve.adapters.vision import vision_adapter

    ad = vision_adapter(llava)
    inp, _ = _llava_batch()
    st = ad.prefill(inp, "pyramiddrop:0.25")  # λ = 0.25^(1/3): 16 → 10 → 6 → 4 per image
    assert [st.visual_tokens[f"llm:{k}"] for k in (1, 2, 3)] == [[10, 20, 0], [6, 12, 0], [4, 8, 0]]
    st = ad.prefill(inp, "transprune[at=1-2-3]:0.25")  # 1/7 and 3/7 of the 12 to remove, then the budget
    assert [st.visual_tokens[f"llm:{k}"] for k in (1, 2, 3)] == [[14, 28, 0], [11, 22, 0], [4, 8, 0]]
    st = ad.prefill(inp, "sparsevlm[at=1-2,scale=2]:0.25")
    assert st.visual_tokens["llm"] == [4, 8, 0]
    assert all(n >= 4 for n in st.visual_tokens["llm:1"][:1])
    merged = [k for k in st.kept["llm:2"] if k.tokens is not None]
    assert merged  # recycled tokens replaced some states


@pytest.mark.parametrize("family", ["llava", "qwen", "next"])
def test_keep_all_equals_the_unpruned_model(family: str, llava: Any, qwen: Any, nxt: Any) -> None:
    from tokensieve.adapters.vision import vision_adapter

    model, _, singles = _batch(family, {"llava": llava, "qwen": qwen, "next": nxt})
    ad = vision_adapter(model)
    for one in singles[:2]:
        ref = ad.prefill(one, None, all_logits=True).all_logits
        for spec in ("pyramiddrop:1.0", "transprune:1.0", "sparsevlm:1.0", "sparsevlm[at=1-2-3]:1.0"):
            got = ad.prefill(one, spec, all_logits=True).all_logits
            assert ref is not None
            assert got is not None
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=spec)
