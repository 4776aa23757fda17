"""Fused gather-and-attend decode kernels: a small C++ extension, compiled on first use, with PyTorch as fallback.

The PyTorch decode paths (:mod:`.sparse`, :mod:`.ragged`) copy what they read: Quest's chosen pages go through
``index_select`` into a new tensor before SDPA reads them again, and the ragged split-K writes every page's partial
output. :func:`paged_attention` reads the selected pages of a ``(N, P, D)`` pool in place and attends in one pass
(online softmax per page, split-K over chunks of pages for the threads, float32 accumulation for float32 and bfloat16
storage): the bytes it moves are the pages it reads. Per-query-head page lists are merged into their union first,
so a page several query heads of a group chose is read once (``csrc/paged_attention.cpp``).

Which implementation runs (``TOKENSIEVE_KERNELS`` or :func:`set_backend`):

* ``auto`` (default): the C++ kernel if it builds here, else the PyTorch paths, with one line on stderr saying why;
* ``torch``: always the PyTorch paths;
* ``cpp``: the C++ kernel, or a :class:`~tokensieve.errors.ConfigError` saying why it cannot be built.

The extension is built with ``torch.utils.cpp_extension`` (``-O3 -march=native -fopenmp``; threads follow
``torch.set_num_threads``) into ``$TOKENSIEVE_HOME/kernels/<name>`` (default ``~/.cache/tokensieve``), once per
source, torch version and CPU; later processes load it in well under a second. Both implementations compute the
same attention over the same entries (tested against an eager reference); they differ in float rounding only.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..errors import ConfigError
from ..paths import cache_home

ENV = "TOKENSIEVE_KERNELS"
MODES = ("auto", "torch", "cpp")
SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"

_LOCK = threading.Lock()
_MODE: str | None = None  # None: read the environment on first use
_MODULE: ModuleType | None = None
_FAILED: str | None = None  # why the extension could not be built (once per process)


def _mode() -> str:
    mode = _MODE if _MODE is not None else os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{ENV}={mode!r} is not one of {', '.join(MODES)}.")
    return mode


def set_backend(mode: str | None) -> str | None:
    """Choose the decode kernels for this process (``auto``, ``torch``, ``cpp``; None: back to ``$TOKENSIEVE_KERNELS``);
    returns the previous choice."""
    global _MODE
    if mode is not None and mode not in MODES:
        raise ConfigError(f"Unknown kernel backend {mode!r}; choose one of {', '.join(MODES)}.")
    previous, _MODE = _MODE, mode
    return previous


def _cpu_tag() -> str:
    """What the compiled code depends on besides its source: compiler target (-march=native), torch, Python."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}|{flags}|{torch.__version__}|{sys.version_info[:2]}"


def build_dir() -> Path:
    """Where the extension is (or will be) built: one folder per source, torch version and CPU."""
    h = hashlib.sha256(SOURCE.read_bytes() + _cpu_tag().encode()).hexdigest()[:12]
    return cache_home() / "kernels" / f"tokensieve_paged_{h}"


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ({cxx}; install g++ or set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI package puts the binary on PATH of its own)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    return None


