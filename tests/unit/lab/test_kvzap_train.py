"""`tokensieve train kvzap`: KVzip+ targets against the official collector's formula (eager attention weights from a
forward hook, as kvpress's kvzap/data.py reads them), the repeat prompt, the fits, resuming, and a whole tiny run."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import tokensieve as ts
from tests.conftest import make_tiny_model
from tokensieve.adapters.models import layer_weights
from tokensieve.errors import ConfigError
from tokensieve.methods.kv.kvzap_surrogate import KVzapSurrogate, ridge
from tokensieve.train.kvzap import KVzapTrainConfig, KVzapTrainer, kvzip_plus, passages, repeat_prompt
from tokensieve.train.spkv import _Observe


@torch.no_grad()
def official_scores(model, ids, original, repeated):
    """kvzap/data.py's hook, written out: eager attention weights / ||h|| (query rows) * ||W_o^h v|| (key columns),
    max over the repeated text's rows, then over the KV group, log."""
    eager = make_tiny_model()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    out = {}

    def hook(module, args, kwargs, output):
        h = kwargs["hidden_states"]
        v = module.v_proj(h).view(1, h.shape[1], -1, module.head_dim).transpose(1, 2)
        s = output[1] / h.norm(dim=-1)[:, None, :, None]
        v = v.repeat_interleave(module.num_key_value_groups, dim=1)
        wo = module.o_proj.weight.T.view(module.config.num_attention_heads, module.head_dim, -1)
        s = s * torch.einsum("hij,bhti->bhtj", wo, v).norm(dim=-1)[:, :, None, :]
        s = s[:, :, repeated[0] : repeated[1], original[0] : original[1]].amax(2)
        s = s.view(1, module.config.num_key_value_heads, module.num_key_value_groups, -1).amax(2)
        out[module.layer_idx] = s[0].log()

    hs = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in eager.model.layers]
    try:
        eager(torch.tensor([ids]))
    finally:
        for h in hs:
            h.remove()
    return out


def test_kvzip_plus_matches_the_official_collector(tiny_model):
    ids = torch.randint(3, 97, (40,)).tolist()
    original, repeated = (3, 17), (20, 34)
    ids[repeated[0] : repeated[1]] = ids[original[0] : original[1]]
    want = official_scores(tiny_model, ids, original, repeated)
    got = {}
    weights = layer_weights(tiny_model)

    def grab(ctx):
        got[ctx.layer_idx] = kvzip_plus(ctx, weights.out_proj[ctx.layer_idx], original, repeated, chunk=5)

    with torch.no_grad():
        ts.compress(tiny_model, _Observe(callback=grab), 1.0).prefill(torch.tensor([ids]))
    for layer in range(3):
        torch.testing.assert_close(got[layer], want[layer], atol=1e-4, rtol=1e-4)


class _Tok:
    """A character tokenizer with a ChatML-like template (enough for the repeat prompt and the passages)."""

    chat_template = "x"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(ch) % 90) for ch in text]}

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>\n{m['content']}<end>\n" for m in messages)


def test_repeat_prompt_holds_the_text_twice_with_the_same_ids():
    tok = _Tok()
    text = [5, 6, 7, 8, 9]
    ids, (s0, e0), (s1, e1) = repeat_prompt(tok, text)
    assert ids[s0:e0] == text
    assert ids[s1:e1] == text
    assert e0 < s1
    assert ids[:s0] == tok("<user>\n")["input_ids"]
    middle = tok("\n\nRepeat the previous context exactly.<end>\n<assistant>\n")["input_ids"]
    assert ids[e0:s1] == middle


def test_passages_start_at_paragraphs_and_have_lengths_in_range():
    tok = _Tok()
    text = "\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(200))
    ps = passages(tok, text, 6, 30, 50, seed=0)
    assert len(ps) == 6
    assert all(30 <= len(p) <= 50 for p in ps)
    assert all(p[:9] == tok("paragraph")["input_ids"] for p in ps)
    assert len({tuple(p[:14]) for p in ps}) == 6  # spread over the text, not the same start


def test_ridge_matches_the_closed_form_with_an_unpenalised_intercept():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) + 3.0
    y = x @ torch.randn(5, 2, generator=g) + torch.tensor([1.0, -2.0])
    w, b = ridge(x, y, alpha=1e-9)
    torch.testing.assert_close(x @ w.T + b, y, atol=1e-3, rtol=1e-3)
    w1, _ = ridge(x, y, alpha=1e4)
    assert w1.norm() < w.norm()  # the penalty shrinks the weights, not the intercept


def test_config_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="forms"):
        KVzapTrainer(KVzapTrainConfig(out=str(tmp_path / "a"), forms="tree"))
    with pytest.raises(ConfigError, match="tokens"):
        KVzapTrainer(KVzapTrainConfig(out=str(tmp_path / "b"), tokens=2000))
    with pytest.raises(ConfigError, match="lr"):
        KVzapTrainer(KVzapTrainConfig(out=str(tmp_path / "c"), lr=float("nan")))


def test_a_whole_tiny_run_resumes_and_makes_a_loadable_profile(tmp_path, monkeypatch):
    """The real pipeline on the tiny model (a character tokenizer, generated text): collect, fit both forms, evaluate,
    write the profile; a rerun resumes (nothing collected twice, the MLP fit restarts from its checkpoint)."""
    model = make_tiny_model()
    tok = _Tok()
    cfg = KVzapTrainConfig(out=str(tmp_path / "run"), sources="generated", per_source=4, heldout_per_source=2,
                           min_tokens=40, max_tokens=60, tokens=16, mlp_hidden=8, epochs=3, batch=16,
                           checkpoint_every=2, threads=1)  # fmt: skip
    trainer = KVzapTrainer(cfg, progress=False)
    trainer._model = (model, tok)
    path = trainer.run()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_texts"] == 4
    assert metrics["heldout_texts"] == 2
    assert metrics["sources"] == ["generated"]
    assert len(metrics["r2_linear_per_layer"]) == 3
    assert len(metrics["r2_mlp_per_layer"]) == 3
    assert metrics["r2_linear_mean"] > -1.0  # a fit, not noise (the tiny model's scores are learnable at all)
    from tokensieve.adapters.profiles import Profile, _with_tensors

    raw = json.loads(path.read_text())
    loaded = _with_tensors(Profile(**raw), path)
    from tokensieve.adapters.models import model_shape

    surrogate = loaded.content(model_shape(model))
    assert isinstance(surrogate, KVzapSurrogate)
    assert surrogate.forms() == ["mlp", "linear"]
    dens = surrogate.calibration["mlp"]["density"]
    assert all(a >= b for a, b in itertools.pairwise(dens))  # a higher threshold keeps fewer entries
    # resume: nothing is collected twice; the fit continues from its checkpoint
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 3 * 4  # 3 epochs of ceil(64 / 16) minibatches
    again = KVzapTrainer(cfg, progress=False)
    again._model = (model, tok)
    again.run()
    log2 = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert not any('"stage": "collect"' in line and '"text"' in line for line in log2[len(log) :])
    with pytest.raises(ConfigError, match="other settings"):
        KVzapTrainer(KVzapTrainConfig(**{**cfg.__dict__, "epochs": 4}), progress=False)
