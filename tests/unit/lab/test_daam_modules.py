"""tokensieve.nn: the Gaussian (density-adaptive) attention forms and the DAAM speech networks."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.errors import ConfigError
from tokensieve.nn import (
    DAAMAudioCNNLSTM,
    DAAMAudioTransformer,
    DensityAdaptiveAttention,
    FrameScorer,
    GaussianBlock,
    GroupedQueryAttention,
    GroupedQueryDAAM,
    MultiHeadGaussianAdaptiveAttention,
    count_parameters,
    head_sizes,
    moments,
)

# ----------------------------------------------------------------------------------- references from the official code
# Written from the formulas of the authors' code (gioannides/Gaussian-Adaptive-Attention GaussianBlock.py, the speech
# code sdsuai/depression_audio_processing exp_run/models_pytorch.py, gioannides/DAAM-PEFT-paper-code GQDAAM.py), one
# head and one Gaussian at a time, sharing nothing with tokensieve.nn but the parameter values.


def _official_gaussian_head(x: torch.Tensor, offsets: torch.Tensor, c: torch.Tensor, dim: int) -> torch.Tensor:
    """One Form A head: running product of the Gaussians, divided by its sum clamped at 1e-8."""
    eps = 1e-8
    mean = x.mean(dim=dim, keepdim=True)
    var = x.var(dim=dim, keepdim=True) + eps
    mixture: torch.Tensor | float = 1.0
    for i in range(len(offsets)):
        y_norm = (x - (mean + offsets[i])) / torch.sqrt(var)
        gaussian = torch.exp(-((y_norm**2) / (2.0 * c[i] ** 2))) / torch.sqrt(2 * torch.pi * c[i] ** 2)
        mixture = mixture * gaussian
    assert isinstance(mixture, torch.Tensor)
    return mixture / mixture.sum(dim=dim, keepdim=True).clamp(min=eps)


def _official_gaussian_layer(x: torch.Tensor, offsets: torch.Tensor, c: torch.Tensor, axis: int) -> torch.Tensor:
    """Form A's multi-head layer: chunks of len // H along the axis (the last takes the rest); the weights."""
    heads = offsets.shape[0]
    size = x.shape[axis] // heads
    out = []
    for h in range(heads):
        end = x.shape[axis] if h == heads - 1 else (h + 1) * size
        out.append(_official_gaussian_head(x.narrow(axis, h * size, end - h * size), offsets[h], c[h], axis))
    return torch.cat(out, dim=axis)


