"""Block-sparse causal prefill attention on PyTorch's FlexAttention (CPU or GPU).

A prefill sparse-attention method chooses, per (sequence, query head), which key *blocks* each query block reads: a
``(B, H_q, n, n)`` bool matrix over a grid of ``block``-token blocks. :func:`block_sparse_attention` runs exact
softmax attention over the chosen blocks with ``torch.nn.attention.flex_attention`` and a ``BlockMask``:

* **The grid is anchored at the end of the prompt.** The prompt is padded at the front to a multiple of ``block``
  (padding keys masked), so block ``i`` always ends ``(n - 1 - i) · block`` tokens before the last token. Left-padded
  sequences of a batch then share one grid with their unpadded selves, and a batch equals its sequences run alone.
* **Blocks strictly below the diagonal** whose keys are all real (and all inside a sliding window) are passed as
  *full* blocks (no per-token mask evaluated); the rest as partial blocks under the token mask: causal, padding
  keys hidden (a query always sees itself), and the layer's sliding window.
* **Modifiers**: a sliding window (transformers' rule ``p − k < window``) is part of the token mask; logit
  soft-capping (Gemma-2) is a ``score_mod``.
* **Compilation**: FlexAttention is only fast compiled. It is compiled once per process with ``dynamic=True``, so
  prompt lengths do not recompile (measured: one compile, then 1000-3000-token prompts reuse it); batch size 1 and
  larger batches are two graphs (dynamo specialises sizes 1), the soft-capped variant another. Inductor also keeps
  compiled code on disk (its cache directory), so a later process compiles faster. Time spent in calls that
  compiled a graph is counted in :data:`STATS` apart from steady-state calls. :func:`set_compile` (or
  ``TOKENSIEVE_FLEX_COMPILE=0``) computes the same token mask densely instead (no compilation; memory grows with
  ``T²``: for tests on small tensors).

With every causal block chosen the result equals dense causal attention (tested against SDPA).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .dense import PLAIN, Modifiers, grouped_attention


@dataclass
class FlexStats:
    """What the kernel did in this process.

    Attributes:
        compile_seconds: wall time of the calls that compiled a graph (compilation and that call's run).
        compiles: graphs compiled.
        steady_seconds: wall time of the other calls.
        calls: calls.
        selected_blocks / causal_blocks: blocks attended vs blocks of dense causal attention, summed over calls,
            sequences and query heads (padding-only blocks excluded) — the density is their ratio.
    """

    compile_seconds: float = 0.0
    compiles: int = 0
    steady_seconds: float = 0.0
    calls: int = 0
    selected_blocks: int = 0
    causal_blocks: int = 0

    @property
    def density(self) -> float:
        return self.selected_blocks / self.causal_blocks if self.causal_blocks else 1.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


STATS = FlexStats()
_LOCK = threading.Lock()
_COMPILED: dict[str, Callable[..., Any]] = {}
_COMPILE = os.environ.get("TOKENSIEVE_FLEX_COMPILE", "1") not in ("0", "false", "no", "off")


def set_compile(enabled: bool) -> bool:
    """Compile FlexAttention (the default) or compute the same mask densely (tests on tiny tensors); returns the
    previous value."""
    global _COMPILE
    previous, _COMPILE = _COMPILE, enabled
    return previous


def _flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    if not _COMPILE:
        return flex_attention
    with _LOCK:
        fn = _COMPILED.get("flex")
        if fn is None:
            fn = _COMPILED["flex"] = torch.compile(flex_attention, dynamic=True)
        return fn


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def causal_block_grid(n: int, device: torch.device | None = None) -> Tensor:
    """``(n, n)`` bool: key block ``j`` can hold keys visible to query block ``i`` (``j <= i``)."""
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None]


def front_pad(x: Tensor, pad: int) -> Tensor:
    """``x`` ``(B, H, T, D)`` with ``pad`` zero rows in front of the token axis."""
    return x if pad == 0 else F.pad(x, (0, 0, pad, 0))


def grid_valid(valid: Tensor | None, B: int, T: int, block: int, device: torch.device) -> tuple[Tensor, int]:
    """The padding mask ``(B, T_p)`` on the end-anchored grid (``T_p`` a multiple of ``block``) and the front pad."""
    n = -(-T // block)
    pad = n * block - T
    v = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    return torch.cat([torch.zeros(B, pad, dtype=torch.bool, device=device), v], 1), pad


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    blocks: Tensor,
    block: int,
    valid: Tensor | None,
    scaling: float,
    mods: Modifiers = PLAIN,
) -> Tensor:
    """Causal attention of a fresh prompt over the chosen key blocks.

    Args:
        q: ``(B, H_q, T, D)``; k, v: ``(B, H_kv, T, D)`` (GQA: query head ``h`` reads KV head ``h // G``).
        blocks: ``(B, H_q, n, n)`` bool on the end-anchored grid (``n = ceil(T / block)``): query block ``i`` reads
            key block ``j``. Blocks above the diagonal are ignored; the diagonal is always read.
        block: block size in tokens.
        valid: ``(B, T)`` bool padding mask (left padding) or None.
        scaling: softmax scale.
        mods: the layer's sliding window and logit soft-capping.

    Returns:
        ``(B, H_q, T, D)``. A padding query reads itself only (finite, never used).
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, Hq, T, _ = q.shape
    n = -(-T // block)
    if blocks.shape[-2:] != (n, n):
        raise ValueError(f"blocks must be (B, H_q, {n}, {n}) for T={T}, block={block}; got {tuple(blocks.shape)}.")
    dev = q.device
    gv, pad = grid_valid(valid, B, T, block, dev)
    Tp = n * block
    qp, kp, vp = front_pad(q, pad), front_pad(k, pad), front_pad(v, pad)
    start = (Tp - gv.sum(-1)).to(torch.long)  # first real token per sequence (left padding)
    causal = causal_block_grid(n, dev)
    chosen = blocks.to(torch.bool).expand(B, Hq, n, n) & causal | torch.eye(n, dtype=torch.bool, device=dev)
    idx = torch.arange(n, device=dev)
    # a full block: strictly below the diagonal, every key real, every key inside the window for every query
    full_ok = (idx[None, :] < idx[:, None])[None] & (idx[None, None, :] * block >= start[:, None, None])  # (B, n, n)
    window = mods.window if mods.window is not None else Tp + 1
    full_ok = full_ok & ((idx[:, None] * block + block - 1 - idx[None, :] * block) < window)[None]
    full = chosen & full_ok[:, None]
    partial = chosen & ~full
    real_blocks = idx[None, :] * block + block > start[:, None]  # (B, n): blocks holding a real token
    with _LOCK:
        STATS.selected_blocks += int((chosen & real_blocks[:, None, :, None] & real_blocks[:, None, None, :]).sum())
        STATS.causal_blocks += int(
            ((causal[None] & real_blocks[:, :, None] & real_blocks[:, None, :]).sum(dim=(1, 2)) * Hq).sum()
        )

    def index(m: Tensor) -> tuple[Tensor, Tensor]:
        return m.sum(-1).to(torch.int32).contiguous(), torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(
            torch.int32
        ).contiguous()

    grid = chosen.contiguous()

    # The compiled kernel never visits a block outside the BlockMask, so the token mask need not repeat the block
    # choice (eager FlexAttention would ignore it: the uncompiled path below materialises both instead).
    # ``window`` stays a Python int (dynamic with the shapes: no recompilation per length, measured); as a captured
    # 0-d tensor it hits an Inductor CPU code-generation error in torch 2.13 for batches > 1.
    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        seen = (ki <= qi) & ((ki >= start[b]) | (ki == qi))
        return seen & (qi - ki < window)

    num, ind = index(partial)
    fnum, find = index(full)
    bm = BlockMask.from_kv_blocks(num, ind, fnum, find, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Tp, Tp))
    score_mod = None
    if mods.softcap is not None:
        cap = torch.tensor(float(mods.softcap), dtype=torch.float32, device=dev)

        def score_mod(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return cap * torch.tanh(s / cap)

    if not _COMPILE:  # the same token mask, materialised: dense masked attention (small tensors, tests)
        with _LOCK:
            STATS.calls += 1
        return _masked(qp, kp, vp, grid, block, start, window, scaling, mods.softcap)[:, :, pad:]
    fn = _flex()
    before = _unique_graphs() if _COMPILE else 0
    t0 = time.perf_counter()
    out = fn(qp, kp, vp, score_mod=score_mod, block_mask=bm, scale=scaling, enable_gqa=Hq != k.shape[1])
    dt = time.perf_counter() - t0
    with _LOCK:
        STATS.calls += 1
        if _COMPILE and _unique_graphs() > before:
            STATS.compiles += _unique_graphs() - before
            STATS.compile_seconds += dt
        else:
            STATS.steady_seconds += dt
    assert isinstance(out, Tensor)
    return out[:, :, pad:]


def _masked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: Tensor,
    block: int,
    start: Tensor,
    window: int,
    scaling: float,
    softcap: float | None,
) -> Tensor:
    """Dense attention under the kernel's token mask ``(B, H_q, T_p, T_p)`` (the reference path)."""
    B, Hq, Tp, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    i = torch.arange(Tp, device=q.device)
    tok = grid.repeat_interleave(block, -1).repeat_interleave(block, -2)  # (B, Hq, Tp, Tp)
    seen = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # (Tp, Tp)
    real = (i[None, :] >= start[:, None])[:, None, :] | (i[None, :] == i[:, None])[None]  # (B, Tp, Tp)
    mask = tok & seen[None, None] & real[:, None]
    out = grouped_attention(q.reshape(B, Hkv, G * Tp, D), k, v, scaling, mask.reshape(B, Hkv, G * Tp, Tp), softcap)
    return out.reshape(B, Hq, Tp, D)


__all__ = [
    "STATS",
    "FlexStats",
    "block_sparse_attention",
    "causal_block_grid",
    "front_pad",
    "grid_valid",
    "set_compile",
]
