"""Expected Attention: score keys by the attention future queries are expected to pay them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext, ModelShape
from ...core.method import PrefillMethod
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...scorers.expected import expected_attention_scores


@register
@dataclass(frozen=True)
class ExpectedAttention(PrefillMethod):
    """Expected Attention: queries are modelled as Gaussian; the attention the next ``n_future`` queries are expected
    to pay each key is computed in closed form, no attention matrix needed (Devoto, Jeblick, Jégou, "Expected
    Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution", arXiv:2510.00636).

    Score: per query head, mean ``μ`` and covariance ``Σ`` of the prompt's pre-RoPE queries (first ``sink`` tokens
    left out), rotated by the RoPE rotation averaged over the next ``n_future`` positions ``R̄``:
    ``s_j = ‖v_j‖ · mean_{h ∈ group} softmax_j(c R̄μ·k_j + c²/2 k_jᵀ R̄ΣR̄ᵀ k_j)``, ``c`` the softmax scale.

    Choices (kvpress's defaults): n_future 512, 4 sinks kept, covariance and value norm on, ε 0, Σ divided by
    ``n``. Pre-RoPE queries are recovered by undoing the rotation the model applied (exact for the rotate-half
    layout; a model without RoPE needs no undoing); the future positions start at each sequence's true length (kvpress
    starts at the chunk length). Prefill only (the paper's decoding variant is not implemented).
    """

    name: ClassVar[str] = "expected_attention"
    paper: ClassVar[str] = (
        "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution "
        "(arXiv:2510.00636)"
    )
    rule: ClassVar[str] = "s_j = ||v_j|| mean_group softmax_j(c R̄mu.k_j + c^2/2 k_j^T R̄ Sigma R̄^T k_j)"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        rescorable=False,  # needs every prompt query at its true position
    )
    n_future: int = 512
    sink: int = 4
    covariance: bool = True
    vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.n_future < 1 or self.sink < 0 or self.epsilon < 0:
            raise ConfigError("expected_attention: n_future must be >= 1, sink >= 0 and epsilon >= 0.")

    def check(self, shape: ModelShape) -> None:
        if not shape.rope:
            raise CapabilityError(
                f"expected_attention needs each layer's rotary embedding, which could not be read from model "
                f"'{shape.key}'; use a method that needs no positions (e.g. keydiff, knorm)."
            )

    def refusal(self, shape: ModelShape) -> str | None:
        if shape.max_positions and self.n_future > shape.max_positions:
            return (
                f"expected_attention averages the rotation of the next n_future={self.n_future} positions, more than "
                f"the model's whole context ({shape.max_positions}); use n_future <= {shape.max_positions}."
            )
        return super().refusal(shape)

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    def score(self, ctx: LayerContext) -> Tensor:
        if ctx.queries.shape[2] != ctx.length:
            raise CapabilityError("expected_attention scores a prompt from all its queries, not a cache.")
        rope = ctx.run.shape.rope
        if not rope:
            self.check(ctx.run.shape)
        return expected_attention_scores(
            ctx,
            rope[ctx.layer_idx],
            n_future=self.n_future,
            n_sink=self.sink,
            use_covariance=self.covariance,
            use_vnorm=self.vnorm,
            epsilon=self.epsilon,
        )
