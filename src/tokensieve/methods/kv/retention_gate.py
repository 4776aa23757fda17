"""Global retention gates: per-layer retention gates with one shared final projection, so that every (layer, KV head)
scores its entries on one scale.

"Make Each Token Count: Towards Improving Long-Context Performance with KV Cache Eviction" (Bui, Nguyen, Cohan,
Ying; arXiv:2605.09649) gives each token, when it is created, a query-agnostic *retention* ``β ∈ (0, 1)`` per layer
and KV head; the token's importance then decays geometrically with its age, ``α = β^age``, and a *shared final
scoring projection* puts the scores of all layers and heads on one scale so that a single global eviction policy can
rank them against one memory budget. This module holds the gates and their profile file;
:mod:`tokensieve.methods.kv.retention` is the method that evicts.

Gate (layout: our reading of the paper's "final projection tied across layers", which its model cards state and its
text does not detail — UNVERIFIED beyond that):

    log β^{(ℓ)} = logsigmoid(W₂ · silu(W₁^{(ℓ)} f + b₁^{(ℓ)}) + b₂)            (one output per KV head)

with ``W₁^{(ℓ)}, b₁^{(ℓ)}`` per layer (hidden width ``r``) and ``W₂ (H_kv × r)``, ``b₂ (H_kv)`` **shared by every
layer**: head ``g`` of every layer reads its retention off the same projection, so the per-layer part can only move a
token along a common scale. The input ``f`` is the same as SP-KV's gate (:func:`tokensieve.methods.kv.spkv_gate.
gate_features`): the layer's keys with RoPE undone and its values over all KV heads — a linear image of the
normalised hidden state the paper's gate reads (its code taps the post-``input_layernorm`` state), which the attention
hook sees without an extra model hook. The feature standardisation measured in training is folded into ``W₁``.

The profile file (kind ``retention``, made by ``tokensieve train retention``) holds the weights and the gate's
settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.profiles import PROFILE_KINDS, ProfileData
from ...errors import ConfigError

KIND = "retention"


@dataclass(frozen=True)
class RetentionGates(ProfileData):
    """Trained global retention gates for one model (profile kind ``retention``).

    Attributes:
        w1: ``(L, r, F)`` per-layer first maps, on raw features (``F = 2 · H_kv · D``); b1: ``(L, r)``.
        w2: ``(H_kv, r)`` the shared final projection; b2: ``(H_kv,)`` its bias (shared too).
    """

    kind: ClassVar[str] = KIND
    command: ClassVar[str] = "tokensieve train retention --model {model}"
    trained: ClassVar[bool] = True
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor

    def logits(self, layer: int, feats: Tensor) -> Tensor:
        """``(..., F)`` features of layer ``layer`` → ``(..., H_kv)`` retention logits (``β = σ(logit)``)."""
        z = feats.float() @ self.w1[layer].T + self.b1[layer]
        return torch.nn.functional.silu(z) @ self.w2.T + self.b2

    def log_beta(self, layer: int, feats: Tensor) -> Tensor:
        """``(..., F)`` → ``(..., H_kv)`` log-retention ``log β ≤ 0``."""
        return torch.nn.functional.logsigmoid(self.logits(layer, feats))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> RetentionGates:
        what = f"The '{KIND}' profile"
        H, D, L = shape.num_kv_heads, shape.head_dim, shape.num_layers
        F = 2 * H * D
        try:
            w1 = torch.tensor(data["w1"], dtype=torch.float32)
            b1 = torch.tensor(data["b1"], dtype=torch.float32)
            w2 = torch.tensor(data["w2"], dtype=torch.float32)
            b2 = torch.tensor(data["b2"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{what} needs numeric 'w1', 'b1', 'w2', 'b2' ({exc}).") from None
        if w1.dim() != 3 or w1.shape[0] != L or w1.shape[2] != F:
            raise ConfigError(f"{what}: 'w1' must be {L} x r x {F} (layers x hidden x 2 * kv_heads * head_dim).")
        r = int(w1.shape[1])
        if b1.shape != (L, r) or w2.shape != (H, r) or b2.shape != (H,):
            raise ConfigError(f"{what}: 'b1' must be {L} x {r}, 'w2' {H} x {r} and 'b2' {H} numbers.")
        return cls(w1, b1, w2, b2)


def gates_to_dict(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> dict[str, Any]:
    """A profile's ``data`` table from the gate's tensors, rounded to 6 significant digits."""

    def r(t: Tensor) -> Any:
        return [float(f"{x:.6g}") for x in t.tolist()] if t.dim() == 1 else [r(row) for row in t]

    return {
        "features": "per KV head: key with RoPE undone, then value (the layer's projections of its input)",
        "gate": "log beta = logsigmoid(w2 @ silu(w1[layer] @ f + b1[layer]) + b2); w2, b2 shared by all layers",
        "w1": r(w1),
        "b1": r(b1),
        "w2": r(w2),
        "b2": r(b2),
    }


PROFILE_KINDS.setdefault(KIND, RetentionGates)  # the profile loader reads kind "retention" with this schema


class RetentionNet(torch.nn.Module):
    """The gates as one module, for training (``tokensieve train retention``).

    Args:
        num_layers, features, heads: ``L``, ``F``, ``H_kv``.
        hidden: ``r``, the per-layer hidden width.
        bias_init: initial ``b₂`` (``β = σ(b₂)`` at initialisation; the paper's code starts near "keep everything").
        init_std: standard deviation of the initial weights.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        num_layers: int,
        features: int,
        heads: int,
        hidden: int = 8,
        bias_init: float = 3.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        L, F, H, r = num_layers, features, heads, hidden
        self.register_buffer("mean", torch.zeros(L, F))
        self.register_buffer("std", torch.ones(L, F))
        self.w1 = torch.nn.Parameter(torch.randn(L, r, F) * init_std)
        self.b1 = torch.nn.Parameter(torch.zeros(L, r))
        self.w2 = torch.nn.Parameter(torch.randn(H, r) * init_std)
        self.b2 = torch.nn.Parameter(torch.full((H,), float(bias_init)))

    def forward(self, feats: Tensor) -> Tensor:
        """``(L, N, F)`` raw features → ``(L, N, H_kv)`` log β."""
        x = (feats.float() - self.mean[:, None, :]) / self.std[:, None, :]
        z = torch.einsum("lnf,lrf->lnr", x, self.w1) + self.b1[:, None, :]
        return torch.nn.functional.logsigmoid(torch.nn.functional.silu(z) @ self.w2.T + self.b2)

    @torch.no_grad()
    def export(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(w1, b1, w2, b2)`` on raw features: ``w1' = w1 / std``, ``b1' = b1 − w1' · mean``."""
        w1 = self.w1 / self.std[:, None, :]
        b1 = self.b1 - torch.einsum("lrf,lf->lr", w1, self.mean)
        return w1.clone(), b1.clone(), self.w2.detach().clone(), self.b2.detach().clone()


__all__ = ["KIND", "RetentionGates", "RetentionNet", "gates_to_dict"]
