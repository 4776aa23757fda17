"""The speed and memory benchmark: every configuration against the full cache, in the same run.

For each context length and batch size, each repetition prefills once per distinct prefill configuration (the
configurations that only differ in their decode method decode on forks of that prefill), then decodes a fixed
number of tokens after two untimed warm-up steps (in which decode methods build their metadata). The order of the
configurations rotates between repetitions so that slow drifts of a shared machine hit every configuration alike;
figures are medians over repetitions and ratios against the full cache of the same length and batch size.
"""

from __future__ import annotations

import gc
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import __version__
from ..adapters.models import load_model, model_key
from ..eval.prompts import encode
from ..pipeline import Compressor, compress
from ..profiling.corpus import calibration_text
from .config import BenchConfig, MethodSpec
from .machine import PeakRSS, describe_machine, measure_bandwidth


@dataclass
class BenchRow:
    """One measurement (one configuration, length, batch size and repetition)."""

    label: str
    prefill: str
    budget: str
    decode: str | None
    decode_budget: str | None
    length: int
    batch: int
    rep: int
    prefill_s: float
    compress_s: float
    ttft_s: float
    decode_s: float
    steps: int
    tok_s: float
    attn_ms: float  # attention time per decode step, all layers
    bytes_read: float  # KV (+ page metadata) bytes read per decode step, all layers and sequences
    kv_bytes: int
    alloc_bytes: int
    meta_bytes: int
    stored_entries: int
    prefill_peak_rss: int  # process resident memory, highest while prefilling (model weights included)
    decode_peak_rss: int  # highest while decoding


def bench_prompts(tokenizer: Any, length: int, batch: int) -> torch.Tensor:
    """``(batch, length)`` ids: consecutive slices of the standard-library docstring corpus (no padding)."""
    ids = encode(tokenizer, calibration_text(min_chars=max(200_000, 6 * length * batch)))
    need = length * batch
    if len(ids) < need:
        ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, length)


WARMUP = 2  # decode steps before timing starts


def _measure_decode(press: Compressor, ctx: Any, spec: MethodSpec, cfg: BenchConfig) -> dict[str, Any]:
    if spec.decode is not None:
        press.attach_decode(ctx, spec.decode, spec.decode_budget or spec.budget, **dict(spec.decode_params))
    # Warm-up steps, not timed: decode methods build their metadata (page bounds, selections) in the first step.
    press.decode(ctx, WARMUP + 1)
    stats = ctx.cache.stats
    a0, r0 = stats.decode_attention_seconds, ctx.cache.bytes_read()
    gc.collect()
    with PeakRSS() as mem:
        gen = press.decode(ctx, cfg.decode_tokens + 1)
    steps = max(1, gen.steps)
    cache = ctx.cache
    return {
        "decode_s": gen.decode_seconds,
        "steps": gen.steps,
        "tok_s": gen.steps * ctx.batch / gen.decode_seconds if gen.decode_seconds > 0 else float("nan"),
        "attn_ms": (stats.decode_attention_seconds - a0) / steps * 1e3,
        "bytes_read": (cache.bytes_read() - r0) / steps,
        "kv_bytes": cache.kv_bytes(),
        "alloc_bytes": cache.allocated_bytes(),
        "meta_bytes": cache.meta_bytes(),
        "stored_entries": cache.stored_entries(),
        "decode_peak_rss": mem.peak,
    }


def _evicts_while_decoding(spec: MethodSpec) -> bool:
    from ..core.capabilities import Apply
    from ..registry import get_method_class

    return spec.decode is not None and get_method_class(spec.decode).capabilities.apply is not Apply.SPARSE


