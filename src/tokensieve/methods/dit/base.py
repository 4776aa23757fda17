"""The protocol of sparse-attention methods for diffusion transformers (DiTs), and the helpers they share.

A DiT's self-attention reads a whole video at once: ``F × H × W`` tokens (frames × rows × columns of patches, the
model's frame-major order ``t = f·H·W + y·W + x``), every query against every key, at every layer and every denoising
step. A :class:`DiTMethod` replaces that attention in one self-attention call (:class:`DiTCall`) and returns its output
with the fraction of query-key pairs it computed (:class:`Attended`). Methods keep what they learn across steps (k-means
centroids, a searched pattern, caches) in the call's ``state``, one dict per (layer, run).

Conventions every method follows:

* **Dense warm-up and dense first layers.** ``warmup`` is the fraction of the denoising steps run densely before the
  method acts (the papers' "first timesteps in full precision"), ``dense_layers`` the first layers always dense — a
  count when ≥ 1, a fraction of the layers (floored) when < 1, as each official code gives it. A dense call is plain
  SDPA, so a run whose every call is dense is the unmodified model exactly.
* **Batch = single.** Every selection is made per sequence (and head): a batch gives each sequence what it gets alone.
* **Joint attention** (image DiTs such as SD3: text tokens in the same attention): the method sparsifies video-to-video
  pairs only; every video query also reads every text key (``call.text_k``), and text queries are attended densely by
  the adapter.
* **Density** is the fraction of video query × key pairs read (a pooled key that stands for ``p`` keys counts
  ``1/p``); the ideal attention speed-up of a call is its inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...attention.bidirectional import (
    FULL,
    PARTIAL,
    SKIP,
    MaskMod,
    ScoreMod,
    block_sparse_bidirectional,
    dense_bidirectional,
)
from ...core.method import DIT, Method
from ...errors import ConfigError


@dataclass(frozen=True)
class VideoGrid:
    """The token grid of one self-attention call: ``frames × height × width`` patches (after patchifying)."""

    frames: int
    height: int
    width: int

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass
class DiTCall:
    """One self-attention call of a DiT.

    Attributes:
        q, k, v: ``(B, H, N, D)`` — the video tokens in the model's frame-major order, after norms and RoPE.
        scaling: softmax scale.
        grid: the token grid (``grid.tokens == N``).
        layer, num_layers: this self-attention's index among the model's, and how many there are.
        step, num_steps: the denoising step (0-based) and the run's step count.
        state: the method's memory for this layer across the steps of one run.
        text_k, text_v: ``(B, H, L, D)`` context keys every video query also reads (joint attention), or None.
        active: ``(B, n)`` the video tokens (indices into the grid, ascending) whose queries, keys and values this call
            holds when a token-caching method (Region-Adaptive Sampling) runs the blocks on part of the video; None:
            every token.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scaling: float
    grid: VideoGrid
    layer: int
    num_layers: int
    step: int
    num_steps: int
    state: dict[str, Any] = field(default_factory=dict)
    text_k: Tensor | None = None
    text_v: Tensor | None = None
    active: Tensor | None = None


@dataclass(frozen=True)
class Attended:
    """A call's output ``(B, H, N, D)`` and the fraction of video query-key pairs it computed."""

    out: Tensor
    density: float


def count_of(value: float, total: int) -> int:
    """A count given as a count (≥ 1) or as a fraction of ``total`` (< 1, floored)."""
    return int(value) if value >= 1 else math.floor(value * total)


@dataclass(frozen=True)
class DiTMethod(Method):
    """Base class of a DiT sparse-attention method: one frozen dataclass per paper, family ``dit`` of the one registry.

    Subclasses set ``name``, ``paper``, ``rule`` and ``budget_param`` (the field a spec's ``:value`` sets, or None when
    the paper's knob is a threshold given as a parameter) and implement :meth:`sparse`.
    """

    family: ClassVar[str] = DIT
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    budget_param: ClassVar[str | None] = None
    #: True for methods that skip whole tokens between steps (they need the adapter's token hooks)
    drops_tokens: ClassVar[bool] = False

    warmup: float = 0.0
    dense_layers: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup <= 1.0:
            raise ConfigError(f"{self.name}: warmup is a fraction of the steps in [0, 1], got {self.warmup}.")
        if self.dense_layers < 0:
            raise ConfigError(f"{self.name}: dense_layers must be ≥ 0, got {self.dense_layers}.")

    # -- when the method acts ----------------------------------------------------------------------------------
    def warmup_steps(self, num_steps: int) -> int:
        return math.floor(self.warmup * num_steps)

    def is_dense(self, call: DiTCall) -> bool:
        """The call runs dense attention: a warm-up step or one of the first dense layers."""
        return call.step < self.warmup_steps(call.num_steps) or call.layer < count_of(
            self.dense_layers, call.num_layers
        )

    def attend(self, call: DiTCall) -> Attended:
        """The call's attention output: dense during warm-up and in the first layers, else :meth:`sparse`."""
        if self.is_dense(call):
            return Attended(dense_attention(call), 1.0)
        return self.sparse(call)

    def sparse(self, call: DiTCall) -> Attended:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        if cls.drops_tokens:
            return "diffusion transformer: updates only the important tokens between denoising steps (Wan)"
        return "diffusion transformer: sparse self-attention per call (bidirectional, block-sparse)"

    def label(self) -> str:
        """The canonical spec of this method (every parameter that differs from the defaults)."""
        from .grammar import label_of

        return label_of(self)


