"""Kernel measurements (``tokensieve bench --kernels``): medians per path, the fraction of the bandwidth bound, the
ratios against dense attention of the same run, and their table.

A row (stored or fresh) carries ``label`` (the path and its backend, e.g. ``quest-kv[cpp]``), ``method`` (the path),
``length``, ``batch``, ``attn_ms`` (one call), ``bytes_read`` and ``extra`` (JSON): ``dtype``, ``phase`` (decode or
prefill), ``stream_ms`` (a streaming read of the same number of bytes, measured in the same repetition) and what is
particular to a path (the union of Quest's pages, a sparse prefill's block density).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from .render import Block, fmt


def _extra(row: Mapping[str, Any]) -> dict[str, Any]:
    e = row.get("extra")
    if isinstance(e, str):
        try:
            e = json.loads(e)
        except ValueError:
            return {}
    return dict(e) if isinstance(e, Mapping) else {}


def _q(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def kernel_summary(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (path, length, batch, dtype): medians over repetitions, the fraction of the bandwidth bound
    (median streaming time of the same bytes / median time) and the speed-up over dense attention of the same shape
    (``dense`` for decode paths, ``prefill-dense`` for prefill paths), and a decode path's time over SnapKV's."""
    groups: dict[tuple[str, int, int, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        e = _extra(r)
        groups.setdefault((str(r["label"]), int(r["length"]), int(r["batch"]), str(e.get("dtype", ""))), []).append(r)
    out: list[dict[str, Any]] = []
    for (label, length, batch, dtype), rs in groups.items():
        e0 = _extra(rs[0])
        ms = [float(r["attn_ms"]) for r in rs if r.get("attn_ms") is not None]
        if not ms:
            continue
        streams = [float(_extra(r)["stream_ms"]) for r in rs if _extra(r).get("stream_ms") is not None]
        lo, hi = _q(ms)
        med = statistics.median(ms)
        stream = statistics.median(streams) if streams else None
        byts = [float(r["bytes_read"]) for r in rs if r.get("bytes_read") is not None]
        entry: dict[str, Any] = {
            "method": label,
            "path": str(rs[0]["method"]),
            "backend": e0.get("backend"),
            "phase": e0.get("phase", "decode"),
            "length": length,
            "batch": batch,
            "dtype": dtype,
            "reps": len(ms),
            "ms": med,
            "ms_q1": lo,
            "ms_q3": hi,
            "bytes_read": statistics.median(byts) if byts else None,
            "kv_bytes": rs[0].get("kv_bytes"),  # the bytes the path's cache stores
            "stream_ms": stream,
            "bandwidth_gbs": (statistics.median(byts) / stream / 1e6) if byts and stream else None,
            "fraction_of_bound": (stream / med) if stream else None,
        }
        for k in ("union_bytes", "selected_bytes", "pages_per_head", "row_min", "row_max", "density", "compile_s"):
            if k in e0:
                entry[k] = e0[k]
        out.append(entry)
    # the baselines are PyTorch's SDPA (no backend); dense[cpp] and snapkv[cpp] are the fused kernel on the same cache
    base = {(e["length"], e["batch"], e["dtype"], e["phase"]): e["ms"] for e in out
            if e["path"] in ("dense", "prefill-dense") and e["backend"] is None}  # fmt: skip
    snap = {(e["length"], e["batch"], e["dtype"]): e["ms"] for e in out
            if e["path"] == "snapkv" and e["backend"] is None}  # fmt: skip
    for e in out:
        b = base.get((e["length"], e["batch"], e["dtype"], e["phase"]))
        e["speedup_vs_dense"] = b / e["ms"] if b else None
        s = snap.get((e["length"], e["batch"], e["dtype"])) if e["phase"] == "decode" else None
        e["time_vs_snapkv"] = e["ms"] / s if s else None  # the head-adaptive store's target: within 1.2
    order = {"dense": 0, "snapkv": 1, "ragged": 2, "quest-head": 3, "quest-kv": 4, "stream": 5}
    out.sort(key=lambda e: (e["phase"] != "decode", e["dtype"], e["length"], e["batch"], order.get(e["path"], 9),
                            e["method"]))  # fmt: skip
    return out


HEADER = ("path", "dtype", "length", "batch", "ms (median)", "IQR ms", "MB read", "stream ms", "GB/s", "of bound",
          "× dense", "time / SnapKV")  # fmt: skip


def kernel_cells(e: Mapping[str, Any]) -> list[str]:
    mb = e.get("bytes_read")
    return [
        str(e["method"]),
        str(e["dtype"]),
        str(e["length"]),
        str(e["batch"]),
        fmt(e["ms"], 3),
        f"{fmt(e['ms_q1'], 3)}–{fmt(e['ms_q3'], 3)}",
        fmt(mb / 1e6 if mb is not None else None, 1),
        fmt(e.get("stream_ms"), 3),
        fmt(e.get("bandwidth_gbs"), 1),
        fmt(e.get("fraction_of_bound"), 2),
        fmt(e.get("speedup_vs_dense"), 2),
        fmt(e.get("time_vs_snapkv"), 2),
    ]


def kernel_blocks(summary: list[dict[str, Any]], machine: str = "") -> list[Block]:
    """The kernel table (decode paths, then prefill paths), for a report or a results page."""
    if not summary:
        return []
    blocks = [
        Block("h2", "Attention kernels at Llama-3.1-8B geometry (32 query / 8 KV heads, head dim 128; synthetic)"),
        Block(
            "p",
            "One decode step (or one prefill) of one layer's attention. 'of bound': the time of a streaming read of "
            "the same bytes in the same repetition divided by the path's time (1.0 = at the memory-bandwidth "
            "bound). 'MB read': the bytes the path reads (Quest per query head: the union of its group's pages, plus "
            "the page metadata). '× dense': dense attention's time over this path's, same shape and run; "
            "'time / SnapKV': this path's time over the compacted cache's."
            + (f" Machine: {machine}." if machine else ""),
        ),
    ]
    decode = [e for e in summary if e["phase"] == "decode"]
    prefill = [e for e in summary if e["phase"] != "decode"]
    if decode:
        blocks.append(Block("table", header=HEADER, body=[kernel_cells(e) for e in decode]))
    if prefill:
        blocks.append(Block("h3", "Prefill attention (block-sparse FlexAttention against dense causal SDPA)"))
        head = ("path", "dtype", "length", "ms (median)", "IQR ms", "density", "× dense", "compile s")
        body = [[str(e["method"]), str(e["dtype"]), str(e["length"]), fmt(e["ms"], 1),
                 f"{fmt(e['ms_q1'], 1)}–{fmt(e['ms_q3'], 1)}", fmt(e.get("density"), 3),
                 fmt(e.get("speedup_vs_dense"), 2), fmt(e.get("compile_s"), 1)] for e in prefill]  # fmt: skip
        blocks.append(Block("table", header=head, body=body))
    return blocks


__all__ = ["HEADER", "kernel_blocks", "kernel_cells", "kernel_summary"]
