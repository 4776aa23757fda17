"""The DiT adapters on tiny random diffusers transformers: keep-all = the unmodified model, batch = single, refusals."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from tokensieve.adapters.diffusion import dit_spec, load_transformer, sparsify
from tokensieve.attention import flex
from tokensieve.errors import CapabilityError, ConfigError, UnknownNameError


@pytest.fixture(autouse=True)
def _reference_kernel():
    previous = flex.set_compile(False)  # the kernel's reference path: no compilation in unit tests
    yield
    flex.set_compile(previous)


def tiny_wan(layers: int = 3):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=3,
        out_channels=3,
        text_dim=8,
        freq_dim=16,
        ffn_dim=32,
        num_layers=layers,
        rope_max_seq_len=32,
    ).eval()


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
    ).eval()


def wan_inputs(batch: int = 2, frames: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, frames, size, size, generator=g)
    text = torch.randn(batch, 3, 8, generator=g)
    return x, text


def run_wan(model, x, text, ts=(900, 500, 100)):
    outs = []
    with torch.no_grad():
        for t in ts:
            outs.append(model(x, torch.full((x.shape[0],), t), text, return_dict=False)[0])
    return outs


KEEP_ALL = [
    "full",
    "svg:1.0",
    "svg2[qc=4,kc=8,top_p=1,min_kc_ratio=1,warmup=0,dense_layers=0]",
    "vmoba[threshold=1.5]",
    "psa[e1=1,e2=1,e4=1,e8=1,warmup=0,block_m=16]",
    "adaspa[warmup=0]:1",
    "radial[warmup=0,dense_layers=0,block=64,decay=100]",
    "ras:1",
]


@pytest.mark.parametrize("spec", KEEP_ALL)
def test_wan_keep_all_is_the_unmodified_model(spec):
    model = tiny_wan()
    # Radial thins far frames by the frame size alone (its split rule ignores the decay): with 256 tokens a frame,
    # no frame of four is thinned, and a huge decay keeps every token of the others
    x, text = wan_inputs(size=32 if spec.startswith("radial") else 16)
    ref = run_wan(model, x, text)
    with sparsify(model, spec, num_steps=3) as sieve:
        got = run_wan(model, x, text)
        assert len(sieve.stats.records) == 3 * 3
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    # detaching puts the model's own processors back
    torch.testing.assert_close(run_wan(model, x, text)[0], ref[0], atol=0, rtol=0)


def test_wan_dense_calls_are_bitwise_the_model():
    model = tiny_wan()
    x, text = wan_inputs()
    ref = run_wan(model, x, text)
    with sparsify(model, "svg:0.3", num_steps=100):  # every call a warm-up step: diffusers' own dispatch
        got = run_wan(model, x, text)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


SPARSE = [
    "svg[warmup=0,dense_layers=0,round_to=1]:0.3",
    "svg2[qc=4,kc=8,warmup=0,dense_layers=0]",
    "radial[warmup=0,dense_layers=0,block=64]",
    "vmoba",
    "psa[warmup=0,block_m=16]",
    "adaspa[warmup=0]:0.3",
    "ras[warmup=0,reset_a=0,reset_b=0]:0.5",
]


@pytest.mark.parametrize("spec", SPARSE)
def test_wan_batch_equals_single(spec):
    model = tiny_wan()
    x, text = wan_inputs(batch=2)
    with sparsify(model, spec, num_steps=3) as sieve:
        both = run_wan(model, x, text)
        sieve.reset()
        one = run_wan(model, x[1:], text[1:])
    torch.testing.assert_close(both[-1][1:], one[-1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("spec", SPARSE)
def test_wan_sparse_methods_compute_less(spec):
    model = tiny_wan()
    x, text = wan_inputs(batch=1, frames=8, size=32)
    with sparsify(model, spec, num_steps=3) as sieve:
        run_wan(model, x, text)
    densities = [r.density for r in sieve.stats.records]
    assert min(densities) < 1.0
    assert all(0 < d <= 1 for d in densities)


def test_sd3_keep_all_and_batch():
    model = tiny_sd3()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 8, generator=g)

    def run():
        with torch.no_grad():
            return model(x, ctx, pooled, torch.tensor([500.0, 500.0]), return_dict=False)[0]

    ref = run()
    with sparsify(model, "svg2[qc=4,kc=8,top_p=1,min_kc_ratio=1,warmup=0,dense_layers=0]", num_steps=1) as sieve:
        got = run()
        assert len(sieve.modules) == 3  # two joint attentions and one dual-attention attn2
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    with sparsify(model, "vmoba[threshold=0.3]", num_steps=1):
        both = run()
        with torch.no_grad():
            one = model(x[1:], ctx[1:], pooled[1:], torch.tensor([500.0]), return_dict=False)[0]
    torch.testing.assert_close(both[1:], one, atol=1e-4, rtol=1e-3)


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="KV-cache method"):
        dit_spec("snapkv:0.25")
    with pytest.raises(ConfigError, match="visual-token method"):
        dit_spec("todre:0.1")
    with pytest.raises(ConfigError, match="names one method"):
        dit_spec("svg:0.3/radial")
    with pytest.raises(UnknownNameError, match="DiT methods: adaspa"):
        dit_spec("nope:0.3")
    # the other way round: a DiT method in a language model's spec
    from tokensieve.spec import Spec

    with pytest.raises(ConfigError, match="diffusion-transformer"):
        Spec.parse("svg:0.3")
    assert dit_spec("dit:full").label() == "full"
    with pytest.raises(ConfigError, match=r"takes no ':value'"):
        dit_spec("svg2:0.5")
    with pytest.raises(ConfigError, match="no parameter"):
        dit_spec("svg[bogus=1]")
    with pytest.raises(CapabilityError, match="Wan transformers only"):
        sparsify(tiny_sd3(), "ras:0.5", num_steps=2)
    with pytest.raises(CapabilityError):
        sparsify(torch.nn.Linear(2, 2), "svg:0.3")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "LlamaForCausalLM"}))
    with pytest.raises(ConfigError, match="not a diffusers transformer"):
        load_transformer(tmp_path)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_transformer(_empty_dir(tmp_path))
    model = tiny_wan()
    with sparsify(model, "svg:0.3") as _, pytest.raises(ConfigError, match="number of denoising steps"):
        run_wan(model, *wan_inputs())


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_load_transformer_roundtrip(tmp_path):
    model = tiny_wan(layers=1)
    model.save_pretrained(tmp_path / "wan")
    back = load_transformer(tmp_path / "wan")
    x, text = wan_inputs(batch=1)
    torch.testing.assert_close(run_wan(back, x, text)[0], run_wan(model, x, text)[0])
