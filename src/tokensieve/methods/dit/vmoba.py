"""VMoBA: mixture-of-block attention for video — 1D/2D/3D key blocks by layer, global threshold selection per head.

Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models", arXiv:2506.23858 (2025); checked against
the authors' single-file implementation (KwaiVGI/VMoBA, ``src/vmoba.py``: ``process_moba_input``,
``moba_attn_varlen`` and ``_select_threshold_head_global``).

**Rule.** Keys are partitioned into blocks ("chunks") that cycle with the layer: layer ``l`` uses a 1D partition
(``l mod 3 = 0``: runs of ``chunk_1d`` whole frames), a 2D one (``= 1``: ``chunk_2d = (h, w)`` spatial tiles through all
frames) or a 3D one (``= 2``: ``chunk_3d = (t, h, w)`` space-time cubes); the tokens are rearranged so that every chunk
is contiguous (``process_moba_input``). A chunk is represented by the mean of its keys; every query token scores every
chunk by ``q · mean(k)`` (the gate). Selection is *global per head* and *threshold-based*: the gate is min-max
normalised over all (chunk, query) pairs of the head; each query always reads its own chunk; the other (chunk, query)
pairs of the head are taken in descending order of normalised gate until the selected mass (own chunks included)
reaches ``threshold`` of the head's total. Each query then attends exactly over the keys of its selected chunks. (The
pair of least gate normalises to 0 and is never needed to reach a threshold ≤ 1: a threshold above 1 reads every
chunk, the keep-all setting.)

**Defaults.** ``threshold = 0.25`` and threshold-based selection, as ``moba_attn_varlen``'s defaults; global per-head
selection (``select = "head_global"``) as the paper describes it (the function's default ``"query_head"``, the same
rule per query, is available as ``select=query_head``). No dense steps or layers (the paper trains with VMoBA from the
start). Chunk shapes are not given for Wan in the paper or code; ours: one frame (1D), a quarter of each side (2D),
half the frames × a quarter of each side (3D), each at least one token.

**Choices.** As the authors' varlen kernel: per (sequence, head, chunk), the queries that selected the chunk are
gathered and attend over the chunk's keys (one matrix product each, with the log-sum-exp of every query's logits), and
each query's pieces are merged by their log-sum-exps — exact softmax attention over the union of its chunks, the work
the density's. In joint attention the text keys are one more piece every query reads. The density is the exact
fraction of (query, key) pairs read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.registry import register
from ...errors import ConfigError
from .base import Attended, DiTCall, DiTMethod, VideoGrid


def chunk_layout(grid: VideoGrid, shape: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """The rearrangement that makes ``shape`` = (t, h, w) chunks contiguous: ``order`` ``(N,)`` (frame-major index at
    each new position), ``chunk`` ``(N,)`` (chunk id at each new position) and the number of chunks. Edge chunks
    may be smaller."""
    F, H, W = grid.frames, grid.height, grid.width
    t, h, w = (max(1, min(a, b)) for a, b in zip(shape, (F, H, W)))
    f = torch.arange(F, device=device)[:, None, None]
    y = torch.arange(H, device=device)[None, :, None]
    x = torch.arange(W, device=device)[None, None, :]
    nh, nw = -(-H // h), -(-W // w)
    cid = ((f // t) * nh + y // h) * nw + x // w  # (F, H, W)
    inner = ((f % t) * h + y % h) * w + x % w
    key = (cid * (t * h * w) + inner).reshape(-1)
    order = torch.argsort(key, stable=True)
    chunk = cid.reshape(-1)[order]
    return order, chunk, int(cid.max()) + 1


def select_head_global(gate: Tensor, own: Tensor, threshold: float) -> Tensor:
    """``_select_threshold_head_global``: gate ``(B, H, N, C)``, own ``(B, H, N, C)`` bool (each query's chunk) →
    selected ``(B, H, N, C)``."""
    B, H, N, C = gate.shape
    eps = 1e-6
    g = gate.flatten(2)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    den = torch.where(hi - lo <= eps, torch.ones_like(hi), hi - lo)
    norm = (g - lo) / den  # (B, H, N*C)
    own_f = own.flatten(2)
    total = norm.sum(-1)
    remain = (threshold - (norm * own_f).sum(-1) / (total + eps)).clamp(min=0)
    others = torch.where(own_f, torch.zeros_like(norm), norm)
    vals, idx = torch.sort(others, dim=-1, descending=True)
    ratio = vals.cumsum(-1) / (total[..., None] + eps)
    cond = ratio >= remain[..., None]
    cutoff = torch.where(cond.any(-1), cond.float().argmax(-1), torch.full_like(total, N * C - 1).long())
    take = torch.arange(N * C, device=gate.device) <= cutoff[..., None]
    picked = torch.zeros_like(own_f).scatter_(-1, idx, take)
    return (picked | own_f).view(B, H, N, C)


def select_query_head(gate: Tensor, own: Tensor, threshold: float) -> Tensor:
    """``_select_threshold_query_head``: the same rule for each query over its chunks."""
    eps = 1e-6
    lo, hi = gate.amin(-1, keepdim=True), gate.amax(-1, keepdim=True)
    den = torch.where(hi - lo <= eps, torch.ones_like(hi), hi - lo)
    norm = (gate - lo) / den
    total = norm.sum(-1)
    remain = (threshold - (norm * own).sum(-1) / (total + eps)).clamp(min=0)
    others = torch.where(own, torch.zeros_like(norm), norm)
    vals, idx = torch.sort(others, dim=-1, descending=True)
    ratio = vals.cumsum(-1) / (total[..., None] + eps)
    cond = ratio >= remain[..., None]
    C = gate.shape[-1]
    cutoff = torch.where(cond.any(-1), cond.float().argmax(-1), torch.full_like(total, C - 1).long())
    take = torch.arange(C, device=gate.device) <= cutoff[..., None]
    return torch.zeros_like(own).scatter_(-1, idx, take) | own


@register
@dataclass(frozen=True)
class VMoBA(DiTMethod):
    """VMoBA: mixture-of-block attention for video — 1D/2D/3D key blocks by layer, global threshold selection per head.

    The module docstring states the rule, the code it was checked against and the defaults.
    """

    name: ClassVar[str] = "vmoba"
    paper: ClassVar[str] = "Wu et al., VMoBA, arXiv:2506.23858 (2025)"
    rule: ClassVar[str] = "1D/2D/3D key chunks cycling by layer; (query, chunk) by q·mean(k), global per-head threshold"

    threshold: float = 0.25
    select: str = "head_global"
    chunk_1d: int = 1
    chunk_2d: tuple[int, int] = (0, 0)  # (h, w) in patches; 0: a quarter of the side
    chunk_3d: tuple[int, int, int] = (0, 0, 0)  # (t, h, w); 0: half the frames, a quarter of each side

    @classmethod
    def summary(cls) -> str:
        return "diffusion transformer: sparse self-attention per call (bidirectional, exact query-chunk pairs)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.threshold > 0 or self.select not in ("head_global", "query_head"):
            raise ConfigError("vmoba: threshold > 0, select head_global or query_head.")

    def chunk_shape(self, layer: int, grid: VideoGrid) -> tuple[int, int, int]:
        F, H, W = grid.frames, grid.height, grid.width
        kind = layer % 3
        if kind == 0:
            return (self.chunk_1d, H, W)
        if kind == 1:
            h, w = self.chunk_2d
            return (F, h or max(1, H // 4), w or max(1, W // 4))
        t, h, w = self.chunk_3d
        return (t or max(1, F // 2), h or max(1, H // 4), w or max(1, W // 4))

    def sparse(self, call: DiTCall) -> Attended:
        q, k = call.q, call.k
        B, H, N, _D = q.shape
        order, chunk, C = chunk_layout(call.grid, self.chunk_shape(call.layer, call.grid), q.device)
        cid = torch.empty_like(chunk)
        cid[order] = chunk  # the chunk of every (frame-major) token
        onehot = torch.nn.functional.one_hot(cid, C).float()  # (N, C)
        sizes = onehot.sum(0)  # (C,)
        mean_k = torch.einsum("bhnd,nc->bhcd", k.float(), onehot) / sizes[:, None]
        gate = torch.matmul(q.float(), mean_k.transpose(-1, -2))  # (B, H, N, C)
        own = onehot.bool()[None, None].expand(B, H, N, C)
        pick = select_head_global if self.select == "head_global" else select_query_head
        sel = pick(gate, own, self.threshold)  # (B, H, N, C)
        density = float((sel.float() * sizes).sum()) / (B * H * N * N)
        return Attended(chunk_attention(call, sel, cid, C), density)


def chunk_attention(call: DiTCall, sel: Tensor, cid: Tensor, C: int) -> Tensor:
    """Each query over the keys of its selected chunks: ``sel`` ``(B, H, N, C)`` bool, ``cid`` ``(N,)`` the chunk of
    every token. Per (sequence, head, chunk) one attention of the selecting queries over the chunk's keys; the pieces
    are merged per query by their log-sum-exps (and the text keys of joint attention are one more piece)."""
    q, k, v = call.q, call.k, call.v
    B, H, N, D = q.shape
    members = [torch.nonzero(cid == c).squeeze(1) for c in range(C)]
    out = torch.empty_like(q)
    everyone = torch.arange(N, device=q.device)
    for b in range(B):
        for h in range(H):
            rows, lses, outs = [], [], []
            pieces = [(torch.nonzero(sel[b, h, :, c]).squeeze(1), k[b, h, members[c]], v[b, h, members[c]])
                      for c in range(C)]  # fmt: skip
            if call.text_k is not None and call.text_v is not None:
                pieces.append((everyone, call.text_k[b, h], call.text_v[b, h]))
            for qi, kc, vc in pieces:
                if qi.numel() == 0:
                    continue
                logits = torch.matmul(q[b, h, qi].float(), kc.float().T) * call.scaling
                lse = torch.logsumexp(logits, -1)
                rows.append(qi)
                lses.append(lse)
                outs.append(torch.matmul(torch.exp(logits - lse[:, None]), vc.float()))
            idx, lse, o = torch.cat(rows), torch.cat(lses), torch.cat(outs)
            top = torch.full((N,), float("-inf"), device=q.device).scatter_reduce(0, idx, lse, "amax")
            w = torch.exp(lse - top[idx])
            total = torch.zeros(N, device=q.device).index_add_(0, idx, w)
            acc = torch.zeros(N, D, device=q.device).index_add_(0, idx, w[:, None] * o)
            out[b, h] = (acc / total[:, None]).to(q.dtype)
    return out
