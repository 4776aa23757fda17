"""Density-adaptive (Gaussian) attention blocks: re-weight features by learnable Gaussians of their standardised
values.

Two forms are published and they disagree in details; both are here, with every point of disagreement an option
whose default is the paper's:

* **Form A** — :class:`MultiHeadGaussianAdaptiveAttention` and the residual :class:`GaussianBlock` (GAAM, Ioannides,
  Chadha, Elkins, arXiv 2401.11143, and the speech networks of the DAAM depression paper, arXiv 2409.00391). The
  normalisation axis is split into H chunks (heads). Each head has N Gaussians with scalar offset δ_i and scale c_i.
  With μ, σ² the mean and (unbiased) variance of the chunk along the axis::

      z_i = (x − μ − δ_i) / √(σ² + ε)
      g_i = exp(−z_i² / (2 c_i²)) / √(2π c_i²)
      w   = Π_i g_i, normalised to sum 1 along the axis (within the head's chunk)
      out = x ⊙ w                      (the block adds the residual: x + out)

* **Form B** — :class:`DensityAdaptiveAttention` (Algorithm 1 of DAAM, arXiv 2401.11143 v3+/2409.00391): per head a
  mean-offset *vector* δ and a scale *vector* ξ over the head's features (init 0 and 2). Statistics are taken over
  the rows (the sequence axis) per feature::

      μ  = E[x],  σ² = |E[x²] − μ²| + 1e-8          (population variance)
      z  = (x − μ − δ) / √(σ² + 1e-5)
      G  = exp(−z² / (2ξ))                          (not normalised)
      out = x ⊙ G

Points where the papers disagree, and the options that choose:

========================  =====================  ======================  ==============================
choice                     option                 Form A default          Form B default
========================  =====================  ======================  ==============================
exponent denominator       ``scale_form``         ``"c2"`` (2c², prose)   ``"xi"`` (2ξ, Algorithm 1)
normalise the weights      ``normalise``          True                    False
variance                   ``variance``           ``"unbiased"``          ``"population"``
========================  =====================  ======================  ==============================

Implementation note: Form A's normalised product is computed in log space — log w = Σ_i log g_i followed by a
softmax along the axis — which is the same number as "product, then divide by the sum" whenever that product does not
underflow, and stays finite when it does (24 Gaussians of a far-out value underflow float32). Un-normalised weights
are exp(Σ_i log g_i).

The weights ``w`` (same shape as the input) are the importance map: ``forward(x, return_weights=True)`` returns
them with the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError

ScaleForm = Literal["c2", "xi"]
Variance = Literal["unbiased", "population"]

__all__ = [
    "DensityAdaptiveAttention",
    "GaussianBlock",
    "MultiHeadGaussianAdaptiveAttention",
    "head_sizes",
    "moments",
]


def head_sizes(n: int, heads: int) -> list[int]:
    """Split an axis of length ``n`` into ``heads`` chunks: n // heads each, the last one takes the remainder."""
    if heads < 1:
        raise ConfigError(f"heads must be ≥ 1, got {heads}")
    if n < heads:
        raise ConfigError(f"an axis of length {n} cannot be split into {heads} heads")
    size = n // heads
    return [size] * (heads - 1) + [n - size * (heads - 1)]


