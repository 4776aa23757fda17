"""Scoring rules and appliers checked against direct computations."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.adapters.profiles import Profile, load_profile, save_profile
from tokensieve.core.context import LayerContext, ModelShape, RunState
from tokensieve.core.profiles import RetrievalHeads
from tokensieve.methods.kv.ems import merge_into_centres
from tokensieve.profiling.retrieval_heads import echo_induction_scores
from tokensieve.selection import Selection

D = 8


def make_ctx(B=1, Hq=4, Hkv=2, T=20, seed=0, budget=6, sink=0, recent=0, valid=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    run = RunState(
        shape=ModelShape(3, Hq, Hkv, D, 512),
        budget_tokens=torch.full((B,), budget),
        n_tokens=valid.sum(-1),
        sink=sink,
        recent=recent,
    )
    return LayerContext(layer_idx=1, queries=q, keys=k, values=v, valid=valid, scaling=D**-0.5, run=run)


def test_snapkv_score_is_window_attention_pooled_and_group_averaged():
    ctx = make_ctx()
    W = 4
    m = ts.create_method("snapkv", window=W, kernel=3, pooling="avg")
    s = m.score(ctx)
    T = ctx.length
    logits = torch.einsum("bhqd,bhkd->bhqk", ctx.queries[:, :, T - W :], ctx.keys.repeat_interleave(2, 1)) * D**-0.5
    causal = torch.arange(T)[None, :] <= torch.arange(T - W, T)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).mean(2)  # (B, Hq, T)
    prefix = torch.nn.functional.avg_pool1d(probs[..., : T - W].reshape(-1, 1, T - W), 3, 1, 1).reshape(1, 4, T - W)
    pooled = torch.cat([prefix, probs[..., T - W :]], -1)  # the window's own attention is never pooled in
    expected = pooled.view(1, 2, 2, T).mean(2)
    torch.testing.assert_close(s, expected)


def test_h2o_score_is_accumulated_attention():
    ctx = make_ctx(T=12)
    s = ts.create_method("h2o").score(ctx)
    T = 12
    logits = torch.einsum("bhqd,bhkd->bhqk", ctx.queries, ctx.keys.repeat_interleave(2, 1)) * D**-0.5
    probs = torch.softmax(logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)
    torch.testing.assert_close(s, probs.sum(2).view(1, 2, 2, T).mean(2))


def test_tova_is_one_ranking_per_layer_and_knorm_prefers_small_keys():
    ctx = make_ctx()
    s = ts.create_method("tova").score(ctx)
    assert torch.equal(s[:, 0], s[:, 1])
    sel = ts.create_method("knorm").compress(ctx).selection
    norms = ctx.keys.norm(dim=-1)
    for h in range(2):
        assert set(sel.row(0, h).tolist()) == set(norms[0, h].topk(6, largest=False).indices.tolist())


def test_streaming_llm_keeps_sinks_and_the_latest_tokens():
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    ctx = make_ctx(valid=valid, budget=8, sink=4)
    sel = ts.create_method("streaming_llm").compress(ctx).selection
    assert sel.row(0, 0).tolist() == [3, 4, 5, 6, 16, 17, 18, 19]


def test_razor_compensation_token_is_the_mean_of_what_was_dropped():
    ctx = make_ctx(T=20, budget=8, sink=2)
    ctx.run.profile = RetrievalHeads(ranked=((1, 0),), count=1)
    ctx.run.budget_tokens = torch.tensor([14])  # 3 layers x 2 heads x 14 = 84 = 20 (retrieval) + 5 x 12.8
    m = ts.create_method("razor", sink=2, min_local=4)
    comp = m.compress(ctx)
    sel = comp.selection
    assert sel.counts[0, 0] == 20  # layer 1 head 0 is a retrieval head: keeps everything
    kept = set(sel.row(0, 1).tolist())
    dropped = [j for j in range(20) if j not in kept]
    assert {0, 1} <= kept
    assert 19 in kept
    n_d = len(dropped)
    torch.testing.assert_close(comp.extra_keys[0, 1, 0], ctx.keys[0, 1, dropped].mean(0))
    torch.testing.assert_close(comp.extra_values[0, 1, 0], ctx.values[0, 1, dropped].mean(0))
    torch.testing.assert_close(comp.extra_bias[0, 1, 0], torch.tensor(float(n_d)).log())
    assert comp.extra_valid.tolist() == [[[False], [True]]]  # no compensation token where nothing was dropped
    # entries stored by this layer: retrieval head 20 + ordinary head (kept + 1 compensation token)
    assert int(sel.counts[0, 1]) + 1 + 20 in (32, 33)


def test_ems_merge_is_an_importance_weighted_mean_with_norm_kept():
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 2.0]]])  # (H=1, T=4, D=2)
    values = torch.arange(8.0).view(1, 4, 2)
    weight = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    kept = torch.tensor([[True, False, True, False]])
    cand = ~kept
    k, v, members, merged = merge_into_centres(keys, values, weight, kept, cand, torch.tensor([0.9]))
    assert merged.tolist() == [[False, True, False, True]]
    assert members.tolist() == [[2.0, 1.0, 2.0, 1.0]]
    torch.testing.assert_close(v[0, 0], (3 * values[0, 0] + values[0, 1]) / 4)
    mean_dir = (3 * keys[0, 0] + keys[0, 1]) / 4
    norm = (3 * 1.0 + keys[0, 1].norm()) / 4
    torch.testing.assert_close(k[0, 0], mean_dir / mean_dir.norm() * norm)
    torch.testing.assert_close(k[0, 2], torch.tensor([0.0, 1.5]))  # same direction, mean norm
    torch.testing.assert_close(k[0, 1], keys[0, 1])  # non-centres untouched (they are dropped anyway)


def test_echo_and_induction_heads_are_found():
    n, reps = 5, 3
    T = 1 + n * reps
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, T, D, generator=g)
    q = torch.zeros(1, 2, T, D)
    for i in range(1 + n, T):
        q[0, 0, i] = 8 * keys[0, 0, i - n]  # head 0 looks at the previous copy of its token (echo)
        q[0, 1, i] = 8 * keys[0, 1, i - n + 1]  # head 1 looks at the token after it (induction)
    run = RunState(shape=ModelShape(1, 2, 2, D, 64), budget_tokens=torch.tensor([1]), n_tokens=torch.tensor([T]))
    ctx = LayerContext(0, q, keys, keys, torch.ones(1, T, dtype=torch.bool), 1.0, run)
    echo, induction = echo_induction_scores(ctx, n)
    assert echo[0] > 0.5 > echo[1]
    assert induction[1] > 0.5 > induction[0]


def test_profile_roundtrip_prefers_the_user_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSIEVE_HOME", str(tmp_path))
    shape = ModelShape(2, 4, 2, 8, 64, key="toy")
    prof = Profile(
        "fasa",
        "toy",
        {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 8},
        {"s": 1},
        {"ks": [8], "ca": [[[0.5] * 4] * 2] * 2},
    )
    path = save_profile(prof)
    assert path == tmp_path / "profiles" / "toy" / "fasa.json"
    loaded = load_profile("fasa", shape)
    assert loaded is not None
    assert loaded.data == prof.data
    assert load_profile("compresskv", shape) is None


def test_selection_counts_are_what_the_method_allocated():
    ctx = make_ctx(T=30, budget=10, recent=4)
    comp = ts.create_method("snapkv", window=4).compress(ctx)
    assert isinstance(comp.selection, Selection)
    assert comp.selection.counts.tolist() == [[10, 10]]
    assert set(range(26, 30)) <= set(comp.selection.row(0, 0).tolist())


def test_a_malformed_profile_is_refused_before_any_work(tiny_model, tiny_profiles):
    import dataclasses

    good = tiny_profiles["retrieval-heads"]
    ts.compress(tiny_model, "razor", 0.25, profile=good)
    bad = dataclasses.replace(good, data={**good.data, "ranked": [[99, 0]]})
    with pytest.raises(ts.ConfigError, match="outside the model"):
        ts.compress(tiny_model, "razor", 0.25, profile=bad)
    bad = dataclasses.replace(tiny_profiles["fasa"], data={"ks": [8], "ca": []})
    with pytest.raises(ts.ConfigError, match="'ca'"):
        ts.compress(tiny_model, "fasa", 0.25, profile=bad)
