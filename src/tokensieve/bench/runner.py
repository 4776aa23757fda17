"""The speed and memory benchmark: every configuration against the full cache, in the same run.

For each context length and batch size, each repetition prefills once per distinct prefill configuration (the
configurations that only differ in their decode method decode on forks of that prefill), then decodes a fixed
number of tokens after two untimed warm-up steps (in which decode methods build their metadata). The order of the
configurations rotates between repetitions so that slow drifts of a shared machine hit every configuration alike;
figures are medians over repetitions and ratios against the full cache of the same length and batch size.

Before any timing, every distinct prefill configuration prefills one short prompt (:func:`_warm_up`), so that a
sparse prefill compiles its FlexAttention kernel there (:data:`tokensieve.attention.flex.STATS`; the seconds go to
the run's ``info["warmup_compile_s"]``) and not inside the first timed prefill. A row's ``compile_s`` is what its
own prefill spent compiling: 0 unless a new graph was needed (e.g. the first batch larger than 1).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import __version__
from ..adapters.models import load_model, model_key
from ..attention import flex
from ..core.capabilities import Apply
from ..data.prompts import encode
from ..data.text import calibration_text
from ..engine import Compressor, compress
from ..errors import ConfigError, TokensieveError
from ..results.store import ResultStore, spec_columns
from ..spec import Spec, budget_label, method_label
from .config import BenchConfig
from .machine import PeakRSS, describe_machine, measure_bandwidth


@dataclass
class BenchRow:
    """One measurement (one configuration, length, batch size and repetition)."""

    label: str  # the spec's canonical label
    method: str  # the label without budgets
    budget: str  # shown budget (25%, 100% …)
    prefill: str  # the prefill part of the label
    decode: str | None  # the decode method and its parameters
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
    chunk: int | None = None  # chunked prefill: the chunk size in tokens (None: one pass)
    prefill_attn_s: float | None = None  # wall time inside the prefill's attention calls, summed over layers
    compile_s: float | None = None  # FlexAttention compilation during this prefill (wall time of compiling calls)


def bench_prompts(tokenizer: Any, length: int, batch: int) -> torch.Tensor:
    """``(batch, length)`` ids: consecutive slices of the standard-library docstring corpus (no padding)."""
    ids = encode(tokenizer, calibration_text(min_chars=max(200_000, 6 * length * batch)))
    need = length * batch
    if len(ids) < need:
        ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, length)


WARMUP = 2  # decode steps before timing starts


def _measure_decode(press: Compressor, ctx: Any, spec: Spec, cfg: BenchConfig) -> dict[str, Any]:
    if spec.decode is not None:
        press.attach_decode(ctx, spec.decode, spec.decode_budget)
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


def _evicts_while_decoding(spec: Spec) -> bool:
    return spec.decode is not None and spec.decode.capabilities.apply is not Apply.SPARSE


def _order(spec: Spec) -> tuple[bool, bool]:
    """Within a group sharing one prefill: no decode method first, then sparse decoding, eviction last."""
    return (_evicts_while_decoding(spec), spec.decode is not None)


def row_key(spec: Spec, *, model: str, length: int, batch: int, rep: int, cfg: BenchConfig) -> str:
    """The key of one benchmark measurement (:meth:`Spec.key` with the workload)."""
    chunked = {} if cfg.chunk is None else {"chunk": cfg.chunk}  # keys of one-pass rows stay as they were
    return spec.key(model=model, length=length, batch=batch, rep=rep, decode_tokens=cfg.decode_tokens,
                    threads=cfg.threads, **chunked)  # fmt: skip


def describe(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "specs": [s.label for s in cfg.specs],
        "lengths": list(cfg.lengths),
        "batch_sizes": list(cfg.batch_sizes),
        "decode_tokens": cfg.decode_tokens,
        "repetitions": cfg.repetitions,
        "threads": cfg.threads,
        **({} if cfg.chunk is None else {"chunk": cfg.chunk}),
    }


def run_bench(
    cfg: BenchConfig,
    *,
    store: ResultStore | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    bandwidth: float | None = None,
    command: str = "",
) -> tuple[list[BenchRow], dict[str, Any]]:
    """Run the benchmark; returns the rows measured now and a description of the machine and settings.

    ``store`` receives every row (table ``bench``) as soon as it is measured and lets an interrupted run resume;
    ``progress(done, total, label)`` is called after every measurement.
    """
    torch.set_num_threads(cfg.threads)
    model, tok = model_and_tokenizer or load_model(cfg.model)
    check_specs(model, cfg)  # every configuration is refused now, not after the first cells were measured
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
    groups: dict[Spec, list[Spec]] = {}
    for spec in cfg.specs:
        groups.setdefault(spec.prefill, []).append(spec)
    order = list(groups)
    total = len(cfg.lengths) * len(cfg.batch_sizes) * cfg.repetitions * len(cfg.specs)
    done_keys = store.keys("bench") if store is not None else set()

    def keyof(spec: Spec, length: int, batch: int, rep: int) -> str:
        return row_key(spec, model=key, length=length, batch=batch, rep=rep, cfg=cfg)

    todo_total = sum(
        keyof(s, length, batch, rep) not in done_keys
        for length in cfg.lengths
        for batch in cfg.batch_sizes
        for rep in range(cfg.repetitions)
        for s in cfg.specs
    )
    rows: list[BenchRow] = []
    if todo_total == 0:
        return rows, info
    info["warmup_compile_s"] = _warm_up(model, tok, order, cfg)  # recorded with the run
    run_id = 0
    if store is not None:
        run_id = store.start_run(tool="bench", command=command, config=describe(cfg), model=key, version=__version__,
                                 threads=cfg.threads, cells=total, todo=todo_total, info=info)  # fmt: skip
    done = 0
    for length in cfg.lengths:
        for batch in cfg.batch_sizes:
            ids = bench_prompts(tok, length, batch)
            for rep in range(cfg.repetitions):
                rotated = order[rep % len(order) :] + order[: rep % len(order)]
                for prefill in rotated:
                    specs = groups[prefill]
                    todo = [s for s in specs if keyof(s, length, batch, rep) not in done_keys]
                    if not todo:
                        done += len(specs)
                        continue
                    press = compress(
                        model, reserve=cfg.decode_tokens + WARMUP + 8, chunk=cfg.chunk, **prefill.compressor_kwargs()
                    )
                    gc.collect()
                    c0 = flex.STATS.compile_seconds
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        ctx = press.prefill(ids)
                        ttft = time.perf_counter() - t0 + _argmax_seconds(ctx.logits)
                    compile_s = flex.STATS.compile_seconds - c0
                    prefill_attn_s = ctx.cache.stats.prefill_attention_seconds
                    # One prefill serves the whole group: configurations that only append are rolled back (no
                    # copy, so memory figures stay those of one cache); one that evicts while decoding runs last,
                    # or on a fork when two do.
                    todo.sort(key=_order)
                    for i, spec in enumerate(todo):
                        last = i == len(todo) - 1
                        run_ctx = ctx if last or not _evicts_while_decoding(spec) else ctx.fork()
                        mark = run_ctx.checkpoint() if run_ctx is ctx and not last else None
                        measured = _measure_decode(press, run_ctx, spec, cfg)
                        if mark is not None:
                            ctx.rollback(mark)
                        cols = spec_columns(spec)
                        row = BenchRow(
                            label=cols["label"],
                            method=cols["method"],
                            budget=cols["budget"],
                            prefill=prefill.label,
                            decode=method_label(spec.decode) if spec.decode is not None else None,
                            decode_budget=budget_label(spec.decode_budget) if spec.decode_budget is not None else None,
                            length=length,
                            batch=batch,
                            rep=rep,
                            prefill_s=ctx.prefill_seconds,
                            compress_s=ctx.compress_seconds,
                            ttft_s=ttft,
                            prefill_peak_rss=mem.peak,
                            chunk=cfg.chunk,
                            prefill_attn_s=prefill_attn_s,
                            compile_s=compile_s,
                            **measured,
                        )
                        rows.append(row)
                        if store is not None:
                            store.add("bench", {
                                **asdict(row), **cols, "key": keyof(spec, length, batch, rep), "model": key,
                                "version": __version__, "created": time.time(), "run_id": run_id,
                                "threads": cfg.threads,
                            })  # fmt: skip
                        done += 1
                        if progress is not None:
                            progress(done, total, f"{spec.label} @ {length} x{batch}")
                        del run_ctx
                    del ctx
                    done += len(specs) - len(todo)
    return rows, info


def check_specs(model: Any, cfg: BenchConfig) -> None:
    """Build every configuration of the benchmark on the model (capabilities, composition, profiles, what would do
    nothing) and fit its budgets to every length and batch, before anything is measured; raises the first refusal
    with the configuration's label."""
    for spec in cfg.specs:
        try:
            press = compress(model, chunk=cfg.chunk, **spec.compressor_kwargs())
            for length in cfg.lengths:
                if press.method.compresses:
                    press.budget.tokens_for(length)
                for batch in cfg.batch_sizes:
                    press.spec.check(press.request([length] * batch, images=False))
        except TokensieveError as exc:
            if spec.label in str(exc):
                raise
            raise ConfigError(f"{spec.label}: {exc}") from None


WARMUP_TOKENS = 512  # prompt of the per-configuration warm-up prefill (several FlexAttention blocks)


def _warm_up(model: Any, tok: Any, prefills: list[Spec] | None = None, cfg: BenchConfig | None = None) -> float:
    """One short prefill and decode, so that weights are paged in and kernels initialised before any timing; then
    one short prefill per prefill configuration (batch 1, one pass), so that a sparse prefill's kernel is compiled
    here. Returns the FlexAttention compile seconds this took."""
    c0 = flex.STATS.compile_seconds
    press = compress(model, "full")
    press.decode(press.prefill(bench_prompts(tok, 64, 1)), 4)
    n = min([WARMUP_TOKENS, *(cfg.lengths if cfg is not None else ())])
    for prefill in prefills or []:
        kwargs = prefill.compressor_kwargs()
        with contextlib.suppress(TokensieveError):  # e.g. a token budget above the warm-up prompt: warm up timed
            compress(model, **kwargs).prefill(bench_prompts(tok, n, 1))
    return flex.STATS.compile_seconds - c0


def _argmax_seconds(logits: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits.argmax(-1)
    return time.perf_counter() - t0
