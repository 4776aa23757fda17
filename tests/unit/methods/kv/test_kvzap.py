"""KVzap: the surrogate's top-k / threshold rules against references written from the paper's code (not from our
helpers), keep-everything parity with transformers, batching, decode-time eviction replayed independently, the
profile file and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.adapters.profiles import Profile, load_profile, save_profile
from tokensieve.data.prompts import left_pad
from tokensieve.errors import ConfigError
from tokensieve.methods.kv.kvzap import KVzap


def prompts(seed=0, lengths=(48, 30, 41)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def stored_positions(ctx, b=0):
    out = {}
    for li, layer in enumerate(ctx.cache.layers):
        for h in range(ctx.cache.lengths().shape[2]):
            out[(li, h)] = set(layer.store.row(b, h)[2].tolist())
    return out


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def surrogate_scores(t, form, layer, h):
    """The official KVzapModel's layer module, written out: Linear, or Linear → GELU → Linear. ``h (T, d)`` →
    ``(H, T)``."""
    if form == "linear":
        return (h @ t["linear.weight"][layer].T + t["linear.bias"][layer]).T
    z = gelu(h @ t["mlp.w1"][layer].T + t["mlp.b1"][layer])
    return (z @ t["mlp.w2"][layer].T + t["mlp.b2"][layer]).T


@torch.no_grad()
def reference_scores(model, tensors, ids, form):
    """Per layer ``(H, T)``: the surrogate on each layer's attention input = input_layernorm(residual stream)."""
    out = model(ids, output_hidden_states=True)
    return [
        surrogate_scores(tensors, form, li, layer.input_layernorm(out.hidden_states[li][0]))
        for li, layer in enumerate(model.model.layers)
    ]


def topk_rule(s, b, window):
    """ScorerPress's rule with a protected recent window: the last ``window`` positions, then the best scores."""
    T = s.shape[-1]
    kept = set(range(max(0, T - window), T))
    order = sorted(range(T - window if window else T), key=lambda j: (-float(s[j]), j))
    kept |= set(order[: max(0, b - len(kept))])
    return kept


def dms_rule(s, n, window, threshold):
    """DMSPress after the prefill: the last ``window`` tokens stay (the buffer), older ones iff score >= threshold."""
    return {j for j in range(n) if j >= n - window or float(s[j]) >= threshold}


@pytest.mark.parametrize("form", ["mlp", "linear"])
@torch.inference_mode()
def test_fixed_ratio_keeps_each_heads_top_scores(form, tiny_model, tiny_profiles):
    prof = tiny_profiles["kvzap"]
    ids = torch.tensor([prompts()[0]])
    for window in (0, 5):
        spec = f"kvzap[surrogate={form},window={window}]"
        ctx = ts.compress(tiny_model, spec, 0.25, profile=prof).prefill(ids)
        b = ts.Budget.ratio(0.25).tokens_for(48)
        ref = reference_scores(tiny_model, prof.data["tensors"], ids, form)
        want = {(li, h): topk_rule(ref[li][h], b, window) for li in range(3) for h in range(2)}
        assert stored_positions(ctx) == want


@pytest.mark.parametrize(("threshold", "window"), [(-1.0, 8), (0.5, 0), (-0.3, 128)])
@torch.inference_mode()
def test_threshold_keeps_the_window_and_scores_above_it(threshold, window, tiny_model, tiny_profiles):
    prof = tiny_profiles["kvzap"]
    ids = torch.tensor([prompts()[0]])
    ctx = ts.compress(tiny_model, f"kvzap[threshold={threshold},window={window}]", profile=prof).prefill(ids)
    ref = reference_scores(tiny_model, prof.data["tensors"], ids, "mlp")
    want = {(li, h): dms_rule(ref[li][h], 48, window, threshold) for li in range(3) for h in range(2)}
    assert stored_positions(ctx) == want
    counts = {len(v) for v in want.values()}
    if window < 48:
        assert len(counts) > 1  # variable density: each row keeps its own count
    assert ctx.cache.kv_bytes() == ctx.cache.stored_entries() * 2 * 8 * 4  # ragged rows, exact bytes


