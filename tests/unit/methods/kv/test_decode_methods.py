"""Decode-time methods: bounded caches stay bounded, sparse attention is exact at full coverage, selection caches
are invalidated when they must be, phases are checked."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tests.conftest import make_tiny_model
from tokensieve.attention.sparse import attend_pages, attend_slots, page_bounds, page_meta
from tokensieve.cache.decode import DecodeLayer, DecodeRun
from tokensieve.cache.storage import DenseKV
from tokensieve.core.context import ModelShape
from tokensieve.methods.kv.tokenselect import TokenSelect

D = 8


@pytest.fixture(scope="module")
def long_model():
    return make_tiny_model(max_position_embeddings=2048)


def _store(B=2, H=2, n=70, seed=0, valid=None, bias=False):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    pos = torch.arange(n).expand(B, H, n)
    b = torch.randn(B, H, n, generator=g) if bias else None
    return DenseKV(k, v, pos, valid=valid, bias=b, reserve=10)


@pytest.mark.parametrize("bias", [False, True])
def test_sparse_kernels_equal_dense_at_full_coverage(bias):
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[1, :5] = False
    store = _store(valid=valid, bias=bias)
    store.align(16)
    q = torch.randn(2, 6, 1, D)
    dense = store.attend(q, D**-0.5)
    qg = q.view(2, 2, 3, D)
    pages = torch.randperm(5).expand(2, 2, 5)  # every page, in any order (the last one partial)
    per_row = store.capacity // 16
    flat = torch.arange(4)[:, None] * per_row + pages.reshape(4, 5)
    page_slots = (pages[..., None] * 16 + torch.arange(16)).view(2, 2, -1)
    kbuf, vbuf = store.buffers
    out = attend_pages(qg, kbuf, vbuf, flat, 16, D**-0.5, store.slot_mask(page_slots))
    torch.testing.assert_close(out.view_as(dense), dense)
    slots = torch.randperm(70).expand(2, 2, 70)
    out = attend_slots(qg, kbuf, vbuf, slots, D**-0.5, store.slot_mask(slots))
    torch.testing.assert_close(out.view_as(dense), dense)


def test_decode_run_budget_follows_the_cache_length():
    shape = ModelShape(num_layers=2, num_q_heads=6, num_kv_heads=2, head_dim=D, max_positions=2048)
    ratio = DecodeRun(shape, torch.tensor([10]), budget=ts.Budget.ratio(0.125))
    assert [ratio.tokens_for(n) for n in (80, 800, 8000)] == [10, 100, 1000]
    absolute = DecodeRun(shape, torch.tensor([256]), budget=ts.Budget.tokens(256))
    assert [absolute.tokens_for(n) for n in (100, 256, 5000)] == [100, 256, 256]


def test_quest_bounds_are_the_paper_formula_and_upper_bounds():
    store = _store(B=1, n=50)
    store.align(16)
    meta = page_meta(store.buffers[0], 3, 16)  # the 3 complete pages of 50 entries
    q = torch.randn(1, 2, 3, D)
    bound = page_bounds(q, meta)[..., :3]  # (1, 2, 3, 3)
    logits = torch.einsum("bhgd,bhnd->bhgn", q, store.keys)
    for p in range(3):
        page_keys = store.keys[:, :, p * 16 : (p + 1) * 16]  # (1, 2, 16, D)
        hi, lo = page_keys.amax(2)[:, :, None], page_keys.amin(2)[:, :, None]  # (1, 2, 1, D)
        paper = torch.maximum(q * hi, q * lo).sum(-1)  # U_p = sum_d max(q_d M_d, q_d m_d)
        torch.testing.assert_close(bound[..., p], paper, atol=1e-5, rtol=1e-5)
        exact = logits[..., p * 16 : (p + 1) * 16].amax(-1)
        assert bool((bound[..., p] >= exact - 1e-5).all())


@pytest.mark.parametrize("budget", [1.0, 4096])  # a ratio of 1, and an absolute budget above the cache length
@pytest.mark.parametrize("method", ["quest", "tokenselect", "tidaldecode"])
@torch.inference_mode()
def test_sparse_methods_at_full_budget_equal_the_full_cache(method, budget, long_model):
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(1))
    ref = ts.compress(long_model, "full")
    r = ref.prefill(ids)
    want = ref.decode(r, 10).tokens
    press = ts.compress(long_model, "full", decode=method, decode_budget=budget)
    ctx = press.prefill(ids)
    assert press.decode(ctx, 10).tokens == want
    torch.testing.assert_close(ctx.logits, r.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "budget"), [("quest", 48), ("tokenselect", 100), ("tidaldecode", 40)])
@torch.inference_mode()
def test_sparse_methods_run_sparse_and_keep_the_cache_whole(method, budget, long_model):
    ids = torch.randint(3, 97, (2, 300), generator=torch.Generator().manual_seed(2))
    press = ts.compress(long_model, "full", decode=method, decode_budget=budget)
    ctx = press.prefill(ids)
    gen = press.decode(ctx, 8)
    assert ctx.cache.lengths().unique().tolist() == [307]  # nothing evicted
    assert all(len(t) == 8 for t in gen.tokens)
    assert torch.isfinite(ctx.logits).all()


@pytest.mark.parametrize(("method", "slack"), [("streaming_llm", 0), ("h2o", 0), ("tova", 0), ("recompress", 16)])
@torch.inference_mode()
def test_bounded_caches_stay_within_budget_over_long_generations(method, slack, long_model):
    ids = torch.randint(3, 97, (1, 100), generator=torch.Generator().manual_seed(3))
    params = {"interval": 16, "window": 8} if method == "recompress" else None
    press = ts.compress(long_model, "full", decode=method, decode_budget=64, decode_params=params, reserve=8)
    ctx = press.prefill(ids)
    sizes: list[int] = []
    press.decode(ctx, 520, on_token=lambda row, tok: sizes.append(int(ctx.cache.lengths().max())))
    assert len(sizes) == 520
    assert max(sizes[1:]) <= 64 + slack
    assert ctx.cache.seq_length() == 100 + 519  # positions keep counting
    positions = ctx.cache.layers[1].store.positions
    assert int(positions.max()) == 100 + 518
    if method == "streaming_llm":
        kept = sorted(positions[0, 0].tolist())
        assert kept[:4] == [0, 1, 2, 3]  # the sinks stay
        assert kept[4:] == list(range(100 + 519 - 60, 100 + 519))  # then the latest tokens


@torch.inference_mode()
def test_streaming_llm_rolls_its_window_from_the_first_decode_step(long_model):
    """A prompt longer than the budget is cut to sinks + latest tokens at the first step, then the window rolls."""
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    press = ts.compress(long_model, "full", decode="streaming_llm", decode_budget=32)
    ctx = press.prefill(ids)
    press.decode(ctx, 3)
    store = ctx.cache.layers[0].store
    assert store.n == 32
    assert sorted(store.positions[0, 0].tolist()) == [0, 1, 2, 3, *range(14, 42)]


def test_tokenselect_selection_cache_is_reused_and_invalidated():
    torch.manual_seed(0)
    store = _store(B=1, n=400)
    run = DecodeRun(ModelShape(3, 6, 2, D, 1024), torch.tensor([120]), ts.Budget.tokens(120))
    m = TokenSelect(n_init=4, n_local=8, theta=0.9, reuse=True)
    layer = DecodeLayer(1, store, run, D**-0.5)
    state = layer.state = m.setup(layer, None)
    q = torch.randn(1, 6, 1, D)

    def step(query):
        store.append(torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D), torch.tensor([[store.n]]), None)
        m.on_append(layer, 1)
        return m.step(layer, query)

    step(q)
    assert (state["recomputed"], state["reused"]) == (1, 0)
    step(q * 1.01)  # nearly the same query: reuse
    assert (state["recomputed"], state["reused"]) == (1, 1)
    step(-q)  # a very different query: select again
    assert (state["recomputed"], state["reused"]) == (2, 1)
    store.append(torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D), torch.arange(5)[None] + store.n, None)
    m.on_append(layer, 5)  # a multi-token chunk invalidates the selection
    step(-q)
    assert (state["recomputed"], state["reused"]) == (3, 1)


def test_phases_are_checked(tiny_model):
    with pytest.raises(ts.CapabilityError, match="does not act during decode"):
        ts.compress(tiny_model, "full", decode="snapkv")
    with pytest.raises(ts.ConfigError, match="does not act during prefill"):
        ts.compress(tiny_model, "quest:0.5+tova:0.5")
    # one method that acts only while decoding means a full prefill, then it (as in every spec)
    press = ts.compress(tiny_model, "quest", 0.5)
    assert (press.method.name, press.decode_method.name, press.spec.label) == ("full", "quest", "+quest:0.5")
    with pytest.raises(ts.ConfigError, match="decode_params"):
        ts.compress(tiny_model, "full", decode_params={"page": 8})


@torch.inference_mode()
def test_eviction_then_sparse_decoding_composes(long_model):
    ids = torch.randint(3, 97, (1, 400), generator=torch.Generator().manual_seed(5))
    press = ts.compress(long_model, "snapkv", 0.5, decode="quest", decode_budget=64, decode_params={"page": 8})
    ctx = press.prefill(ids)
    assert ctx.cache.stored_entries() == 3 * 2 * 200
    gen = press.decode(ctx, 6)
    assert len(gen.tokens[0]) == 6
    assert ctx.cache.stored_entries() == 3 * 2 * 205


def test_decode_after_head_adaptive_prefill_is_refused_before_any_work(long_model, monkeypatch):
    """Eviction while decoding keeps one cache size per row: refused after a head-adaptive prefill (sparse decode
    methods are not: tests/unit/methods/kv/test_ragged_decode_methods.py)."""
    calls = []
    monkeypatch.setattr(long_model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ts.CapabilityError, match="head-adaptive"):
        ts.compress(long_model, "adakv", 0.3, decode="h2o", decode_budget=32)
    press = ts.compress(long_model, "adakv", 0.3)
    with pytest.raises(ts.CapabilityError, match="head-adaptive"):
        press.attach_decode(None, "h2o", 32)  # type: ignore[arg-type]
    assert calls == []


@torch.inference_mode()
def test_tidaldecode_shared_slots_equal_position_lookup(long_model):
    """The full-cache fast path (slot = position in every layer) gives what the position lookup gives."""
    ids = torch.randint(3, 97, (1, 300), generator=torch.Generator().manual_seed(7))
    press = ts.compress(long_model, "full", reserve=16)
    base = press.prefill(ids)
    fast, slow = base.fork(), base.fork()
    for s in slow.cache.stores():
        s.identity_positions = False
    assert all(s.identity_positions for s in fast.cache.stores())
    out = []
    for ctx in (fast, slow):
        press.attach_decode(ctx, "tidaldecode", 40)
        out.append((press.decode(ctx, 8).tokens, ctx.logits.clone()))
    assert out[0][0] == out[1][0]
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_single_token_extend_is_a_decode_step(long_model):
    ids = torch.randint(3, 97, (1, 200), generator=torch.Generator().manual_seed(8))
    press = ts.compress(long_model, "full", decode="streaming_llm", decode_budget=64)
    ctx = press.prefill(ids)
    press.extend(ctx, torch.tensor([[5]]))  # one token: the decode method evicts down to its budget
    assert int(ctx.cache.lengths().max()) == 64
    press.extend(ctx, torch.tensor([[5, 6, 7]]))  # a chunk is appended densely
    assert int(ctx.cache.lengths().max()) == 67


@pytest.mark.parametrize("group", ["per_head", "max"])
def test_quest_step_attends_exactly_over_the_best_bounded_pages(group):
    from tokensieve.attention.dense import reference_attention
    from tokensieve.methods.kv.quest import Quest

    g = torch.Generator().manual_seed(9)
    B, H, G, n, P = 1, 2, 3, 77, 8
    store = DenseKV(
        torch.randn(B, H, n - 1, D, generator=g),
        torch.randn(B, H, n - 1, D, generator=g),
        torch.arange(n - 1).expand(B, H, n - 1),
        reserve=20,
    )
    m = Quest(page=P, dense_layers=0, group=group)
    run = DecodeRun(ModelShape(1, H * G, H, D, 1024), torch.tensor([24]), ts.Budget.tokens(24))
    layer = DecodeLayer(0, store, run, D**-0.5)
    layer.state = m.setup(layer, None)
    m.on_append(layer, n - 1)
    store.append(
        torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), torch.tensor([[n - 1]]), None
    )
    m.on_append(layer, 1)
    q = torch.randn(B, H * G, 1, D, generator=g)
    out = m.step(layer, q)
    # brute force (the paper's rule): U_p = Σ_d max(q_d M_pd, q_d m_pd) for every complete page; each query head
    # ("per_head", as the reference) or each KV head from its query heads' largest bound ("max") attends exactly
    # over its best 2 pages + the current page
    keys, values = store.keys[0], store.values[0]
    cur = (n - 1) // P
    expected = torch.zeros_like(out)
    for hq in range(H * G):
        h = hq // G
        group_q = q[0, hq : hq + 1, 0] if group == "per_head" else q[0, h * G : (h + 1) * G, 0]
        bound = torch.stack(
            [
                torch.maximum(
                    group_q[:, None, :] * keys[h, p * P : (p + 1) * P].amax(0),
                    group_q[:, None, :] * keys[h, p * P : (p + 1) * P].amin(0),
                )
                .sum(-1)
                .amax()
                for p in range(cur)
            ]
        )
        pages = [*bound.topk(2).indices.tolist(), cur]
        slots = torch.cat([torch.arange(p * P, min((p + 1) * P, n)) for p in pages])
        ref = reference_attention(q[:, hq : hq + 1], [[keys[h, slots]]], [[values[h, slots]]], D**-0.5)
        expected[:, hq : hq + 1] = ref
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
