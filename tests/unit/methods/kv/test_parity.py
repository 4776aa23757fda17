"""Reference parity: each method keeps exactly the entries its paper's rule picks, computed here independently with
a straightforward implementation of the paper's formula on small fixed tensors (no library scorer or selector)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tokensieve as ts
from tokensieve.core.context import LayerContext, ModelShape, RunState

D, HQ, HKV, G = 8, 4, 2, 2


def ctx_for(T=40, budget=12, seed=0, sink=0, recent=0, layer=1, layers=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HQ, T, D, generator=g) * 2
    k = torch.randn(1, HKV, T, D, generator=g) * 2
    v = torch.randn(1, HKV, T, D, generator=g)
    valid = torch.ones(1, T, dtype=torch.bool)
    run = RunState(ModelShape(layers, HQ, HKV, D, 512), torch.tensor([budget]), torch.tensor([T]), sink, recent)
    return LayerContext(layer, q, k, v, valid, D**-0.5, run)


def kept(method, ctx) -> list[set[int]]:
    ctx.run.sink, ctx.run.recent = method.protected()  # as the Compressor resolves them
    sel = method.compress(ctx).selection
    return [set(sel.row(0, h).tolist()) for h in range(ctx.num_kv_heads)]


def attention(q, k, q_positions, T):
    """softmax(q kᵀ/√D) per query head over causally visible keys; q (H_q, n, D), k (H_kv, T, D) → (H_q, n, T)."""
    kk = k.repeat_interleave(G, 0)  # query head h reads KV head h // G
    logits = q @ kk.transpose(-1, -2) / D**0.5
    visible = torch.arange(T)[None, :] <= torch.as_tensor(q_positions)[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)


def top(scores: torch.Tensor, n: int) -> set[int]:
    return set(scores.topk(n).indices.tolist())


def assert_is_top(got: set[int], scores: torch.Tensor, n: int) -> None:
    """``got`` is a top-``n`` set of ``scores`` (max pooling makes ties; any tie-break is the paper's rule)."""
    assert len(got) == n
    rest = [j for j in range(scores.numel()) if j not in got]
    assert float(scores[sorted(got)].min()) >= float(scores[rest].max())


def test_snapkv_parity():
    """SnapKV (arXiv:2404.14469): votes of the last W queries on the keys before the window, summed over the window,
    max-pooled (kernel 7), the window kept whole; GQA: votes averaged over the group."""
    ctx, W, budget = ctx_for(), 8, 12
    T = ctx.length
    attn = attention(ctx.queries[0, :, T - W :], ctx.keys[0], torch.arange(T - W, T), T)  # (H_q, W, T)
    votes = attn[:, :, : T - W].sum(1)  # (H_q, T - W)
    votes = F.max_pool1d(votes[:, None], 7, 1, 3)[:, 0]
    votes = votes.view(HKV, G, T - W).mean(1)
    window = set(range(T - W, T))
    for h, row in enumerate(kept(ts.create_method("snapkv", window=W), ctx)):
        assert window <= row
        assert_is_top(row - window, votes[h], budget - W)


def test_pyramidkv_layer_budgets_follow_the_paper():
    """PyramidKV (arXiv:2406.02069): b_l = max − l (max − min)/(L − 1) + w, min = (b − w)/β, max = 2(b − w) − min."""
    from tokensieve.methods.kv.pyramidkv import pyramid_schedule

    b, w, L, beta, T = 64, 8, 5, 20.0, 1000
    base = b - w
    mn = base / beta
    mx = 2 * base - mn
    paper = [mx - layer * (mx - mn) / (L - 1) + w for layer in range(L)]
    got = pyramid_schedule(b, T, L, w, beta)
    assert sum(got) == L * b
    assert all(abs(g - p) < 1 for g, p in zip(got, paper))
    assert got == sorted(got, reverse=True)


def test_h2o_parity():
    """H2O (arXiv:2306.14048): heavy hitters by accumulated attention, plus the most recent tokens (half the budget)."""
    ctx, budget = ctx_for(budget=12), 12
    T = ctx.length
    attn = attention(ctx.queries[0], ctx.keys[0], torch.arange(T), T)  # (H_q, T, T)
    acc = attn.sum(1).view(HKV, G, T).mean(1)  # accumulated over every query, group mean
    n_recent = budget // 2
    recent = set(range(T - n_recent, T))
    expected = []
    for h in range(HKV):
        s = acc[h].clone()
        s[T - n_recent :] = float("-inf")
        expected.append(top(s, budget - n_recent) | recent)
    assert kept(ts.create_method("h2o"), ctx) == expected


def test_tova_parity():
    """TOVA (arXiv:2401.06104): the last query's attention averaged over every head of the layer, one ranking."""
    ctx, budget = ctx_for(), 12
    T = ctx.length
    attn = attention(ctx.queries[0, :, T - 1 :], ctx.keys[0], [T - 1], T)[:, 0]  # (H_q, T)
    expected = top(attn.mean(0), budget)
    assert kept(ts.create_method("tova"), ctx) == [expected, expected]


def test_knorm_and_streaming_llm_parity():
    """KNorm (arXiv:2406.11430): keep the lowest-norm keys. StreamingLLM (arXiv:2309.17453): sinks + the latest."""
    ctx, budget = ctx_for(), 12
    norms = ctx.keys[0].norm(dim=-1)  # (H_kv, T)
    assert kept(ts.create_method("knorm"), ctx) == [top(-norms[h], budget) for h in range(HKV)]
    T = ctx.length
    expected = set(range(4)) | set(range(T - (budget - 4), T))
    assert kept(ts.create_method("streaming_llm"), ctx) == [expected, expected]


def test_adakv_parity():
    """AdaKV (arXiv:2407.11550): the layer's H·b entries go to the globally best scores across heads, softened by
    α (each head keeps ≥ α of its uniform share), window tokens kept by every head."""
    ctx, budget, W, alpha = ctx_for(T=60, budget=16, seed=3), 16, 8, 0.2
    T = ctx.length
    base = ts.create_method("snapkv", window=W)
    scores = base.score(ctx)[0]  # SnapKV's scores (checked by its own parity test above)
    free = budget - W
    cand = scores[:, : T - W]  # (H_kv, T - W): the window is protected
    n_h = torch.bincount(cand.reshape(-1).topk(HKV * free).indices // (T - W), minlength=HKV).double()
    cap = n_h * (1 - alpha) + alpha * free
    alloc = torch.floor(cap).long()
    while int(alloc.sum()) < HKV * free:  # largest remainders first, as any exact rounding must
        alloc[int((cap - alloc).argmax())] += 1
    window = set(range(T - W, T))
    expected = [top(cand[h], int(alloc[h])) | window for h in range(HKV)]
    got = kept(ts.create_method("adakv", base=base), ctx)
    assert got == expected
    assert sum(len(r) for r in got) == HKV * budget


def test_tokenselect_parity():
    """TokenSelect (arXiv:2411.02886): per-head softmax of q·k over the candidates, summed over heads (soft vote),
    top-k plus the first n_init and last n_local tokens."""
    from tokensieve.cache.decode import DecodeLayer, DecodeRun
    from tokensieve.cache.storage import DenseKV
    from tokensieve.methods.kv.tokenselect import TokenSelect

    g = torch.Generator().manual_seed(5)
    n, n_init, n_local, budget = 80, 4, 8, 40
    k, v = torch.randn(1, HKV, n, D, generator=g), torch.randn(1, HKV, n, D, generator=g)
    q = torch.randn(1, HQ, 1, D, generator=g)
    store = DenseKV(k, v, torch.arange(n).expand(1, HKV, n))
    run = DecodeRun(ModelShape(1, HQ, HKV, D, 512), torch.tensor([budget]), ts.Budget.tokens(budget))
    layer = DecodeLayer(0, store, run, D**-0.5)
    layer.state = TokenSelect(n_init=n_init, n_local=n_local).setup(layer, None)
    out = TokenSelect(n_init=n_init, n_local=n_local).step(layer, q)
    kk = k[0].repeat_interleave(G, 0)  # (H_q, n, D)
    logits = (q[0, :, 0, None, :] @ kk[:, n_init : n - n_local].transpose(-1, -2))[:, 0]  # (H_q, c): raw q·k
    vote = torch.softmax(logits, -1).sum(0)
    chosen = sorted(
        {*range(n_init), *(vote.topk(budget - n_init - n_local).indices + n_init).tolist(), *range(n - n_local, n)}
    )
    ref = (
        torch.softmax((q[0, :, 0, None, :] @ kk[:, chosen].transpose(-1, -2)) * D**-0.5, -1)
        @ v[0].repeat_interleave(G, 0)[:, chosen]
    )
    torch.testing.assert_close(out[0, :, 0], ref[:, 0], atol=1e-5, rtol=1e-5)


def test_fasa_parity():
    """FASA (arXiv:2602.03152): each decode step scores every cached token with the dominant RoPE chunks only
    (raw partial q·k, chunk i = dims (i, i + D/2)), attends with all dimensions over the top-budget tokens."""
    from tokensieve.cache.decode import DecodeLayer, DecodeRun
    from tokensieve.cache.storage import DenseKV
    from tokensieve.core.profiles import FrequencyChunks
    from tokensieve.methods.kv.fasa import FASA

    g = torch.Generator().manual_seed(7)
    n, budget, half = 50, 12, D // 2
    k, v = torch.randn(1, HKV, n, D, generator=g), torch.randn(1, HKV, n, D, generator=g)
    q = torch.randn(1, HQ, 1, D, generator=g)
    dominant = {0: [1, 3], 1: [0, 2]}  # KV head → its dominant chunks (CA 0.9; the others 0.1)
    ca = [[[0.9 if c in dominant[h] else 0.1 for c in range(half)] for h in range(HKV)] for _ in range(2)]
    profile = FrequencyChunks(ks=(budget,), ca=(tuple(tuple(tuple(r) for r in layer) for layer in ca[:2]),))
    store = DenseKV(k, v, torch.arange(n).expand(1, HKV, n))
    run = DecodeRun(ModelShape(2, HQ, HKV, D, 512), torch.tensor([budget]), ts.Budget.tokens(budget), profile=profile)
    layer = DecodeLayer(1, store, run, D**-0.5)
    m = FASA(min_chunks=2, max_chunks=2)
    layer.state = m.setup(layer, None)
    out = m.step(layer, q)
    for hq in range(HQ):
        h = hq // G
        dims = [c for i in dominant[h] for c in (i, i + half)]
        group = q[0, h * G : (h + 1) * G, 0]  # (G, D)
        partial = (group[:, dims] @ k[0, h][:, dims].T).sum(0)  # (n,): raw partial logits, summed over the group
        chosen = sorted(partial.topk(budget).indices.tolist())
        attn = torch.softmax(q[0, hq, 0] @ k[0, h, chosen].T * D**-0.5, -1)
        torch.testing.assert_close(out[0, hq, 0], attn @ v[0, h, chosen], atol=1e-5, rtol=1e-5)


def test_compresskv_parity():
    """CompressKV (arXiv:2508.02401): only the layer's semantic retrieval heads vote — window attention summed over
    the window, average-pooled (kernel 5), averaged over the SRH heads — one ranking per layer, plus the window."""
    from tokensieve.core.profiles import SemanticHeads

    ctx, W, budget = ctx_for(T=48, budget=20, seed=4), 8, 20
    T = ctx.length
    srh = (3, 0)  # the profile's best two query heads of layer 1
    ctx.run.profile = SemanticHeads(srh=((0,), srh, (1,)), layer_score=(1.0, 1.0, 1.0))
    ctx.run.scratch[("compresskv", "budgets")] = torch.tensor([[budget, budget, budget]])  # equal layer budgets
    attn = attention(ctx.queries[0, :, T - W :], ctx.keys[0], torch.arange(T - W, T), T)  # (H_q, W, T)
    votes = F.avg_pool1d(attn.sum(1)[:, None], 5, 1, 2)[:, 0]  # (H_q, T)
    ranking = votes[list(srh)].mean(0)
    ranking[T - W :] = float("-inf")
    expected = top(ranking, budget - W) | set(range(T - W, T))
    assert kept(ts.create_method("compresskv", heads=2), ctx) == [expected, expected]


def test_tidaldecode_parity():
    """TidalDecode (arXiv:2410.05076): the selection layer attends fully and keeps, per KV head, the positions of the
    top tokens by the group's summed attention; a later layer attends only to those positions with its own K, V."""
    from tokensieve.cache.decode import DecodeLayer, DecodeRun
    from tokensieve.cache.storage import DenseKV
    from tokensieve.methods.kv.tidaldecode import TidalDecode

    g = torch.Generator().manual_seed(11)
    n, budget = 60, 16
    run = DecodeRun(ModelShape(8, HQ, HKV, D, 512), torch.tensor([budget]), ts.Budget.tokens(budget))
    m = TidalDecode(select_layer=2, reselect_layer=6)
    stores = [
        DenseKV(*(torch.randn(1, HKV, n, D, generator=g) for _ in range(2)), torch.arange(n).expand(1, HKV, n))
        for _ in range(2)
    ]
    q2, q3 = torch.randn(1, HQ, 1, D, generator=g), torch.randn(1, HQ, 1, D, generator=g)
    layers = [DecodeLayer(i, s, run, D**-0.5) for i, s in zip((2, 3), stores)]
    for layer in layers:
        layer.state = m.setup(layer, None)
    m.step(layers[0], q2)  # the selection layer
    out = m.step(layers[1], q3)
    k2 = stores[0].keys[0]
    summed = attention(q2[0, :, :, :].squeeze(1)[:, None], k2, [n - 1], n)[:, 0].view(HKV, G, n).sum(1)  # (H_kv, n)
    k3, v3 = stores[1].keys[0], stores[1].values[0]
    for hq in range(HQ):
        h = hq // G
        chosen = sorted(set(summed[h].topk(budget).indices.tolist()) | {n - 1})  # + the current token, always
        attn = torch.softmax(q3[0, hq, 0] @ k3[h, chosen].T * D**-0.5, -1)
        torch.testing.assert_close(out[0, hq, 0], attn @ v3[h, chosen], atol=1e-5, rtol=1e-5)