@torch.inference_mode()
def test_global_allocation_keeps_the_best_scores_of_the_whole_model(tiny_model, tiny_profiles):
    prof = tiny_profiles["kvzap"]
    ids = torch.tensor([prompts()[0]])
    ctx = ts.compress(tiny_model, "kvzap[allocation=global]", 0.25, profile=prof).prefill(ids)
    b = ts.Budget.ratio(0.25).tokens_for(48)
    ref = torch.stack(reference_scores(tiny_model, prof.data["tensors"], ids, "mlp"))  # (L, H, T)
    top = set(ref.flatten().topk(3 * 2 * b).indices.tolist())
    want = {(li, h): {t for t in range(48) if (li * 2 + h) * 48 + t in top} for li in range(3) for h in range(2)}
    assert stored_positions(ctx) == want
    assert ctx.cache.stored_entries() == 3 * 2 * b


@pytest.mark.parametrize("spec", ["kvzap:1.0", "kvzap[threshold=-1000000000.0,decoding=true]"])
@torch.inference_mode()
def test_keeping_everything_equals_plain_transformers(spec, tiny_model, tiny_profiles):
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        plain = tiny_model(ids).logits[0, -1]
    press = ts.compress(tiny_model, spec, profile=tiny_profiles["kvzap"])
    ctx = press.prefill(ids)
    torch.testing.assert_close(ctx.logits[0], plain, atol=1e-4, rtol=1e-4)
    gen = press.decode(ctx, 6)
    full = ts.compress(tiny_model, "full")
    ref = full.prefill(ids)
    assert gen.tokens == full.decode(ref, 6).tokens
    assert ctx.cache.stored_entries() == 3 * 2 * (48 + 5)


@pytest.mark.parametrize("spec", ["kvzap:0.3", "kvzap[allocation=global]:0.3", "kvzap[threshold=-0.5,window=6]",
                                  "kvzap[threshold=-0.5,window=6,decoding=true]"])  # fmt: skip
@torch.inference_mode()
def test_batch_equals_single(spec, tiny_model, tiny_profiles):
    prof = tiny_profiles["kvzap"]
    rows = prompts(seed=1)
    ids, mask = left_pad(rows, 0)
    press = ts.compress(tiny_model, spec, profile=prof)
    ctx = press.prefill(ids, mask)
    first = ctx.logits.clone()
    kept = [stored_positions(ctx, b) for b in range(len(rows))]
    gen = press.decode(ctx, 12)
    for b, r in enumerate(rows):
        alone = press.prefill(torch.tensor([r]))
        torch.testing.assert_close(first[b], alone.logits[0], atol=1e-4, rtol=1e-4)
        assert kept[b] == stored_positions(alone)
        assert press.decode(alone, 12).tokens[0] == gen.tokens[b]
        assert stored_positions(ctx, b) == stored_positions(alone)


@torch.inference_mode()
def test_decoding_decides_each_token_as_it_leaves_the_window(tiny_model, tiny_profiles):
    """An independent replay of DMSPress with decoding: the hidden states each attention module reads are recorded by
    the test's own hooks during the compressed run; a token is kept iff it is among the last w + 1 positions or its
    score (the surrogate on its own hidden state) reaches the threshold."""
    prof = tiny_profiles["kvzap"]
    t = prof.data["tensors"]
    w, thr = 6, -0.5
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}

    def hook(module, args, kwargs):
        seen[module.layer_idx].append(kwargs["hidden_states"][0].clone())

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in tiny_model.model.layers]
    try:
        press = ts.compress(tiny_model, f"kvzap[threshold={thr},window={w},decoding=true]", profile=prof)
        ctx = press.prefill(torch.tensor([prompts()[0]]))
        press.decode(ctx, 20)
    finally:
        for h in handles:
            h.remove()
    got = stored_positions(ctx)
    newest = 48 + 19 - 1  # the last decode step wrote position 66 and attended
    for li in range(3):
        h_all = torch.cat(seen[li])  # (48 + 19, d): prompt, then one row per decode step
        s = surrogate_scores(t, "mlp", li, h_all)
        for hh in range(2):
            want = {j for j in range(newest + 1) if newest - j <= w or float(s[hh, j]) >= thr}
            assert got[(li, hh)] == want
    assert ctx.cache.stored_entries() < 3 * 2 * (newest + 1)  # something was dropped while decoding


