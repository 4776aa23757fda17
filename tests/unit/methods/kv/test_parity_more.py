"""Reference parity for the methods test_parity.py and test_parity_added_methods.py leave out (DapQ, EMS, Random,
FASA-prefill, Recompress, PyramidKV's selection, RazorAttention's selection): each keeps exactly the entries its
rule picks, computed here independently with straightforward loops over small fixed tensors (no library scorer,
selector or pooling)."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.core.context import LayerContext, ModelShape, RunState

D, HQ, HKV, G = 8, 4, 2, 2


def make_ctx(T=40, budget=12, seed=0, layer=1, layers=3, tail=0, run=None) -> LayerContext:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, T, D, generator=g) * 2
    k = torch.randn(1, HKV, T, D, generator=g) * 2
    v = torch.randn(1, HKV, T, D, generator=g)
    if run is None:
        run = RunState(ModelShape(layers, HQ, HKV, D, 512), torch.tensor([budget]), torch.tensor([T - tail]))
    return LayerContext(layer, q, k, v, torch.ones(1, T, dtype=torch.bool), D**-0.5, run, tail=tail)


def kept(method, ctx) -> list[set[int]]:
    ctx.run.sink, ctx.run.recent = method.protected()  # as the Compressor resolves them
    sel = method.compress(ctx).selection
    return [set(sel.row(0, h).tolist()) for h in range(ctx.num_kv_heads)]


def probs_row(q: torch.Tensor, keys: torch.Tensor, visible: int) -> list[float]:
    """softmax(q·k_j/√D) over keys 0 … visible−1 (zeros after), one query (D,) and one head's keys (T, D)."""
    logits = [float(q @ keys[j]) / math.sqrt(D) for j in range(visible)]
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    z = sum(e)
    return [x / z for x in e] + [0.0] * (keys.shape[0] - visible)


def pool(xs: list[float], kernel: int, kind: str) -> list[float]:
    """'Same'-length 1-D pooling as SnapKV's reference (stride 1, zero padding counted by the average)."""
    r, n = kernel // 2, len(xs)
    if kind == "max":
        return [max(xs[max(0, j - r) : j + r + 1]) for j in range(n)]
    return [sum(xs[max(0, j - r) : j + r + 1]) / kernel for j in range(n)]


def best(scores: list[float], n: int, among: list[int]) -> set[int]:
    order = sorted(among, key=lambda j: -scores[j])
    return set(order[:n])


def assert_is_top(got: set[int], scores: list[float], n: int, among: list[int]) -> None:
    """``got`` is a top-``n`` subset of ``among`` by ``scores`` (max pooling makes ties; any tie-break is fine)."""
    assert len(got) == n
    assert got <= set(among)
    rest = [j for j in among if j not in got]
    if rest:
        assert min(scores[j] for j in got) >= max(scores[j] for j in rest)


# ------------------------------------------------------------------------------------------------------------- DapQ
def test_dapq_pseudo_tokens_are_the_prompts_prefix_and_suffix():
    """DapQ's "prefix + suffix" pseudo content: the first ``prefix`` real tokens, then the last ``n − prefix``;
    left padding is not content."""
    m = ts.create_method("dapq", n_pseudo=6, prefix=2)
    ids = torch.tensor([[0, 0, 11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]])
    mask = torch.tensor([[0, 0] + [1] * 8, [1] * 10])
    assert m.prefill_suffix(ids, mask).tolist() == [[11, 12, 15, 16, 17, 18], [21, 22, 27, 28, 29, 30]]


