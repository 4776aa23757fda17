"""SP-KV's write gate: keep-everything parity, batching, the gate rule against a reference, decode-time writes on the
ragged cache, the profile file and the training pieces."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.adapters.models import model_shape
from tokensieve.adapters.profiles import Profile, shape_dict
from tokensieve.cache.storage import RaggedKV
from tokensieve.core.context import LayerContext, ModelShape, Rope, RunState
from tokensieve.data.prompts import left_pad
from tokensieve.errors import ConfigError
from tokensieve.methods.kv.spkv import SPKV
from tokensieve.methods.kv.spkv_gate import GateNet, SPKVGates, gate_features, gates_to_dict


def spkv_profile(model, seed: int = 0, window: int = 8, hidden: int = 0) -> Profile:
    """A random but valid gate for ``model`` (its calibration table is a made-up monotone curve)."""
    shape = model_shape(model)
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    F = 2 * H * D
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(L):
        if hidden:
            layers.append(
                {
                    "w1": torch.randn(hidden, F, generator=g) / math.sqrt(F),
                    "b1": torch.zeros(hidden),
                    "w2": torch.randn(H, hidden, generator=g),
                    "b2": torch.zeros(H),
                }
            )
        else:
            layers.append({"w1": torch.randn(H, F, generator=g) * 2 / math.sqrt(F), "b1": torch.zeros(H)})
    taus = [i / 10 for i in range(1, 10)]
    data = gates_to_dict(layers, window, hidden, taus, [1 - t for t in taus])
    return Profile("spkv", shape.key, shape_dict(shape), {"test": True}, data)


@pytest.fixture(scope="module")
def gate(tiny_model):
    return spkv_profile(tiny_model)


def prompts(seed=0, lengths=(48, 30, 41)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


# ------------------------------------------------------------------------------------------------ parity with plain
@pytest.mark.parametrize("spec", ["spkv:1.0", "spkv[tau=0]"])
@torch.inference_mode()
def test_keeping_everything_equals_plain_transformers(spec, tiny_model, gate):
    ids = torch.tensor([prompts()[0]])
    out = tiny_model(ids, use_cache=True)
    ref_tokens = []
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    for _ in range(5):
        ref_tokens.append(int(nxt))
        step = tiny_model(nxt[:, None], past_key_values=past, use_cache=True)
        past, nxt = step.past_key_values, step.logits[:, -1].argmax(-1)
    press = ts.compress(tiny_model, spec, profile=gate)
    ctx = press.prefill(ids)
    torch.testing.assert_close(ctx.logits, out.logits[:, -1], atol=1e-4, rtol=1e-4)
    assert press.decode(ctx, 5).tokens[0] == ref_tokens
    assert ctx.cache.stored_entries() == 3 * 2 * (48 + 4)  # nothing dropped, at prefill or while decoding


def test_without_tau_a_budget_is_required(tiny_model, gate):
    with pytest.raises(ts.ConfigError, match="gives no budget"):
        ts.compress(tiny_model, "spkv", profile=gate)  # it would silently keep the whole prompt
    assert ts.compress(tiny_model, "spkv[tau=0.5]", profile=gate).budget.is_full  # tau decides; no budget needed


# ------------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("spec", ["spkv[tau=0.5,window=8]", "spkv[window=6,sink=2]:0.4"])
@torch.inference_mode()
def test_batch_equals_single(spec, tiny_model, gate):
    rows = prompts(seed=1)
    ids, mask = left_pad(rows, 0)
    press = ts.compress(tiny_model, spec, profile=gate)
    ctx = press.prefill(ids, mask)
    first, lengths = ctx.logits.clone(), ctx.cache.lengths()
    gen = press.decode(ctx, 8)
    after = ctx.cache.lengths()
    assert not bool((lengths == lengths[:, :, :1]).all())  # heads keep different numbers of entries
    for b, r in enumerate(rows):
        single = press.prefill(torch.tensor([r]))
        torch.testing.assert_close(first[b], single.logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(lengths[:, b], single.cache.lengths()[:, 0])
        assert gen.tokens[b] == press.decode(single, 8).tokens[0]
        assert torch.equal(after[:, b], single.cache.lengths()[:, 0])


# ------------------------------------------------------------------------------------------------ reference parity
def _reference_keep(k, v, w1, b1, inv_freq, n, window, tau, sink):
    """The gate rule written out token by token: undo RoPE with explicit cos/sin, a linear gate, a sigmoid, and the
    window / sink / threshold test (one sequence, no padding)."""
    H, T, D = k.shape
    half = D // 2
    keep = torch.zeros(H, T, dtype=torch.bool)
    for j in range(T):
        parts = []
        for h in range(H):
            x = k[h, j].double()
            ang = j * inv_freq.double()
            c, s = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
            # R x = x*c + rot(x)*s with rot(x) = [-x2, x1]; the inverse is x' = y*c - rot(y)*s ... solved per pair
            y1, y2 = x[:half], x[half:]
            x1 = y1 * c[:half] + y2 * s[:half]
            x2 = y2 * c[half:] - y1 * s[half:]
            parts += [torch.cat([x1, x2]).float(), v[h, j]]
        f = torch.cat(parts)
        u = torch.sigmoid(w1 @ f + b1)
        for h in range(H):
            keep[h, j] = (n - j < window) or j < sink or bool(u[h] >= tau)
    return keep


def test_gate_rule_matches_a_reference_on_small_tensors():
    g = torch.Generator().manual_seed(3)
    H, T, D, Hq = 2, 20, 8, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).double() / D))
    k_raw = torch.randn(1, H, T, D, generator=g)
    pos = torch.arange(T)
    # rotate the raw keys as transformers does (rotate-half), so the method sees post-RoPE keys
    ang = pos[:, None].double() * inv_freq[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    rot = torch.cat([-k_raw[..., D // 2 :], k_raw[..., : D // 2]], -1)
    keys = k_raw * cos + rot * sin
    values = torch.randn(1, H, T, D, generator=g)
    w1 = torch.randn(H, 2 * H * D, generator=g) * 0.5
    b1 = torch.randn(H, generator=g) * 0.1
    shape = ModelShape(1, Hq, H, D, 512, rope=(Rope(tuple(inv_freq.tolist())),))
    gates = SPKVGates.from_dict(gates_to_dict([{"w1": w1, "b1": b1}], 5, 0, [0.2, 0.8], [0.7, 0.2]), shape)
    # the rounded weights of the file are what the method uses
    w1r, b1r = gates.layers[0].w1, gates.layers[0].b1
    run = RunState(shape, torch.tensor([T]), torch.tensor([T]), profile=gates)
    ctx = LayerContext(0, torch.zeros(1, Hq, T, D), keys, values, torch.ones(1, T, dtype=torch.bool), D**-0.5, run)
    for tau, window, sink in [(0.5, 5, 0), (0.3, 3, 2), (0.9, 1, 0)]:
        sel = SPKV(tau=tau, window=window, sink=sink).compress(ctx).selection
        got = sel.mask(T)[0]
        want = _reference_keep(keys[0], values[0], w1r, b1r, inv_freq, T, window, tau, sink)
        assert torch.equal(got, want), (tau, window, sink)
    # features: keys with RoPE undone, then values, per KV head
    f = gate_features(keys, values, pos[None], shape.rope[0])
    torch.testing.assert_close(f[0, :, :D], k_raw[0, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f[0, :, D : 2 * D], values[0, 0])


# ------------------------------------------------------------------------------------------------ decoding
@torch.inference_mode()
def test_decode_writes_only_useful_pairs_leaving_the_window_on_a_ragged_store(tiny_model, gate, monkeypatch):
    window, tau, steps = 6, 0.5, 20
    seen: dict[tuple[int, int], list[float]] = {}  # (layer, position) -> u per KV head at its latest decision
    original = SPKV.utilities

    def spy(self, gates, layer, keys, values, positions, rope, hidden=None):
        u = original(self, gates, layer, keys, values, positions, rope, hidden)
        for t, p in enumerate(positions[0].tolist()):
            seen[(layer, p)] = u[0, :, t].tolist()
        return u

    monkeypatch.setattr(SPKV, "utilities", spy)
    press = ts.compress(tiny_model, f"spkv[tau={tau},window={window}]", profile=gate)
    ctx = press.prefill(torch.tensor([prompts()[0]]))
    press.decode(ctx, steps)
    newest = 48 + steps - 2  # the last generated token is never fed back
    dropped = 0
    for layer_idx, layer in enumerate(ctx.cache.layers):
        assert isinstance(layer.store, RaggedKV)
        dropped += layer.decode.state.dropped
        for h in range(2):
            got = set(layer.store.row(0, h)[2].tolist())
            want = {p for p in range(newest + 1) if newest - p < window or seen[(layer_idx, p)][h] >= tau}
            assert got == want, (layer_idx, h)
    assert dropped > 0  # pairs were dropped while decoding, not only at prefill
    lengths = ctx.cache.lengths()
    assert not bool((lengths == lengths[:, :, :1]).all())
    assert ctx.cache.kv_bytes() == ctx.cache.stored_entries() * 2 * 8 * 4  # exact bytes: the memory is saved


@torch.inference_mode()
def test_spkv_decodes_after_another_prefill_and_refuses_rollback(tiny_model, gate):
    press = ts.compress(tiny_model, "full", decode="spkv", decode_params={"tau": 0.6, "window": 5}, profile=gate)
    ctx = press.prefill(torch.tensor([prompts()[1]]))
    mark = ctx.checkpoint()
    press.decode(ctx, 4)
    assert ctx.cache.stored_entries() < 3 * 2 * (30 + 3)  # the prompt was decided at the first step
    with pytest.raises(ts.ConfigError, match="evicted"):
        ctx.rollback(mark)


@torch.inference_mode()
def test_target_density_calibrates_tau_and_query_agnostic_extend_works(tiny_model, gate):
    press = ts.compress(tiny_model, "spkv[window=4]", 0.5, profile=gate)
    method, gates = press.method, press.profile_data
    assert isinstance(method, SPKV)
    tau = method.thresholds(gates, torch.tensor([100]), torch.tensor([50]))
    share = (50 - 3) / (100 - 3)  # the 3 window tokens at the end of the prompt are kept anyway
    assert abs(float(tau) - (1 - share)) < 1e-6  # the test table is out_density = 1 - tau
    ctx = press.prefill(torch.tensor([prompts()[0]]))
    fork = ctx.fork()
    press.extend(fork, torch.tensor([[5, 6, 7, 8, 9, 10]]))
    gen = press.decode(fork, 4)
    assert len(gen.tokens[0]) == 4
    with pytest.raises(ConfigError, match="tau"):
        SPKV(tau=1.5)


def test_gate_calibration_table_interpolates():
    shape = ModelShape(1, 2, 1, 4, 64)
    data = gates_to_dict([{"w1": torch.zeros(1, 8), "b1": torch.zeros(1)}], 4, 0, [0.2, 0.5, 0.8], [0.6, 0.3, 0.1])
    g = SPKVGates.from_dict(data, shape)
    assert g.tau_for(1.0) == float("-inf")
    assert g.tau_for(0.0) == float("inf")
    assert abs(g.tau_for(0.45) - 0.35) < 1e-9
    assert abs(g.tau_for(0.2) - 0.65) < 1e-9
    assert 0 < g.tau_for(0.8) < 0.2
    bad = dict(data, layers=data["layers"] * 2)
    with pytest.raises(ConfigError, match="one predictor for each"):
        SPKVGates.from_dict(bad, shape)
    with pytest.raises(ConfigError, match="calibration"):
        SPKVGates.from_dict(dict(data, calibration={"tau": [0.5, 0.2], "out_density": [0.1, 0.2]}), shape)


def test_gatenet_export_folds_the_standardisation():
    torch.manual_seed(0)
    for hidden in (0, 5):
        net = GateNet(3, 8, 2, hidden=hidden, init_std=0.3)
        net.mean.copy_(torch.randn(3, 8))
        net.std.copy_(torch.rand(3, 8) + 0.5)
        feats = torch.randn(3, 10, 8)
        want = net(feats)
        shape = ModelShape(3, 4, 2, 2, 64)
        g = SPKVGates.from_dict(gates_to_dict(net.export(), 4, hidden, [0.1, 0.9], [0.9, 0.1]), shape)
        for i in range(3):
            torch.testing.assert_close(g.layers[i].logits(feats[i]), want[i], atol=1e-4, rtol=1e-4)


def test_missing_gate_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSIEVE_HOME", str(tmp_path))
    with pytest.raises(ts.CapabilityError, match="spkv"):
        ts.compress(tiny_model, "spkv", 0.5)


def test_gate_figure_utilities_are_the_methods_scores(tiny_model, gate):
    """The heat strip's numbers (train/spkv_figure.py) are the utilities the method scores pairs with."""
    from tokensieve.engine import Compressor
    from tokensieve.methods.kv.spkv import SPKV
    from tokensieve.train.spkv import _Observe
    from tokensieve.train.spkv_figure import gate_utilities

    ids = torch.randint(5, 90, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    u, gates = gate_utilities(tiny_model, ids, gate)
    shape = model_shape(tiny_model)
    assert u.shape == (shape.num_layers, 24, shape.num_kv_heads)
    assert float(u.min()) > 0.0
    assert float(u.max()) < 1.0
    seen = []

    def grab(ctx):
        rope = shape.rope[ctx.layer_idx] if shape.rope else None
        seen.append(SPKV().utilities(gates, ctx.layer_idx, ctx.keys, ctx.values, ctx.positions, rope)[0])

    with torch.no_grad():
        Compressor(tiny_model, _Observe(callback=grab), 1.0).prefill(torch.tensor([ids]))
    torch.testing.assert_close(u, torch.stack(seen).permute(0, 2, 1))  # (L, H, T) -> (L, T, H)
