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
    GaussianBlock,
    MultiHeadGaussianAdaptiveAttention,
    count_parameters,
    head_sizes,
    moments,
)


def _reference_form_a(x: torch.Tensor, offsets: torch.Tensor, c: torch.Tensor, dim: int) -> torch.Tensor:
    """Form A for one head, written as in the paper's prose: product of Gaussians, then divide by the sum."""
    mean = x.mean(dim=dim, keepdim=True)
    var = x.var(dim=dim, keepdim=True) + 1e-8
    w = torch.ones_like(x)
    for d, ci in zip(offsets, c):
        z = (x - mean - d) / var.sqrt()
        w = w * torch.exp(-(z**2) / (2 * ci**2)) / torch.sqrt(2 * math.pi * ci**2)
    return w / w.sum(dim=dim, keepdim=True)


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


def test_form_a_matches_the_product_written_out() -> None:
    torch.manual_seed(0)
    layer = MultiHeadGaussianAdaptiveAttention(axis=1, heads=2, gaussians=3)
    with torch.no_grad():
        layer.offsets.normal_(0, 0.3)
    x = torch.randn(2, 8, 5)
    y, w = layer(x, return_weights=True)
    assert y.shape == w.shape == x.shape
    for h, (lo, hi) in enumerate([(0, 4), (4, 8)]):
        ref = _reference_form_a(x[:, lo:hi], layer.offsets[h], layer.scales[h], 1)
        torch.testing.assert_close(w[:, lo:hi], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y, x * w)
    # normalised within each head's chunk
    torch.testing.assert_close(w[:, :4].sum(1), torch.ones(2, 5))
    torch.testing.assert_close(w[:, 4:].sum(1), torch.ones(2, 5))


def test_form_a_options_change_the_weights() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 12, 7)
    base = MultiHeadGaussianAdaptiveAttention(1, 3, 4)
    raw = MultiHeadGaussianAdaptiveAttention(1, 3, 4, normalise=False)
    raw.load_state_dict(base.state_dict())
    w_norm, w_raw = base.weights(x), raw.weights(x)
    # un-normalised weights normalise to the normalised ones
    for lo in (0, 4, 8):
        torch.testing.assert_close(
            w_raw[:, lo : lo + 4] / w_raw[:, lo : lo + 4].sum(1, keepdim=True), w_norm[:, lo : lo + 4]
        )
    xi = MultiHeadGaussianAdaptiveAttention(1, 3, 4, scale_form="xi")
    assert torch.all(xi.scales == 2.0)
    pop = MultiHeadGaussianAdaptiveAttention(1, 3, 4, variance="population")
    pop.load_state_dict(base.state_dict())
    assert not torch.allclose(pop.weights(x), w_norm)


def test_form_a_block_is_near_identity_at_init() -> None:
    """At init the weights are a distribution over each chunk, so the block adds at most max(w)·|x| to x."""
    torch.manual_seed(2)
    block = GaussianBlock((1,), 4, 24)
    x = torch.randn(4, 40, 120)
    y, (w,) = block(x, return_weights=True)
    assert count_parameters(block) == 4 * 24 * 2
    torch.testing.assert_close(y, x + x * w)
    assert torch.all((y - x).abs() <= w * x.abs() + 1e-6)
    assert w.sum(1).mean().item() == pytest.approx(4.0, rel=1e-5)  # 4 heads, each sums to 1


def test_form_b_algorithm() -> None:
    torch.manual_seed(3)
    layer = DensityAdaptiveAttention(features=6, heads=2)
    assert count_parameters(layer) == 12
    assert torch.all(layer.offsets == 0)
    assert torch.all(layer.scales == 2.0)
    with torch.no_grad():
        layer.offsets.normal_(0, 0.5)
    x = torch.randn(2, 9, 6)
    y, g = layer(x, return_weights=True)
    mean = x.mean(1, keepdim=True)
    var = ((x**2).mean(1, keepdim=True) - mean**2).abs() + 1e-8
    z = (x - mean - layer.offsets.reshape(-1)) / torch.sqrt(var + 1e-5)
    ref = torch.exp(-(z**2) / (2 * 2.0))
    torch.testing.assert_close(g, ref)
    torch.testing.assert_close(y, x * ref)
    assert torch.all(g <= 1.0)  # not normalised: each weight is at most 1


def test_form_b_identity_where_the_value_is_the_mean() -> None:
    layer = DensityAdaptiveAttention(features=4)
    x = torch.tensor([[[1.0, 0.0, 2.0, 5.0], [3.0, 0.0, 2.0, 5.0], [2.0, 0.0, 2.0, 5.0]]])
    y = layer(x)
    assert y[0, 2, 0].item() == pytest.approx(2.0)  # value at the column's mean: weight 1
    assert abs(y[0, 0, 0].item()) < 1.0  # away from the mean: shrunk
    torch.testing.assert_close(y[0, :, 1:], x[0, :, 1:])  # constant columns pass unchanged


@pytest.mark.parametrize(
    "layer",
    [
        MultiHeadGaussianAdaptiveAttention(1, 2, 24),
        MultiHeadGaussianAdaptiveAttention(1, 2, 24, normalise=False),
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


def test_far_out_values_do_not_underflow_to_nan() -> None:
    layer = MultiHeadGaussianAdaptiveAttention(1, 1, 24)
    x = torch.zeros(1, 10, 1)
    x[0, 0, 0] = 1e4
    w = layer.weights(x)
    assert torch.isfinite(w).all()
    assert w.sum().item() == pytest.approx(1.0, rel=1e-5)


def test_gradients_reach_the_gaussian_parameters() -> None:
    torch.manual_seed(4)
    block = GaussianBlock((1, 2), (4, 4), (3, 3))
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
        DensityAdaptiveAttention(10, 3)
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


def test_transformer_keeps_selected_frames_with_their_positions() -> None:
    torch.manual_seed(6)
    model = DAAMAudioTransformer(mels=8, frames=12, heads=2, gaussians=2, d_model=16, feedforward=32).eval()
    x = torch.randn(2, 8, 12)
    everything = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(model(x, keep=everything), model(x))
    keep = torch.tensor([[0, 3, 5], [1, 2, 11]])
    h = model.front(x)
    manual = model.fc(
        model.encoder(torch.stack([model.embed(h[b].T[keep[b]]) + model.position[keep[b]] for b in range(2)])).mean(1)
    )
    torch.testing.assert_close(model(x, keep=keep), manual)
