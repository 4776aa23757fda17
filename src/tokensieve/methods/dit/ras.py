"""Region-Adaptive Sampling (RAS): at most denoising steps only the regions in focus are run through the model.

Liu et al., "Region-Adaptive Sampling for Diffusion Transformers", arXiv:2502.10389 (2025); checked against the
authors' manager of settings (microsoft/RAS, ``ras_manager``: ``sample_ratio``, ``scheduler_start_step``,
``scheduler_end_step``, ``error_reset_steps``, ``starvation_scale``, ``metric="std"``).

**Rule.** After ``warmup`` dense steps, at every *RAS step* the model runs on a fraction ``ratio`` of the video tokens
only: those whose patch of the previous step's prediction (the flow velocity, the "noise") has the largest standard
deviation — the regions the model is working on — with a token's score multiplied by ``1 + starvation · s`` when it has
been left out of the last ``s`` steps, so that no region starves. The other tokens keep the previous step's prediction.
Inside attention the active queries read every token: the active tokens' fresh keys and values and, for the others,
the keys and values cached when they were last computed. Some steps are full again (*error reset*) so that the caches
catch up.

**Defaults** as the authors' manager (30 steps): ``ratio = 0.5``, the first 4 steps dense (``warmup = 4/30``), full
steps at 12 and 22 of 30 (``reset_a = 0.4``, ``reset_b = 22/30`` of the run), RAS up to the last step,
``starvation = 0.1``.

**Choices.** The per-token score is the standard deviation over the patch's channels and pixels of the model output.
The starvation boost is linear in the number of steps left out (our reading of the paper's "starvation" term). The
adapter (:mod:`tokensieve.adapters.diffusion`) runs the transformer blocks on the active tokens through hooks and
restores the cached prediction of the others; the density of a RAS step is its share of queries, ``ratio``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from .base import Attended, DiTCall, DiTMethod, dense_attention


@register
@dataclass(frozen=True)
class RegionAdaptiveSampling(DiTMethod):
    """Region-Adaptive Sampling (RAS): at most denoising steps only the regions in focus are run through the model.

    The module docstring states the rule, the code it was checked against and the defaults.
    """

    name: ClassVar[str] = "ras"
    paper: ClassVar[str] = "Liu et al., Region-Adaptive Sampling for Diffusion Transformers, arXiv:2502.10389 (2025)"
    rule: ClassVar[str] = "run the blocks on the tokens of largest prediction std (with starvation); cache the rest"
    budget_param: ClassVar[str | None] = "ratio"
    drops_tokens: ClassVar[bool] = True

    ratio: float = 0.5
    warmup: float = 4 / 30
    reset_a: float = 0.4
    reset_b: float = 22 / 30
    end: float = 1.0
    starvation: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ratio <= 1 or self.starvation < 0:
            raise ConfigError("ras: ratio in (0, 1], starvation ≥ 0.")

    def is_ras_step(self, step: int, num_steps: int) -> bool:
        """This step runs on part of the tokens."""
        if self.ratio >= 1 or step < self.warmup_steps(num_steps) or step > math.floor(self.end * num_steps):
            return False
        resets = {round(self.reset_a * num_steps), round(self.reset_b * num_steps)}
        return step not in resets

    def keep(self, tokens: int) -> int:
        return max(1, round(self.ratio * tokens))

    def select(self, prediction: Tensor, starved: Tensor) -> Tensor:
        """``(B, n)`` ascending indices of the active tokens from the previous prediction per token ``(B, N, P)`` and
        the steps each token has been left out ``(B, N)``."""
        score = prediction.float().std(-1) * (1.0 + self.starvation * starved.float())
        top = score.topk(self.keep(score.shape[1]), dim=-1).indices
        return torch.sort(top, dim=-1).values

    def attend(self, call: DiTCall) -> Attended:
        if call.active is None:  # a full step: every token, and the caches of keys and values refreshed
            call.state["k"], call.state["v"] = call.k, call.v
            return Attended(dense_attention(call), 1.0)
        return self.sparse(call)

    def sparse(self, call: DiTCall) -> Attended:
        kc, vc = call.state.get("k"), call.state.get("v")
        if call.active is None or kc is None or vc is None or kc.shape[0] != call.q.shape[0]:
            raise ConfigError("ras: a partial step needs the keys and values of an earlier full step.")
        idx = call.active[:, None, :, None].expand(-1, kc.shape[1], -1, kc.shape[-1])
        kc = kc.scatter(2, idx, call.k)
        vc = vc.scatter(2, idx, call.v)
        call.state["k"], call.state["v"] = kc, vc
        full = DiTCall(
            call.q,
            kc,
            vc,
            call.scaling,
            call.grid,
            call.layer,
            call.num_layers,
            call.step,
            call.num_steps,
            call.state,
            call.text_k,
            call.text_v,
        )
        N = kc.shape[2]
        return Attended(dense_attention(full), call.q.shape[2] / N)
