"""A minimal LoRA for training (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

``W x + scale · B A x`` with ``A`` (rank × in) Gaussian, ``B`` (out × rank) zero. Only the factors are saved; loading
adds ``scale · B @ A`` to the text model's own weights (``adapters.vlm.merge_lora``), so the loaded model is a plain
``LlavaForConditionalGeneration`` and needs no LoRA code (and no ``peft``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale
        return out


def add_lora(language_model: Any, targets: tuple[str, ...], rank: int, scale: float, prefix: str) -> dict[str, Any]:
    """Wrap ``targets`` (e.g. ``self_attn.q_proj``) of every decoder layer; returns {weight name: LoRALinear}."""
    wrapped: dict[str, LoRALinear] = {}
    for i, layer in enumerate(language_model.layers):
        for t in targets:
            parent_name, _, attr = t.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            base = getattr(parent, attr)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"layers.{i}.{t} is a {type(base).__name__}, not a Linear")
            module = LoRALinear(base, rank, scale)
            setattr(parent, attr, module)
            wrapped[f"{prefix}layers.{i}.{t}.weight"] = module
    return wrapped


def lora_factors(wrapped: dict[str, LoRALinear]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (m.lora_a.detach().clone(), m.lora_b.detach().clone()) for name, m in wrapped.items()}


def lora_state(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, m in wrapped.items():
        out[f"{name}::A"] = m.lora_a.detach().clone()
        out[f"{name}::B"] = m.lora_b.detach().clone()
    return out


def load_lora_state(wrapped: dict[str, LoRALinear], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in wrapped.items():
            m.lora_a.copy_(state[f"{name}::A"])
            m.lora_b.copy_(state[f"{name}::B"])