def _official_daam(x: torch.Tensor, offsets: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Form B, multi-head, as DAAM-PEFT's MultiHeadDAAM: x (B, rows, features); head i owns rows
    [i·rows/H, (i+1)·rows/H) and full-width vectors offsets[i], c[i] (features,)."""
    b, rows, feats = x.shape
    heads = offsets.shape[0]
    per = rows // heads
    xs = x.reshape(b, heads, per, 1, feats)  # one time step, as every official model passes
    outs = []
    for i in range(heads):
        xi = xs[:, i]  # (B, per, 1, F)
        y = xi.reshape(b, per * feats, 1).mean(-1).reshape(b, per, feats)  # the adaptive average over time
        mean = y.mean(dim=1, keepdim=True)
        var = abs((y**2).mean(dim=1, keepdim=True) - mean**2) + 1e-8
        y_norm = (y - (mean + offsets[i])) / torch.sqrt(var + 1e-5)
        g = torch.exp(-(y_norm**2 / (2 * c[i])))
        outs.append((xi * g.unsqueeze(2)).mean(dim=2))
    return torch.cat(outs, dim=1).reshape(b, rows, feats)


def _official_gqa(layer: GroupedQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of DAAM-PEFT's MultiheadGQA written per key/value head: queries divided by √d, logits summed
    over the group's query heads and divided by √d again, softmax, values; layer norm; output projection."""
    b, n, _ = x.shape
    hq, hk = layer.query_heads, layer.kv_heads
    d = layer.head_dim
    groups = hq // hk
    q = (x @ layer.q_proj.weight.T + layer.q_proj.bias).reshape(b, n, hq, d) / d**0.5
    k = (x @ layer.k_proj.weight.T + layer.k_proj.bias).reshape(b, n, hk, d)
    v = (x @ layer.v_proj.weight.T + layer.v_proj.bias).reshape(b, n, hk, d)
    heads = []
    for h in range(hk):
        sim = sum(q[:, :, h * groups + g] @ k[:, :, h].transpose(1, 2) for g in range(groups))
        attn = torch.softmax(sim / d**0.5, dim=-1)  # type: ignore[operator]
        heads.append(attn @ v[:, :, h])  # (B, n, d)
    out = torch.cat(heads, dim=-1)
    assert layer.norm is not None
    out = torch.nn.functional.layer_norm(out, (hk * d,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    return out @ layer.out_proj.weight.T + layer.out_proj.bias


def test_head_sizes_last_takes_remainder() -> None:
    assert head_sizes(40, 4) == [10, 10, 10, 10]
    assert head_sizes(10, 3) == [3, 3, 4]
    with pytest.raises(ConfigError):
        head_sizes(3, 4)


def test_moments_variance_options() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    _, unbiased = moments(x, 1, "unbiased", 0.0)
    _, population = moments(x, 1, "population", 0.0)
    assert unbiased.item() == pytest.approx(14 / 3)
    assert population.item() == pytest.approx(3.5)


def test_form_a_matches_the_official_layer() -> None:
    torch.manual_seed(0)
    layer = MultiHeadGaussianAdaptiveAttention(axis=1, heads=3, gaussians=4)  # 10 bands → chunks of 3, 3, 4
    with torch.no_grad():
        layer.offsets.normal_(0, 0.3)
    x = torch.randn(2, 10, 5)
    y, w = layer(x, return_weights=True)
    assert y.shape == w.shape == x.shape
    ref = _official_gaussian_layer(x, layer.offsets.detach(), layer.scales.detach(), 1)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y, x * ref, rtol=1e-5, atol=1e-7)
    # a block of two layers, each with the official residual
    block = GaussianBlock((1, 2), (2, 1), 3)
    out, ws = block(x, return_weights=True)
    h = x
    for lay in block.layers:
        h = h * _official_gaussian_layer(h, lay.offsets.detach(), lay.scales.detach(), lay.axis) + h
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-6)
    assert len(ws) == 2


def test_form_a_matches_the_official_loop_where_the_gaussians_are_narrow() -> None:
    """The speech networks' regime: c from N(0, 1) (some |c| ≪ 1), 24 Gaussians per 10-band head, 16 per 30-frame
    head. The one-Gaussian form agrees with the official float32 loop to float32 rounding."""
    for seed, (axis, gaussians) in enumerate([(1, 24), (2, 16), (1, 24)]):
        torch.manual_seed(seed)
        layer = MultiHeadGaussianAdaptiveAttention(axis, 4, gaussians, c_init="normal")
        with torch.no_grad():
            layer.offsets.normal_(0, 0.5)
        x = torch.randn(3, 40, 120)
        w = layer.weights(x)
        ref = _official_gaussian_layer(x, layer.offsets.detach(), layer.scales.detach(), axis)
        torch.testing.assert_close(w, ref, rtol=5e-4, atol=1e-6)
        assert bool((ref == 0).any())  # some products underflow in this regime …
        assert torch.equal(w[ref > 1e-6] > 0, torch.ones_like(w[ref > 1e-6], dtype=torch.bool))  # … not the others


def test_form_a_divides_by_the_sum_clamped_at_1e_8() -> None:
    """Where the product of a head's Gaussians sums to less than ε = 1e-8 over its chunk, the official layer divides
    by ε (the weights sum to less than 1); where it underflows to 0 the head passes x through. The log-space
    ``stable`` form gives a distribution in both cases."""
    layer = MultiHeadGaussianAdaptiveAttention(axis=1, heads=2, gaussians=1)
    stable = MultiHeadGaussianAdaptiveAttention(axis=1, heads=2, gaussians=1, stable=True)
    with torch.no_grad():
        layer.scales.fill_(1.0)
        layer.offsets.copy_(torch.tensor([[10.0], [40.0]]))  # head 0: sum ≈ 2e-10, in (0, ε); head 1: exp(−480) = 0
    stable.load_state_dict(layer.state_dict())
    torch.manual_seed(1)
    # every chunk of 4 bands holds −1.5, −0.5, 0.5, 1.5 (in some order) plus a shift: z = (value − 10) / 1.29
    pattern = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    x = torch.stack([pattern[torch.randperm(4)] for _ in range(3 * 2 * 5)]).reshape(3, 5, 2, 4)
    x = (x + torch.randn(3, 5, 2, 1)).reshape(3, 5, 8).transpose(1, 2)  # (3, 8 bands, 5 frames)
    w = layer.weights(x)
    ref = _official_gaussian_layer(x, layer.offsets.detach(), layer.scales.detach(), 1)
    torch.testing.assert_close(w, ref, rtol=1e-4, atol=0.0)
    head0 = w[:, :4].sum(1)
    assert torch.all(head0 > 1e-3)  # the product divided by ε, not by its sum
    assert torch.all(head0 < 0.1)
    assert torch.all(w[:, 4:] == 0)  # underflowed: the head passes x through
    torch.testing.assert_close((x + layer(x))[:, 4:], x[:, 4:])
    ws = stable.weights(x)
    torch.testing.assert_close(ws[:, :4].sum(1), torch.ones(3, 5))
    torch.testing.assert_close(ws[:, 4:].sum(1), torch.ones(3, 5))


def test_form_a_weights_are_computed_in_float32() -> None:
    torch.manual_seed(2)
    layer = MultiHeadGaussianAdaptiveAttention(axis=1, heads=2, gaussians=3)
    x = torch.randn(2, 8, 6).to(torch.bfloat16)
    y, w = layer(x, return_weights=True)
    assert w.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    ref = _official_gaussian_layer(x.float(), layer.offsets.detach(), layer.scales.detach(), 1)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-7)
    assert layer.weights(x.double()).dtype == torch.float64