def run_bench(
    cfg: BenchConfig,
    *,
    store: Any = None,
    progress: Callable[[int, int, str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    bandwidth: float | None = None,
) -> tuple[list[BenchRow], dict[str, Any]]:
    """Run the benchmark; returns the rows and a description of the machine and settings.

    ``store`` (a :class:`~tokensieve.bench.store.BenchStore`) receives every row as soon as it is measured and
    lets an interrupted run resume; ``progress(done, total, label)`` is called after every measurement.
    """
    torch.set_num_threads(cfg.threads)
    model, tok = model_and_tokenizer or load_model(cfg.model)
    key = model_key(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    info: dict[str, Any] = {
        **describe_machine(),
        "model": key,
        "weights_bytes": weights,
        "bandwidth": bandwidth if bandwidth is not None else measure_bandwidth(),
        "version": __version__,
        "decode_tokens": cfg.decode_tokens,
        "repetitions": cfg.repetitions,
    }
    groups: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[MethodSpec]] = {}
    for spec in cfg.specs:
        groups.setdefault(spec.prefill_key, []).append(spec)
    order = list(groups)
    _warm_up(model, tok)
    total = len(cfg.lengths) * len(cfg.batch_sizes) * cfg.repetitions * len(cfg.specs)
    done = 0
    rows: list[BenchRow] = []
    for length in cfg.lengths:
        for batch in cfg.batch_sizes:
            ids = bench_prompts(tok, length, batch)
            for rep in range(cfg.repetitions):
                rotated = order[rep % len(order) :] + order[: rep % len(order)]
                for gkey in rotated:
                    specs = groups[gkey]
                    todo = [s for s in specs if store is None or not store.has(_row_key(key, s, length, batch, rep))]
                    if not todo:
                        done += len(specs)
                        continue
                    prefill, budget, pparams = gkey
                    press = compress(model, prefill, budget, reserve=cfg.decode_tokens + WARMUP + 8, **dict(pparams))
                    gc.collect()
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        ctx = press.prefill(ids)
                        ttft = time.perf_counter() - t0 + _argmax_seconds(ctx.logits)
                    # One prefill serves the whole group: configurations that only append are rolled back (no
                    # copy, so memory figures stay those of one cache); one that evicts while decoding runs last,
                    # or on a fork when two do.
                    todo.sort(key=_evicts_while_decoding)
                    for i, spec in enumerate(todo):
                        last = i == len(todo) - 1
                        run_ctx = ctx if last or not _evicts_while_decoding(spec) else ctx.fork()
                        mark = run_ctx.checkpoint() if run_ctx is ctx and not last else None
                        measured = _measure_decode(press, run_ctx, spec, cfg)
                        if mark is not None:
                            ctx.rollback(mark)
                        row = BenchRow(
                            label=spec.label,
                            prefill=spec.prefill,
                            budget=spec.budget,
                            decode=spec.decode,
                            decode_budget=spec.decode_budget,
                            length=length,
                            batch=batch,
                            rep=rep,
                            prefill_s=ctx.prefill_seconds,
                            compress_s=ctx.compress_seconds,
                            ttft_s=ttft,
                            prefill_peak_rss=mem.peak,
                            **measured,
                        )
                        rows.append(row)
                        if store is not None:
                            store.add_bench(_row_key(key, spec, length, batch, rep), row, info)
                        done += 1
                        if progress is not None:
                            progress(done, total, f"{spec.label} @ {length} x{batch}")
                        del run_ctx
                    del ctx
                    done += len(specs) - len(todo)
    return rows, info


def _warm_up(model: Any, tok: Any) -> None:
    """One short prefill and decode, so that weights are paged in and kernels initialised before any timing."""
    press = compress(model, "full")
    press.decode(press.prefill(bench_prompts(tok, 64, 1)), 4)


def _argmax_seconds(logits: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits.argmax(-1)
    return time.perf_counter() - t0


def _row_key(model: str, spec: MethodSpec, length: int, batch: int, rep: int) -> str:
    blob = json.dumps([model, asdict(spec), length, batch, rep, __version__], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------ summaries
SUMMARY_FIELDS = (
    "prefill_s",
    "compress_s",
    "ttft_s",
    "tok_s",
    "attn_ms",
    "bytes_read",
    "kv_bytes",
    "alloc_bytes",
    "stored_entries",
    "prefill_peak_rss",
    "decode_peak_rss",
)


def summarize(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians per (configuration, length, batch) and ratios against the full cache of the same length and batch.

    Adds ``speedup`` (decode tok/s vs full), ``attn_ratio`` (full attention time / this one), ``kv_ratio``
    (stored KV bytes / full), ``compress_share`` (compression time / the full cache's prefill time) and
    ``ideal_speedup`` — the decode speed-up the bytes read per step allow, from the measured bandwidth
    (weights + KV read, full vs this configuration).
    """
    buckets: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        buckets.setdefault((r["label"], r["length"], r["batch"]), []).append(r)
    med: dict[tuple[str, int, int], dict[str, Any]] = {}
    for k, rs in buckets.items():
        m: dict[str, Any] = {f: statistics.median(float(r[f]) for r in rs) for f in SUMMARY_FIELDS}
        m.update({"label": k[0], "length": k[1], "batch": k[2], "reps": len(rs)})
        m.update({f: rs[0][f] for f in ("prefill", "budget", "decode", "decode_budget")})
        med[k] = m
    weights = float(info.get("weights_bytes", 0))
    bw = float(info.get("bandwidth", 0)) or float("nan")
    out = []
    for (_, length, batch), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0] != "full")):
        base = med.get(("full", length, batch))
        if base is not None:
            m["speedup"] = m["tok_s"] / base["tok_s"] if base["tok_s"] else float("nan")
            m["attn_ratio"] = base["attn_ms"] / m["attn_ms"] if m["attn_ms"] else float("nan")
            m["kv_ratio"] = m["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] else float("nan")
            m["compress_share"] = m["compress_s"] / base["prefill_s"] if base["prefill_s"] else float("nan")
            m["ideal_speedup"] = (weights + base["bytes_read"]) / (weights + m["bytes_read"])
        m["ideal_tok_s"] = batch / ((weights + m["bytes_read"]) / bw)
        out.append(m)
    return out
