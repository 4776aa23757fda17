"""Block-sparse *bidirectional* attention on PyTorch's FlexAttention: the kernel of the diffusion-transformer methods.

A diffusion transformer's self-attention has no causal mask: every token reads every token. A sparse method chooses,
per (sequence, head), which key blocks each query block reads — a ``(B, H, n_q, n_k)`` int8 grid on ``block``-token
blocks: 0 = skip, 1 = *partial* (the block's token pairs pass through ``mask_mod``), 2 = *full* (every pair read, no
per-token mask evaluated). :func:`block_sparse_bidirectional` runs exact softmax attention over the chosen pairs with
``torch.nn.attention.flex_attention`` and a ``BlockMask``:

* **Shapes.** ``q`` ``(B, H, T_q, D)``, ``k``/``v`` ``(B, H, T_k, D)``; both lengths multiples of ``block`` (the
  caller pads and hides padding keys through ``mask_mod``). ``T_q`` and ``T_k`` may differ (pooled keys appended, as
  Pyramid Sparse Attention does).
* **Token rules** are one small function each: ``mask_mod(b, h, q, k) -> bool`` (FlexAttention's signature, indices
  are tensors) refines partial blocks; ``score_mod(s, b, h, q, k) -> s'`` changes logits (e.g. ``+ log p`` for a key
  that stands for ``p`` pooled keys).
* **Compilation**: FlexAttention compiled with static shapes (a DiT's geometry is fixed for a run, so one graph per
  geometry and token rule; with ``dynamic=True`` torch 2.13's CPU template misnames the symbolic sizes of tensors a
  rule reads and fails to compile). Dynamo's recompilation limits are raised to 64 graphs so that several methods
  and geometries in one process stay compiled. :func:`tokensieve.attention.flex.set_compile` switches this kernel and
  the causal one to the reference path, which materialises the same token mask and runs dense masked attention
  (tests on small tensors). Calls are
  counted in :data:`tokensieve.attention.flex.STATS` (``selected_blocks`` over ``n_q · n_k`` per head as
  ``causal_blocks``: the density of a call is their ratio).

A query row whose every key is masked returns zeros in the compiled kernel and NaN-free zeros in the reference path;
callers keep at least one key per query (the methods always keep the diagonal block).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import flex as _flex_mod
from .flex import STATS

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

SKIP, PARTIAL, FULL = 0, 1, 2


_STATIC: dict[str, Callable[..., Any]] = {}


def _flex_static() -> Callable[..., Any]:
    """FlexAttention compiled with static shapes (once per process)."""
    from torch.nn.attention.flex_attention import flex_attention

    with _flex_mod._LOCK:
        fn = _STATIC.get("flex")
        if fn is None:
            import torch._dynamo.config as dcfg

            dcfg.cache_size_limit = max(dcfg.cache_size_limit, 64)
            dcfg.accumulated_cache_size_limit = max(dcfg.accumulated_cache_size_limit, 512)
            fn = _STATIC["flex"] = torch.compile(flex_attention, dynamic=False)
        return fn


def _index(m: Tensor) -> tuple[Tensor, Tensor]:
    """FlexAttention's (num_blocks, indices) of a bool ``(B, H, n_q, n_k)`` grid, chosen blocks first."""
    num = m.sum(-1).to(torch.int32).contiguous()
    ind = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    return num, ind