def test_form_a_initial_scales() -> None:
    torch.manual_seed(3)
    package = MultiHeadGaussianAdaptiveAttention(1, 32, 32)  # the GAAM package: c = exp(N(0, 1))
    speech = MultiHeadGaussianAdaptiveAttention(1, 32, 32, c_init="normal")  # the speech code: c = N(0, 1)
    assert torch.all(package.scales > 0)
    assert abs(package.scales.log().mean().item()) < 0.1
    assert (speech.scales < 0).float().mean().item() == pytest.approx(0.5, abs=0.08)
    assert abs(speech.scales.mean().item()) < 0.1
    assert speech.scales.std().item() == pytest.approx(1.0, abs=0.08)
    # the speech networks take the speech code's initialisation; official=False the earlier lognormal one
    for net in (DAAMAudioCNNLSTM(), DAAMAudioTransformer(feedforward=32)):
        layer = net.front.gaussian.layers[0]  # type: ignore[union-attr]
        assert (layer.c_init, layer.stable) == ("normal", False)
    legacy = DAAMAudioCNNLSTM(official=False).front.gaussian.layers[0]  # type: ignore[union-attr]
    assert (legacy.c_init, legacy.stable) == ("lognormal", True)


def test_form_a_stable_option_is_the_normalised_product_in_log_space() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 12, 7)
    base = MultiHeadGaussianAdaptiveAttention(1, 3, 4, stable=True)
    with torch.no_grad():
        base.scales.uniform_(0.8, 2.0)  # wide Gaussians: the product does not underflow
    official = MultiHeadGaussianAdaptiveAttention(1, 3, 4)
    official.load_state_dict(base.state_dict())
    torch.testing.assert_close(base.weights(x), official.weights(x), rtol=1e-4, atol=1e-7)
    raw = MultiHeadGaussianAdaptiveAttention(1, 3, 4, normalise=False, stable=True)
    raw.load_state_dict(base.state_dict())
    w_norm, w_raw = base.weights(x), raw.weights(x)
    for lo in (0, 4, 8):  # un-normalised weights normalise to the normalised ones
        torch.testing.assert_close(
            w_raw[:, lo : lo + 4] / w_raw[:, lo : lo + 4].sum(1, keepdim=True), w_norm[:, lo : lo + 4]
        )
    xi = MultiHeadGaussianAdaptiveAttention(1, 3, 4, scale_form="xi")
    assert torch.all(xi.scales == 2.0)
    pop = MultiHeadGaussianAdaptiveAttention(1, 3, 4, variance="population", stable=True)
    pop.load_state_dict(base.state_dict())
    assert not torch.allclose(pop.weights(x), w_norm)


