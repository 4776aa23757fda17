"""SP-KV's write gate: a tiny network per layer that predicts the future utility ``u ∈ (0, 1)`` of every KV pair.

Self-Pruned Key-Value Attention (Szilvasy, Faysse et al., arXiv:2605.14037) scores each KV pair with a light
*utility predictor* when the token is created; the pair stays visible while it is in a local window of ``w`` tokens
and is written to the long-term cache when it leaves the window only if ``u ≥ τ``. This module holds the predictor
and its profile file; :mod:`tokensieve.methods.kv.spkv` is the method that acts on the cache.

What the predictor reads (our choice — the paper's input is UNVERIFIED beyond "the token's hidden state"): the
layer's own projections of the token's hidden state, i.e. its keys with the rotary embedding undone and its values,
over all KV heads — ``f = [R_p⁻¹ k_1, v_1, …, R_p⁻¹ k_H, v_H]`` (``2 · H_kv · D`` numbers, a linear image of the
normalised hidden state the attention layer receives). The attention hook sees exactly these tensors, so the gate
needs no extra hook into the model and costs one small matrix product per layer; undoing RoPE makes ``u`` depend on
the token, not on where it sits.

Per layer ``ℓ``: ``u = σ(W₂ · silu(W₁ f + b₁) + b₂)`` with a hidden width ``h``, or ``u = σ(W f + b)`` when
``h = 0`` (the shipped gate); one output per KV head (shared by the head's query group). The feature
standardisation measured during training is folded into the first layer's weights.

Option (``tokensieve train spkv --input hidden``): the gate reads the token's hidden state instead — the input of the
layer's attention, after its input normalisation (``d`` numbers), as the paper's predictor reads "the token". The
profile records which input its gate reads (``input``: ``kv`` or ``hidden``); a hidden-state gate scores each token
while the layer reads it and keeps the utility until the token leaves the window.

The profile file (kind ``spkv``, made by ``tokensieve train spkv``) holds the weights, the window the gate was
trained for, and a calibration table: the share of out-of-window entries kept at each threshold on held-out text,
which turns a target density into a threshold.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...attention.rope import unrotate
from ...core.context import Rope
from ...core.profiles import PROFILE_KINDS, ProfileData
from ...errors import ConfigError

KIND = "spkv"


def gate_features(keys: Tensor, values: Tensor, positions: Tensor, rope: Rope | None) -> Tensor:
    """The predictor's input for every token: ``(B, T, 2 · H_kv · D)`` float32.

    keys, values ``(B, H_kv, T, D)`` (keys post-RoPE, as the attention layer holds them); positions ``(B, T)`` the
    positions the keys were rotated with (any value at padding); rope: the layer's rotary embedding (None: the keys
    are used as they are).
    """
    k = keys.float()
    if rope is not None:
        inv = torch.tensor(rope.inv_freq, dtype=torch.float64)
        k = unrotate(k, positions.clamp_min(0)[:, None, :], inv, rope.scaling).float()
    B, H, T, D = k.shape
    f = torch.cat([k, values.float()], dim=-1)  # (B, H, T, 2D)
    return f.permute(0, 2, 1, 3).reshape(B, T, H * 2 * D)


@dataclass(frozen=True)
class LayerGate:
    """One layer's predictor: ``w1 (F_hidden_or_H, F)``, ``b1``; with a hidden layer also ``w2 (H, h)``, ``b2``."""

    w1: Tensor
    b1: Tensor
    w2: Tensor | None = None
    b2: Tensor | None = None

    def logits(self, feats: Tensor) -> Tensor:
        """``(..., F)`` features → ``(..., H_kv)`` logits of ``u``."""
        z = feats @ self.w1.T + self.b1
        if self.w2 is not None:
            assert self.b2 is not None
            z = torch.nn.functional.silu(z) @ self.w2.T + self.b2
        return z


