"""CompressKV: semantic retrieval heads choose the tokens; layer budgets follow each layer's eviction error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext
from ...core.method import PrefillMethod
from ...core.profiles import SemanticHeads
from ...core.registry import register
from ...errors import ConfigError
from ...scorers.attention import window_scores
from ...selection.allocation import round_to_total


def compresskv_layer_budgets(layer_score: list[float], budget: int, n_tokens: int, floor: int = 32) -> list[int]:
    """``b_l = lo + round(score_l · (L·b − lo·L))``, clipped to ``[lo, 3b]``, summing exactly to ``L·b``.

    ``lo = min(floor, b)``; the upper clip also never exceeds the prompt length.
    """
    L = len(layer_score)
    lo = min(floor, budget)
    hi = max(lo, min(3 * budget, n_tokens))
    total = L * budget
    score = torch.tensor(layer_score, dtype=torch.float64)
    score = score / score.sum() if float(score.sum()) > 0 else torch.full((L,), 1.0 / L, dtype=torch.float64)
    raw = lo + score * (total - lo * L)
    return round_to_total(raw[None], torch.tensor([total]), lo=lo, hi=hi)[0].tolist()


@register
@dataclass(frozen=True)
class CompressKV(PrefillMethod):
    """CompressKV: only a layer's *semantic retrieval heads* vote for the tokens to keep, and each layer's budget
    grows with the error that eviction causes there (Lin et al., arXiv:2508.02401).

    Score: the last ``window`` queries' attention (causal inside the window) summed over the window, average-pooled
    (kernel 5), averaged over the layer's SRH query heads (the top ``heads`` of the profile's ranking) — one ranking
    per layer, shared by every KV head (the official code's choice). Keep the top ``b_l − window`` plus the window.
    Layer budgets: ``b_l = 32 + round(score_l · (L·b − 32·L))``, clipped to ``[32, 3b]`` and adjusted until
    ``Σ_l b_l = L·b`` exactly (32 becomes ``b`` when the budget itself is smaller). A budget below the protected
    ``window`` keeps only recent tokens (the window is not shrunk; a :class:`~tokensieve.errors.TokensieveWarning`
    says so).

    Profile (``tokensieve profile compresskv``): SRH from passkey needle runs, counting the attention on the answer
    span at steps that emit an answer token (successful trials only); layer scores from the relative attention
    output error at a 32-entry budget on natural text and needle prompts. Choices: four SRH per layer (of nine
    query heads on the embedded model); needle tokens are matched by exact token id.
    """

    name: ClassVar[str] = "compresskv"
    paper: ClassVar[str] = (
        "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before Generation (arXiv:2508.02401)"
    )
    rule: ClassVar[str] = "s_j = pool(sum_window A_ij) over the layer's semantic retrieval heads; b_l from layer error"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        granularity=Granularity.LAYER,
        needs_attention=True,
        layer_adaptive=True,
        profile="compresskv",
    )
    window: int = 8
    kernel: int = 5
    heads: int = 4

    def __post_init__(self) -> None:
        if self.window < 1 or self.heads < 1 or self.kernel % 2 == 0:
            raise ConfigError("compresskv: window and heads must be >= 1 and kernel odd.")

    def protected(self) -> tuple[int, int]:
        return 0, self.window

    def score(self, ctx: LayerContext) -> Tensor:
        profile: SemanticHeads = ctx.run.profile
        srh = list(profile.srh[ctx.layer_idx][: self.heads])
        s = window_scores(ctx, self.window, self.kernel)[:, srh].mean(1, keepdim=True)  # (B, 1, T)
        s = s.masked_fill(~ctx.valid[:, None, :], 0.0)
        return s.expand(ctx.batch, ctx.num_kv_heads, ctx.length).contiguous()

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        key = ("compresskv", "budgets")
        if key not in ctx.run.scratch:
            score = list(ctx.run.profile.layer_score)
            rows = [
                compresskv_layer_budgets(score, int(b), int(n))
                for b, n in zip(ctx.run.budget_tokens.tolist(), ctx.run.n_tokens.tolist())
            ]
            ctx.run.scratch[key] = torch.tensor(rows, dtype=torch.long)  # (B, L)
        per_layer = ctx.run.scratch[key][:, ctx.layer_idx]
        return per_layer[:, None].expand(ctx.batch, ctx.num_kv_heads).clone()
