"""Density-adaptive (Gaussian) attention blocks: re-weight features by learnable Gaussians of their standardised
values.

Two forms are published and they disagree in details; both are here, and each computes by default what its
authors' code computes (read against it: docs/DAAM.md, "The modules"):

* **Form A** — :class:`MultiHeadGaussianAdaptiveAttention` and the residual :class:`GaussianBlock` (GAAM, Ioannides,
  Chadha, Elkins, arXiv 2401.11143, code gioannides/Gaussian-Adaptive-Attention; the speech networks of the DAAM
  depression paper, arXiv 2409.00391, code sdsuai/depression_audio_processing). The normalisation axis is split into
  H chunks (heads; the last takes the remainder). Each head has N Gaussians with scalar offset δ_i and scale c_i.
  With μ, σ² the mean and unbiased variance of the chunk along the axis, ε = 1e-8::

      z_i = (x − μ − δ_i) / √(σ² + ε)
      g_i = exp(−z_i² / (2 c_i²)) / √(2π c_i²)
      p   = g_1 · g_2 · … · g_N                        (in float32)
      w   = p / max(Σ_axis p, ε)                        (the sum clamped at ε, within the head's chunk)
      out = x ⊙ w                                       (the block adds the residual: x + out)

  The official code multiplies the N Gaussians in a loop; here their product, itself one Gaussian in x, is
  exp(const − A(u − m v)² − D v²) (see ``_log_product``): the same number up to float32 rounding (both are within
  2e-4 relative of a float64 evaluation of the official loop wherever a weight exceeds 1e-6), about 6× faster for
  24 Gaussians, and underflowing to 0 where the official product does (up to values below 1e-38). Where p is 0
  along a whole chunk (often, with 24 narrow Gaussians over a chunk of 10 values) w is 0 and the block passes x
  through; where Σ p < ε the weights sum to less than 1. ``stable=True`` normalises by a softmax of log p instead:
  the same number wherever Σ p ≥ ε, and a distribution over the chunk everywhere (this package's earlier form).

* **Form B** — :class:`DensityAdaptiveAttention` (DAAM, Algorithm 1 of arXiv 2401.11143 v3+, code
  gioannides/DAAM-PEFT-paper-code). The rows (the statistics axis, e.g. tokens or encoder layers) are split into H
  contiguous groups (heads); each head has a mean-offset *vector* δ and a scale *vector* ξ over all the features
  (init 0 and 2) and takes its statistics over its own rows, per feature::

      μ  = E[x],  σ² = |E[x²] − μ²| + 1e-8               (population variance over the head's rows)
      z  = (x − μ − δ) / √(σ² + 1e-5)
      G  = exp(−z² / (2ξ))                              (not normalised)
      out = x ⊙ G

  :mod:`tokensieve.nn.gqdaam` puts Form B in front of grouped-query attention (GQ-DAAM).

Points where the papers disagree, and the options that choose (each form's default is its code's):

========================  =====================  =========================  ==============================
choice                     option                 Form A default             Form B default
========================  =====================  =========================  ==============================
exponent denominator       ``scale_form``         ``"c2"`` (2c²)             ``"xi"`` (2ξ)
normalise the weights      ``normalise``          True (clamped sum)         False
variance                   ``variance``           ``"unbiased"``             ``"population"``
initial c                  ``c_init``             ``"lognormal"`` exp(N(0,1)) (the GAAM package; the speech
                                                  networks pass ``"normal"``, N(0,1), as the speech code does)
========================  =====================  =========================  ==============================

The weights (same shape as the input) are the importance map: ``forward(x, return_weights=True)`` returns them with
the output.
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
CInit = Literal["lognormal", "normal"]

__all__ = [
    "DensityAdaptiveAttention",
    "GaussianBlock",
    "MultiHeadGaussianAdaptiveAttention",
    "compute_dtype",
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


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the Gaussian weights are computed in: float32, or the input's if it is wider (float64) — what the
    official code gets by mixing the input with its float32 parameters."""
    return torch.promote_types(x.dtype, torch.float32)


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


def _check_options(scale_form: str, variance: str) -> None:
    if scale_form not in ("c2", "xi"):
        raise ConfigError(f"scale_form must be 'c2' or 'xi', got {scale_form!r}")
    if variance not in ("unbiased", "population"):
        raise ConfigError(f"variance must be 'unbiased' or 'population', got {variance!r}")