@dataclass(frozen=True)
class SPKVGates(ProfileData):
    """A trained write gate for one model (profile kind ``spkv``).

    Attributes:
        layers: one :class:`LayerGate` per decoder layer.
        window: the local window ``w`` the gate was trained for (the method's default window).
        hidden: hidden width of each layer's predictor (0: linear).
        tau, out_density: the calibration table — at threshold ``tau[i]`` (ascending), the share ``out_density[i]``
            of out-of-window entries (over layers, KV heads and held-out tokens) the gate keeps.
        input: what the gate reads: ``kv`` (keys with RoPE undone and values of all KV heads) or ``hidden`` (the
            hidden state the layer's attention reads).
    """

    kind: ClassVar[str] = KIND
    command: ClassVar[str] = "tokensieve train spkv --model {model}"
    trained: ClassVar[bool] = True
    layers: tuple[LayerGate, ...]
    window: int
    hidden: int
    tau: tuple[float, ...]
    out_density: tuple[float, ...]
    input: str = "kv"

    def utility(self, layer: int, feats: Tensor) -> Tensor:
        """``(..., F)`` features of layer ``layer`` → ``(..., H_kv)`` utilities in (0, 1)."""
        return torch.sigmoid(self.layers[layer].logits(feats.float()))

    def tau_for(self, out_density: float) -> float:
        """The threshold that keeps ``out_density`` of the out-of-window entries (calibration table, interpolated
        linearly; a share of 1 or more keeps everything: ``-inf``, 0 or less keeps nothing: ``+inf``)."""
        if out_density >= 1.0:
            return float("-inf")
        if out_density <= 0.0:
            return float("inf")
        taus, dens = self.tau, self.out_density  # densities fall as tau rises
        if out_density >= dens[0]:
            # between "keep everything" (tau = 0) and the first row
            d0, t0 = dens[0], taus[0]
            return t0 * (1.0 - out_density) / max(1.0 - d0, 1e-9)
        for i in range(1, len(taus)):
            if dens[i] <= out_density:
                d_hi, d_lo = dens[i - 1], dens[i]
                w = 0.0 if d_hi == d_lo else (d_hi - out_density) / (d_hi - d_lo)
                return taus[i - 1] + w * (taus[i] - taus[i - 1])
        return taus[-1] + (1.0 - taus[-1]) * 0.5  # below the table's last row: between it and 1

    # ------------------------------------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> SPKVGates:
        what = f"The '{KIND}' profile"
        H, D, L = shape.num_kv_heads, shape.head_dim, shape.num_layers
        source = data.get("input", "kv")
        if source not in ("kv", "hidden"):
            raise ConfigError(f"{what}: 'input' must be 'kv' or 'hidden', not {source!r}.")
        F = 2 * H * D
        if source == "hidden":
            raw0 = (data.get("layers") or [{}])[0]
            F = int(getattr(shape, "hidden_size", 0) or len((raw0.get("w1") or [[]])[0]))
        window, hidden = data.get("window"), data.get("hidden", 0)
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"{what} needs 'window': the local window (>= 1) the gate was trained for.")
        if not isinstance(hidden, int) or hidden < 0:
            raise ConfigError(f"{what}: 'hidden' must be a whole number >= 0.")
        raw = data.get("layers")
        if not isinstance(raw, list) or len(raw) != L:
            raise ConfigError(f"{what} needs 'layers': one predictor for each of the {L} layers.")
        layers = []
        for i, lay in enumerate(raw):
            try:
                w1 = torch.tensor(lay["w1"], dtype=torch.float32)
                b1 = torch.tensor(lay["b1"], dtype=torch.float32)
                w2 = torch.tensor(lay["w2"], dtype=torch.float32) if hidden else None
                b2 = torch.tensor(lay["b2"], dtype=torch.float32) if hidden else None
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{what}: layer {i} has no valid weights ({exc}).") from None
            out1 = hidden or H
            if w1.shape != (out1, F) or b1.shape != (out1,):
                raise ConfigError(
                    f"{what}: layer {i}'s 'w1' must be {out1} x {F} (features: "
                    + ("the hidden size)." if source == "hidden" else "2 * kv_heads * head_dim).")
                )
            if hidden and (w2 is None or b2 is None or w2.shape != (H, hidden) or b2.shape != (H,)):
                raise ConfigError(f"{what}: layer {i}'s 'w2' must be {H} x {hidden}.")
            layers.append(LayerGate(w1, b1, w2, b2))
        cal = data.get("calibration") or {}
        taus, dens = cal.get("tau"), cal.get("out_density")
        if (
            not isinstance(taus, list)
            or not isinstance(dens, list)
            or len(taus) != len(dens)
            or len(taus) < 2
            or any(not isinstance(x, (int, float)) for x in taus + dens)
            or any(b <= a for a, b in itertools.pairwise(taus))
        ):
            raise ConfigError(f"{what} needs 'calibration': 'tau' (ascending) and 'out_density' of equal lengths.")
        return cls(tuple(layers), window, hidden, tuple(float(t) for t in taus), tuple(float(d) for d in dens), source)


