"""FlexPrefill: per head and per prompt, a query-aware or a vertical-slash block pattern sized by attention mass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from ._sparse_prefill import BlockGrid, SparsePrefill, dense_rows, top_mass_count, topn_mask


def last_block_attention(grid: BlockGrid, last: int) -> Tensor:
    """``(B, H_q, last, T_p)`` fp32: softmax attention of the last ``last`` queries over every key (causal among
    them, padding keys hidden)."""
    q = grid.q[:, :, -last:].float()
    k = grid.kv_for_queries(grid.k).float()
    Tp = k.shape[2]
    logits = torch.matmul(q, k.transpose(-1, -2)) * grid.scaling  # (B, Hq, last, Tp)
    qi = torch.arange(Tp - last, Tp, device=q.device)
    kj = torch.arange(Tp, device=q.device)
    ok = (kj[None, :] <= qi[:, None])[None] & grid.valid[:, None, :]  # (B, last, Tp)
    return torch.softmax(logits.masked_fill(~ok[:, None], float("-inf")), dim=-1)


def vertical_slash_scores(att: Tensor) -> tuple[Tensor, Tensor]:
    """From ``att`` ``(B, H, m, T_p)`` (the last ``m`` queries): the vertical score ``a_v[j]`` (mean over the rows)
    and the slash score ``a_s[o]`` (sum along the diagonal at offset ``o = query − key``, divided by ``m``), each
    ``(B, H, T_p)`` and summing to 1."""
    B, H, m, Tp = att.shape
    a_v = att.mean(2)
    qi = torch.arange(Tp - m, Tp, device=att.device)
    off = (qi[:, None] - torch.arange(Tp, device=att.device)[None, :]).clamp(min=0)  # (m, Tp); masked keys weigh 0
    a_s = torch.zeros(B, H, Tp, device=att.device).scatter_add_(
        -1, off.reshape(1, 1, -1).expand(B, H, -1), att.reshape(B, H, -1)
    )
    return a_v, a_s / m


def key_block_means(grid: BlockGrid) -> tuple[Tensor, Tensor]:
    """Mean key of each block over its real tokens ``(B, H_q, n, D)`` and which blocks hold any ``(B, n)``."""
    B = grid.valid.shape[0]
    k = grid.kv_for_queries(grid.k).float() * grid.valid[:, None, :, None]
    counts = grid.block_valid()  # (B, n)
    sums = k.view(B, k.shape[1], grid.n, grid.block, -1).sum(3)
    return sums / counts.clamp(min=1)[:, None, :, None], counts > 0


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Square root of the Jensen-Shannon divergence (natural log) between distributions along the last axis."""
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - m.clamp(min=1e-30).log()), 0.0).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0).sqrt()


def vs_blocks(a_v: Tensor, a_s: Tensor, n_v: Tensor, n_s: Tensor, block: int, first: Tensor) -> Tensor:
    """Vertical-slash pattern on the block grid, ``(B, H, n, n)``: the ``n_v`` key blocks of largest pooled
    vertical score (block ``first`` — the sequence's first real token — forced) for every query block at or after
    them, and the ``n_s`` block diagonals of largest pooled slash score (the main diagonal forced)."""
    B, H, Tp = a_v.shape
    n = Tp // block
    v_blk = a_v.view(B, H, n, block).sum(-1)
    s_blk = a_s.view(B, H, n, block).sum(-1)  # block offset s sums token offsets [s·b, (s+1)·b)
    idx = torch.arange(n, device=a_v.device)
    v_blk = torch.where(idx[None, None, :] == first[:, None, None], float("inf"), v_blk)
    s_blk = s_blk.clone()
    s_blk[..., 0] = float("inf")
    vsel = topn_mask(v_blk, n_v)  # (B, H, n)
    ssel = topn_mask(s_blk, n_s)
    diag = (idx[:, None] - idx[None, :]).clamp(min=0)  # (n, n) block offset i - j
    return vsel[:, :, None, :] | ssel[:, :, diag]