def block_sparse_bidirectional(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    blocks: Tensor,
    block: int | tuple[int, int],
    scaling: float,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    """Bidirectional attention over the chosen key blocks.

    Args:
        q: ``(B, H, T_q, D)``; k, v: ``(B, H, T_k, D)``; ``T_q`` and ``T_k`` multiples of ``block``.
        blocks: ``(B or 1, H or 1, T_q / block, T_k / block)`` int8 (or bool: True = full): 0 skip, 1 partial, 2 full.
        block: block size in tokens, or ``(query block, key block)``.
        scaling: softmax scale.
        mask_mod: the token rule of partial blocks (None: every pair of a partial block is read).
        score_mod: a logit modifier applied to every read pair (None: plain softmax).

    Returns:
        ``(B, H, T_q, D)``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, H, Tq, _D = q.shape
    Tk = k.shape[2]
    bq, bk = block if isinstance(block, tuple) else (block, block)
    if Tq % bq or Tk % bk:
        raise ValueError(f"lengths must be multiples of the blocks {bq}, {bk}; got T_q={Tq}, T_k={Tk}.")
    nq, nk = Tq // bq, Tk // bk
    grid = blocks.to(torch.int8) * 2 if blocks.dtype == torch.bool else blocks.to(torch.int8)
    if grid.shape[-2:] != (nq, nk):
        raise ValueError(f"blocks must be (B, H, {nq}, {nk}); got {tuple(blocks.shape)}.")
    grid = grid.expand(B, H, nq, nk)
    if mask_mod is None:
        grid = torch.where(grid > 0, torch.full_like(grid, FULL), grid)
    full = grid == FULL
    partial = grid == PARTIAL
    with _flex_mod._LOCK:
        STATS.selected_blocks += int((grid > 0).sum())
        STATS.causal_blocks += B * H * nq * nk
    if not _flex_mod._COMPILE:
        with _flex_mod._LOCK:
            STATS.calls += 1
        return _reference(q, k, v, grid, (bq, bk), scaling, mask_mod, score_mod)
    num, ind = _index(partial)
    fnum, find = _index(full)

    def always(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return qi >= 0

    bm = BlockMask.from_kv_blocks(
        num, ind, fnum, find, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod or always, seq_lengths=(Tq, Tk)
    )
    fn = _flex_static()
    before = _flex_mod._unique_graphs()
    t0 = time.perf_counter()
    out = fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=scaling)
    dt = time.perf_counter() - t0
    with _flex_mod._LOCK:
        STATS.calls += 1
        after = _flex_mod._unique_graphs()
        if after > before:
            STATS.compiles += after - before
            STATS.compile_seconds += dt
        else:
            STATS.steady_seconds += dt
    assert isinstance(out, Tensor)
    return out


def token_mask(
    grid: Tensor, block: tuple[int, int], Tq: int, Tk: int, mask_mod: MaskMod | None, device: torch.device
) -> Tensor:
    """The ``(B, H, T_q, T_k)`` bool mask the kernel reads: chosen blocks, partial ones refined by ``mask_mod``."""
    B, H = grid.shape[:2]
    tok = grid.repeat_interleave(block[1], -1).repeat_interleave(block[0], -2)  # (B, H, Tq, Tk) int8
    mask = tok == FULL
    if mask_mod is not None:
        b = torch.arange(B, device=device)[:, None, None, None]
        h = torch.arange(H, device=device)[None, :, None, None]
        qi = torch.arange(Tq, device=device)[None, None, :, None]
        ki = torch.arange(Tk, device=device)[None, None, None, :]
        refined = mask_mod(b, h, qi, ki).expand(B, H, Tq, Tk)
        mask = mask | ((tok == PARTIAL) & refined)
    else:
        mask = mask | (tok == PARTIAL)
    return mask


def _reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: Tensor,
    block: tuple[int, int],
    scaling: float,
    mask_mod: MaskMod | None,
    score_mod: ScoreMod | None,
) -> Tensor:
    """Dense attention under the kernel's token mask and logit modifier (small tensors, tests)."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    mask = token_mask(grid, block, Tq, Tk, mask_mod, q.device)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if score_mod is not None:
        b = torch.arange(B, device=q.device)[:, None, None, None]
        h = torch.arange(H, device=q.device)[None, :, None, None]
        qi = torch.arange(Tq, device=q.device)[None, None, :, None]
        ki = torch.arange(Tk, device=q.device)[None, None, None, :]
        logits = score_mod(logits, b, h, qi, ki)
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def dense_bidirectional(q: Tensor, k: Tensor, v: Tensor, scaling: float) -> Tensor:
    """Plain bidirectional attention (SDPA): ``(B, H, T_q, D)`` over ``(B, H, T_k, D)``."""
    return F.scaled_dot_product_attention(q, k, v, scale=scaling)


def pad_tokens(x: Tensor, multiple: int, dim: int = 2) -> tuple[Tensor, int]:
    """``x`` padded with zeros at the end of ``dim`` to a multiple of ``multiple``, and the pad length."""
    n = x.shape[dim]
    pad = -n % multiple
    if pad == 0:
        return x, 0
    shape: list[Any] = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim), pad


__all__ = [
    "FULL",
    "PARTIAL",
    "SKIP",
    "MaskMod",
    "ScoreMod",
    "block_sparse_bidirectional",
    "dense_bidirectional",
    "pad_tokens",
    "token_mask",
]