# ----------------------------------------------------------------------------------------------------- helpers
def dense_attention(call: DiTCall) -> Tensor:
    """Plain attention of the call's video queries over its video keys (and text keys, in joint attention)."""
    k, v = call.k, call.v
    if call.text_k is not None and call.text_v is not None:
        k, v = torch.cat([k, call.text_k], 2), torch.cat([v, call.text_v], 2)
    return dense_bidirectional(call.q, k, v, call.scaling)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``(B, H, N, D)`` reordered along the tokens by ``index`` ``(B, H, N)`` (or ``(N,)``)."""
    if index.dim() == 1:
        return x.index_select(2, index)
    return torch.gather(x, 2, index[..., None].expand(*index.shape, x.shape[-1]))


def scatter_tokens(x: Tensor, index: Tensor) -> Tensor:
    """The inverse of :func:`gather_tokens`: ``out[..., index[i], :] = x[..., i, :]``."""
    out = torch.empty_like(x)
    if index.dim() == 1:
        out[:, :, index] = x
        return out
    return out.scatter_(2, index[..., None].expand(*index.shape, x.shape[-1]), x)


def blocks_of(n: int, block: int) -> int:
    return -(-n // block)


def run_blocks(
    call: DiTCall,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: Tensor,
    block: int | tuple[int, int],
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    """Block-sparse attention of video queries ``q`` ``(B, H, N_q, D)`` over video keys ``k``/``v`` ``(B, H, N_k, D)``
    and, in joint attention, every text key of the call.

    ``block`` is one size or ``(query block, key block)``; ``grid`` ``(B or 1, H or 1, ceil(N_q / block_q),
    ceil(N_k / block_k))`` int8 is the method's choice on the video blocks
    (0 skip, 1 partial through ``mask_mod``, 2 full); ``mask_mod`` and ``score_mod`` take video indices. The helper pads
    both axes to whole blocks (padding keys never read), appends the text keys as blocks every query reads, and
    returns ``(B, H, N_q, D)``.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    bq, bk = block if isinstance(block, tuple) else (block, block)
    nq, nk = blocks_of(Nq, bq), blocks_of(Nk, bk)
    Nqp, Nkp = nq * bq, nk * bk
    g = grid.to(torch.int8).expand(B, H, nq, nk)
    pad_k = Nkp > Nk
    if pad_k:  # the last key block holds padding: never full
        g = g.clone()
        last = g[..., -1]
        g[..., -1] = torch.where(last == FULL, torch.full_like(last, PARTIAL), last)
    qp = torch.cat([q, q.new_zeros(B, H, Nqp - Nq, D)], 2) if Nqp > Nq else q
    kp = torch.cat([k, k.new_zeros(B, H, Nkp - Nk, D)], 2) if pad_k else k
    vp = torch.cat([v, v.new_zeros(B, H, Nkp - Nk, D)], 2) if pad_k else v
    L = 0 if call.text_k is None else call.text_k.shape[2]
    Ltp = 0
    if L:
        assert call.text_k is not None
        assert call.text_v is not None
        nt = blocks_of(L, bk)
        Ltp = nt * bk
        tk = torch.cat([call.text_k, call.text_k.new_zeros(B, H, Ltp - L, D)], 2)
        tv = torch.cat([call.text_v, call.text_v.new_zeros(B, H, Ltp - L, D)], 2)
        kp, vp = torch.cat([kp, tk], 2), torch.cat([vp, tv], 2)
        text_cols = torch.full((B, H, nq, nt), FULL, dtype=torch.int8, device=q.device)
        if Ltp > L:
            text_cols[..., -1] = PARTIAL
        g = torch.cat([g, text_cols], -1)
    needs_mask = mask_mod is not None or pad_k or (L > 0 and Ltp > L)
    # the video rule sees only real query and key indices
    composed: MaskMod | None = None
    if needs_mask:
        user = mask_mod

        def composed(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            video = ki < Nk
            if user is not None:
                # padding queries and keys read the rule at index 0 (their result is never used)
                video = video & user(b, h, torch.where(qi < Nq, qi, 0), torch.where(ki < Nk, ki, 0))
            if L:
                return video | ((ki >= Nkp) & (ki < Nkp + L))
            return video

    smod: ScoreMod | None = None
    if score_mod is not None:
        inner = score_mod

        def smod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return torch.where(ki < Nk, inner(s, b, h, qi, torch.where(ki < Nk, ki, 0)), s)

    out = block_sparse_bidirectional(qp, kp, vp, g, block, call.scaling, mask_mod=composed, score_mod=smod)
    return out[:, :, :Nq]


def classify_blocks(allowed_counts: Tensor, block_q: int, block_k: int) -> Tensor:
    """The kernel grid from the number of allowed token pairs per block: 0 → skip, all → full, else partial."""
    full = allowed_counts >= block_q * block_k
    some = allowed_counts > 0
    return torch.where(full, FULL, torch.where(some, PARTIAL, SKIP)).to(torch.int8)


__all__ = [
    "Attended",
    "DiTCall",
    "DiTMethod",
    "VideoGrid",
    "blocks_of",
    "classify_blocks",
    "count_of",
    "dense_attention",
    "gather_tokens",
    "run_blocks",
    "scatter_tokens",
]