def query_aware_blocks(grid: BlockGrid, kbar: Tensor, kreal: Tensor, gamma: float) -> Tensor:
    """Query-aware pattern ``(B, H_q, n, n)``: ``Ŝ = row-softmax(Q̄ K̄ᵀ/√D)`` over block-causal real key blocks
    (``Q̄`` the mean real query of each block); the fewest blocks of the whole map whose mass reaches ``gamma`` of
    its total (one selection over all rows)."""
    B, Hq = grid.q.shape[:2]
    counts = grid.block_valid()  # (B, n)
    qsum = (grid.q.float() * grid.valid[:, None, :, None]).view(B, Hq, grid.n, grid.block, -1).sum(3)
    qbar = qsum / counts.clamp(min=1)[:, None, :, None]
    s = torch.matmul(qbar, kbar.transpose(-1, -2)) * grid.scaling  # (B, Hq, n, n)
    ok = grid.causal[None] & kreal[:, None, :] & kreal[:, :, None]  # (B, n, n): real query and key blocks
    p = torch.softmax(s.masked_fill(~ok[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    flat = p.flatten(2)  # (B, Hq, n*n)
    return topn_mask(flat, top_mass_count(flat, gamma)).view_as(p)


def flexprefill_blocks(
    grid: BlockGrid, gamma: float, tau: float, min_budget: int, max_budget: int | None
) -> tuple[Tensor, Tensor]:
    """FlexPrefill's block choice for every (sequence, query head): ``(B, H_q, n, n)`` bool and the query-aware
    heads ``(B, H_q)`` bool (see :class:`FlexPrefill`)."""
    b, n = grid.block, grid.n
    att = last_block_attention(grid, b)  # (B, Hq, b, Tp)
    a_v, a_s = vertical_slash_scores(att)
    kbar, kreal = key_block_means(grid)
    qhat = grid.q[:, :, -b:].float().mean(2)  # (B, Hq, D)
    est = torch.matmul(qhat[:, :, None], kbar.transpose(-1, -2))[:, :, 0] * grid.scaling  # (B, Hq, n)
    a_hat = torch.softmax(est.masked_fill(~kreal[:, None], float("-inf")), dim=-1)
    a_bar = a_v.view(*a_v.shape[:2], n, b).sum(-1)
    aware = js_distance(a_hat, a_bar) < tau  # (B, Hq)
    lo = -(-min_budget // b)
    hi = n if max_budget is None else max(lo, -(-max_budget // b))
    n_v = (-(-top_mass_count(a_v, gamma) // b)).clamp(min=lo, max=hi)
    n_s = (-(-top_mass_count(a_s, gamma) // b)).clamp(min=lo, max=hi)
    floor = torch.full_like(n_v, lo)
    n_v = torch.where(aware, floor, n_v)
    n_s = torch.where(aware, floor, n_s)
    first = (grid.valid.shape[1] - grid.lengths) // b  # (B,) block of the first real token
    chosen = vs_blocks(a_v, a_s, n_v, n_s, b, first)
    qa = query_aware_blocks(grid, kbar, kreal, gamma)
    qa[:, :, first, first] = True  # the first real block is always in (block (0, 0) of an unpadded prompt)
    chosen = chosen | (qa & aware[:, :, None, None])
    return dense_rows(chosen, grid.lengths, max(2 * b, min_budget)), aware


@register
@dataclass(frozen=True)
class FlexPrefill(SparsePrefill):
    """FlexPrefill: context-aware sparse prefill attention (Lai et al., ICLR 2025, arXiv:2502.20766, Algorithms 1-4).

    Per (sequence, query head), from the last block of ``b`` queries ``Q̂``:

    1. **Pattern choice** (Alg. 2). ``Â = softmax(Q̂Kᵀ/√D)`` (causal among the last queries); its block-summed
       column mass ``ā`` is the true attention distribution over key blocks, ``â = softmax(mean(Q̂) K̄ᵀ/√D)`` (``K̄``
       the block-mean keys) the cheap pooled estimate. ``d = √JSD(â, ā)``: ``d < τ`` → the pooled estimate is
       trustworthy → **query-aware** head; else **vertical-slash** head.
    2. **Vertical-slash** (Alg. 3). Vertical scores ``a_v[j]`` = column means of ``Â``, slash scores ``a_s[o]`` =
       diagonal sums at offset ``o`` divided by ``b``; keep the fewest tokens whose sorted cumulative mass reaches
       ``γ`` for each, as ``⌈count / b⌉`` blocks (clamped to ``[⌈min_budget/b⌉, ⌈max_budget/b⌉]``): the top vertical
       key blocks (read by every later query block) and the top block diagonals (pooled sums), with the first key
       block and the main diagonal forced.
    3. **Query-aware** (Alg. 4). ``Ŝ = row-softmax(Q̄K̄ᵀ/√D)`` over the block-causal grid (``Q̄`` block-mean queries);
       keep the fewest blocks of the whole map whose mass reaches ``γ`` of its total, block (0, 0) always in, plus
       a vertical-slash set at the minimum budget (as the official code).

    Defaults from the paper and README: ``γ = 0.9``, ``τ = 0.1``, ``b = 128``, ``min_budget = 512`` tokens, no
    ``max_budget``; a sequence of at most ``max(2b, min_budget)`` tokens is attended densely (the code's rule).

    Choices: the official code's token→block count is ``(count + 1) // 128 + 1`` with a hard-coded 128; we use
    ``⌈count / b⌉`` (the paper's minimal set reaching γ, in blocks). JSD with natural logarithms. Selection per query
    head (as the code, batch 1 there); batched here with padding hidden from every estimate, and the block grid
    anchored at the end of each prompt so that a padded batch equals its prompts alone. The chosen blocks are
    attended exactly by the FlexAttention kernel (:mod:`tokensieve.attention.flex`). With ``γ = 1`` every block
    holding attention mass is kept: dense attention.
    """

    name: ClassVar[str] = "flexprefill"
    paper: ClassVar[str] = (
        "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference "
        "(arXiv:2502.20766)"
    )
    rule: ClassVar[str] = (
        "per head: sqrt(JSD(pooled, true last-block attention)) < tau ? query-aware blocks : vertical-slash; "
        "fewest blocks reaching gamma of the attention mass"
    )
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 512
    max_budget: int = 0  # 0: none

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1 or self.tau < 0 or self.min_budget < 0 or self.max_budget < 0:
            raise ConfigError("flexprefill: 0 < gamma <= 1, tau >= 0, min_budget >= 0, max_budget >= 0 are required.")

    def blocks(self, grid: BlockGrid, profile: Any) -> Tensor | None:
        chosen, _ = flexprefill_blocks(grid, self.gamma, self.tau, self.min_budget, self.max_budget or None)
        return chosen