def _build() -> ModuleType:
    """Compile (first use) or load the extension; raises RuntimeError with the reason."""
    why = _compiler_missing()
    if why is not None:
        raise RuntimeError(why)
    from torch.utils.cpp_extension import load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    name = out.name
    if not any(out.glob(f"{name}*.so")):
        print(f"tokensieve: compiling the fused decode kernels into {out} (once)", file=sys.stderr)
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
    return load(name=name, sources=[str(SOURCE)], build_directory=str(out), extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip


def kernels() -> ModuleType | None:
    """The compiled extension if the backend is ``cpp`` or ``auto`` and it builds here, else None."""
    global _MODULE, _FAILED
    mode = _mode()
    if mode == "torch":
        return None
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is None and _FAILED is None:
            try:
                _MODULE = _build()
            except Exception as exc:  # a compiler error, a missing tool: the PyTorch paths still work
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                _FAILED = first
                if mode == "auto":
                    print(f"tokensieve: fused decode kernels unavailable ({first}); using the PyTorch kernels "
                          f"(set {ENV}=torch to silence this)", file=sys.stderr)  # fmt: skip
    if _MODULE is None and mode == "cpp":
        raise ConfigError(f"{ENV}=cpp: the fused decode kernels cannot be built here: {_FAILED}.")
    return _MODULE


def backend() -> str:
    """``cpp`` or ``torch``: what the decode paths run now (builds the extension on first call in ``auto``)."""
    return "cpp" if kernels() is not None else "torch"


def paged_attention(
    q: Tensor,
    kpages: Tensor,
    vpages: Tensor,
    pages: Tensor,
    scaling: float,
    *,
    bias: Tensor | None = None,
    per_row: int = 0,
    limit: int = 0,
) -> tuple[Tensor, Tensor]:
    """One decode step over pages of a pool, read in place (the C++ kernel; see the module docstring).

    Args:
        q: ``(R, G, D)`` the queries of each row (the query heads of its KV head's group).
        kpages, vpages: ``(N, P, D)`` the pool, contiguous, float32 or bfloat16.
        pages: ``(R, S, W)`` long page ids each row reads, -1 for none; ``S = 1``: one list for the whole group,
            ``S = G``: one list per query head (their union is read, each page once).
        scaling: softmax scale.
        bias: ``(N, P)`` additive logit bias of every slot (``-inf``: empty slot), the pool's dtype, or None.
        per_row, limit: for a row-major dense layout (``per_row`` pages per row), slot ``j`` of page ``p`` exists
            only if ``(p % per_row) * P + j < limit``; ``per_row = 0``: every slot exists.

    Returns:
        (``(R, G, D)`` in ``q``'s dtype — zeros for a query with nothing to attend to —, ``(R,)`` long: distinct
        pages read per row).
    """
    mod = kernels()
    if mod is None:
        raise ConfigError(f"The fused decode kernels are not in use ({ENV}={_mode()}, {_FAILED or 'not built'}).")
    empty = kpages.new_empty(0)
    out, counts = mod.paged_attention(q, kpages, vpages, pages, empty if bias is None else bias, int(per_row),
                                      int(limit), float(scaling))  # fmt: skip
    return out, counts


def contiguous_attention(q: Tensor, keys: Tensor, values: Tensor, n: int, scaling: float, page: int = 16) -> Tensor:
    """One decode step over the first ``n`` slots of contiguous key/value buffers, read in place by the C++ kernel:
    every page of each row (the buffers viewed as a pool of ``page``-slot pages, the last one partial).

    q ``(B, H_q, 1, D)``; keys, values ``(B, H_kv, capacity, D)`` contiguous, ``capacity`` a multiple of ``page``
    → ``(B, H_q, 1, D)``. No mask: every one of the ``n`` slots is attended (what a decode step over an unpadded,
    unbiased cache computes)."""
    B, Hq, _, D = q.shape
    H, cap = keys.shape[1], keys.shape[2]
    if cap % page or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError(
            f"contiguous_attention: buffers must be contiguous with a capacity that is a multiple of {page}."
        )
    per_row = cap // page
    used = -(-n // page)
    ids = torch.arange(B * H, device=q.device)[:, None] * per_row + torch.arange(used, device=q.device)
    kp, vp = keys.view(B * H * per_row, page, D), values.view(B * H * per_row, page, D)
    out, _ = paged_attention(q.reshape(B * H, Hq // H, D), kp, vp, ids.view(B * H, 1, used), scaling,
                             per_row=per_row, limit=n)  # fmt: skip
    return out.view(B, Hq, 1, D)


def page_bounds(qg: Tensor, meta: Tensor, cur: int) -> Tensor:
    """Quest's bounds of the first ``cur`` pages, as :func:`tokensieve.attention.sparse.page_bounds` computes them,
    with the metadata read once (the C++ kernel where it is built, else that function): qg ``(B, H, G, D)``, meta
    ``(B, H, 2D, pages)`` → ``(B, H, G, cur)`` in the metadata's dtype (accumulated in float32)."""
    mod = kernels()
    if mod is None:
        from .sparse import page_bounds as torch_bounds

        return torch_bounds(qg, meta[..., :cur])
    B, H, G, D = qg.shape
    out = mod.page_bounds(qg.reshape(B * H, G, D), meta.reshape(B * H, 2 * D, meta.shape[-1]), int(cur))
    return out.view(B, H, G, cur)


def owner_table(page_row: Tensor, rows: int) -> Tensor:
    """``(rows, 1, W)`` long: each row's pages in pool order (-1 past its last page), from ``page_row`` ``(N,)``
    (the row owning each page, -1 for a free page); linear time."""
    mod = kernels()
    if mod is not None:
        return mod.owner_table(page_row, int(rows))
    counts = torch.bincount(page_row[page_row >= 0], minlength=rows)
    order = torch.argsort(torch.where(page_row >= 0, page_row, rows), stable=True)[: int(counts.sum())]
    W = int(counts.max()) if rows and counts.numel() else 0
    first = torch.cumsum(counts, 0) - counts
    owners = page_row[order]
    table = torch.full((rows, 1, W), -1, dtype=torch.long, device=page_row.device)
    table[owners, 0, torch.arange(order.numel(), device=order.device) - first[owners]] = order
    return table


__all__ = ["ENV", "backend", "build_dir", "kernels", "owner_table", "page_bounds", "paged_attention", "set_backend"]