def test_form_a_block_moves_x_by_at_most_w_x_at_init() -> None:
    """At init each head's weights sum to 1 (or less, where the official product underflows), so the block adds at
    most max(w)·|x| to x."""
    torch.manual_seed(2)
    for stable in (False, True):
        block = GaussianBlock((1,), 4, 24, stable=stable, c_init="normal")
        x = torch.randn(4, 40, 120)
        y, (w,) = block(x, return_weights=True)
        assert count_parameters(block) == 4 * 24 * 2
        torch.testing.assert_close(y, x + x * w)
        assert torch.all((y - x).abs() <= w * x.abs() + 1e-6)
        head_sums = w.reshape(4, 4, 10, 120).sum(2)
        assert torch.all(head_sums <= 1 + 1e-5)
        if stable:
            torch.testing.assert_close(head_sums, torch.ones_like(head_sums))


def test_form_b_matches_the_official_multi_head_daam() -> None:
    """Rows split into heads, each with full-width δ and ξ and its own statistics (DAAM-PEFT's MultiHeadDAAM)."""
    torch.manual_seed(3)
    layer = DensityAdaptiveAttention(features=6, heads=2)
    assert count_parameters(layer) == 2 * 2 * 6
    assert torch.all(layer.offsets == 0)
    assert torch.all(layer.scales == 2.0)
    with torch.no_grad():
        layer.offsets.normal_(0, 0.5)
        layer.scales.uniform_(1.0, 3.0)
    x = torch.randn(3, 8, 6)
    y, g = layer(x, return_weights=True)
    ref = _official_daam(x, layer.offsets.detach(), layer.scales.detach())
    torch.testing.assert_close(y, ref)
    assert torch.all(g <= 1.0)  # not normalised: each weight is at most 1
    # the head split is over rows: statistics of rows 0–3 do not see rows 4–7
    x2 = x.clone()
    x2[:, 4:] += 5.0 * torch.randn(3, 4, 6)
    torch.testing.assert_close(layer(x2)[:, :4], y[:, :4])
    one = DensityAdaptiveAttention(features=6, heads=1)
    torch.testing.assert_close(one(x), _official_daam(x, one.offsets.detach(), one.scales.detach()))
    with pytest.raises(ConfigError, match="must divide"):
        layer(torch.randn(2, 7, 6))


def test_form_b_on_another_axis() -> None:
    torch.manual_seed(4)
    layer = DensityAdaptiveAttention(features=5, heads=2, axis=1)
    with torch.no_grad():
        layer.offsets.normal_(0, 0.5)
    x = torch.randn(2, 4, 3, 5)  # rows on axis 1, an extra axis 2
    y = layer(x)
    for j in range(3):
        torch.testing.assert_close(
            y[:, :, j], _official_daam(x[:, :, j], layer.offsets.detach(), layer.scales.detach())
        )


def test_form_b_identity_where_the_value_is_the_mean() -> None:
    layer = DensityAdaptiveAttention(features=4)
    x = torch.tensor([[[1.0, 0.0, 2.0, 5.0], [3.0, 0.0, 2.0, 5.0], [2.0, 0.0, 2.0, 5.0]]])
    y = layer(x)
    assert y[0, 2, 0].item() == pytest.approx(2.0)  # value at the column's mean: weight 1
    assert abs(y[0, 0, 0].item()) < 1.0  # away from the mean: shrunk
    torch.testing.assert_close(y[0, :, 1:], x[0, :, 1:])  # constant columns pass unchanged


def test_grouped_query_attention_matches_the_official_layer() -> None:
    torch.manual_seed(5)
    layer = GroupedQueryAttention(embed_dim=32, query_heads=4, kv_heads=2)
    with torch.no_grad():
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
            lin.bias.normal_(0, 0.1)  # the official init zeroes them; make the reference see them
    x = torch.randn(3, 7, 32)
    out, attn = layer(x, x, x, need_weights=True)
    torch.testing.assert_close(out, _official_gqa(layer, x), rtol=1e-5, atol=1e-5)
    assert attn is not None
    assert attn.shape == (3, 2, 7, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 7))
    sqrt = GroupedQueryAttention(32, 4, 2, logit_scale="sqrt")
    sqrt.load_state_dict(layer.state_dict())
    assert not torch.allclose(sqrt(x, x, x)[0], out)  # the official logits are q·k / d, not q·k / √d
    with pytest.raises(ConfigError):
        GroupedQueryAttention(32, 4, 3)


