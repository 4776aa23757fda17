"""`tokensieve bench --kernels`: attention kernels at Llama-3.1-8B's attention geometry against the memory bound.

Synthetic tensors (no weights needed): 32 query / 8 KV heads, head dim 128, one layer. For every context length,
batch size and dtype, one run measures, interleaved (each repetition runs every path once, in a rotated order):

decode (one query per head, the cache already built):

* ``dense`` — the full cache's attention (:meth:`DenseKV.attend`, SDPA);
* ``snapkv`` — a compacted cache of 1/8 of the tokens (what SnapKV and every uniform eviction method leave);
* ``dense[cpp]``, ``snapkv[cpp]`` — the same two caches attended by the fused C++ kernel
  (:func:`~tokensieve.attention.fused.contiguous_attention`), against SDPA on the same buffers;
* ``ragged[…]`` — the head-adaptive store at 1/8 of the tokens in total: AdaKV's allocation
  (:func:`~tokensieve.selection.allocation.pooled_counts` over scores whose spread differs per head) built by the
  library's own :func:`~tokensieve.cache.storage.build_store` into a :class:`~tokensieve.cache.ragged.RaggedKV`,
  attended with :meth:`RaggedKV.attend`;
* ``quest-head[…]`` / ``quest-kv[…]`` — Quest at 1/8 (``+quest:0.125``, pages of 16) per query head and with one
  page set per KV head, driven exactly as a decode step drives it (:meth:`Quest.step` on the same full cache);
* ``stream`` — a streaming read (a sum) of as many bytes as the full cache holds.

``[torch]`` and ``[cpp]`` name the implementation (:mod:`tokensieve.attention.fused`: the PyTorch kernels, the fused
C++ kernel); ``--compiled`` adds ``quest-kv[inductor]`` (the gather-and-attend written as element-wise products and
reductions, compiled by Inductor's CPU code generation) and ``quest-kv[flex]`` (FlexAttention with a page-level
block mask). Every path's *bound* is a streaming read of the bytes it reads, measured in the same repetition; the
fraction of the bound is that time over the path's.

prefill (batch 1, ``--prefill-lengths``): ``prefill-dense`` (causal SDPA, the library's ``causal_attention``) and
``prefill-sparse`` (the library's block-sparse FlexAttention with 1/8 of the causal blocks: the sink block, the
diagonal and random others, blocks of 128); compilation is done in an untimed first call and reported apart.

Rows: one per path, shape and repetition, into the results store (table ``bench``, ``spec`` kind ``kernel``, model
``synthetic:llama-3.1-8b-attention``); ``--json`` writes the medians (one row per path and shape), ``--report`` a
dated page.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..attention import flex, fused
from ..attention.dense import causal_attention
from ..cache.decode import DecodeLayer, DecodeRun
from ..cache.ragged import RaggedKV
from ..cache.storage import DenseKV, build_store
from ..core.budget import Budget
from ..core.context import ModelShape
from ..errors import ConfigError
from ..methods.kv.quest import Quest
from ..results.kernels import kernel_summary
from ..results.store import ResultStore, kernel_key, kernel_spec_dict
from ..selection.allocation import pooled_counts
from .machine import describe_machine

HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B's attention
GEOMETRY = "llama-3.1-8b-attention"
MODEL = f"synthetic:{GEOMETRY}"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp32": torch.float32, "bf16": torch.bfloat16}
DECODE_PATHS = ("dense", "snapkv", "ragged", "quest-head", "quest-kv", "stream")
PREFILL_PATHS = ("prefill-dense", "prefill-sparse")
PAGE = 16  # Quest's default page
BLOCK = 128  # the sparse prefill methods' default block
WARMUP = 2


def parse_length(text: str) -> int:
    """``8192``, ``8k``, ``32K`` → tokens (k = 1024)."""
    t = text.strip().lower()
    try:
        return int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise ConfigError(f"Expected a length in tokens (8192, 8k, 32K), got {text!r}.") from None


def parse_lengths(text: str | None) -> tuple[int, ...]:
    if text is None or text.strip().lower() in ("", "none", "0"):
        return ()
    return tuple(parse_length(x) for x in text.split(",") if x.strip())


@dataclass(frozen=True)
class KernelConfig:
    """What ``tokensieve bench --kernels`` measures (see the module docstring)."""

    lengths: tuple[int, ...] = (8192, 32768)
    batch_sizes: tuple[int, ...] = (1, 4)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    repetitions: int = 10
    threads: int = 1
    budget: float = 0.125
    page: int = PAGE
    backends: tuple[str, ...] = ("torch", "cpp")
    compiled: bool = False
    prefill_lengths: tuple[int, ...] = (32768,)
    prefill_repetitions: int = 3
    block: int = BLOCK
    seed: int = 0
    paths: tuple[str, ...] = field(default=DECODE_PATHS + PREFILL_PATHS)

    def __post_init__(self) -> None:
        if any(n < 4 * self.page for n in self.lengths) or any(n < 2 * self.block for n in self.prefill_lengths):
            raise ConfigError(f"Lengths must be at least {4 * self.page} tokens (prefill: {2 * self.block}).")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError("Batch sizes must be >= 1.")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise ConfigError(f"Unknown dtype(s) {bad or '(none)'}: use float32 and/or bfloat16.")
        object.__setattr__(self, "dtypes", tuple(dict.fromkeys(str(DTYPES[d]).split(".")[-1] for d in self.dtypes)))
        if not 0 < self.budget < 1:
            raise ConfigError(f"The sparse budget is a fraction in (0, 1), got {self.budget}.")
        if self.repetitions < 1 or self.prefill_repetitions < 1 or self.threads < 1:
            raise ConfigError("repetitions >= 1 and threads >= 1 are required.")
        unknown = [p for p in self.paths if p not in DECODE_PATHS + PREFILL_PATHS]
        if unknown:
            known = ", ".join(DECODE_PATHS + PREFILL_PATHS)
            raise ConfigError(f"Unknown kernel path(s) {unknown}; choose among {known}.")
        for b in self.backends:
            if b not in ("torch", "cpp"):
                raise ConfigError(f"Unknown kernel backend {b!r}: torch and/or cpp.")


# ------------------------------------------------------------------------------------------------ decode cases
def adakv_lengths(batch: int, length: int, budget: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """AdaKV's per-head allocation over synthetic scores: each KV head's scores spread differently (log-normal
    scales), the top ``budget · H · length`` of each sequence's pooled scores are kept. Returns the kept indices
    ``(B, H, K)`` (ascending, -1 padded) and counts ``(B, H)``."""
    spread = torch.exp(0.75 * torch.randn(batch, HKV, 1, generator=g))
    scores = torch.randn(batch, HKV, length, generator=g) * spread
    total = round(budget * HKV * length)
    counts = torch.stack([pooled_counts(scores[b], total) for b in range(batch)])  # (B, H)
    K = int(counts.max())
    order = scores.topk(K, dim=-1).indices  # (B, H, K) the best K of every row
    keep = torch.arange(K)[None, None, :] < counts[..., None]
    idx = torch.where(keep, order, torch.full_like(order, length)).sort(-1).values
    return torch.where(idx < length, idx, torch.full_like(idx, -1)), counts


def _quest(store: DenseKV, group: str, page: int, budget: float, length: int, batch: int) -> tuple[Quest, DecodeLayer]:
    method = Quest(page=page, dense_layers=0, group=group)  # type: ignore[arg-type]
    b = Budget.ratio(budget)
    run = DecodeRun(ModelShape(1, HQ, HKV, D, length + page), torch.full((batch,), b.tokens_for(length)), b)
    layer = DecodeLayer(0, store, run, D**-0.5)
    layer.state = method.setup(layer, None)
    method.on_append(layer, 1)
    return method, layer


def _quest_ties(method: Quest, layer: DecodeLayer, q: Tensor, backends: Sequence[str]) -> Tensor:
    """(B, H_q) bool: the query heads whose pages differ between the backends only because two page bounds tie
    within float rounding (the C++ bounds and the matmul sum the same products in another order and round them to the
    metadata's dtype, so a page at the top-k boundary may swap with its equal; in bfloat16 "equal" is to about 3 %).
    Such heads attend over different, equally valid pages and are left out of the agreement check; any other
    difference in the choice is an error."""
    store, run = layer.store, layer.run
    plan = method._step_plan(store, run)
    B, Hq, _, D = q.shape
    tied = torch.zeros(B, Hq, dtype=torch.bool)
    if plan is None or len(backends) < 2:
        return tied
    cur, k = plan[0], plan[1]
    meta = layer.state["meta"]
    H = meta.shape[1]
    G = Hq // H
    per_head = method.group == "per_head"
    qg = q.view(B, H, G, D)
    exact = torch.matmul(torch.cat([qg.relu(), qg], -1).double(), meta[..., :cur].double())  # (B, H, G, cur)
    if not per_head:  # one page set per KV head: the group's largest bound
        exact = exact.amax(2, keepdim=True).expand_as(exact)
    chosen = []
    for b in backends:
        bounds = _with_backend(b, lambda: fused.page_bounds(qg, meta, cur))()
        if not per_head:
            bounds = bounds.amax(2, keepdim=True).expand_as(exact)
        top = bounds.topk(k - 1, dim=-1).indices
        chosen.append(torch.zeros(exact.shape, dtype=torch.bool).scatter_(-1, top, True))
    rel = max(1e-5, 4 * torch.finfo(meta.dtype).eps)  # the bounds are rounded to the metadata's dtype
    for other in chosen[1:]:
        diff = chosen[0] != other  # (B, H, G, cur)
        for bi, h, g in diff.any(-1).nonzero().tolist():
            vals = exact[bi, h, g][diff[bi, h, g]]
            tol = rel * float(exact[bi, h, g].abs().max()) + 1e-6
            if float(vals.max() - vals.min()) > tol:
                raise RuntimeError(f"quest: the backends choose different pages beyond a rounding tie "
                                   f"({meta.dtype}, row {bi}, KV head {h}, query {g})")  # fmt: skip
            tied[bi, h * G + g if per_head else slice(h * G, (h + 1) * G)] = True
    return tied


def _with_backend(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        previous = fused.set_backend(name)
        try:
            return fn()
        finally:
            fused.set_backend(previous)

    return call


def _inductor_quest_kv(store: DenseKV, layer: DecodeLayer, method: Quest) -> Callable[[Tensor], Tensor]:
    """Quest with one page set per KV head, its gather-and-attend written as element-wise products and reductions
    over indexed pages (so that Inductor can fuse the indexing into the loops), compiled for CPU. Page selection as
    :meth:`Quest.step` (the bounds, top-k); the attention differs from it in rounding only."""
    from ..attention.sparse import page_bounds

    P = method.page
    n, cap = store.n, store.capacity
    B = store.keys.shape[0]
    cur = (n - 1) // P
    k = max(method.min_pages, -(-layer.run.tokens_for(n) // P))
    base = (torch.arange(B * HKV) * (cap // P))[:, None]
    valid = (torch.arange(k * P) < (k - 1) * P + (n - cur * P)).view(1, 1, k, P)
    scale = layer.scaling

    def attend(q: Tensor, kp: Tensor, vp: Tensor, idx: Tensor, ok: Tensor) -> Tensor:
        K = kp[idx]  # (R, k, P, D), indexed in the loops below (never materialised once fused)
        V = vp[idx]
        s = (q[:, :, None, None, :].float() * K[:, None].float()).sum(-1) * scale  # (R, G, k, P)
        s = s.masked_fill(~ok, float("-inf"))
        p = torch.softmax(s.flatten(2), -1).view_as(s)
        return (p[..., None] * V[:, None].float()).sum((2, 3)).to(q.dtype)  # (R, G, D)

    compiled = torch.compile(attend, dynamic=False)
    kp, vp = store.pages(P)

    def run(q: Tensor) -> Tensor:
        qg = q.view(B, HKV, HQ // HKV, D)
        bounds = page_bounds(qg, layer.state["meta"][..., :cur])
        top = bounds.amax(2).topk(k - 1, dim=-1, sorted=False).indices.view(B * HKV, k - 1)
        idx = torch.cat([top + base, base + cur], 1)
        out = compiled(qg.reshape(B * HKV, HQ // HKV, D), kp, vp, idx, valid)
        return out.view(B, HQ, 1, D)

    return run


def _flex_quest_kv(store: DenseKV, layer: DecodeLayer, method: Quest) -> Callable[[Tensor], Tensor]:
    """Quest with one page set per KV head as FlexAttention's block-sparse decode: a block mask of page-sized key
    blocks (every query head of a group given its KV head's pages), compiled for CPU."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from ..attention.sparse import page_bounds

    P = method.page
    n = store.n
    B = store.keys.shape[0]
    cur = (n - 1) // P
    k = max(method.min_pages, -(-layer.run.tokens_for(n) // P))
    compiled = torch.compile(flex_attention, dynamic=False)
    keys, values = store.keys, store.values

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return ki < n

    def run(q: Tensor) -> Tensor:
        qg = q.view(B, HKV, HQ // HKV, D)
        bounds = page_bounds(qg, layer.state["meta"][..., :cur])
        top = bounds.amax(2).topk(k - 1, dim=-1, sorted=False).indices  # (B, H, k-1) complete pages
        nb = -(-n // P)
        # the complete pages are full blocks (no token mask), the current page a partial one (slots past n masked);
        # torch 2.13's CPU template needs both tables (without full blocks its generated C++ does not compile)
        full_num = torch.full((B, HQ, 1), k - 1, dtype=torch.int32)
        full_ind = torch.zeros(B, HQ, 1, nb, dtype=torch.int32)  # (B, H_q, query blocks, key blocks)
        full_ind[..., : k - 1] = top.repeat_interleave(HQ // HKV, 1)[:, :, None, :].to(torch.int32)
        part_num = torch.ones(B, HQ, 1, dtype=torch.int32)
        part_ind = torch.zeros(B, HQ, 1, nb, dtype=torch.int32)
        part_ind[..., 0] = cur
        bm = BlockMask.from_kv_blocks(part_num, part_ind, full_num, full_ind, BLOCK_SIZE=(1, P), mask_mod=mask_mod,
                                      seq_lengths=(1, n))  # fmt: skip
        out = compiled(q, keys, values, block_mask=bm, scale=layer.scaling, enable_gqa=True)
        assert isinstance(out, Tensor)
        return out

    return run


@dataclass
class _Path:
    name: str  # label: path[backend]
    path: str
    backend: str | None
    fn: Callable[[], Any]
    bytes_read: int
    kv_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


def decode_paths(cfg: KernelConfig, length: int, batch: int, dtype: torch.dtype, g: torch.Generator) -> list[_Path]:
    """Every decode path of one shape, built and checked (the backends of one path agree)."""
    es = torch.tensor([], dtype=dtype).element_size()
    want = set(cfg.paths)
    keys = torch.randn(batch, HKV, length, D, generator=g).to(dtype)
    values = torch.randn(batch, HKV, length, D, generator=g).to(dtype)
    positions = torch.arange(length).expand(batch, length)
    q = torch.randn(batch, HQ, 1, D, generator=g).to(dtype)
    scale = D**-0.5
    out: list[_Path] = []
    ragged: RaggedKV | None = None
    if "ragged" in want:
        idx, counts = adakv_lengths(batch, length, cfg.budget, g)
        store = build_store(keys, values, positions, idx, counts, reserve=16)
        if not isinstance(store, RaggedKV):  # pragma: no cover - equal counts in every head
            raise ConfigError("the synthetic head-adaptive allocation gave every head the same length")
        ragged = store
    dense = DenseKV(keys, values, positions[:, None, :].expand(batch, HKV, length))
    del keys, values
    dense_bytes = dense.kv_bytes()
    contiguous: list[tuple[str, DenseKV]] = [("dense", dense)] if "dense" in want else []
    if "snapkv" in want:
        m = max(1, round(cfg.budget * length))
        snap = DenseKV(dense.keys[:, :, :m].clone(), dense.values[:, :, :m].clone(), dense.positions[:, :, :m])
        contiguous.append(("snapkv", snap))
    for path, store in contiguous:  # SDPA (what DenseKV.attend runs), and the fused kernel over the same buffers
        sdpa = functools.partial(store.attend, q, scale)
        out.append(_Path(path, path, None, sdpa, store.kv_bytes(), store.kv_bytes()))
        if "cpp" in cfg.backends and store.capacity % cfg.page == 0:
            fused_fn = functools.partial(fused.contiguous_attention, q, *store.buffers, store.n, scale, cfg.page)
            fn = _with_backend("cpp", fused_fn)
            _agree(path, {"sdpa": sdpa(), "cpp": fn()}, dtype)
            out.append(_Path(f"{path}[cpp]", path, "cpp", fn, store.kv_bytes(), store.kv_bytes()))
        elif "cpp" in cfg.backends:
            print(f"{path}[cpp] @ {length} x{batch}: not measured ({store.capacity} slots are not whole pages of "
                  f"{cfg.page})", file=sys.stderr)  # fmt: skip
    if ragged is not None:
        rstore = ragged
        lens = rstore.lengths()
        extra = {"row_min": int(lens.min()), "row_max": int(lens.max()), "row_mean": float(lens.float().mean())}
        results = {}
        for b in cfg.backends:
            fn = _with_backend(b, lambda: rstore.attend(q, scale))
            results[b] = fn()
            out.append(_Path(f"ragged[{b}]", "ragged", b, fn, rstore.decode_bytes(), rstore.kv_bytes(), dict(extra)))
        _agree("ragged", results, dtype)
    for group, path in (("per_head", "quest-head"), ("max", "quest-kv")):
        if path not in want:
            continue
        method, layer = _quest(dense, group, cfg.page, cfg.budget, length, batch)
        results = {}
        for b in cfg.backends:
            fn = _with_backend(b, functools.partial(method.step, layer, q))
            r0 = layer.run.bytes_read
            results[b] = fn()
            read = layer.run.bytes_read - r0
            P = cfg.page
            k = max(method.min_pages, -(-layer.run.tokens_for(length) // P))
            selected = 2 * batch * HQ * k * P * D * es  # every query head's own pages, counted apart
            extra = {"pages_per_head": k, "selected_bytes": selected, "union_bytes": read} if group == "per_head" \
                else {"pages_per_head": k}  # fmt: skip
            out.append(_Path(f"{path}[{b}]", path, b, fn, read, dense_bytes, extra))
        tied = _quest_ties(method, layer, q, cfg.backends)
        if tied.any():
            for p in out[-len(cfg.backends) :]:
                p.extra["tied_heads"] = int(tied.sum())
        _agree(path, {b: r[~tied] for b, r in results.items()}, dtype)
        if cfg.compiled and group == "max":
            for name, make in (("inductor", _inductor_quest_kv), ("flex", _flex_quest_kv)):
                try:
                    run = make(dense, layer, method)
                    t0 = time.perf_counter()
                    got = run(q)
                    compile_s = time.perf_counter() - t0
                    _agree(path, {"reference": next(iter(results.values())), name: got}, dtype)
                except Exception as exc:  # a candidate that does not compile or run here is reported, not measured
                    print(f"{path}[{name}] @ {length} x{batch} {dtype}: not measured ({_first_line(exc)})",
                          file=sys.stderr)  # fmt: skip
                    continue
                read = out[-1].bytes_read
                out.append(
                    _Path(
                        f"{path}[{name}]",
                        path,
                        name,
                        functools.partial(run, q),
                        read,
                        dense_bytes,
                        {"pages_per_head": out[-1].extra["pages_per_head"], "compile_s": compile_s},
                    )
                )
    if "stream" in want:
        out.append(_Path("stream", "stream", None, lambda: None, dense_bytes, dense_bytes))  # the stream is the path
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _agree(path: str, results: dict[str, Tensor], dtype: torch.dtype) -> None:
    """The implementations of one path compute the same attention (else nothing is measured)."""
    names = list(results)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for n in names[1:]:
        a, b = results[names[0]].float(), results[n].float()
        if not torch.allclose(a, b, atol=tol, rtol=tol):
            raise RuntimeError(f"{path}: {names[0]} and {n} differ by {float((a - b).abs().max()):.3g}")


# ------------------------------------------------------------------------------------------------ prefill
def sparse_blocks(n_blocks: int, density: float, g: torch.Generator) -> Tensor:
    """``(1, H_q, n, n)`` bool: every query block reads the sink block, its diagonal and random earlier blocks,
    ``max(2, round(density · (i + 1)))`` blocks in all for query block ``i > 0``."""
    i = torch.arange(n_blocks)
    causal = i[None, :] <= i[:, None]
    score = torch.rand(HQ, n_blocks, n_blocks, generator=g)
    score = torch.where(causal, score, torch.full_like(score, -1.0))
    score[:, :, 0] = 2.0  # the sink block
    score[:, i, i] = 3.0  # the diagonal
    want = torch.maximum((density * (i + 1).double()).round().long(), (i + 1).clamp(max=2))  # (n,)
    rank = score.argsort(-1, descending=True).argsort(-1)  # (H, n, n) rank of each key block in its row
    return ((rank < want[None, :, None]) & causal)[None]


def prefill_paths(cfg: KernelConfig, length: int, dtype: torch.dtype, g: torch.Generator) -> list[_Path]:
    q = torch.randn(1, HQ, length, D, generator=g).to(dtype)
    k = torch.randn(1, HKV, length, D, generator=g).to(dtype)
    v = torch.randn(1, HKV, length, D, generator=g).to(dtype)
    scale = D**-0.5
    out: list[_Path] = []
    if "prefill-dense" in cfg.paths:
        out.append(_Path("prefill-dense", "prefill-dense", None, lambda: causal_attention(q, k, v, None, scale), 0, 0,
                         {"phase": "prefill"}))  # fmt: skip
    if "prefill-sparse" in cfg.paths:
        n = -(-length // cfg.block)
        blocks = sparse_blocks(n, cfg.budget, g)
        s0 = (flex.STATS.selected_blocks, flex.STATS.causal_blocks)

        def sparse() -> Tensor:
            return flex.block_sparse_attention(q, k, v, blocks, cfg.block, None, scale)

        t0 = time.perf_counter()
        try:
            sparse()  # compiles (untimed)
        except Exception as exc:
            print(f"prefill-sparse @ {length} {dtype}: not measured ({_first_line(exc)})", file=sys.stderr)
            return out
        compile_s = time.perf_counter() - t0
        density = (flex.STATS.selected_blocks - s0[0]) / max(1, flex.STATS.causal_blocks - s0[1])
        extra = {"phase": "prefill", "density": density, "compile_s": compile_s, "block": cfg.block}
        out.append(_Path("prefill-sparse", "prefill-sparse", "flex", sparse, 0, 0, extra))
    return out


# ------------------------------------------------------------------------------------------------ measuring
def _ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _measure(
    paths: list[_Path], reps: int, with_stream: bool, warmup: int = WARMUP
) -> dict[str, list[tuple[float, float | None]]]:
    """``reps`` interleaved repetitions (rotated order) after ``warmup`` untimed calls of each: per path, (ms, ms of
    a streaming read of its bytes)."""
    sizes = sorted({p.bytes_read for p in paths if p.bytes_read > 0}) if with_stream else []
    buf = torch.ones(max(sizes) // 4 + 1 if sizes else 0, dtype=torch.float32)  # a streaming read: a sum
    streams = {n: (lambda n=n: buf[: n // 4].sum()) for n in sizes}
    calls: list[tuple[str, Callable[[], Any]]] = [(p.name, p.fn) for p in paths if p.path != "stream"]
    calls += [(f"stream:{n}", fn) for n, fn in streams.items()]
    for _, fn in calls:
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in calls}
    for rep in range(reps):
        order = calls[rep % len(calls) :] + calls[: rep % len(calls)]
        for name, fn in order:
            times[name].append(_ms(fn))
    out: dict[str, list[tuple[float, float | None]]] = {}
    for p in paths:
        st = times.get(f"stream:{p.bytes_read}")
        own = times[f"stream:{p.bytes_read}"] if p.path == "stream" else times[p.name]
        out[p.name] = [(own[i], st[i] if st else None) for i in range(reps)]
    return out


def _row(cfg: KernelConfig, p: _Path, length: int, batch: int, dtype: str, rep: int, ms: float,
         stream_ms: float | None) -> dict[str, Any]:  # fmt: skip
    phase = p.extra.get("phase", "decode")
    budget = 1.0 if p.path in ("dense", "stream", "prefill-dense") else cfg.budget
    spec = kernel_spec_dict(p.path, backend=p.backend, dtype=dtype, geometry=GEOMETRY, budget=budget,
                            **({"page": cfg.page} if p.path.startswith("quest") else {}),
                            **({"block": cfg.block} if p.path == "prefill-sparse" else {}))  # fmt: skip
    extra = {**p.extra, "dtype": dtype, "phase": phase, "backend": p.backend}
    if stream_ms is not None:
        extra["stream_ms"] = stream_ms
        extra["fraction_of_bound"] = stream_ms / ms if ms > 0 else None
    return {
        "key": kernel_key(spec, length=length, batch=batch, rep=rep, threads=cfg.threads),
        "label": p.name,
        "method": p.path,
        "spec": spec,
        "budget": f"{budget:.1%}".replace(".0%", "%"),
        "budget_kind": "ratio",
        "budget_value": budget,
        "model": MODEL,
        "version": __version__,
        "created": time.time(),
        "threads": cfg.threads,
        "prefill": "synthetic",
        "decode": p.name if phase == "decode" else None,
        "length": length,
        "batch": batch,
        "rep": rep,
        "attn_ms": ms,
        "prefill_attn_s": ms / 1e3 if phase == "prefill" else None,
        "bytes_read": float(p.bytes_read) if p.bytes_read else None,
        "kv_bytes": p.kv_bytes or None,
        "extra": extra,
    }


def run_kernels(
    cfg: KernelConfig, *, store: ResultStore | None = None, command: str = "",
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Measure every path of every shape; returns the rows (also written to ``store`` as they are measured) and the
    run's description."""
    torch.set_num_threads(cfg.threads)
    backends = list(cfg.backends)
    if "cpp" in backends:
        previous = fused.set_backend("auto")
        try:
            if fused.kernels() is None:
                backends.remove("cpp")
        finally:
            fused.set_backend(previous)
        cfg = KernelConfig(**{**cfg.__dict__, "backends": tuple(backends) or ("torch",)})
    info: dict[str, Any] = {**describe_machine(), "geometry": f"{HQ} query / {HKV} KV heads, head dim {D}",
                            "model": MODEL, "version": __version__, "backends": list(cfg.backends),
                            "kernels": fused.build_dir().name if "cpp" in cfg.backends else None}  # fmt: skip
    run_id = 0
    if store is not None:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
        cells = len(cfg.lengths) * len(cfg.batch_sizes) * len(cfg.dtypes) + len(cfg.prefill_lengths) * len(cfg.dtypes)
        run_id = store.start_run(
            tool="bench-kernels", command=command, config=config, model=MODEL, version=__version__,
            threads=cfg.threads, cells=cells, todo=cells, info=info,
        )  # fmt: skip
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        row["run_id"] = run_id
        rows.append(row)
        if store is not None:
            store.add("bench", row)

    g = torch.Generator().manual_seed(cfg.seed)
    decode_wanted = any(p in cfg.paths for p in DECODE_PATHS)
    for dtype_name in cfg.dtypes:
        dtype = DTYPES[dtype_name]
        for length in cfg.lengths if decode_wanted else ():
            for batch in cfg.batch_sizes:
                if progress is not None:
                    progress(f"decode {length} x{batch} {dtype_name}")
                paths = decode_paths(cfg, length, batch, dtype, g)
                times = _measure(paths, cfg.repetitions, with_stream=True)
                for p in paths:
                    for rep, (ms, st) in enumerate(times[p.name]):
                        emit(_row(cfg, p, length, batch, dtype_name, rep, ms, st))
                del paths
                gc.collect()
        for length in cfg.prefill_lengths if any(p in cfg.paths for p in PREFILL_PATHS) else ():
            if progress is not None:
                progress(f"prefill {length} {dtype_name}")
            paths = prefill_paths(cfg, length, dtype, g)
            # no warm-up calls: a prefill is long (its first-call costs are small next to it) and the sparse path
            # has already run once, untimed, to compile
            times = _measure(paths, cfg.prefill_repetitions, with_stream=False, warmup=0)
            for p in paths:
                for rep, (ms, _) in enumerate(times[p.name]):
                    emit(_row(cfg, p, length, 1, dtype_name, rep, ms, None))
            del paths
            gc.collect()
    return rows, info


def kernel_command(cfg: KernelConfig, args: Any) -> str:
    """The command line that reproduces this run (recorded in the store, shown on the page)."""
    import shlex

    parts = ["tokensieve", "bench", "--kernels", "--lengths", ",".join(map(str, cfg.lengths)) or "none",
             "--batch-sizes", ",".join(map(str, cfg.batch_sizes)), "--dtypes", ",".join(cfg.dtypes),
             "--reps", str(cfg.repetitions), "--threads", str(cfg.threads),
             "--prefill-lengths", ",".join(map(str, cfg.prefill_lengths)) or "none",
             "--prefill-reps", str(cfg.prefill_repetitions)]  # fmt: skip
    if args.paths:
        parts += ["--paths", ",".join(cfg.paths)]
    if cfg.compiled:
        parts.append("--compiled")
    for flag in ("store", "json", "report"):
        value = getattr(args, flag, None)
        if value:
            parts += [f"--{flag}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_bench_kernels(args: Any) -> int:
    """``tokensieve bench --kernels`` (arguments: see :func:`tokensieve.bench.cli.add_commands`)."""
    from ..results.kernels import HEADER, kernel_blocks, kernel_cells
    from ..results.render import Block, render_markdown, text_table
    from ..results.threads import resolve_threads

    threads = resolve_threads(args.threads)
    cfg = KernelConfig(
        lengths=parse_lengths(args.lengths or "8192,32768"),
        batch_sizes=tuple(int(b) for b in (args.batch_sizes or "1,4").split(",") if b.strip()),
        dtypes=tuple(d.strip() for d in (args.dtypes or "float32,bfloat16").split(",") if d.strip()),
        repetitions=args.reps if args.reps is not None else 10,
        threads=threads,
        compiled=bool(args.compiled),
        prefill_lengths=parse_lengths(args.prefill_lengths if args.prefill_lengths is not None else "32768"),
        prefill_repetitions=args.prefill_reps,
        paths=tuple(p.strip() for p in args.paths.split(",")) if args.paths else DECODE_PATHS + PREFILL_PATHS,
    )
    out_json = Path(args.json).expanduser() if args.json else None
    if out_json is not None and out_json.is_dir():
        raise ConfigError(f"--json {args.json} is a folder: give a file name, e.g. --json kernels.json.")
    report_dir = None
    if args.report:
        report_dir = Path(args.report).expanduser()
        report_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(args.store) if args.store else None
    command = kernel_command(cfg, args)
    try:
        rows, info = run_kernels(cfg, store=store, command=command,
                                 progress=lambda s: print(f"[kernels] {s}", file=sys.stderr))  # fmt: skip
    finally:
        if store is not None:
            store.close()
    summary = kernel_summary(rows)
    machine = f"{info['cpu']}, {info['cores']} cores, {cfg.threads} thread(s), torch {info['torch']}"
    print(text_table(HEADER, [kernel_cells(e) for e in summary]))
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
        doc = {"command": command, "machine": info, "config": config, "rows": summary}
        out_json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"json: {out_json}", file=sys.stderr)
    if report_dir is not None:
        day = _dt.date.today().isoformat()
        blocks = [Block("h1", f"Attention kernels against the memory bound ({day})")]
        if command:
            blocks += [Block("p", "Produced by:"), Block("code", command)]
        blocks += kernel_blocks(summary, machine)
        page = report_dir / f"kernels-{day}.md"
        page.write_text(render_markdown(blocks, report_dir), encoding="utf-8")
        print(f"report: {page}", file=sys.stderr)
    if not rows:
        raise ConfigError("Nothing was measured: check --paths and the lengths.")
    return 0


__all__ = [
    "DECODE_PATHS",
    "PREFILL_PATHS",
    "KernelConfig",
    "adakv_lengths",
    "parse_length",
    "run_kernels",
    "sparse_blocks",
]  # fmt: skip