def test_dapq_parity():
    """DapQ (arXiv:2603.11564): the N pseudo queries (positions L_p … L_p+N−1, causal among themselves) vote
    Σ_m softmax(q̃_m Kᵀ/√D)_j for each prompt token j; the votes of the prompt tokens are average-pooled (kernel 5,
    as SnapKV — the pseudo tokens' own columns are not prompt tokens and never enter the pool), averaged over the
    KV group; the top-budget prompt tokens are kept and no pseudo token is."""
    Lp, N, budget = 36, 6, 10
    T = Lp + N
    ctx = make_ctx(T=T, budget=budget, seed=3, tail=N)  # a draw where pooling across the boundary would differ
    q, k = ctx.queries[0], ctx.keys[0]
    votes = []
    for h in range(HKV):
        per_q = []
        for hq in range(h * G, (h + 1) * G):
            col = [0.0] * T
            for m in range(N):
                p = probs_row(q[hq, Lp + m], k[h], Lp + m + 1)
                col = [a + b for a, b in zip(col, p)]
            per_q.append(pool(col[:Lp], 5, "avg"))
        votes.append([sum(r[j] for r in per_q) / G for j in range(Lp)])
    got = kept(ts.create_method("dapq", n_pseudo=N), ctx)
    assert got == [best(votes[h], budget, list(range(Lp))) for h in range(HKV)]


@torch.inference_mode()
def test_dapq_drops_its_pseudo_tokens_and_decodes_from_the_prompt(tiny_model):
    """The pseudo tokens are attended to while the prompt is compressed and never stored: the next-token logits are
    the real prompt's, every kept entry is a prompt position, and decoding continues at position L_p."""
    ids = torch.randint(3, 97, (1, 48), generator=torch.Generator().manual_seed(4))
    full = ts.compress(tiny_model, "full").prefill(ids)
    ctx = ts.compress(tiny_model, "dapq[n_pseudo=8]", ts.Budget.tokens(16)).prefill(ids)
    torch.testing.assert_close(ctx.logits, full.logits, atol=1e-4, rtol=1e-4)
    for layer in ctx.cache.layers:
        pos = layer.store.positions[0]
        assert pos.shape[-1] == 16
        assert int(pos.max()) < 48
    assert int(ctx.next_positions()[0]) == 48


# -------------------------------------------------------------------------------------------------------------- EMS
def ems_reference(ctx: LayerContext, W: int, lam: float, kernel: int) -> list[list[float]]:
    """EMS's global-local score per KV head: λ·ĝ + (1−λ)·l̂ (ĝ: attention accumulated over every query, l̂: mean
    attention of the last W queries, each normalised to sum 1 per query head), max-pooled over the keys before the
    window, averaged over the group."""
    q, k, T = ctx.queries[0], ctx.keys[0], ctx.length
    out = []
    for h in range(HKV):
        rows = []
        for hq in range(h * G, (h + 1) * G):
            probs = [probs_row(q[hq, i], k[h], i + 1) for i in range(T)]
            glob = [sum(p[j] for p in probs) for j in range(T)]
            loc = [sum(p[j] for p in probs[T - W :]) / W for j in range(T)]
            glob = [x / sum(glob) for x in glob]
            loc = [x / sum(loc) for x in loc]
            s = [lam * a + (1 - lam) * b for a, b in zip(glob, loc)]
            rows.append(pool(s[: T - W], kernel, "max") + s[T - W :])
        out.append([sum(r[j] for r in rows) / G for j in range(T)])
    return out


