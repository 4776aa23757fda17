"""Chunked prefill (docs/PREFILL.md, "Chunked prefill"): peak memory and prefill time against one-shot compression and
the full cache, each configuration in its own process; and the accuracy cost of chunking on needle tasks.

    python scripts/chunked_prefill.py memory --length 8192 --batch 4 --spec snapkv:0.125 --chunk 1024
    python scripts/chunked_prefill.py accuracy --tasks niah_single,passkey --length 2048 --chunk 512 \
        --specs snapkv:0.25,snapkv:0.5 --depths 0.1,0.3,0.5,0.7,0.9 --seeds 0-7

``memory`` runs ``one`` once per configuration (full cache, one-shot, chunked) in a fresh Python process, serially,
and reads the process's peak resident memory from ``resource.getrusage`` (``ru_maxrss``, model weights included):
separate processes keep one configuration's freed memory from inflating another's figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any

MODES = ("full", "oneshot", "chunked")


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cmd_one(args: argparse.Namespace) -> int:
    """One configuration in this process: prints a JSON line with peak RSS and prefill time."""
    import torch

    import tokensieve as ts
    from tokensieve.bench.runner import bench_prompts

    torch.set_num_threads(args.threads)
    model, tok = ts.load_model(args.model)
    ids = bench_prompts(tok, args.length, args.batch)
    spec = "full" if args.mode == "full" else args.spec
    chunk = args.chunk if args.mode == "chunked" else None
    press = ts.compress(model, spec, chunk=chunk)
    with torch.inference_mode():
        press.prefill(bench_prompts(tok, 64, 1))  # warm-up: kernels initialised, weights paged in
    loaded = _rss()
    times, compress_s = [], []
    kv = entries = 0
    first: list[int] = []
    for _ in range(args.reps):
        with torch.inference_mode():
            t0 = time.perf_counter()
            ctx = press.prefill(ids)
            times.append(time.perf_counter() - t0)
        compress_s.append(ctx.compress_seconds)
        kv, entries = ctx.cache.kv_bytes(), ctx.cache.stored_entries()
        first = ctx.logits.argmax(-1).tolist()
        del ctx
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({
        "mode": args.mode, "spec": spec, "chunk": chunk, "length": args.length, "batch": args.batch,
        "threads": args.threads, "peak_rss": peak, "rss_after_load": loaded, "prefill_s": times,
        "compress_s": compress_s, "kv_bytes": kv, "stored_entries": entries, "first_tokens": first,
    }))  # fmt: skip
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}: use {', '.join(MODES)}")
        cmd = [sys.executable, __file__, "one", "--mode", mode, "--spec", args.spec, "--chunk", str(args.chunk),
               "--length", str(args.length), "--batch", str(args.batch), "--threads", str(args.threads),
               "--reps", str(args.reps), "--model", args.model]  # fmt: skip
        print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    print(f"| configuration | peak RSS | RSS after load | prefill s ({args.reps} run(s)) | stored KV |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = {"full": "full cache", "oneshot": f"{r['spec']} one-shot", "chunked": f"{r['spec']} chunk={r['chunk']}"}
        times = ", ".join(f"{t:.1f}" for t in r["prefill_s"])
        print(f"| {name[r['mode']]} | {r['peak_rss'] / 2**30:.2f} GiB | {r['rss_after_load'] / 2**30:.2f} GiB | "
              f"{times} | {r['kv_bytes'] / 2**20:.0f} MiB |")  # fmt: skip
    return 0


def cmd_time(args: argparse.Namespace) -> int:
    """One-shot vs chunked prefill time in one process, interleaved (the order alternates between repetitions):
    wall time and CPU time of the process (all threads), medians."""
    import statistics

    import torch

    import tokensieve as ts
    from tokensieve.bench.runner import bench_prompts

    torch.set_num_threads(args.threads)
    model, tok = ts.load_model(args.model)
    ids = bench_prompts(tok, args.length, args.batch)
    presses = {
        "one-shot": ts.compress(model, args.spec),
        f"chunk={args.chunk}": ts.compress(model, args.spec, chunk=args.chunk),
    }
    with torch.inference_mode():
        for press in presses.values():
            press.prefill(bench_prompts(tok, 64, 1), chunk=32)  # warm-up
    wall: dict[str, list[float]] = {k: [] for k in presses}
    cpu: dict[str, list[float]] = {k: [] for k in presses}
    for rep in range(args.reps):
        names = list(presses) if rep % 2 == 0 else list(presses)[::-1]
        for name in names:
            with torch.inference_mode():
                w, c = time.perf_counter(), time.process_time()
                ctx = presses[name].prefill(ids)
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
            del ctx
            print(f"rep {rep} {name}: wall {wall[name][-1]:.1f} s, cpu {cpu[name][-1]:.1f} s", file=sys.stderr,
                  flush=True)  # fmt: skip
    base = "one-shot"
    print(f"| {args.spec}, {args.length} x {args.batch} | wall s (median) | × one-shot | CPU s (median) | × one-shot |")
    print("|---|---|---|---|---|")
    for name in presses:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        bw, bc = statistics.median(wall[base]), statistics.median(cpu[base])
        print(f"| {name} | {mw:.1f} | {mw / bw:.2f} | {mc:.1f} | {mc / bc:.2f} |")
    return 0


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def cmd_accuracy(args: argparse.Namespace) -> int:
    """Paired comparison on the same samples: one-shot vs chunked prefill at equal budget (and the full cache)."""
    import torch

    import tokensieve as ts
    from tokensieve.data.tasks import get_task

    torch.set_num_threads(args.threads)
    model, tok = ts.load_model(args.model)
    eos = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    specs = [s for s in args.specs.split(",") if s]
    depths = [float(d) for d in args.depths.split(",")]
    seeds = _seeds(args.seeds)
    scores: dict[tuple[str, str], list[float]] = {}
    t_start = time.perf_counter()
    for task_name in args.tasks.split(","):
        task = get_task(task_name)
        for depth in depths:
            for seed in seeds:
                sample = task.make(tok, args.length, depth, seed)
                prompt = sample.ids(tok)
                runs = [("full", None)] if args.with_full else []
                runs += [(s, c) for s in specs for c in (None, args.chunk)]
                for spec, chunk in runs:
                    press = ts.compress(model, spec, chunk=chunk, reserve=len(prompt.question) + 64)
                    with torch.inference_mode():
                        if args.mode == "aware":
                            ctx = press.prefill(torch.tensor([prompt.full]))
                        else:
                            ctx = press.prefill(torch.tensor([prompt.context]))
                            press.extend(ctx, torch.tensor([prompt.question]))
                        gen = press.decode(ctx, task.max_new_tokens, eos_token_ids=eos)
                    out = tok.decode(gen.tokens[0], skip_special_tokens=True)
                    key = (spec, "one-shot" if chunk is None else f"chunk={chunk}")
                    scores.setdefault(key, []).append(float(task.score(sample, out)))
                    print(f"  {key[0]} {key[1]}: {scores[key][-1]:.0f} {out!r}", file=sys.stderr, flush=True)
                done = len(scores[(specs[0], "one-shot")])
                print(f"{task_name} depth={depth} seed={seed} [{done}] {time.perf_counter() - t_start:.0f}s",
                      file=sys.stderr, flush=True)  # fmt: skip
    print("| configuration | prefill | accuracy | 95 % Wilson interval | n |")
    print("|---|---|---|---|---|")
    for (spec, how), xs in scores.items():
        k = sum(1 for x in xs if x >= 0.999)
        lo, hi = _wilson(k, len(xs))
        print(f"| {spec} | {how} | {sum(xs) / len(xs):.3f} | [{lo:.2f}, {hi:.2f}] | {len(xs)} |")
    for spec in specs:
        a, b = scores[(spec, "one-shot")], scores[(spec, f"chunk={args.chunk}")]
        diffs = [y - x for x, y in zip(a, b)]
        n = len(diffs)
        m = sum(diffs) / n
        sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / max(1, n - 1))
        worse = sum(1 for x, y in zip(a, b) if y < x)
        better = sum(1 for x, y in zip(a, b) if y > x)
        half = 1.96 * sd / math.sqrt(n)
        print(f"\n{spec}: chunked - one-shot = {m:+.3f} (95 % CI {m - half:+.3f} .. {m + half:+.3f}, paired, "
              f"n={n}); samples worse {worse}, better {better}")  # fmt: skip
    print(f"\n{time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    common: dict[str, Any] = {}
    for name, fn in (("one", cmd_one), ("memory", cmd_memory), ("time", cmd_time), ("accuracy", cmd_accuracy)):
        sp = sub.add_parser(name, **common)
        sp.set_defaults(func=fn)
        sp.add_argument("--model", default="smollm2-135m")
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--length", type=int, default=8192)
        sp.add_argument("--chunk", type=int, default=1024)
        if name in ("one", "memory", "time"):
            sp.add_argument("--spec", default="snapkv:0.125")
            sp.add_argument("--batch", type=int, default=4)
            sp.add_argument("--reps", type=int, default=1)
        if name == "one":
            sp.add_argument("--mode", choices=MODES, required=True)
        if name == "memory":
            sp.add_argument("--modes", default=",".join(MODES))
        if name == "accuracy":
            sp.add_argument("--tasks", default="niah_single,passkey")
            sp.add_argument("--specs", default="snapkv:0.25,snapkv:0.5")
            sp.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
            sp.add_argument("--seeds", default="0-7")
            sp.add_argument("--mode", choices=("aware", "agnostic"), default="aware")
            sp.add_argument("--with-full", action="store_true", help="also measure the full cache")
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
