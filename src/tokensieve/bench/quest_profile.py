"""Where a Quest decode step's attention time goes: the per-operation profile of one decode step over every layer.

Builds SmolLM2-135M's attention geometry (30 layers, 9 query / 3 KV heads, head_dim 64) over a cache of ``--length``
tokens, drives the decode method exactly as :class:`~tokensieve.cache.sieve_cache.SieveCache` does (append the step's
token, ``on_append``, ``step``) and measures, interleaved with the dense step over the same cache (the full-cache
baseline of the same run): the time per step (median and spread over repetitions), the attention ratio, and a
``torch.profiler`` table of the operations of one step, grouped by what they do. Random keys: the operations and
their sizes are Quest's, the pages chosen are not those of a real prompt (which does not change their cost).

Run: ``python -m tokensieve.bench.quest_profile --help``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from ..cache.decode import DecodeLayer, DecodeMethod, DecodeRun
from ..cache.storage import DenseKV
from ..core.budget import Budget
from ..core.context import ModelShape
from ..methods.kv.quest import Quest
from ..spec import Spec

LAYERS, HQ, HKV, D = 30, 9, 3, 64


class _TokenGatherQuest(Quest):
    """Quest's earlier decode path, kept to compare against: every query head's pages gathered token by token (the
    padded-batch path)."""

    def _per_head_pages(
        self, layer: DecodeLayer, q: torch.Tensor, bounds: torch.Tensor, cur: int, k: int
    ) -> torch.Tensor:
        return self._per_head(layer, q, bounds, cur, k, 0)


def _layers(length: int, batch: int, method: DecodeMethod | None, budget: Budget, seed: int) -> list[DecodeLayer]:
    g = torch.Generator().manual_seed(seed)
    shape = ModelShape(LAYERS, HQ, HKV, D, 2 * length)
    run = DecodeRun(shape, torch.full((batch,), budget.tokens_for(length)), budget)
    out = []
    for i in range(LAYERS):
        k = torch.randn(batch, HKV, length, D, generator=g)
        v = torch.randn(batch, HKV, length, D, generator=g)
        pos = torch.arange(length).expand(batch, HKV, length)
        store = DenseKV(k, v, pos, reserve=256)
        store.identity_positions = True
        layer = DecodeLayer(i, store, run, D**-0.5)
        if method is not None:
            layer.state = method.setup(layer, None)
        out.append(layer)
    return out


def _step(layers: list[DecodeLayer], method: DecodeMethod | None, kv: torch.Tensor, q: torch.Tensor) -> float:
    """One decode step over every layer (append, on_append, step); returns the attention seconds, timed as the
    cache times them (append excluded, the method's bookkeeping included)."""
    B = q.shape[0]
    total = 0.0
    for layer in layers:
        store = layer.store
        pos = torch.full((B, 1), store.n, dtype=torch.long)
        store.append(kv, kv, pos, None)
        t0 = time.perf_counter()
        if method is None:
            store.attend(q, layer.scaling)
        else:
            method.on_append(layer, 1)
            method.step(layer, q)
        total += time.perf_counter() - t0
        if layer.index == len(layers) - 1:
            layer.run.step += 1
    return total


def _truncate(layers: list[DecodeLayer], n: int) -> None:
    for layer in layers:
        layer.store.truncate(n)


def profile(spec: str, length: int, batch: int, reps: int, seed: int = 0) -> dict[str, Any]:
    s = Spec.parse(spec)
    method = s.decode
    if not isinstance(method, DecodeMethod):
        raise SystemExit("give a decode method, e.g. '+quest[page=32]:0.125'")
    budget = s.decode_budget or Budget.ratio(1.0)
    sparse = _layers(length, batch, method, budget, seed)
    dense = _layers(length, batch, None, budget, seed)
    kv = torch.randn(batch, HKV, 1, D)
    q = torch.randn(batch, HQ, 1, D)
    for _ in range(2):  # warm-up: metadata built, as the benchmark's two untimed steps
        _step(sparse, method, kv, q)
        _step(dense, None, kv, q)
    n0 = sparse[0].store.n
    configs: list[tuple[str, list[DecodeLayer], DecodeMethod | None]] = [("dense", dense, None), (spec, sparse, method)]
    if isinstance(method, Quest) and method.group == "per_head":  # the same layers, the token-gather path of before
        before = _TokenGatherQuest(**{f: getattr(method, f) for f in ("page", "min_pages", "dense_layers", "group")})
        configs.append((spec + " (token gathers, before)", sparse, before))
    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for rep in range(reps):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for name, layers, m in order:
            _truncate(layers, n0)
            times[name].append(_step(layers, m, kv, q) * 1e3)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _truncate(sparse, n0)
    _step(sparse, method, kv, q)
    _truncate(sparse, n0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            _truncate(sparse, n0)
            _step(sparse, method, kv, q)
    ops = [(e.key, e.self_cpu_time_total / 5 / 1e3, e.count // 5) for e in prof.key_averages()]
    ops.sort(key=lambda x: -x[1])
    return {"times": times, "ops": ops}


def report(res: dict[str, Any], top: int) -> str:
    times = res["times"]
    names = list(times)
    dense = statistics.median(times["dense"])
    lines = ["| configuration | attention ms/step (median) | IQR ms | attention × (dense / this, same run) |",
             "|---|---|---|---|"]  # fmt: skip
    for name in names:
        ts = times[name]
        qs = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.2f} | {qs[0]:.2f}–{qs[2]:.2f} | {dense / med:.2f} |")
    total = sum(t for _, t, _ in res["ops"])
    lines += ["", "| operation (torch.profiler, self CPU time) | ms/step | calls/step | share |", "|---|---|---|---|"]
    for key, t, c in res["ops"][:top]:
        lines.append(f"| `{key}` | {t:.3f} | {c} | {t / total:.0%} |")
    lines.append(f"| (all operations, profiled) | {total:.3f} | | 100% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="+quest[page=32]:0.125")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=18)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{a.spec}, {a.length} tokens, batch {a.batch}, {a.threads} thread(s), {a.reps} interleaved reps")
    print(report(profile(a.spec, a.length, a.batch, a.reps), a.top))


if __name__ == "__main__":
    main()