def gates_to_dict(
    layers: list[dict[str, Tensor]],
    window: int,
    hidden: int,
    tau: list[float],
    out_density: list[float],
    source: str = "kv",
) -> dict[str, Any]:
    """A profile's ``data`` table from per-layer weight tensors (``w1``, ``b1`` and, with ``hidden``, ``w2``,
    ``b2``); numbers rounded to 6 significant digits (the file stays small and diffable)."""

    def r(t: Tensor) -> Any:
        return [float(f"{x:.6g}") for x in t.tolist()] if t.dim() == 1 else [r(row) for row in t]

    out_layers = []
    for lay in layers:
        d = {"w1": r(lay["w1"]), "b1": r(lay["b1"])}
        if hidden:
            d["w2"], d["b2"] = r(lay["w2"]), r(lay["b2"])
        out_layers.append(d)
    features = {
        "kv": "per KV head: key with RoPE undone, then value (the layer's projections of its input)",
        "hidden": "the hidden state the layer's attention reads (its input after the input normalisation)",
    }[source]
    return {
        "window": int(window),
        "hidden": int(hidden),
        "input": source,
        "features": features,
        "layers": out_layers,
        "calibration": {"tau": [round(t, 6) for t in tau], "out_density": [round(d, 6) for d in out_density]},
    }


PROFILE_KINDS.setdefault(KIND, SPKVGates)  # the profile loader reads kind "spkv" with this schema


class GateNet(torch.nn.Module):
    """Every layer's predictor in one module, for training (``tokensieve train spkv``).

    Input features are standardised with per-layer statistics (``mean``, ``std`` buffers measured on training
    data); :meth:`export` folds that into the first layer's weights, so the shipped gate reads raw features.

    Args:
        num_layers, features, heads: ``L``, ``F = 2 · H_kv · D``, ``H_kv``.
        hidden: hidden width (0: one linear map per layer).
        init_std: standard deviation of the initial weights (biases start at 0).
    """

    mean: Tensor
    std: Tensor
    w2: torch.nn.Parameter  # only with a hidden layer
    b2: torch.nn.Parameter

    def __init__(self, num_layers: int, features: int, heads: int, hidden: int = 0, init_std: float = 0.02) -> None:
        super().__init__()
        self.hidden = hidden
        L, F, H = num_layers, features, heads
        out1 = hidden or H
        self.register_buffer("mean", torch.zeros(L, F))
        self.register_buffer("std", torch.ones(L, F))
        self.w1 = torch.nn.Parameter(torch.randn(L, out1, F) * init_std)
        self.b1 = torch.nn.Parameter(torch.zeros(L, out1))
        if hidden:
            self.w2 = torch.nn.Parameter(torch.randn(L, H, hidden) * init_std * 10)
            self.b2 = torch.nn.Parameter(torch.zeros(L, H))

    def forward(self, feats: Tensor) -> Tensor:
        """``(L, N, F)`` raw features → ``(L, N, H_kv)`` logits of ``u``."""
        x = (feats.float() - self.mean[:, None, :]) / self.std[:, None, :]
        z = torch.einsum("lnf,lof->lno", x, self.w1) + self.b1[:, None, :]
        if self.hidden:
            z = torch.einsum("lnh,loh->lno", torch.nn.functional.silu(z), self.w2) + self.b2[:, None, :]
        return z

    def layer_logits(self, layer: int, feats: Tensor) -> Tensor:
        """``(..., F)`` raw features of layer ``layer`` → ``(..., H_kv)`` logits of ``u`` (the hard-gate stage)."""
        x = (feats.float() - self.mean[layer]) / self.std[layer]
        z = x @ self.w1[layer].T + self.b1[layer]
        if self.hidden:
            z = torch.nn.functional.silu(z) @ self.w2[layer].T + self.b2[layer]
        return z

    @torch.no_grad()
    def export(self) -> list[dict[str, Tensor]]:
        """Per-layer weights on raw features: ``w1' = w1 / std``, ``b1' = b1 − w1' · mean``."""
        out = []
        for i in range(self.w1.shape[0]):
            w1 = self.w1[i] / self.std[i][None, :]
            b1 = self.b1[i] - w1 @ self.mean[i]
            d = {"w1": w1.clone(), "b1": b1.clone()}
            if self.hidden:
                d["w2"], d["b2"] = self.w2[i].clone(), self.b2[i].clone()
            out.append(d)
        return out


__all__ = ["KIND", "GateNet", "LayerGate", "SPKVGates", "gate_features", "gates_to_dict"]