@torch.inference_mode()
def test_query_agnostic_extend_scores_the_question_when_appended(tiny_model, tiny_profiles):
    prof = tiny_profiles["kvzap"]
    press = ts.compress(tiny_model, "kvzap[threshold=-0.5,window=4,decoding=true]", profile=prof)
    ctx = press.prefill(torch.tensor([prompts()[0]]))
    press.extend(ctx, torch.tensor([[5, 6, 7, 8, 9, 10]]))
    gen = press.decode(ctx, 8)
    assert len(gen.tokens[0]) == 8
    lengths = ctx.cache.lengths()
    assert int(lengths.min()) >= 4 + 1
    assert int(lengths.max()) < 48 + 6 + 7


def test_refusals_name_what_to_do(tiny_model, tiny_profiles, tmp_path, monkeypatch):
    prof = tiny_profiles["kvzap"]
    with pytest.raises(ConfigError, match="threshold"):
        KVzap(decoding=True)
    with pytest.raises(ConfigError, match="allocation"):
        KVzap(threshold=-4.0, allocation="global")
    with pytest.raises(ConfigError, match="surrogate"):
        ts.compress(tiny_model, "kvzap[surrogate=tree]", 0.3, profile=prof)
    with pytest.raises(ts.CapabilityError, match="own prefill"):
        ts.compress(tiny_model, "snapkv:0.3+kvzap[threshold=-4,decoding=true]", profile=prof)
    press = ts.compress(tiny_model, "kvzap", 0.3, profile=prof)
    with pytest.raises(ts.CapabilityError, match="chunk"):
        press.prefill(torch.tensor([prompts()[0]]), chunk=8)
    with pytest.raises(ConfigError, match="budget"):
        ts.compress(tiny_model, "kvzap", profile=prof)  # the fixed-ratio form needs a budget
    ts.compress(tiny_model, "kvzap[threshold=-4]", profile=prof)  # the threshold form does not
    monkeypatch.setenv("TOKENSIEVE_HOME", str(tmp_path))
    with pytest.raises(ts.CapabilityError, match="tokensieve train kvzap"):
        ts.compress(tiny_model, "kvzap", 0.5)  # no surrogate for this model: the error names the command


def test_profile_weights_live_in_a_safetensors_file(tiny_model, tiny_profiles, tmp_path, monkeypatch):
    from tokensieve.adapters.models import model_shape

    monkeypatch.setenv("TOKENSIEVE_HOME", str(tmp_path))
    prof = tiny_profiles["kvzap"]
    shape = model_shape(tiny_model)
    path = save_profile(Profile("kvzap", shape.key, prof.shape, {}, dict(prof.data)))
    assert (path.parent / "kvzap.safetensors").is_file()
    assert '"tensors": "kvzap.safetensors"' in path.read_text()
    back = load_profile("kvzap", shape)
    assert back is not None
    for k, v in prof.data["tensors"].items():
        assert torch.equal(back.data["tensors"][k], v)
    ids = torch.tensor([prompts()[0]])
    a = ts.compress(tiny_model, "kvzap", 0.3).prefill(ids)  # found in the user's profiles
    b = ts.compress(tiny_model, "kvzap", 0.3, profile=prof).prefill(ids)
    assert stored_positions(a) == stored_positions(b)
    (path.parent / "kvzap.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing"):
        load_profile("kvzap", shape)


def test_methods_listing_says_kvzap_needs_a_trained_profile():
    from tokensieve.registry import list_methods

    info = {i.name: i for i in list_methods()}
    assert "tokensieve train kvzap" in info["kvzap"].profile
    assert "trained" in info["kvzap"].profile
    assert "tokensieve train spkv" in info["spkv"].profile
    assert info["snapkv"].profile == ""
