"""SP-KV with the paper's predictor input (the token's hidden state) and the KVzip+ training target: the gate rule
against a reference written from the model's own layers, decode-time decisions replayed from hidden states the test
records itself, refusals, and a tiny training run with both options."""

from __future__ import annotations

import json

import pytest
import torch

import tokensieve as ts
from tests.conftest import make_tiny_model
from tokensieve.adapters.models import model_shape
from tokensieve.adapters.profiles import Profile, shape_dict
from tokensieve.methods.kv.spkv_gate import SPKVGates
from tokensieve.train.spkv import SPKVTrainConfig, SPKVTrainer


def prompts(seed=0, lengths=(48, 30, 41)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hidden_gate(tiny_model):
    shape = model_shape(tiny_model)
    L, H, d = shape.num_layers, shape.num_kv_heads, shape.hidden_size
    g = torch.Generator().manual_seed(3)
    layers = [{"w1": (torch.randn(H, d, generator=g) * d**-0.5 * 3).tolist(), "b1": [0.0] * H} for _ in range(L)]
    data = {"window": 8, "hidden": 0, "input": "hidden", "layers": layers,
            "calibration": {"tau": [0.1, 0.5, 0.9], "out_density": [0.9, 0.5, 0.1]}}  # fmt: skip
    return Profile("spkv", shape.key, shape_dict(shape), {}, data)


def utilities(model, prof, ids):
    """Per layer ``(H, T)``: sigmoid(W h + b), h = the layer's input_layernorm of the residual stream."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    res = []
    for li, layer in enumerate(model.model.layers):
        w = torch.tensor(prof.data["layers"][li]["w1"])
        b = torch.tensor(prof.data["layers"][li]["b1"])
        res.append(torch.sigmoid(layer.input_layernorm(out.hidden_states[li][0]) @ w.T + b).T)
    return res


def stored(ctx, b=0):
    return {
        (li, h): set(layer.store.row(b, h)[2].tolist()) for li, layer in enumerate(ctx.cache.layers) for h in range(2)
    }


@torch.inference_mode()
def test_hidden_state_gate_keeps_the_window_and_useful_pairs(tiny_model, hidden_gate):
    ids = torch.tensor([prompts()[0]])
    tau, w = 0.5, 6
    ctx = ts.compress(tiny_model, f"spkv[tau={tau},window={w}]", profile=hidden_gate).prefill(ids)
    u = utilities(tiny_model, hidden_gate, ids)
    want = {
        (li, h): {j for j in range(48) if 48 - j < w or float(u[li][h, j]) >= tau} for li in range(3) for h in range(2)
    }
    assert stored(ctx) == want
    assert isinstance(hidden_gate.content(model_shape(tiny_model)), SPKVGates)


@torch.inference_mode()
def test_hidden_state_gate_decides_decoded_tokens_from_their_own_hidden_states(tiny_model, hidden_gate):
    tau, w, steps = 0.5, 6, 16
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}

    def hook(module, args, kwargs):
        seen[module.layer_idx].append(kwargs["hidden_states"][0].clone())

    hs = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in tiny_model.model.layers]
    try:
        press = ts.compress(tiny_model, f"spkv[tau={tau},window={w}]", profile=hidden_gate)
        ctx = press.prefill(torch.tensor([prompts()[0]]))
        press.decode(ctx, steps)
    finally:
        for h in hs:
            h.remove()
    newest = 48 + steps - 2
    for li in range(3):
        hid = torch.cat(seen[li])
        wt = torch.tensor(hidden_gate.data["layers"][li]["w1"])
        u = torch.sigmoid(hid @ wt.T).T  # (H, T)
        for h in range(2):
            want = {p for p in range(newest + 1) if newest - p < w or float(u[h, p]) >= tau}
            assert stored(ctx)[(li, h)] == want
    assert sum(layer.decode.state.dropped for layer in ctx.cache.layers) > 0


@torch.inference_mode()
def test_hidden_state_gate_batch_equals_single_and_refuses_to_follow_another_prefill(tiny_model, hidden_gate):
    rows = prompts(seed=1)
    from tokensieve.data.prompts import left_pad

    ids, mask = left_pad(rows, 0)
    press = ts.compress(tiny_model, "spkv[tau=0.5,window=5]", profile=hidden_gate)
    ctx = press.prefill(ids, mask)
    gen = press.decode(ctx, 10)
    for b, r in enumerate(rows):
        alone = press.prefill(torch.tensor([r]))
        assert press.decode(alone, 10).tokens[0] == gen.tokens[b]
        assert stored(ctx, b) == stored(alone)
    other = ts.compress(tiny_model, "snapkv:0.5+spkv[tau=0.5]", profile=hidden_gate)
    with pytest.raises(ts.CapabilityError, match="--input kv"):
        other.decode(other.prefill(torch.tensor([rows[0]])), 3)


class _Tok:
    chat_template = "x"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(ch) % 90) for ch in text]}

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>\n{m['content']}<end>\n" for m in messages)


def test_training_with_the_hidden_input_and_the_kvzip_plus_target(tmp_path):
    model = make_tiny_model()
    cfg = SPKVTrainConfig(out=str(tmp_path / "run"), sources="generated,stdlib", length=96, sequences=4, heldout=2,
                          window=8, horizon=16, samples=24, steps=6, batch=16, threads=1, input="hidden",
                          target="kvzip+")  # fmt: skip
    trainer = SPKVTrainer(cfg, progress=False)
    trainer._model = (model, _Tok())
    path = trainer.run()
    raw = json.loads(path.read_text())
    assert raw["data"]["input"] == "hidden"
    assert "KVzip+" in raw["settings"]["objective"]
    shard = torch.load(tmp_path / "run" / "collect" / "0000.pt")
    assert shard["feats"].shape == (3, 24, model.config.hidden_size)  # hidden states of 24 sampled text tokens
    assert bool((shard["oracle"] > 0).all())  # KVzip+ scores (exp of the log score), every key has one
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["heldout_keys_per_layer"] == 2 * 96  # every key of the held-out texts
    prof = Profile(**raw)
    ctx = ts.compress(model, "spkv[tau=0.5]", profile=prof).prefill(torch.tensor([prompts()[0]]))
    assert 0 < ctx.cache.stored_entries() <= 3 * 2 * 48
    with pytest.raises(ts.ConfigError, match="--target"):
        SPKVTrainConfig(out=str(tmp_path / "x"), target="oracle").check()


# ------------------------------------------------------------------------------------------------ hard-gate stage
def test_gated_attention_is_the_attention_of_the_evicted_cache():
    """Forward value of the straight-through gate: keys out of the window with u < tau are gone, exactly as if
    evicted (a reference written with a -inf mask)."""
    from tokensieve.train.spkv_hard import gate_keep, gated_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, 12, 8, generator=g),
        torch.randn(1, 2, 12, 8, generator=g),
        torch.randn(1, 2, 12, 8, generator=g),
    )
    u = torch.rand(1, 2, 12, generator=g, requires_grad=True)
    out = gated_attention(q, k, v, gate_keep(u, 0.5), window=3, scaling=8**-0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    z = (q @ kk.transpose(-1, -2)) * 8**-0.5
    t = torch.arange(12)
    keep = (t[:, None] - t[None, :] < 3)[None, None] | (u.detach() >= 0.5).repeat_interleave(2, 1)[:, :, None, :]
    keep &= (t[None, :] <= t[:, None])[None, None]
    ref = torch.softmax(z.masked_fill(~keep, float("-inf")), -1) @ vv
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert u.grad is not None
    assert float(u.grad.abs().sum()) > 0


def test_hard_stage_with_open_gates_reproduces_the_teacher_and_trains_the_gate(tmp_path):
    from tokensieve.methods.kv.spkv_gate import GateNet
    from tokensieve.train.spkv_hard import HardGateRun, student_loss

    model = make_tiny_model()
    shape = model_shape(model)
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        teacher = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    for source, F in (("kv", 2 * 2 * 8), ("hidden", shape.hidden_size)):
        net = GateNet(3, F, 2)
        with torch.no_grad():
            net.b1.fill_(8.0)  # every gate open: the student is the teacher
        run = HardGateRun(model, net, shape, window=4, tau=0.5, source=source)
        with torch.enable_grad():
            loss, kl, share = student_loss(run, ids, teacher, density=0.25, weight=1.0)
        assert kl < 1e-5
        assert share == pytest.approx(1.0)
        with torch.no_grad():
            net.b1.fill_(0.0)
            net.w1.normal_(0, 0.5)
        with torch.enable_grad():
            loss, kl, share = student_loss(run, ids, teacher, density=0.25, weight=1.0)
            loss.backward()
        assert kl > 1e-4
        assert 0 < share < 1
        assert float(net.w1.grad.abs().sum()) > 0
        assert model.config._attn_implementation == "sdpa"  # restored
    cfg = SPKVTrainConfig(out=str(tmp_path / "run"), sources="generated", length=64, sequences=2, heldout=1, window=8,
                          horizon=16, samples=16, steps=4, batch=8, threads=1, hard_steps=3)  # fmt: skip
    trainer = SPKVTrainer(cfg, progress=False)
    trainer._model = (model, _Tok())
    trainer.run()
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count('"stage": "hard"') == 3
    assert torch.load(tmp_path / "run" / "hard.pt")["step"] == 3


@torch.inference_mode()
def test_hidden_state_gate_keeping_everything_equals_plain_transformers(tiny_model, hidden_gate):
    ids = torch.tensor([prompts()[0]])
    full = ts.compress(tiny_model, "full")
    ref = full.prefill(ids)
    ref_logits, ref_tokens = ref.logits.clone(), full.decode(ref, 6).tokens
    press = ts.compress(tiny_model, "spkv:1.0", profile=hidden_gate)
    ctx = press.prefill(ids)
    torch.testing.assert_close(ctx.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert press.decode(ctx, 6).tokens == ref_tokens
    assert ctx.cache.stored_entries() == 3 * 2 * (48 + 5)
