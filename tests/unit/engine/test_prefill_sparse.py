"""Prefill sparse attention: the FlexAttention block-sparse kernel, the registered patterns, their composition with
eviction, and 100 % density = dense attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from tokensieve.attention import flex
from tokensieve.attention.dense import Modifiers, causal_attention
from tokensieve.data.prompts import left_pad
from tokensieve.spec import Spec

SPARSE = ["ashape", "flexprefill", "minference", "hip"]


@pytest.fixture(autouse=True)
def eager_flex():
    """Tests compute the kernel's token mask densely (tiny tensors); one test below compiles FlexAttention."""
    previous = flex.set_compile(False)
    yield
    flex.set_compile(previous)


def qkv(B=2, Hq=4, Hkv=2, T=37, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, T, D, generator=g),
        torch.randn(B, Hkv, T, D, generator=g),
        torch.randn(B, Hkv, T, D, generator=g),
    )


def masked_reference(q, k, v, blocks, block, valid, scaling, mods=None):
    """Dense softmax under the token mask of a block choice on the end-anchored grid (independent of FlexAttention)."""
    mods = mods or Modifiers()
    T = q.shape[2]
    G = q.shape[1] // k.shape[1]
    n = -(-T // block)
    pad = n * block - T
    tok = blocks.repeat_interleave(block, -1).repeat_interleave(block, -2)[..., pad:, pad:]  # (B, Hq, T, T)
    i = torch.arange(T)
    ok = (i[None, :] <= i[:, None]) & (tok | (i[None, :] == i[:, None]))
    if valid is not None:
        ok = ok & (valid[:, None, None, :] | (i[None, :] == i[:, None]))
    if mods.window is not None:
        ok = ok & (i[:, None] - i[None, :] < mods.window)
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scaling
    if mods.softcap is not None:
        s = mods.softcap * torch.tanh(s / mods.softcap)
    s = s.masked_fill(~ok, float("-inf"))
    return (torch.softmax(s, -1) @ v.double().repeat_interleave(G, 1)).float()


@pytest.mark.parametrize("mods", [Modifiers(), Modifiers(window=9), Modifiers(softcap=5.0)])
def test_all_blocks_equal_dense_causal_attention(mods):
    q, k, v = qkv()
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    n = -(-37 // 8)
    blocks = torch.ones(2, 4, n, n, dtype=torch.bool)
    out = flex.block_sparse_attention(q, k, v, blocks, 8, valid, 0.35, mods)
    ref = causal_attention(q, k, v, valid, 0.35, mods)
    torch.testing.assert_close(out[1, :, 5:], ref[1, :, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    if mods.plain:
        sdpa = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], is_causal=True, scale=0.35, enable_gqa=True)
        torch.testing.assert_close(out[:1], sdpa, atol=1e-5, rtol=1e-5)


def test_sparse_blocks_follow_the_token_mask():
    q, k, v = qkv(T=45, seed=1)
    n = -(-45 // 8)
    g = torch.Generator().manual_seed(3)
    blocks = torch.rand(2, 4, n, n, generator=g) < 0.4  # per sequence and query head
    valid = torch.ones(2, 45, dtype=torch.bool)
    valid[0, :7] = False
    for mods in (Modifiers(), Modifiers(window=13, softcap=4.0)):
        out = flex.block_sparse_attention(q, k, v, blocks, 8, valid, 0.3, mods)
        ref = masked_reference(q, k, v, blocks | torch.eye(n, dtype=torch.bool), 8, valid, 0.3, mods)
        torch.testing.assert_close(out[0, :, 7:], ref[0, :, 7:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)


def test_ashape_mask_on_a_hand_made_case():
    from tokensieve.methods.kv.ashape import ashape_blocks

    # 6 blocks of 4 tokens, first real token at grid index 5 (block 1): sink of 6 tokens = tokens 5..10 = blocks 1, 2
    got = ashape_blocks(6, 4, torch.tensor([5]), sink=6, local=8)[0].int()
    want = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],  # row 0: local band {0} and the sink columns 1, 2 (above the diagonal: ignored)
            [1, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 0, 1, 1],
        ]
    )
    assert torch.equal(got & torch.tril(torch.ones(6, 6, dtype=torch.int)), want & torch.tril(want))


def prompts(seed=0, lengths=(300, 230)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


DENSE_PARAMS = {
    "ashape": {"sink": 0, "local": 4096, "block": 32},
    "flexprefill": {"gamma": 1.0, "min_budget": 0, "block": 32},
    "minference": {"block": 32},
    "hip": {"top_tokens": 4096, "block": 32, "dense_layers": 0},
}


def minference_profile(model, head=("vs", 10**6, 10**6)):
    from tokensieve.adapters.models import model_shape
    from tokensieve.adapters.profiles import Profile, shape_dict

    shape = model_shape(model)
    rows = [[list(head)] * shape.num_q_heads for _ in range(shape.num_layers)]
    return Profile("minference", shape.key, shape_dict(shape), {}, {"patterns": rows})


@pytest.mark.parametrize("name", [m for m in SPARSE if m in DENSE_PARAMS])
@torch.inference_mode()
def test_full_density_equals_plain_transformers(name, tiny_model):
    ids = torch.tensor([prompts()[0]])
    ref = tiny_model(ids).logits[0, -1]
    method = ts.registry.create_method(name, **DENSE_PARAMS[name])
    kinds = method.capabilities.profile
    flex.STATS.reset()
    profile = minference_profile(tiny_model) if kinds == "minference" else None
    press = ts.compress(tiny_model, method, profile=profile)
    ctx = press.prefill(ids)
    torch.testing.assert_close(ctx.logits[0], ref, atol=1e-4, rtol=1e-4)
    assert flex.STATS.calls == 3  # the sparse kernel did run, once per layer
    assert math.isclose(flex.STATS.density, 1.0)


@torch.inference_mode()
def test_sparse_prefill_is_sparse_and_batch_equals_single(tiny_model):
    rows = prompts(seed=1)
    ids, mask = left_pad(rows, 0)
    press = ts.compress(tiny_model, "ashape[sink=16,local=32,block=16]")
    flex.STATS.reset()
    ctx = press.prefill(ids, mask)
    assert flex.STATS.density < 0.5
    dense = ts.compress(tiny_model, "full").prefill(ids, mask)
    assert not torch.allclose(ctx.logits, dense.logits, atol=1e-3)  # the pattern changed the result
    for b, r in enumerate(rows):
        single = press.prefill(torch.tensor([r]))
        torch.testing.assert_close(ctx.logits[b], single.logits[0], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_composition_with_snapkv_scores_on_the_dense_window(tiny_model):
    """flexprefill[evict=snapkv]:0.25 keeps what SnapKV keeps when its window scores are computed densely: the
    same entries as SnapKV after a dense prefill, because SnapKV reads q_window·Kᵀ, not the attention output of
    earlier layers — except that later layers see hidden states computed by the sparse attention. Layer 0's kept
    entries are therefore identical, and the budget is exact in every layer."""
    spec = Spec.parse("ashape[sink=16,local=32,block=16,evict=snapkv[window=8]]:0.25")
    assert spec.label == "ashape[block=16,evict=snapkv[window=8],local=32,sink=16]:0.25"
    assert Spec.parse(spec.label) == spec
    assert spec.compresses
    ids = torch.tensor([prompts()[0]])
    ctx = ts.compress(tiny_model, spec).prefill(ids)
    snap = ts.compress(tiny_model, "snapkv[window=8]:0.25").prefill(ids)
    budget = ts.Budget.ratio(0.25).tokens_for(300)
    assert torch.all(ctx.cache.lengths() == budget)
    _, _, p0 = ctx.cache.stores()[0].row(0, 1)
    _, _, p1 = snap.cache.stores()[0].row(0, 1)
    assert torch.equal(p0, p1)
    assert not torch.equal(ctx.cache.stores()[2].row(0, 0)[2], torch.arange(300)[-budget:])


def test_bad_compositions_are_refused():
    with pytest.raises(ts.errors.ConfigError, match="evict"):
        Spec.parse("ashape[evict=ashape]")
    with pytest.raises(ts.errors.ConfigError, match="every layer"):
        Spec.parse("ashape[evict=kvzip]:0.25")
    with pytest.raises(ts.errors.ConfigError, match="budget"):
        Spec.parse("ashape:0.25")  # no eviction: no budget


# -- reference parity: FlexPrefill's block choice computed independently (loops, one head at a time) -------------
def _fewest_reaching(values, gamma):
    """The smallest k such that the k largest values sum to at least gamma of the total."""
    vals = sorted(values, reverse=True)
    total, run = sum(vals), 0.0
    for i, x in enumerate(vals):
        run += x
        if run >= gamma * total - 1e-12:
            return i + 1
    return len(vals)


def _top(values, k):
    return set(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def flexprefill_reference(q, k, b, scaling, gamma, tau, min_budget):
    """Alg. 1-4 of the FlexPrefill paper for one unpadded sequence: chosen blocks (Hq, n, n) and query-aware heads."""
    _, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    n = T // b
    chosen = torch.zeros(Hq, n, n, dtype=torch.bool)
    aware = []
    lo = -(-min_budget // b)
    for h in range(Hq):
        Q, K = q[0, h].double(), k[0, h // G].double()
        last = Q[T - b :]
        A = torch.zeros(b, T, dtype=torch.float64)
        for r in range(b):
            qpos = T - b + r
            A[r, : qpos + 1] = torch.softmax(last[r] @ K[: qpos + 1].T * scaling, -1)
        a_v = [float(A[:, j].mean()) for j in range(T)]
        a_s = [0.0] * T
        for r in range(b):
            for j in range(T - b + r + 1):
                a_s[T - b + r - j] += float(A[r, j]) / b
        kbar = torch.stack([K[i * b : (i + 1) * b].mean(0) for i in range(n)])
        a_hat = torch.softmax(last.mean(0) @ kbar.T * scaling, -1).tolist()
        a_bar = [sum(a_v[i * b : (i + 1) * b]) for i in range(n)]
        js = 0.0
        for p_, q_ in zip(a_hat, a_bar):
            m = (p_ + q_) / 2
            js += 0.5 * (p_ * math.log(p_ / m) if p_ > 0 else 0) + 0.5 * (q_ * math.log(q_ / m) if q_ > 0 else 0)
        is_aware = math.sqrt(max(js, 0.0)) < tau
        aware.append(is_aware)
        n_v = lo if is_aware else min(n, max(lo, -(-_fewest_reaching(a_v, gamma) // b)))
        n_s = lo if is_aware else min(n, max(lo, -(-_fewest_reaching(a_s, gamma) // b)))
        v_blk = [sum(a_v[i * b : (i + 1) * b]) for i in range(n)]
        s_blk = [sum(a_s[i * b : (i + 1) * b]) for i in range(n)]
        v_blk[0] = s_blk[0] = float("inf")
        V, S = _top(v_blk, n_v), _top(s_blk, n_s)
        for i in range(n):
            for j in range(i + 1):
                chosen[h, i, j] = j in V or (i - j) in S
        if is_aware:
            qbar = torch.stack([Q[i * b : (i + 1) * b].mean(0) for i in range(n)])
            Sm = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                Sm[i, : i + 1] = torch.softmax(qbar[i] @ kbar[: i + 1].T * scaling, -1)
            flat = Sm.flatten().tolist()
            for f in _top(flat, _fewest_reaching(flat, gamma)) | {0}:
                chosen[h, f // n, f % n] = True
    return chosen, torch.tensor(aware)


@pytest.mark.parametrize("gamma", [0.6, 0.9])
def test_flexprefill_block_choice_matches_the_paper(gamma):
    from tokensieve.methods.kv._sparse_prefill import BlockGrid
    from tokensieve.methods.kv.flexprefill import flexprefill_blocks

    g = torch.Generator().manual_seed(5)
    Hq, Hkv, T, D, b = 6, 2, 96, 8, 8
    q = torch.randn(1, Hq, T, D, generator=g) * 2.0
    k = torch.randn(1, Hkv, T, D, generator=g) * 2.0
    k[:, :, 5] += 3 * q[:, ::3, -1]  # a heavy column, as real attention has
    grid = BlockGrid(q, k, torch.ones(1, T, dtype=torch.bool), b, T // b, 0.35, Hq // Hkv, torch.tensor([T]), 0)
    # tau between the heads' distances, so that both kinds of head are exercised
    _, aware_all = flexprefill_reference(q, k, b, 0.35, gamma, 10.0, 16)
    assert aware_all.all()
    dists = []
    for tau in (0.05, 0.1, 0.2, 0.3, 0.5):
        got, aware = flexprefill_blocks(grid, gamma, tau, 16, None)
        want, want_aware = flexprefill_reference(q, k, b, 0.35, gamma, tau, 16)
        assert torch.equal(aware[0], want_aware), tau
        causal = torch.tril(torch.ones(T // b, T // b, dtype=torch.bool))
        assert torch.equal(got[0] & causal, want & causal), tau
        dists.append(int(want_aware.sum()))
    assert max(dists) > 0  # both query-aware ...
    assert min(dists) < Hq  # ... and vertical-slash heads occurred


def test_minference_vertical_slash_on_a_hand_made_case():
    """One head, 4 blocks of 4 tokens, no padding: the last query (last_q = 1) attends only to key 5 and itself.
    With v = 1 column (+ the first 30 forced: all 16 keys here, so every block is a column) the pattern is dense;
    the block-sparse and A-shape kinds follow their rules."""
    from tokensieve.methods.kv._sparse_prefill import BlockGrid
    from tokensieve.methods.kv.minference import pattern_blocks

    T, b, D = 16, 4, 4
    q = torch.zeros(1, 1, T, D)
    k = torch.zeros(1, 1, T, D)
    q[0, 0, -1, 0] = 10.0
    k[0, 0, 5, 0] = 10.0
    grid = BlockGrid(q, k, torch.ones(1, T, dtype=torch.bool), b, 4, 1.0, 1, torch.tensor([T]), 0)
    vs = pattern_blocks(grid, (("vs", 1, 1),), 1)[0, 0] & grid.causal
    assert torch.equal(vs, grid.causal)  # at least 30 columns, the first 30 forced: all 16 keys
    a = pattern_blocks(grid, (("a", 4, 4),), 1)[0, 0] & grid.causal
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(a, want)  # block 0 (sinks) + the diagonal (local = one block)


def test_minference_diagonals_map_to_the_blocks_they_cross():
    from tokensieve.methods.kv import minference as mi
    from tokensieve.methods.kv._sparse_prefill import BlockGrid

    T, b = 256, 32  # 8 blocks; the 100 forced diagonals cross block offsets 0..4 (offset 99 lies in 3 and 4)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, T, 4, generator=g), torch.randn(1, 2, T, 4, generator=g)
    grid = BlockGrid(q, k, torch.ones(1, T, dtype=torch.bool), b, 8, 0.5, 1, torch.tensor([T]), 0)
    old = mi.MIN_VERTICAL
    mi.MIN_VERTICAL = 0  # no columns at all: the slashes alone
    try:
        got = mi.vertical_slash_tokens(grid, 64, torch.tensor([0, 0]), torch.tensor([100, 100]))[0, 0] & grid.causal
    finally:
        mi.MIN_VERTICAL = old
    i = torch.arange(8)
    want = ((i[:, None] - i[None, :]) <= 4) & grid.causal  # offsets 0..99 → block diagonals 0..4
    assert torch.equal(got, want)


def test_minference_profile_is_validated(tiny_model):
    prof = minference_profile(tiny_model, ("zz", 1, 1))
    from tokensieve.adapters.models import model_shape

    with pytest.raises(ts.errors.ConfigError, match="kind 'vs'"):
        prof.content(model_shape(tiny_model))


def hip_reference(q, k, b, rep, stride, top_tokens, sink, window):
    """HiP's tree search written out for one unpadded sequence, one (query head, query block) at a time."""
    _, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    n = T // b
    K = -(-top_tokens // b)
    wb = -(-window // b)
    lo = (max(sink, 1) - 1) // b + 1
    chosen = torch.zeros(Hq, n, n, dtype=torch.bool)
    for h in range(Hq):
        for i in range(n):
            qs = q[0, h, i * b : (i + 1) * b : stride]

            def score(j, qs=qs, h=h):
                return float((qs @ k[0, h // G, j * b : j * b + rep].T).max())

            hi = i - wb + 1
            V = max(0, hi - lo)
            if V <= K:
                keep = list(range(lo, lo + V))
            else:
                branches = [(lo + (V * t) // K, lo + (V * (t + 1)) // K - lo - (V * t) // K) for t in range(K)]
                while any(sz > 1 for _, sz in branches):
                    halves = []
                    for st, sz in branches:
                        left = (sz + 1) // 2
                        halves.append((st, left))
                        if sz - left > 0:
                            halves.append((st + left, sz - left))
                    halves.sort(key=lambda x: -score(x[0]))
                    branches = halves[:K]
                keep = [st for st, _ in branches]
            for j in keep:
                chosen[h, i, j] = True
            for j in range(i + 1):
                if j * b < sink or i - j < wb:
                    chosen[h, i, j] = True
    return chosen


def test_hip_block_choice_matches_the_paper():
    from tokensieve.methods.kv._sparse_prefill import BlockGrid
    from tokensieve.methods.kv.hip import hip_blocks

    g = torch.Generator().manual_seed(7)
    Hq, Hkv, T, D, b = 4, 2, 256, 8, 8  # 32 blocks: 3 rounds of halving for 4 branches
    q = torch.randn(1, Hq, T, D, generator=g)
    k = torch.randn(1, Hkv, T, D, generator=g)
    grid = BlockGrid(q, k, torch.ones(1, T, dtype=torch.bool), b, T // b, 0.35, Hq // Hkv, torch.tensor([T]), 5)
    got = hip_blocks(grid, top_tokens=32, rep=2, stride=2, sink=8, window=16)[0] & grid.causal
    want = hip_reference(q, k, b, rep=2, stride=2, top_tokens=32, sink=8, window=16) & grid.causal
    assert torch.equal(got, want)
    assert (got[:, -1].sum(-1) == 4 + 1 + 2).all()  # last query block: 4 searched + the sink block + 2 of window


@pytest.mark.parametrize("arch", ["mistral-window", "gemma2", "gemma3"])
@torch.inference_mode()
def test_sliding_window_and_softcap_models_are_supported(arch):
    """Sliding-window layers (the window inside the token mask) and logit soft-capping (a score_mod) at full
    density reproduce plain transformers."""
    from transformers import AutoModelForCausalLM

    from tests.unit.engine.test_architectures import _configs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]()).eval()
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits[0, -1]
    flex.STATS.reset()
    ctx = ts.compress(model, "flexprefill[gamma=1.0,min_budget=0,block=16]").prefill(ids)
    torch.testing.assert_close(ctx.logits[0], ref, atol=2e-4, rtol=2e-4)
    assert flex.STATS.calls == model.config.num_hidden_layers
