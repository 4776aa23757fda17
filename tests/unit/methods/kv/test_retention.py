"""Global retention gates: the global selection against an independent reference, keep-everything parity, batching,
refusals before any work, the profile file and the training pieces (never a training run)."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.adapters.models import model_shape
from tokensieve.data.prompts import left_pad
from tokensieve.errors import ConfigError
from tokensieve.methods.kv.retention import Retention, log_retention_score
from tokensieve.methods.kv.retention_gate import RetentionGates, RetentionNet, gates_to_dict
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
def reference_scores(model, data, ids, sink=0, window=0):
    """``(L, H, T)``: the gates written out from the model's own weights — input = the pre-RoPE key and value
    projections of each layer's normalised input — and the official cache's score after a prefill of n tokens,
    (q_idx - i) * log beta with q_idx = n + 1 (DynamicBudgetTrimKVCache: seen tokens + 1); the first ``sink`` / last
    ``window`` tokens +inf."""
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
        age = (n + 1 - torch.arange(n)).float()
        s = (age[:, None] * log_beta).T.clone()  # (H, T)
        s[:, :sink] = float("inf")
        if window:
            s[:, n - window :] = float("inf")
        scores.append(s)
    return torch.stack(scores)


def reference_keep(model, data, ids, budget_tokens, sink=0, window=0):
    """The global policy: the L * H * b best of the whole model."""
    scores = reference_scores(model, data, ids, sink, window)
    L, H, n = scores.shape
    flat = scores.flatten()  # (L * H * T)
    top = set(flat.topk(L * H * budget_tokens).indices.tolist())
    layers = range(L)
    return {(li, h): {t for t in range(n) if (li * H + h) * n + t in top} for li in layers for h in range(H)}


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
    with pytest.raises(ts.CapabilityError, match="own prefill"):
        ts.compress(tiny_model, "full", 0.3, decode="retention", profile=prof)  # its decode needs its prefill
    with pytest.raises(ts.CapabilityError, match="own prefill"):
        ts.compress(tiny_model, "snapkv:0.3+retention:0.3", profile=prof)
    with pytest.raises(ConfigError, match="buffer"):
        Retention(buffer=0)
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


@pytest.mark.parametrize(
    ("spec", "sink", "window"), [("retention[buffer=3]", 0, 0), ("retention[buffer=2,sink=1,window=3]", 1, 3)]
)
@torch.inference_mode()
def test_decode_evicts_globally_as_an_independent_replay(spec, sink, window, tiny_model, tiny_profiles, monkeypatch):
    """While decoding, each generated token enters every (layer, KV head) row; once a sequence holds more than
    L * H * (M + buffer) entries, the global top L * H * M by (age) * log beta stay, with the official cache's age
    after step t: t + 2 - p (q_idx = seen + 1, compressed after the forward pass). Replayed here from the log beta the
    gates gave each token (recorded), starting from the prefill's selection (checked above against the model)."""
    from tokensieve.methods.kv import retention as mod

    seen: dict[tuple[int, int], list[float]] = {}  # (layer, position) -> log beta per KV head
    original = mod.Retention._score_new

    def spy(self, dl, pos, due):
        known = dl.state.known.clone()
        original(self, dl, pos, due)
        for r in range(pos.shape[0]):
            for j in range(int(known[r]), int(dl.state.known[r])):
                seen.setdefault((dl.index, int(pos[r, j])), [0.0, 0.0])[r % 2] = float(dl.state.log_beta[r, j])

    monkeypatch.setattr(mod.Retention, "_score_new", spy)
    prof = tiny_profiles["retention"]
    ids = torch.tensor([prompts()[0]])
    press = ts.compress(tiny_model, spec, 0.3, profile=prof)
    ctx = press.prefill(ids)
    prompt_lb = {li: ctx.cache.decode_run.scratch[("retention", "decode")].layers[li].state for li in range(3)}
    stored = {k: set(v) for k, v in stored_positions(ctx).items()}
    for li, st in prompt_lb.items():  # the prompt entries' log beta, as the prefill computed them
        for h in range(2):
            for j, p in enumerate(ctx.cache.layers[li].store.row(0, h)[2].tolist()):
                seen.setdefault((li, p), [0.0, 0.0])[h] = float(st.log_beta[h, j])
    steps, n, M = 14, 48, ts.Budget.ratio(0.3).tokens_for(48)
    buffer = int(spec.split("buffer=")[1].split(",")[0].rstrip("]"))
    press.decode(ctx, steps)
    evictions = 0
    for t in range(n, n + steps - 1):  # the last generated token is never fed back
        for key in stored:
            stored[key].add(t)
        if sum(len(v) for v in stored.values()) > 3 * 2 * (M + buffer):
            evictions += 1
            flat = []
            for (li, h), ps in stored.items():
                for p in ps:
                    protected = p < sink or p > t - window
                    flat.append((float("inf") if protected else (t + 2 - p) * seen[(li, p)][h], li, h, p))
            flat.sort(key=lambda x: -x[0])
            top = flat[: 3 * 2 * M]
            stored = {key: {p for (_, li, h, p) in top if (li, h) == key} for key in stored}
    assert evictions >= 2
    assert stored_positions(ctx) == stored
    assert ctx.cache.decode_run.scratch[("retention", "decode")].evictions == evictions
    assert ctx.cache.kv_bytes() == ctx.cache.stored_entries() * 2 * 8 * 4