def test_ems_parity_selection_and_merge():
    """EMS (arXiv:2412.08521): keep the window and the top global-local scores; each dropped token joins the kept
    token with the most similar key when cos ≥ τ_h = τ + (1 − τ)·ρ_h (ρ_h: the head's kept share of the score),
    the centre becoming the score-weighted mean of its members (key rescaled to their weighted mean norm) with a
    log(members) logit bias; the other dropped tokens are evicted."""
    W, budget, lam, tau = 8, 16, 0.5, 0.2
    ctx = make_ctx(T=40, budget=budget, seed=6)
    T = ctx.length
    scores = ems_reference(ctx, W, lam, 7)
    method = ts.create_method("ems", window=W, lam=lam, tau=tau)
    ctx.run.sink, ctx.run.recent = method.protected()
    comp = method.compress(ctx)
    window = set(range(T - W, T))
    for h in range(HKV):
        row = set(comp.selection.row(0, h).tolist())
        assert window <= row
        assert_is_top(row - window, scores[h], budget - W, list(range(T - W)))
        s = scores[h]
        rho = sum(s[j] for j in row) / sum(s)
        tau_h = tau + (1 - tau) * rho
        keys, values = ctx.keys[0, h], ctx.values[0, h]
        members: dict[int, list[int]] = {c: [c] for c in row}
        for j in sorted(set(range(T)) - row):
            cos = {c: float(keys[j] @ keys[c] / (keys[j].norm() * keys[c].norm())) for c in row}
            c = max(cos, key=lambda x: cos[x])
            if cos[c] >= tau_h:
                members[c].append(j)
        assert any(len(m) > 1 for m in members.values()), "nothing merged: the test would not check the merge"
        assert any(len(m) < T - budget for m in members.values())
        for c, ms in members.items():
            w = torch.tensor([s[j] for j in ms])
            mean_k = (w[:, None] * keys[ms]).sum(0) / w.sum()
            norm = (w * keys[ms].norm(dim=-1)).sum() / w.sum()
            want_k = mean_k / mean_k.norm() * norm if len(ms) > 1 else keys[c]
            want_v = (w[:, None] * values[ms]).sum(0) / w.sum()
            torch.testing.assert_close(comp.keys[0, h, c], want_k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(comp.values[0, h, c], want_v, atol=1e-5, rtol=1e-5)
            assert comp.bias is not None
            assert float(comp.bias[0, h, c]) == pytest.approx(math.log(len(ms)), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------- Random
def test_random_keeps_a_uniform_subset_whatever_the_keys():
    """Random eviction: a uniformly random budget-sized subset per KV head, reproducible per (seed, layer), blind to
    the tensors: over many seeds every position is kept with probability b/T."""
    T, budget, n_seeds = 40, 12, 600
    a, b = make_ctx(T=T, budget=budget, seed=0), make_ctx(T=T, budget=budget, seed=1)
    assert kept(ts.create_method("random", seed=3), a) == kept(ts.create_method("random", seed=3), b)
    other_layer = make_ctx(T=T, budget=budget, seed=0, layer=2)
    assert kept(ts.create_method("random", seed=3), other_layer) != kept(ts.create_method("random", seed=3), a)
    counts = torch.zeros(HKV, T)
    for s in range(n_seeds):
        for h, row in enumerate(kept(ts.create_method("random", seed=s), make_ctx(T=T, budget=budget))):
            assert len(row) == budget
            counts[h, sorted(row)] += 1
    p = budget / T
    mean, sd = n_seeds * p, math.sqrt(n_seeds * p * (1 - p))
    assert float((counts - mean).abs().max()) < 5 * sd  # no position favoured (first, last, middle)
    # the first and second halves are kept equally often (a recency or sink bias would show here): per draw the
    # first half's count is hypergeometric, variance b·½·½·(T − b)/(T − 1)
    var = budget * 0.25 * (T - budget) / (T - 1)
    diff_sd = 2 * math.sqrt(n_seeds * HKV * var)
    assert abs(float(counts[:, : T // 2].sum() - counts[:, T // 2 :].sum())) < 5 * diff_sd


# ----------------------------------------------------------------------------------------------------- FASA-prefill
def test_fasa_prefill_parity():
    """FASA-prefill (FASA's scorer, arXiv:2602.03152, used to evict once): per KV head the dominant chunks are the
    profile's best by CA (slice whose K is nearest the budget in log scale); s_j = Σ over those chunks' dims (i, i +
    D/2) of q̄·k_j, q̄ the mean of the last ``window`` queries, averaged over the group; top-budget per KV head."""
    from tokensieve.core.profiles import FrequencyChunks

    T, budget, W, half = 40, 12, 3, D // 2
    ctx = make_ctx(T=T, budget=budget, seed=8)
    # two K slices; budget 12 is nearer K = 4 than K = 64 in log scale, so the first slice decides
    near = [[[0.9, 0.1, 0.8, 0.2], [0.3, 0.95, 0.1, 0.7]] for _ in range(3)]
    far = [[[0.1, 0.9, 0.2, 0.8], [0.9, 0.1, 0.8, 0.2]] for _ in range(3)]
    ctx.run.profile = FrequencyChunks(
        ks=(4, 64), ca=tuple(tuple(tuple(tuple(r) for r in layer) for layer in s) for s in (near, far))
    )
    method = ts.create_method("fasa_prefill", window=W, min_chunks=2, max_chunks=2)
    q, k = ctx.queries[0], ctx.keys[0]
    expected = []
    for h in range(HKV):
        ca = near[ctx.layer_idx][h]
        chunks = sorted(range(half), key=lambda c: -ca[c])[:2]
        dims = [d for c in chunks for d in (c, c + half)]
        s = []
        for j in range(T):
            total = 0.0
            for hq in range(h * G, (h + 1) * G):
                qbar = q[hq, T - W :].mean(0)
                total += sum(float(qbar[d] * k[h, j, d]) for d in dims)
            s.append(total / G)
        expected.append(best(s, budget, list(range(T))))
    assert kept(method, ctx) == expected


# ------------------------------------------------------------------------------------------------------- Recompress
def test_recompress_parity():
    """Recompress: every ``interval`` decode steps the scorer's rule runs on the stored entries with the last
    ``window`` decode queries as its observation window, and the cache is cut back to the budget; in between each
    step attends densely over everything stored. Scorer here SnapKV (window 4, max-pool 7, mean over the group)."""
    from tokensieve.cache.decode import DecodeLayer, DecodeRun
    from tokensieve.cache.storage import DenseKV

    g = torch.Generator().manual_seed(15)  # a draw where pooling into the kept window would differ
    n0, budget, interval, W = 30, 20, 4, 4
    k0, v0 = torch.randn(1, HKV, n0, D, generator=g) * 2, torch.randn(1, HKV, n0, D, generator=g)
    store = DenseKV(k0, v0, torch.arange(n0).expand(1, HKV, n0), reserve=16)
    run = DecodeRun(ModelShape(1, HQ, HKV, D, 512), torch.tensor([budget]), ts.Budget.tokens(budget))
    method = ts.create_method("recompress", scorer=ts.create_method("snapkv", window=W), interval=interval, window=W)
    layer = DecodeLayer(0, store, run, D**-0.5)
    layer.state = method.setup(layer, None)
    # the first step finds 31 > budget + interval entries: it re-compresses at once (one query in its window);
    # then steps 2 … 4 grow the cache, and step 4 ((step + 1) % interval == 0) re-compresses with 4 queries
    all_k, all_v, all_pos = k0[0].clone(), v0[0].clone(), list(range(n0))
    kept_pos: list[list[int]] = [list(range(n0)), list(range(n0))]
    queries: list[torch.Tensor] = []
    for step in range(interval):
        pos = n0 + step
        k, v = torch.randn(1, HKV, 1, D, generator=g) * 2, torch.randn(1, HKV, 1, D, generator=g)
        q = torch.randn(1, HQ, 1, D, generator=g) * 2
        store.append(k, v, torch.tensor([[pos]]), None)
        method.on_append(layer, 1)
        out = method.step(layer, q)
        run.step += 1  # as the cache does after the last layer of each decode step
        all_k, all_v, all_pos = torch.cat([all_k, k[0]], 1), torch.cat([all_v, v[0]], 1), [*all_pos, pos]
        queries = ([*queries, q[0, :, 0]])[-W:]
        for h in range(HKV):
            kept_pos[h].append(pos)
            idx = [all_pos.index(p) for p in kept_pos[h]]
            for hq in range(h * G, (h + 1) * G):  # dense attention over what is stored before this step's cut
                p = torch.softmax(q[0, hq, 0] @ all_k[h, idx].T * D**-0.5, -1)
                torch.testing.assert_close(out[0, hq, 0], p @ all_v[h, idx], atol=1e-5, rtol=1e-5)
        n = len(kept_pos[0])
        if n > budget and ((step + 1) % interval == 0 or n > budget + interval):
            w = len(queries)
            for h in range(HKV):
                keys = all_k[h, [all_pos.index(p) for p in kept_pos[h]]]
                votes = []
                for hq in range(h * G, (h + 1) * G):
                    col = [0.0] * n
                    for i, qi in enumerate(queries):  # query i is entry n − w + i: causal inside the window
                        col = [a + b for a, b in zip(col, probs_row(qi[hq], keys, n - w + i + 1))]
                    votes.append(pool([c / w for c in col[: n - W]], 7, "max"))
                s = [sum(r[j] for r in votes) / G for j in range(n - W)]
                order = sorted(range(n - W), key=lambda j: -s[j])[: budget - W]
                chosen = sorted(order) + list(range(n - W, n))  # the scorer's window (W ≥ w) is protected
                kept_pos[h] = [kept_pos[h][j] for j in chosen]
        for h in range(HKV):
            assert sorted(store.positions[0, h, : store.n].tolist()) == kept_pos[h], f"step {step}, head {h}"
    assert store.n == budget


# -------------------------------------------------------------------------------------------------------- PyramidKV
def test_pyramidkv_selection_parity():
    """PyramidKV (arXiv:2406.02069): layer l keeps b_l = max − l(max − min)/(L − 1) + w entries (min = (b − w)/β,
    max = 2(b − w) − min) — the window and the best b_l − w by SnapKV's rule (here W = 8, max-pool kernel 7)."""
    T, b, W, L, beta = 60, 24, 8, 3, 2.0
    base = b - W
    mn, mx = base / beta, 2 * base - base / beta  # 8, 24 → b_l = 32, 24, 16: whole numbers, no rounding
    b_l = [int(mx - layer * (mx - mn) / (L - 1) + W) for layer in range(L)]
    run = RunState(ModelShape(L, HQ, HKV, D, 512), torch.tensor([b]), torch.tensor([T]))
    method = ts.create_method("pyramidkv", window=W, beta=beta)
    for layer in range(L):
        ctx = make_ctx(T=T, seed=20 + layer, layer=layer, run=run)
        q, k = ctx.queries[0], ctx.keys[0]
        rows = kept(method, ctx)
        for h in range(HKV):
            per_q = []
            for hq in range(h * G, (h + 1) * G):
                col = [0.0] * T
                for i in range(T - W, T):
                    col = [a + c for a, c in zip(col, probs_row(q[hq, i], k[h], i + 1))]
                per_q.append(pool([c / W for c in col[: T - W]], 7, "max"))
            s = [sum(r[j] for r in per_q) / G for j in range(T - W)]
            window = set(range(T - W, T))
            assert window <= rows[h]
            assert_is_top(rows[h] - window, s, b_l[layer] - W, list(range(T - W)))


# --------------------------------------------------------------------------------------------------- RazorAttention
def test_razor_selection_parity():
    """RazorAttention (arXiv:2407.15891): a retrieval head keeps every token; any other head keeps the first
    ``sink`` tokens and the most recent ones, one entry going to the compensation token (mean of what it dropped).
    The budget: L·H·b entries in all, retrieval heads first, the rest spread evenly over the other heads."""
    from tokensieve.core.profiles import RetrievalHeads

    T, b, sink, L = 40, 14, 2, 3  # 40 + 5 × (sink + min_local + 1) ≤ 3 × 2 × 14: the retrieval head fits
    run = RunState(ModelShape(L, HQ, HKV, D, 512), torch.tensor([b]), torch.tensor([T]))
    run.profile = RetrievalHeads(ranked=((1, 0),), count=1)
    method = ts.create_method("razor", sink=sink, min_local=4)
    others = (L * HKV * b - T) / (L * HKV - 1)  # (84 − 40) / 5 = 8.8 entries per ordinary head
    total = 0
    for layer in range(L):
        ctx = make_ctx(T=T, seed=30 + layer, layer=layer, run=run)
        ctx.run.sink, ctx.run.recent = method.protected()
        comp = method.compress(ctx)
        for h in range(HKV):
            row = set(comp.selection.row(0, h).tolist())
            if (layer, h) == (1, 0):
                assert row == set(range(T))
                total += T
                continue
            n = len(row) + 1  # + the compensation token
            assert n in (math.floor(others), math.ceil(others))
            assert row == set(range(sink)) | set(range(T - (n - 1 - sink), T))
            dropped = sorted(set(range(T)) - row)
            assert comp.extra_keys is not None
            assert comp.extra_values is not None
            torch.testing.assert_close(comp.extra_keys[0, h, 0], ctx.keys[0, h, dropped].mean(0))
            torch.testing.assert_close(comp.extra_values[0, h, 0], ctx.values[0, h, dropped].mean(0))
            total += n
    assert total == L * HKV * b
