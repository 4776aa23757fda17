"""KVzap's surrogate: per layer, a tiny model of the hidden state that predicts every KV head's log KVzip+ score.

KVzap (Jégou, Jeblick; arXiv:2601.07891; NVIDIA kvpress ``kvzap/``, ``KVzapPress``) replaces KVzip's second pass
over the context by a regression: for each layer ``ℓ``, ``s_j = f_ℓ(h_j) ∈ R^{H_kv}``, where ``h_j`` is the hidden
state the layer's attention reads for token ``j`` (its input after the layer's input normalisation — the
``hidden_states`` argument of the attention module, as the official data collector and press read it) and ``s_j``
the predicted ``log`` KVzip+ score of each KV head (:mod:`tokensieve.train.kvzap` computes the targets). Two forms,
as the official ``KVzapModel``:

* ``linear``: ``f(h) = W h + b`` (``W`` of shape ``(H_kv, d)``), fitted in closed form (ridge regression, as the
  official code's scikit-learn ``Ridge()``);
* ``mlp``: ``f(h) = W₂ · gelu(W₁ h + b₁) + b₂`` (exact GELU, ``torch.nn.GELU``'s default, as the official), fitted
  with AdamW on the squared error.

The profile file (kind ``kvzap``, made by ``tokensieve train kvzap``) is a JSON document with the settings and the
held-out fit (R² per layer), and the weights in ``kvzap.safetensors`` beside it: ``linear.weight (L, H, d)``,
``linear.bias (L, H)``, ``mlp.w1 (L, r, d)``, ``mlp.b1 (L, r)``, ``mlp.w2 (L, H, r)``, ``mlp.b2 (L, H)`` — one or
both forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.profiles import PROFILE_KINDS, ProfileData
from ...errors import ConfigError

KIND = "kvzap"
FORMS = ("mlp", "linear")


@dataclass(frozen=True)
class KVzapSurrogate(ProfileData):
    """Trained surrogates for one model (profile kind ``kvzap``).

    Attributes:
        linear: ``(W (L, H, d), b (L, H))`` or None.
        mlp: ``(W₁ (L, r, d), b₁ (L, r), W₂ (L, H, r), b₂ (L, H))`` or None.
        calibration: ``{"threshold": [...], "density": [...]}``: the share of held-out entries (all layers and heads)
            whose predicted score is at least each threshold, per form — what a threshold keeps on text like the
            training text (empty when not measured).
    """

    kind: ClassVar[str] = KIND
    command: ClassVar[str] = "tokensieve train kvzap --model {model}"
    trained: ClassVar[bool] = True
    linear: tuple[Tensor, Tensor] | None = None
    mlp: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def forms(self) -> list[str]:
        return [f for f in FORMS if getattr(self, f) is not None]

    def scores(self, form: str, layer: int, hidden: Tensor) -> Tensor:
        """``(..., d)`` hidden states of layer ``layer`` → ``(..., H_kv)`` predicted log KVzip+ scores (float32)."""
        x = hidden.float()
        if form == "linear":
            if self.linear is None:
                raise ConfigError(f"This kvzap profile has no linear surrogate (it has: {', '.join(self.forms())}).")
            w, b = self.linear
            return x @ w[layer].T + b[layer]
        if form == "mlp":
            if self.mlp is None:
                raise ConfigError(f"This kvzap profile has no mlp surrogate (it has: {', '.join(self.forms())}).")
            w1, b1, w2, b2 = self.mlp
            z = torch.nn.functional.gelu(x @ w1[layer].T + b1[layer])
            return z @ w2[layer].T + b2[layer]
        raise ConfigError(f"Unknown KVzap surrogate {form!r}; use one of {', '.join(FORMS)}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> KVzapSurrogate:
        what = f"The '{KIND}' profile"
        t = data.get("tensors")
        if not isinstance(t, Mapping):
            raise ConfigError(f"{what} has no weights (its 'tensors' file was not read); retrain it.")
        L, H = shape.num_layers, shape.num_kv_heads
        d = int(getattr(shape, "hidden_size", 0) or 0)

        def get(name: str) -> Tensor:
            x = t.get(name)
            if not isinstance(x, Tensor):
                raise ConfigError(f"{what}: missing tensor '{name}'.")
            return x.float()

        linear = mlp = None
        if "linear.weight" in t:
            w, b = get("linear.weight"), get("linear.bias")
            if w.dim() != 3 or w.shape[:2] != (L, H) or b.shape != (L, H) or (d and w.shape[2] != d):
                raise ConfigError(
                    f"{what}: 'linear.weight' must be {L} x {H} x hidden size and 'linear.bias' {L} x {H}."
                )
            linear = (w, b)
        if "mlp.w1" in t:
            w1, b1, w2, b2 = get("mlp.w1"), get("mlp.b1"), get("mlp.w2"), get("mlp.b2")
            r = int(w1.shape[1]) if w1.dim() == 3 else -1
            if (
                w1.dim() != 3
                or w1.shape[0] != L
                or (d and w1.shape[2] != d)
                or b1.shape != (L, r)
                or w2.shape != (L, H, r)
                or b2.shape != (L, H)
            ):
                raise ConfigError(
                    f"{what}: the mlp must be w1 {L} x r x hidden, b1 {L} x r, w2 {L} x {H} x r, b2 {L} x {H}."
                )
            mlp = (w1, b1, w2, b2)
        if linear is None and mlp is None:
            raise ConfigError(f"{what} holds neither a linear nor an mlp surrogate.")
        cal = data.get("calibration") or {}
        if not isinstance(cal, Mapping):
            raise ConfigError(f"{what}: 'calibration' must be a table per surrogate form.")
        return cls(linear, mlp, {str(k): dict(v) for k, v in cal.items()})


PROFILE_KINDS.setdefault(KIND, KVzapSurrogate)  # the profile loader reads kind "kvzap" with this schema


class SurrogateMLP(torch.nn.Module):
    """Every layer's two-layer MLP in one module, for training (``tokensieve train kvzap``): ``(L, N, d)`` hidden
    states → ``(L, N, H)`` predicted log scores. Inputs are standardised with per-layer statistics (``mean``,
    ``std``), folded into ``W₁`` by :meth:`export`."""

    mean: Tensor
    std: Tensor

    def __init__(self, num_layers: int, hidden_size: int, heads: int, width: int) -> None:
        super().__init__()
        L, d, H, r = num_layers, hidden_size, heads, width
        self.register_buffer("mean", torch.zeros(L, d))
        self.register_buffer("std", torch.ones(L, d))
        # nn.Linear's default initialisation (uniform in ±1/sqrt(fan_in)), per layer
        self.w1 = torch.nn.Parameter((torch.rand(L, r, d) * 2 - 1) / d**0.5)
        self.b1 = torch.nn.Parameter((torch.rand(L, r) * 2 - 1) / d**0.5)
        self.w2 = torch.nn.Parameter((torch.rand(L, H, r) * 2 - 1) / r**0.5)
        self.b2 = torch.nn.Parameter((torch.rand(L, H) * 2 - 1) / r**0.5)

    def forward(self, x: Tensor) -> Tensor:
        z = (x.float() - self.mean[:, None, :]) / self.std[:, None, :]
        z = torch.nn.functional.gelu(torch.einsum("lnd,lrd->lnr", z, self.w1) + self.b1[:, None, :])
        return torch.einsum("lnr,lhr->lnh", z, self.w2) + self.b2[:, None, :]

    @torch.no_grad()
    def export(self) -> dict[str, Tensor]:
        """The weights on raw hidden states: ``W₁' = W₁ / std``, ``b₁' = b₁ − W₁' · mean``."""
        w1 = self.w1 / self.std[:, None, :]
        b1 = self.b1 - torch.einsum("lrd,ld->lr", w1, self.mean)
        return {"mlp.w1": w1.clone(), "mlp.b1": b1.clone(), "mlp.w2": self.w2.detach().clone(),
                "mlp.b2": self.b2.detach().clone()}  # fmt: skip


def ridge(x: Tensor, y: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """Ridge regression with an unpenalised intercept (scikit-learn's ``Ridge(alpha)``): ``x (N, d)``, ``y (N, H)`` →
    ``W (H, d)``, ``b (H,)`` minimising ``‖y − x Wᵀ − b‖² + alpha ‖W‖²``. Float64 normal equations."""
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ yc).T  # (H, d)
    return w.float(), (my - w @ mx).float()


__all__ = ["FORMS", "KIND", "KVzapSurrogate", "SurrogateMLP", "ridge"]