def test_gq_daam_is_form_b_then_grouped_query_attention() -> None:
    torch.manual_seed(6)
    model = GroupedQueryDAAM(features=12, embed_dim=16, daam_heads=2, query_heads=4, kv_heads=2)
    x = torch.randn(2, 6, 12)
    out, (g, attn) = model(x, return_weights=True)
    assert out.shape == (2, 6, 16)
    assert g.shape == x.shape
    assert attn is not None
    assert attn.shape == (2, 2, 6, 6)
    y = _official_daam(x, model.daam.offsets.detach(), model.daam.scales.detach())
    torch.testing.assert_close(out, _official_gqa(model.attention, model.embed(y)), rtol=1e-5, atol=1e-5)
    assert count_parameters(model.daam) == 2 * 2 * 12


@pytest.mark.parametrize(
    "layer",
    [
        MultiHeadGaussianAdaptiveAttention(1, 2, 24),
        MultiHeadGaussianAdaptiveAttention(1, 2, 24, c_init="normal"),
        MultiHeadGaussianAdaptiveAttention(1, 2, 24, stable=True),
        MultiHeadGaussianAdaptiveAttention(1, 2, 24, normalise=False, stable=True),
        MultiHeadGaussianAdaptiveAttention(1, 2, 24, scale_form="xi", variance="population"),
        DensityAdaptiveAttention(8, 2, axis=1),
        DensityAdaptiveAttention(8, 2, axis=1, normalise=True, scale_form="c2", variance="unbiased"),
    ],
)
def test_constant_inputs_are_finite_with_finite_gradients(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        layer.offsets.fill_(0.3)  # a non-zero offset makes z huge on a zero-variance input
    x = torch.full((2, 8, 8), 3.0, requires_grad=True)
    y, w = layer(x, return_weights=True)
    assert torch.isfinite(y).all()
    assert torch.isfinite(w).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()


def test_far_out_values_stay_finite() -> None:
    torch.manual_seed(7)
    x = torch.zeros(1, 10, 1)
    x[0, 0, 0] = 1e4
    stable = MultiHeadGaussianAdaptiveAttention(1, 1, 24, stable=True)
    w = stable.weights(x)
    assert torch.isfinite(w).all()
    assert w.sum().item() == pytest.approx(1.0, rel=1e-5)
    official = MultiHeadGaussianAdaptiveAttention(1, 1, 24)
    w = official.weights(x)
    assert torch.isfinite(w).all()
    assert w.sum().item() <= 1.0 + 1e-5


def test_gradients_reach_the_gaussian_parameters() -> None:
    torch.manual_seed(4)
    for stable in (False, True):
        block = GaussianBlock((1, 2), (4, 4), (3, 3), stable=stable)
        x = torch.randn(2, 8, 12)
        (block(x) ** 2).sum().backward()
        for layer in block.layers:
            assert layer.offsets.grad is not None
            assert layer.offsets.grad.abs().sum() > 0
            assert layer.scales.grad is not None
            assert layer.scales.grad.abs().sum() > 0


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        MultiHeadGaussianAdaptiveAttention(1, 2, 2, scale_form="2c")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DensityAdaptiveAttention(0, 3)
    with pytest.raises(ConfigError):
        MultiHeadGaussianAdaptiveAttention(1, 2, 2, c_init="uniform")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        MultiHeadGaussianAdaptiveAttention(5, 2, 2).weights(torch.zeros(2, 3))
    with pytest.raises(ConfigError):
        DAAMAudioCNNLSTM(attention="softmax")


@pytest.mark.parametrize(
    ("cls", "front", "total"),
    [(DAAMAudioCNNLSTM, 192, 280_257), (DAAMAudioTransformer, 128, 1_124_065)],
)
def test_speech_networks_parameter_counts(cls: type, front: int, total: int) -> None:
    model = cls()
    assert count_parameters(model.front) == front
    assert count_parameters(model) == total
    # the baselines stay within 3 % of the DAAM network
    for kind in ("mha", "none"):
        assert abs(count_parameters(cls(attention=kind)) - total) / total < 0.03


@pytest.mark.parametrize("cls", [DAAMAudioCNNLSTM, DAAMAudioTransformer])
@pytest.mark.parametrize("attention", ["daam", "mha", "none"])
def test_speech_networks_shapes_and_gradients(cls: type, attention: str) -> None:
    torch.manual_seed(5)
    model = cls(mels=8, outputs=3, attention=attention, heads=2, gaussians=2, time_axis=attention == "daam")
    x = torch.randn(2, 8, 12)
    logits, ws = model(x, return_weights=True)
    assert logits.shape == (2, 3)
    if attention == "daam":
        assert [tuple(w.shape) for w in ws] == [(2, 8, 12), (2, 8, 12)]
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_transformer_keeps_selected_frames_with_their_positions(pool: str) -> None:
    torch.manual_seed(6)
    model = DAAMAudioTransformer(mels=8, frames=12, heads=2, gaussians=2, d_model=16, feedforward=32, pool=pool)
    model.eval()
    x = torch.randn(2, 8, 12)
    everything = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(model(x, keep=everything), model(x))
    keep = torch.tensor([[0, 3, 5], [1, 2, 11]])
    h = model.front(x)
    enc = model.encoder(torch.stack([model.embed(h[b].T[keep[b]]) + model.position[keep[b]] for b in range(2)]))
    manual = model.fc(enc[:, -1] if pool == "last" else enc.mean(1))  # the official code reads the last position
    torch.testing.assert_close(model(x, keep=keep), manual)


def test_transformer_pools_the_last_position_unless_built_as_before() -> None:
    assert DAAMAudioTransformer(feedforward=32).pool == "last"
    assert DAAMAudioTransformer(feedforward=32, official=False).pool == "mean"
    with pytest.raises(ConfigError, match="pool"):
        DAAMAudioTransformer(feedforward=32, pool="max")  # type: ignore[arg-type]


def test_cnn_lstm_has_the_official_dropout_and_initialisation() -> None:
    torch.manual_seed(7)
    net = DAAMAudioCNNLSTM()
    assert net.drop.p == 0.05
    bound = math.sqrt(2.0 / (40 * 3)) * math.sqrt(3.0)  # He-uniform on fan-in = 40 mels × kernel 3
    assert net.conv.weight.abs().max().item() <= bound
    assert net.conv.weight.abs().max().item() > 0.9 * bound  # uniform over the whole range, not torch's ±1/√fan-in
    assert torch.all(net.conv.bias == 0)
    assert torch.all(net.fc.bias == 0)
    assert net.fc.weight.abs().max().item() <= math.sqrt(6.0 / 128)
    assert torch.all(net.bn.weight == 1)
    assert torch.all(net.bn.bias == 0)
    x = torch.randn(4, 40, 120)
    net.train()
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, net(x))  # dropout is active in training
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    legacy = DAAMAudioCNNLSTM(official=False)
    assert legacy.drop.p == 0.0
    assert legacy.conv.weight.abs().max().item() <= 1 / math.sqrt(40 * 3)  # torch's default
    assert count_parameters(legacy) == count_parameters(net)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_masked_encoder_equals_the_encoder_on_the_kept_frames(pool: str) -> None:
    torch.manual_seed(8)
    model = DAAMAudioTransformer(mels=8, frames=12, heads=2, gaussians=2, d_model=16, feedforward=32, pool=pool)
    model.eval()
    x = torch.randn(2, 8, 12)
    h = model.front(x)
    torch.testing.assert_close(model.encode(h, key_weights=torch.ones(2, 12)), model.encode(h), rtol=1e-4, atol=1e-5)
    keep = torch.tensor([[0, 3, 5, 6], [1, 2, 9, 11]])
    mask = torch.zeros(2, 12).scatter_(1, keep, 1.0)
    torch.testing.assert_close(model.encode(h, key_weights=mask), model.encode(h, keep), rtol=1e-4, atol=1e-5)
    # a soft mask passes gradients to the weights of dropped and kept frames alike
    soft = (mask + 0.3 * torch.rand(2, 12)).requires_grad_()
    model.encode(h.detach(), key_weights=soft).sum().backward()
    assert soft.grad is not None
    assert bool((soft.grad[mask == 0] != 0).any())
    with pytest.raises(ConfigError):
        model.encode(h, key_weights=torch.zeros(2, 12))


def test_frame_scorer_scores_each_frame() -> None:
    torch.manual_seed(9)
    scorer = FrameScorer(40)
    assert count_parameters(scorer) == 40 * 32 * 5 + 32 + 32 * 5 + 1
    assert scorer(torch.randn(3, 40, 120)).shape == (3, 120)
    model = DAAMAudioTransformer(feedforward=32, scorer=True)
    assert model.scorer is not None
    assert count_parameters(model) == count_parameters(DAAMAudioTransformer(feedforward=32)) + count_parameters(scorer)