def moments(x: Tensor, dim: int, variance: Variance, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``x`` along ``dim`` (kept), variance + ``eps``.

    ``"unbiased"`` divides by n − 1 (torch's default, Form A's reference code; 0 for a chunk of one element);
    ``"population"`` is |E[x²] − μ²| as in Form B's Algorithm 1 (the absolute value guards against a slightly negative
    difference in floating point).
    """
    mean = x.mean(dim=dim, keepdim=True)
    if variance == "unbiased":
        n = x.shape[dim]
        var = x.var(dim=dim, keepdim=True) if n > 1 else torch.zeros_like(mean)
    elif variance == "population":
        var = ((x * x).mean(dim=dim, keepdim=True) - mean * mean).abs()
    else:
        raise ConfigError(f"variance must be 'unbiased' or 'population', got {variance!r}")
    return mean, var + eps


def _axis(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ConfigError(f"axis {dim} is out of range for an input with {ndim} dimensions")
    return dim % ndim


class MultiHeadGaussianAdaptiveAttention(nn.Module):
    """Form A: H heads over chunks of one axis, N Gaussians per head (parameters: 2·H·N scalars).

    Args:
        axis: the normalisation axis of the input (statistics and the split into heads are along it), e.g. the mel
            axis 1 of a (B, mels, frames) spectrogram.
        heads: H; the axis is split into H chunks (the last takes the remainder).
        gaussians: N Gaussians per head, multiplied.
        scale_form: ``"c2"`` — exp(−z²/(2c²))/√(2πc²) with c initialised exp(N(0,1)) (Form A); ``"xi"`` —
            exp(−z²/(2ξ)) with ξ initialised ``xi_init`` and clamped at ``eps`` from below (Form B's algorithm).
        normalise: normalise the product along the axis within each head's chunk (Form A: True).
        variance: ``"unbiased"`` (Form A) or ``"population"``.
        eps: added to the variance, and the floor of c² / ξ.

    Shapes: input (…, L, …) with L the length of ``axis``; output and weights have the input's shape.
    """

    def __init__(
        self,
        axis: int,
        heads: int,
        gaussians: int,
        *,
        scale_form: ScaleForm = "c2",
        normalise: bool = True,
        variance: Variance = "unbiased",
        eps: float = 1e-8,
        xi_init: float = 2.0,
    ) -> None:
        super().__init__()
        if heads < 1 or gaussians < 1:
            raise ConfigError(f"heads and gaussians must be ≥ 1, got {heads} and {gaussians}")
        if scale_form not in ("c2", "xi"):
            raise ConfigError(f"scale_form must be 'c2' or 'xi', got {scale_form!r}")
        if variance not in ("unbiased", "population"):
            raise ConfigError(f"variance must be 'unbiased' or 'population', got {variance!r}")
        self.axis = axis
        self.heads = heads
        self.gaussians = gaussians
        self.scale_form: ScaleForm = scale_form
        self.normalise = normalise
        self.variance: Variance = variance
        self.eps = eps
        self.offsets = nn.Parameter(torch.zeros(heads, gaussians))
        if scale_form == "c2":
            self.scales = nn.Parameter(torch.exp(torch.randn(heads, gaussians)))
        else:
            self.scales = nn.Parameter(torch.full((heads, gaussians), float(xi_init)))

    def extra_repr(self) -> str:
        return (
            f"axis={self.axis}, heads={self.heads}, gaussians={self.gaussians}, scale_form={self.scale_form!r}, "
            f"normalise={self.normalise}, variance={self.variance!r}"
        )

    def _log_density(self, chunk: Tensor, dim: int, head: int) -> Tensor:
        """Σ_i log g_i without materialising the N Gaussians: with u = (x − μ)/σ, v = 1/σ and a_i = 1/(2c_i²)
        (or 1/(2ξ_i)), Σ_i a_i (u − δ_i v)² = u²·Σa_i − 2uv·Σa_iδ_i + v²·Σa_iδ_i²."""
        mean, var = moments(chunk, dim, self.variance, self.eps)
        inv_sd = var.rsqrt()
        u = (chunk - mean) * inv_sd
        d = self.offsets[head]
        if self.scale_form == "c2":
            c2 = (self.scales[head] ** 2).clamp_min(self.eps)
            a = 0.5 / c2
            const = -0.5 * torch.log(2.0 * math.pi * c2).sum()
        else:
            a = 0.5 / self.scales[head].clamp_min(self.eps)
            const = torch.zeros((), dtype=chunk.dtype, device=chunk.device)
        quad = u * u * a.sum() - 2.0 * u * inv_sd * (a * d).sum() + inv_sd * inv_sd * (a * d * d).sum()
        return const - quad

    def weights(self, x: Tensor) -> Tensor:
        """The importance map: one weight per input element (the input's shape)."""
        dim = _axis(self.axis, x.dim())
        out = []
        for h, chunk in enumerate(torch.split(x, head_sizes(x.shape[dim], self.heads), dim=dim)):
            log_w = self._log_density(chunk, dim, h)
            out.append(torch.softmax(log_w, dim=dim) if self.normalise else torch.exp(log_w))
        return torch.cat(out, dim=dim)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x ⊙ w (no residual; :class:`GaussianBlock` adds it). With ``return_weights``: (x ⊙ w, w)."""
        w = self.weights(x)
        y = x * w
        return (y, w) if return_weights else y


class DensityAdaptiveAttention(nn.Module):
    """Form B (DAAM's Algorithm 1): per-head offset and scale *vectors* over the features, weights not normalised.

    The features (last axis, size ``features``) are split into ``heads`` groups; each head owns the slice of
    δ ∈ ℝ^features (init 0) and ξ ∈ ℝ^features (init ``xi_init`` = 2) over its features — per feature, so the split
    into heads only groups parameters and the layer has 2·features parameters whatever H is. Statistics are taken
    along ``axis`` (default −2: the rows / tokens of a (…, T, features) input), per feature.

    Args:
        features: size of the last axis.
        heads: number of heads (must divide ``features``).
        axis: the statistics axis (not the last one).
        scale_form, normalise, variance: as in :class:`MultiHeadGaussianAdaptiveAttention`; defaults are Form B's
            (``"xi"``, False, ``"population"``).
        var_eps, z_eps: the two epsilons of Algorithm 1 (1e-8 on the variance, 1e-5 under the square root).
        residual: add the input to the output (Algorithm 1 does not: False).

    Shapes: input (…, T, features) → output and weights of the same shape.
    """

    def __init__(
        self,
        features: int,
        heads: int = 1,
        *,
        axis: int = -2,
        scale_form: ScaleForm = "xi",
        normalise: bool = False,
        variance: Variance = "population",
        var_eps: float = 1e-8,
        z_eps: float = 1e-5,
        xi_init: float = 2.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if features < 1 or heads < 1 or features % heads:
            raise ConfigError(f"heads ({heads}) must divide features ({features})")
        if scale_form not in ("c2", "xi"):
            raise ConfigError(f"scale_form must be 'c2' or 'xi', got {scale_form!r}")
        if variance not in ("unbiased", "population"):
            raise ConfigError(f"variance must be 'unbiased' or 'population', got {variance!r}")
        self.features = features
        self.heads = heads
        self.axis = axis
        self.scale_form: ScaleForm = scale_form
        self.normalise = normalise
        self.variance: Variance = variance
        self.var_eps = var_eps
        self.z_eps = z_eps
        self.residual = residual
        self.offsets = nn.Parameter(torch.zeros(heads, features // heads))
        init = float(xi_init) if scale_form == "xi" else math.sqrt(float(xi_init))
        self.scales = nn.Parameter(torch.full((heads, features // heads), init))

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, heads={self.heads}, axis={self.axis}, scale_form={self.scale_form!r}, "
            f"normalise={self.normalise}, variance={self.variance!r}, residual={self.residual}"
        )

    def weights(self, x: Tensor) -> Tensor:
        """The importance map G (the input's shape)."""
        if x.shape[-1] != self.features:
            raise ConfigError(f"expected {self.features} features on the last axis, got shape {tuple(x.shape)}")
        dim = _axis(self.axis, x.dim())
        if dim == x.dim() - 1:
            raise ConfigError("the statistics axis of DensityAdaptiveAttention must not be the feature axis")
        mean, var = moments(x, dim, self.variance, self.var_eps)
        delta = self.offsets.reshape(-1)
        z = (x - mean - delta) / torch.sqrt(var + self.z_eps)
        if self.scale_form == "xi":
            log_g = -(z * z) / (2.0 * self.scales.reshape(-1).clamp_min(self.z_eps))
        else:
            log_g = -(z * z) / (2.0 * (self.scales.reshape(-1) ** 2).clamp_min(self.z_eps))
        if not self.normalise:
            return torch.exp(log_g)
        return torch.softmax(log_g, dim=dim)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x ⊙ G (+ x with ``residual``). With ``return_weights``: (output, G)."""
        w = self.weights(x)
        y = x * w
        if self.residual:
            y = x + y
        return (y, w) if return_weights else y


class GaussianBlock(nn.Module):
    """Form A's block: a stack of :class:`MultiHeadGaussianAdaptiveAttention` layers, each with a residual,
    x ← x + layer(x). The speech networks use one layer on the mel axis (optionally a second on the time axis).

    Args:
        axes, heads, gaussians: one entry per layer (``heads``/``gaussians`` may be single ints for all layers).
        **options: passed to every layer (``scale_form``, ``normalise``, ``variance``, ``eps``).

    ``forward(x, return_weights=True)`` returns (output, [weights of each layer]); each weights tensor has the
    input's shape.
    """

    def __init__(
        self,
        axes: Sequence[int],
        heads: int | Sequence[int],
        gaussians: int | Sequence[int],
        **options: object,
    ) -> None:
        super().__init__()
        n = len(axes)
        if n == 0:
            raise ConfigError("a GaussianBlock needs at least one axis")
        hs = [heads] * n if isinstance(heads, int) else list(heads)
        gs = [gaussians] * n if isinstance(gaussians, int) else list(gaussians)
        if len(hs) != n or len(gs) != n:
            raise ConfigError("axes, heads and gaussians must have one entry per layer")
        self.layers = nn.ModuleList(
            MultiHeadGaussianAdaptiveAttention(a, h, g, **options)  # type: ignore[arg-type]
            for a, h, g in zip(axes, hs, gs)
        )

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        ws: list[Tensor] = []
        for layer in self.layers:
            y, w = layer(x, return_weights=True)
            x = x + y
            ws.append(w)
        return (x, ws) if return_weights else x
