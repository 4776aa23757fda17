"""Global retention gates: the global selection against an independent reference, keep-everything parity, batching,
refusals before any work, the profile file and the training pieces (never a training run)."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.adapters.models import model_shape
from tokensieve.data.prompts import left_pad
from tokensieve.errors import ConfigError
from tokensieve.methods.retention import Retention, log_retention_score
from tokensieve.methods.retention_gate import RetentionGates, RetentionNet, gates_to_dict
from tokensieve.train.retention import RetentionTrainConfig, band_oracle, envelope_loss, target_log_beta


def prompts(seed=0, lengths=(48, 30, 41)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def stored_positions(ctx, b=0):
    """``{(layer, kv_head): set of stored positions}`` of sequence ``b``."""
    out = {}
    for li, layer in enumerate(ctx.cache.layers):
        for h in range(ctx.cache.lengths().shape[2]):
            out[(li, h)] = set(layer.store.row(b, h)[2].tolist())
    return out


@torch.no_grad()
def reference_keep(model, data, ids, budget_tokens, sink=0, window=0):
    """The global policy written out from the model's own weights: gate input = the pre-RoPE key and value
    projections of each layer's normalised input; score = (n - i) * log beta; the L * H * b best of the whole model,
    the first ``sink`` / last ``window`` tokens first."""
    out = model(ids, output_hidden_states=True)
    w1, b1 = torch.tensor(data["w1"]), torch.tensor(data["b1"])
    w2, b2 = torch.tensor(data["w2"]), torch.tensor(data["b2"])
    n = ids.shape[1]
    layers = model.model.layers
    H, D = model.config.num_key_value_heads, model.config.head_dim
    scores = []
    for li, layer in enumerate(layers):
        x = layer.input_layernorm(out.hidden_states[li][0])  # (T, d)
        k = layer.self_attn.k_proj(x).view(n, H, D)
        v = layer.self_attn.v_proj(x).view(n, H, D)
        f = torch.cat([k, v], -1).reshape(n, H * 2 * D)
        log_beta = torch.nn.functional.logsigmoid(torch.nn.functional.silu(f @ w1[li].T + b1[li]) @ w2.T + b2)
        age = (n - torch.arange(n)).float()
        s = (age[:, None] * log_beta).T.clone()  # (H, T)
        s[:, :sink] = float("inf")
        if window:
            s[:, n - window :] = float("inf")
        scores.append(s)
    flat = torch.stack(scores).flatten()  # (L * H * T)
    top = set(flat.topk(len(layers) * H * budget_tokens).indices.tolist())
    return {
        (li, h): {t for t in range(n) if (li * H + h) * n + t in top} for li in range(len(layers)) for h in range(H)
    }


@pytest.mark.parametrize(("spec", "sink", "window"), [("retention", 0, 0), ("retention[sink=2,window=4]", 2, 4)])
@torch.inference_mode()
def test_global_selection_matches_an_independent_reference(spec, sink, window, tiny_model, tiny_profiles):
    prof = tiny_profiles["retention"]
    ids = torch.tensor([prompts()[0]])
    press = ts.compress(tiny_model, spec, 0.3, profile=prof)
    ctx = press.prefill(ids)
    b = ts.Budget.ratio(0.3).tokens_for(48)
    assert ctx.cache.stored_entries() == 3 * 2 * b  # one global budget: the same total as a uniform method
    got = stored_positions(ctx)
    want = reference_keep(tiny_model, prof.data, ids, b, sink, window)
    assert got == want
    counts = {k: len(v) for k, v in got.items()}
    assert len(set(counts.values())) > 1  # the layers and heads compete: each row keeps its own number
    assert ctx.cache.kv_bytes() == ctx.cache.stored_entries() * 2 * 8 * 4  # ragged store: exact bytes


@torch.inference_mode()
def test_uniform_allocation_keeps_the_per_head_top_b(tiny_model, tiny_profiles):
    prof = tiny_profiles["retention"]
    press = ts.compress(tiny_model, "retention[allocation=uniform]", 0.3, profile=prof)
    ctx = press.prefill(torch.tensor([prompts()[0]]))
    b = ts.Budget.ratio(0.3).tokens_for(48)
    assert torch.equal(ctx.cache.lengths(), torch.full((3, 1, 2), b))


@pytest.mark.parametrize("spec", ["retention", "retention[lookahead=4,sink=1]"])
@torch.inference_mode()
def test_full_budget_equals_the_full_cache(spec, tiny_model, tiny_profiles):
    ids = torch.tensor([prompts()[0]])
    full = ts.compress(tiny_model, "full")
    ref = full.prefill(ids)
    ref_logits = ref.logits.clone()
    ref_tokens = full.decode(ref, 4).tokens
    press = ts.compress(tiny_model, spec, 1.0, profile=tiny_profiles["retention"])
    ctx = press.prefill(ids)
    torch.testing.assert_close(ctx.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert ctx.cache.stored_entries() == 3 * 2 * 48
    assert press.decode(ctx, 4).tokens == ref_tokens


@torch.inference_mode()
def test_batch_equals_single(tiny_model, tiny_profiles):
    prof = tiny_profiles["retention"]
    rows = prompts(seed=1)
    ids, mask = left_pad(rows, 0)
    press = ts.compress(tiny_model, "retention[window=3]", 0.4, profile=prof)
    ctx = press.prefill(ids, mask)
    first = ctx.logits.clone()
    kept = [stored_positions(ctx, b) for b in range(len(rows))]
    for b, r in enumerate(rows):
        alone = press.prefill(torch.tensor([r]))
        torch.testing.assert_close(first[b], alone.logits[0], atol=1e-4, rtol=1e-4)
        assert kept[b] == stored_positions(alone)


def test_unsupported_combinations_are_refused_before_any_work(tiny_model, tiny_profiles, tmp_path, monkeypatch):
    prof = tiny_profiles["retention"]
    with pytest.raises(ts.CapabilityError, match="decode"):
        ts.compress(tiny_model, "full", 0.3, decode="retention", profile=prof)  # no decode-time eviction
    press = ts.compress(tiny_model, "retention", 0.3, profile=prof)
    with pytest.raises(ts.CapabilityError, match="chunk"):
        press.prefill(torch.tensor([prompts()[0]]), chunk=8)
    with pytest.raises(ConfigError, match="allocation"):
        ts.compress(tiny_model, "retention[allocation=foo]", 0.3, profile=prof)
    with pytest.raises(ConfigError, match="lookahead"):
        Retention(lookahead=0)
    monkeypatch.setenv("TOKENSIEVE_HOME", str(tmp_path))
    with pytest.raises(ts.CapabilityError, match="retention"):
        ts.compress(tiny_model, "retention", 0.5)  # no gates for this model


def test_lookahead_score_is_the_summed_geometric_retention():
    log_beta = torch.tensor([-0.5, -0.01, -3.0])
    age = torch.tensor([3.0, 10.0, 1.0])
    for n in (1, 2, 7):
        want = torch.log(sum(torch.exp((age + k) * log_beta) for k in range(n)))
        torch.testing.assert_close(log_retention_score(log_beta, age, n), want, atol=1e-5, rtol=1e-5)


def test_profile_round_trip_and_export_folds_the_standardisation(tiny_model):
    shape = model_shape(tiny_model)
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    torch.manual_seed(0)
    net = RetentionNet(L, 2 * H * D, H, hidden=4)
    net.mean.normal_()
    net.std.uniform_(0.5, 2.0)
    feats = torch.randn(L, 10, 2 * H * D)
    want = net(feats)
    gates = RetentionGates.from_dict(gates_to_dict(*net.export()), shape)
    for i in range(L):
        torch.testing.assert_close(gates.log_beta(i, feats[i]), want[i], atol=1e-4, rtol=1e-4)
    bad = gates_to_dict(*net.export())
    bad["w2"] = [[0.0] * 4]  # one head instead of two
    with pytest.raises(ConfigError, match="w2"):
        RetentionGates.from_dict(bad, shape)


def test_band_oracle_matches_a_loop_and_the_loss_pieces():
    from tokensieve.core.context import LayerContext, ModelShape, RunState

    g = torch.Generator().manual_seed(1)
    Hq, H, T, D = 4, 2, 40, 8
    q, k = torch.randn(1, Hq, T, D, generator=g), torch.randn(1, H, T, D, generator=g)
    shape = ModelShape(1, Hq, H, D, 512)
    run = RunState(shape, torch.tensor([T]), torch.tensor([T]))
    ctx = LayerContext(0, q, k, k, torch.ones(1, T, dtype=torch.bool), D**-0.5, run)
    ages = [2, 8]
    got = band_oracle(ctx, ages, chunk=7)  # (H, T, K)
    probs = (
        (torch.einsum("hqd,hkd->hqk", q[0], k[0].repeat_interleave(2, 0)) * D**-0.5)
        .masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        .softmax(-1)
    )
    for h in range(H):
        for j in range(T):
            for ki, a in enumerate(ages):
                vals = [float(probs[hq, t, j]) for hq in (2 * h, 2 * h + 1) for t in range(T) if a <= t - j < 2 * a]
                assert abs(float(got[h, j, ki]) - max(vals, default=0.0)) < 1e-6
    # a perfectly geometric envelope is fitted exactly: zero loss, and the least-squares target recovers log beta
    a = torch.tensor([2.0, 8.0])
    log_beta = torch.tensor([[-0.3, -0.05]])
    orc = torch.exp(a * log_beta[..., None])
    assert float(envelope_loss(log_beta, orc, a, 1e-6)) < 1e-10
    torch.testing.assert_close(target_log_beta(orc, a, 1e-6), log_beta)
    with pytest.raises(ConfigError, match="length"):
        RetentionTrainConfig(length=100, ages="4,64").check()
    with pytest.raises(ConfigError, match="ages"):
        RetentionTrainConfig(ages="16,4").check()