@torch.inference_mode()
def test_decoded_tokens_log_beta_is_the_gate_on_their_stored_keys_and_values(tiny_model, tiny_profiles):
    """The log beta given to a generated token is the gate applied to the key and value the store holds for it."""
    from tokensieve.methods.kv.spkv_gate import gate_features

    prof = tiny_profiles["retention"]
    press = ts.compress(tiny_model, "retention[buffer=2]", 0.3, profile=prof)
    ctx = press.prefill(torch.tensor([prompts()[0]]))
    press.decode(ctx, 10)
    gates, shape = press.profile_data, press.shape
    for li, layer in enumerate(ctx.cache.layers):
        st = layer.decode.state
        rows = [layer.store.row(0, h) for h in range(2)]
        common = set(rows[0][2].tolist()) & set(rows[1][2].tolist())
        common = sorted(p for p in common if p >= 48 and all(p in r[2].tolist() for r in rows))
        pick = [[r[2].tolist().index(p) for p in common] for r in rows]
        if not common or any(j >= int(st.known[h]) for h in range(2) for j in pick[h]):
            continue
        k = torch.stack([rows[h][0][pick[h]] for h in range(2)])[None]
        v = torch.stack([rows[h][1][pick[h]] for h in range(2)])[None]
        want = gates.log_beta(li, gate_features(k, v, torch.tensor([common]), shape.rope[li]))[0].T
        got = torch.stack([st.log_beta[h, pick[h]] for h in range(2)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_decode_batch_equals_single_and_keep_all_never_evicts(tiny_model, tiny_profiles):
    prof = tiny_profiles["retention"]
    rows = prompts(seed=2)
    ids, mask = left_pad(rows, 0)
    press = ts.compress(tiny_model, "retention[buffer=2]", 0.4, profile=prof)
    ctx = press.prefill(ids, mask)
    tokens = press.decode(ctx, 8).tokens
    kept = [stored_positions(ctx, b) for b in range(len(rows))]
    for b, r in enumerate(rows):
        alone = press.prefill(torch.tensor([r]))
        assert press.decode(alone, 8).tokens[0] == tokens[b]
        assert kept[b] == stored_positions(alone)
    full = ts.compress(tiny_model, "full")
    ref = full.decode(full.prefill(torch.tensor([rows[0]])), 9).tokens
    keep_all = ts.compress(tiny_model, "retention[buffer=1]", 1.0, profile=prof)
    ctx = keep_all.prefill(torch.tensor([rows[0]]))
    assert keep_all.decode(ctx, 9).tokens == ref
    assert ctx.cache.stored_entries() == 3 * 2 * (48 + 8)


@torch.inference_mode()
def test_floor_reserves_each_heads_share_as_the_authors_cache(tiny_model, tiny_profiles):
    """floor_budget_ratio f (DynamicBudgetTrimKVCache): the global top int(L*H*M*(1-f)) by score, then every head keeps
    its count there plus int(M*f), its own best."""
    prof = tiny_profiles["retention"]
    ids = torch.tensor([prompts()[0]])
    M = ts.Budget.ratio(0.3).tokens_for(48)
    ctx = ts.compress(tiny_model, "retention[floor=0.5]", 0.3, profile=prof).prefill(ids)
    scores = reference_scores(tiny_model, prof.data, ids)  # (L, H, T)
    L, H, n = scores.shape
    top = scores.flatten().topk(int(L * H * M * 0.5)).indices
    counts = torch.bincount(top // n, minlength=L * H).view(L, H) + int(M * 0.5)
    want = {(li, h): set(scores[li, h].topk(int(counts[li, h])).indices.tolist()) for li in range(L) for h in range(H)}
    assert stored_positions(ctx) == want
    assert min(len(v) for v in want.values()) >= int(M * 0.5)


@torch.inference_mode()
def test_threshold_strategy_keeps_entries_whose_retention_reaches_it(tiny_model, tiny_profiles):
    prof = tiny_profiles["retention"]
    ids = torch.tensor([prompts()[0]])
    thr = 0.05
    press = ts.compress(tiny_model, f"retention[threshold={thr}]", profile=prof)  # no budget: the threshold decides
    ctx = press.prefill(ids)
    scores = reference_scores(tiny_model, prof.data, ids)
    want = {(li, h): set((scores[li, h] >= math.log(thr)).nonzero().flatten().tolist()) for li in range(3)
            for h in range(2)}  # fmt: skip
    assert stored_positions(ctx) == want
    before = ctx.cache.stored_entries()
    press.decode(ctx, 10)  # ages grow: every step drops what fell below the threshold, and new tokens enter
    for li, layer in enumerate(ctx.cache.layers):
        for h in range(2):
            kept = set(layer.store.row(0, h)[2].tolist())
            assert {p for p in kept if p < 48} <= want[(li, h)]
    assert ctx.cache.stored_entries() <= before + 3 * 2 * 9
    with pytest.raises(ConfigError, match="floor"):
        Retention(threshold=0.1, floor=0.2)
    with pytest.raises(ConfigError, match="global"):
        Retention(floor=0.2, allocation="uniform")


@pytest.mark.parametrize("spec", ["retention[threshold=0.0]", "retention[floor=0.3]:1.0"])
@torch.inference_mode()
def test_keeping_everything_with_the_authors_options_equals_the_full_cache(spec, tiny_model, tiny_profiles):
    ids = torch.tensor([prompts()[0]])
    full = ts.compress(tiny_model, "full")
    ref = full.prefill(ids)
    ref_logits, ref_tokens = ref.logits.clone(), full.decode(ref, 5).tokens
    press = ts.compress(tiny_model, spec, profile=tiny_profiles["retention"])
    ctx = press.prefill(ids)
    torch.testing.assert_close(ctx.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert press.decode(ctx, 5).tokens == ref_tokens
    assert ctx.cache.stored_entries() == 3 * 2 * (48 + 4)