class MultiHeadGaussianAdaptiveAttention(nn.Module):
    """Form A: H heads over chunks of one axis, N Gaussians per head (parameters: 2·H·N scalars).

    Args:
        axis: the normalisation axis of the input (statistics and the split into heads are along it), e.g. the mel
            axis 1 of a (B, mels, frames) spectrogram.
        heads: H; the axis is split into H chunks (the last takes the remainder).
        gaussians: N Gaussians per head, multiplied.
        scale_form: ``"c2"`` — exp(−z²/(2c²))/√(2πc²) (Form A); ``"xi"`` — exp(−z²/(2ξ)) with ξ initialised
            ``xi_init`` (Form B's exponent, for comparisons).
        normalise: divide the product by its sum along the axis within each head's chunk (Form A: True).
        variance: ``"unbiased"`` (Form A) or ``"population"``.
        eps: added to the variance, and the floor of the sum the product is divided by (the official code uses one ε
            for both, 1e-8).
        stable: the log-space form — Σ_i log g_i, then a softmax along the chunk (or exp without ``normalise``)
            instead of the product divided by its clamped sum. Always a distribution over the chunk; never the
            identity of an underflowed head. False: what the official code computes.
        c_init: ``"lognormal"`` — c = exp(N(0,1)) (the GAAM package); ``"normal"`` — c = N(0,1) (the speech
            networks' code). Ignored for ``scale_form="xi"``.

    Shapes: input (…, L, …) with L the length of ``axis``; output and weights have the input's shape. The weights
    are computed in float32 (float64 for float64 inputs); the output has the input's dtype.
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
        stable: bool = False,
        c_init: CInit = "lognormal",
    ) -> None:
        super().__init__()
        if heads < 1 or gaussians < 1:
            raise ConfigError(f"heads and gaussians must be ≥ 1, got {heads} and {gaussians}")
        _check_options(scale_form, variance)
        if c_init not in ("lognormal", "normal"):
            raise ConfigError(f"c_init must be 'lognormal' or 'normal', got {c_init!r}")
        self.axis = axis
        self.heads = heads
        self.gaussians = gaussians
        self.scale_form: ScaleForm = scale_form
        self.normalise = normalise
        self.variance: Variance = variance
        self.eps = eps
        self.stable = stable
        self.c_init: CInit = c_init
        self.offsets = nn.Parameter(torch.zeros(heads, gaussians))
        if scale_form == "xi":
            self.scales = nn.Parameter(torch.full((heads, gaussians), float(xi_init)))
        elif c_init == "lognormal":
            self.scales = nn.Parameter(torch.exp(torch.randn(heads, gaussians)))
        else:
            self.scales = nn.Parameter(torch.randn(heads, gaussians))

    def extra_repr(self) -> str:
        return (
            f"axis={self.axis}, heads={self.heads}, gaussians={self.gaussians}, scale_form={self.scale_form!r}, "
            f"normalise={self.normalise}, variance={self.variance!r}, stable={self.stable}, c_init={self.c_init!r}"
        )

    def _log_product(self, xh: Tensor, heads: slice) -> Tensor:
        """log Π_i g_i on xh (…, h, n): h heads' chunks of n values on the last axis.

        The N Gaussians share their variable, so their product is one Gaussian: with u = (x − μ)/σ, v = 1/σ and
        a_i = 1/(2c_i²) (or 1/(2ξ_i)), Σ_i a_i (u − δ_i v)² = A (u − m v)² + D v², where A = Σ a_i, m = Σ a_i δ_i / A
        and D = Σ a_i (δ_i − m)² ≥ 0. A sum of non-negative terms: no cancellation, no N-wide tensor, the same number
        as the official loop up to rounding. c² (or ξ) is floored at ε (the official code has no floor; it matters
        only for |c| < 1e-4)."""
        mean, var = moments(xh, -1, self.variance, self.eps)  # (…, h, 1)
        inv_sd = var.rsqrt()
        delta = self.offsets[heads].to(xh.dtype)  # (h, N)
        scales = self.scales[heads].to(xh.dtype)
        denom = (scales * scales if self.scale_form == "c2" else scales).clamp_min(self.eps)
        a = 0.5 / denom
        big_a = a.sum(-1, keepdim=True)  # (h, 1)
        m = (a * delta).sum(-1, keepdim=True) / big_a
        d = (a * (delta - m) ** 2).sum(-1, keepdim=True)
        const = (-0.5 * torch.log(2.0 * math.pi * denom)).sum(-1, keepdim=True) if self.scale_form == "c2" else 0.0
        w = (xh - mean) * inv_sd - m * inv_sd
        return const - big_a * w * w - d * inv_sd * inv_sd

    def weights(self, x: Tensor) -> Tensor:
        """The importance map: one weight per input element (the input's shape, float32 or wider)."""
        dim = _axis(self.axis, x.dim())
        xm = x.to(compute_dtype(x)).movedim(dim, -1)  # (…, L)
        sizes = head_sizes(xm.shape[-1], self.heads)
        if len(set(sizes)) == 1:  # equal chunks: all heads at once, (…, H, n)
            groups = [self._log_product(xm.reshape(*xm.shape[:-1], self.heads, sizes[0]), slice(None))]
        else:  # (…, 1, n_h) per head
            groups = [self._log_product(c.unsqueeze(-2), slice(h, h + 1)) for h, c in enumerate(xm.split(sizes, -1))]
        ws = []
        for log_p in groups:
            if not self.normalise:
                ws.append(torch.exp(log_p))
            elif self.stable:  # a distribution over each chunk, whatever the product's size
                ws.append(torch.softmax(log_p, -1))
            else:  # the official normalisation: the product (underflowing to 0 as it does) over its sum clamped at ε
                p = torch.exp(log_p)
                ws.append(p / p.sum(-1, keepdim=True).clamp(min=self.eps))
        out = ws[0].reshape(xm.shape) if len(ws) == 1 else torch.cat([w[..., 0, :] for w in ws], -1)
        return out.movedim(-1, dim)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x ⊙ w (no residual; :class:`GaussianBlock` adds it). With ``return_weights``: (x ⊙ w, w)."""
        w = self.weights(x)
        y = (x.to(w.dtype) * w).to(x.dtype)
        return (y, w) if return_weights else y


class DensityAdaptiveAttention(nn.Module):
    """Form B (DAAM): the rows split into heads, each head with its own offset and scale *vectors* over all the
    features and its own statistics; weights not normalised.

    The statistics axis ``axis`` (default −2: the rows / tokens of a (…, rows, features) input) is split into
    ``heads`` contiguous groups of equal size (the official code asserts that ``heads`` divides the rows); head h
    owns δ_h ∈ ℝ^features (init 0) and ξ_h ∈ ℝ^features (init ``xi_init`` = 2), so the layer has 2·H·features
    parameters, and takes the mean and variance over its own rows, per feature. H = 1 is DAAM with one head.

    Args:
        features: size of the last axis.
        heads: number of heads (row groups).
        axis: the statistics axis (not the last one).
        scale_form, normalise, variance: as in :class:`MultiHeadGaussianAdaptiveAttention`; defaults are Form B's
            (``"xi"``, False, ``"population"``). ``normalise`` divides by the sum over the head's rows (a softmax of
            the log-weights).
        var_eps, z_eps: the two epsilons of Algorithm 1 (1e-8 on the variance, 1e-5 under the square root).
        residual: add the input to the output (the official module does not: False).

    Shapes: input (…, rows, …, features) with rows divisible by ``heads`` → output and weights of the same shape.
    (The official module also accepts a time axis, averages it for the statistics and broadcasts G over it; every
    official model passes one time step, so that axis is left out here.)
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
        if features < 1 or heads < 1:
            raise ConfigError(f"features and heads must be ≥ 1, got {features} and {heads}")
        _check_options(scale_form, variance)
        self.features = features
        self.heads = heads
        self.axis = axis
        self.scale_form: ScaleForm = scale_form
        self.normalise = normalise
        self.variance: Variance = variance
        self.var_eps = var_eps
        self.z_eps = z_eps
        self.residual = residual
        self.offsets = nn.Parameter(torch.zeros(heads, features))
        init = float(xi_init) if scale_form == "xi" else math.sqrt(float(xi_init))
        self.scales = nn.Parameter(torch.full((heads, features), init))

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, heads={self.heads}, axis={self.axis}, scale_form={self.scale_form!r}, "
            f"normalise={self.normalise}, variance={self.variance!r}, residual={self.residual}"
        )

    def weights(self, x: Tensor) -> Tensor:
        """The importance map G (the input's shape, float32 or wider)."""
        if x.shape[-1] != self.features:
            raise ConfigError(f"expected {self.features} features on the last axis, got shape {tuple(x.shape)}")
        dim = _axis(self.axis, x.dim())
        if dim == x.dim() - 1:
            raise ConfigError("the statistics axis of DensityAdaptiveAttention must not be the feature axis")
        rows = x.shape[dim]
        if rows % self.heads:
            raise ConfigError(f"{self.heads} heads must divide the {rows} rows of axis {self.axis}")
        t = x.to(compute_dtype(x)).movedim(dim, -2)  # (…, rows, features)
        lead = t.shape[:-2]
        t = t.reshape(*lead, self.heads, rows // self.heads, self.features)  # (…, H, rows/H, features)
        mean, var = moments(t, -2, self.variance, self.var_eps)
        delta = self.offsets.to(t.dtype).unsqueeze(-2)  # (H, 1, features)
        z = (t - mean - delta) / torch.sqrt(var + self.z_eps)
        scales = self.scales.to(t.dtype).unsqueeze(-2)
        denom = scales if self.scale_form == "xi" else scales * scales
        log_g = -(z * z) / (2.0 * denom.clamp_min(self.z_eps))
        g = torch.softmax(log_g, dim=-2) if self.normalise else torch.exp(log_g)
        return g.reshape(*lead, rows, self.features).movedim(-2, dim)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x ⊙ G (+ x with ``residual``). With ``return_weights``: (output, G)."""
        w = self.weights(x)
        y = x.to(w.dtype) * w
        if self.residual:
            y = x.to(w.dtype) + y
        y = y.to(x.dtype)
        return (y, w) if return_weights else y


class GaussianBlock(nn.Module):
    """Form A's block: a stack of :class:`MultiHeadGaussianAdaptiveAttention` layers, each with a residual,
    x ← x + layer(x). The speech networks use one layer on the mel axis (optionally a second on the time axis).

    Args:
        axes, heads, gaussians: one entry per layer (``heads``/``gaussians`` may be single ints for all layers).
        **options: passed to every layer (``scale_form``, ``normalise``, ``variance``, ``eps``, ``stable``,
            ``c_init``).

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
