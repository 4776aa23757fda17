#!/usr/bin/env python3
"""tokensieve and kvpress side by side: same model, same prompts (token ids), same number of kept entries.

kvpress 0.5.5 needs transformers < 5.3, so each library runs in its own virtual environment and this one script
has four steps (docs/results/comparison.md gives the exact commands):

  samples   (tokensieve's venv)  generate the prompts with tokensieve's task generators, as token ids
  run       (either venv)        --lib tokensieve | kvpress: every sample × method × mode, greedy answers, the
                                 stored KV bytes, prefill and decode times, and for the first samples the kept
                                 positions of every (layer, KV head); JSON lines, resumable
  report    (tokensieve's venv)  score both libraries' answers with the tasks' own scorers; accuracy with Wilson
                                 95 % intervals, answer agreement, selection agreement (Jaccard per layer and head)

Budgets: kvpress's ``compression_ratio = r`` keeps ``int(n · (1 − r))`` entries per (layer, KV head); tokensieve
is given that same count as an absolute budget, so both store exactly as many entries (kvpress's r = 0.75 is
tokensieve's budget 0.25). Modes: ``agnostic`` compresses the context and appends the question uncompressed (what
kvpress's pipeline does); ``aware`` compresses context and question together.

Nothing from tokensieve is imported at module level: the kvpress side runs without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

MODEL_DIR = Path.home() / ".cache" / "tokensieve" / "models" / "smollm2-135m"

# name → (tokensieve spec, kvpress press class, its arguments besides compression_ratio): kvpress's defaults, and
# tokensieve's parameters set to match them.
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "knorm": ("knorm", "KnormPress", {}),
    "streaming_llm": ("streaming_llm[sink=4]", "StreamingLLMPress", {"n_sink": 4}),
    "snapkv": ("snapkv[window=64,kernel=5,pooling=avg]", "SnapKVPress", {"window_size": 64, "kernel_size": 5}),
    "pyramidkv": (
        "pyramidkv[window=64,kernel=5,pooling=avg,beta=20]",
        "PyramidKVPress",
        {"window_size": 64, "kernel_size": 5, "beta": 20},
    ),
    "tova": ("tova", "TOVAPress", {}),
    "expected_attention": (
        "expected_attention[n_future=512,sink=4]",
        "ExpectedAttentionPress",
        {"n_future_positions": 512, "n_sink": 4},
    ),
    "keydiff": ("keydiff[block=0]", "KeyDiffPress", {}),
    "lagkv": ("lagkv[sink=4,lag=128]", "LagKVPress", {"n_sink": 4, "lag_size": 128}),
}


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in parse_list(text):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["sample"], r["method"], r["budget"], r["mode"])


# ------------------------------------------------------------------------------------------------------------ samples
def cmd_samples(args: argparse.Namespace) -> None:
    import tokensieve as ts
    from tokensieve.data.tasks import get_task

    _, tok = ts.load_model("smollm2-135m")
    rows = []
    # seed-major order: the first k·(tasks × depths) samples are balanced, so `run --limit` can grow a run
    for seed in parse_seeds(args.seeds):
        for task_name in parse_list(args.tasks):
            task = get_task(task_name)
            for depth in [float(d) for d in parse_list(args.depths)]:
                s = task.make(tok, args.length, depth, seed)
                ids = s.ids(tok)
                rows.append(
                    {
                        "id": f"{task_name}/{args.length}/{depth}/{seed}",
                        "task": task_name,
                        "length": args.length,
                        "depth": depth,
                        "seed": seed,
                        "context": ids.context,
                        "question": ids.question,
                        "max_new_tokens": task.max_new_tokens,
                        "eos": [int(tok.eos_token_id)] if tok.eos_token_id is not None else [],
                    }
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows))
    print(f"{len(rows)} samples → {args.out}")


# ---------------------------------------------------------------------------------------------------------------- run
class Runner:
    """One library's way to prefill (compressing), append the question, and decode greedily."""

    def __init__(self, lib: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.lib = lib
        self.torch = torch
        if lib == "tokensieve":
            import tokensieve as ts

            self.ts = ts
            self.model, _ = ts.load_model("smollm2-135m")
            self.version = ts.__version__
            self.kv_heads = int(self.model.config.num_key_value_heads)
        else:
            import kvpress
            from transformers import AutoModelForCausalLM

            self.kvpress = kvpress
            self.model = AutoModelForCausalLM.from_pretrained(
                str(MODEL_DIR), dtype=torch.float32, attn_implementation="sdpa"
            ).eval()
            from importlib.metadata import version

            self.version = version("kvpress")
        import transformers

        self.transformers_version = transformers.__version__

    def run(self, sample: dict[str, Any], method: str, ratio: float, mode: str, want_selection: bool) -> dict[str, Any]:
        ctx_ids = sample["context"] if mode == "agnostic" else sample["context"] + sample["question"]
        rest = sample["question"] if mode == "agnostic" else []
        n = len(ctx_ids)
        kept = n if method == "full" else max(1, int(n * (1 - ratio)))
        fn = self._tokensieve if self.lib == "tokensieve" else self._kvpress
        with self.torch.inference_mode():
            out = fn(ctx_ids, rest, method, ratio, kept, sample, want_selection)
        out.update(kept_per_head=kept, compressed_tokens=n)
        return out

    # tokensieve ----------------------------------------------------------------------------------------------------
    def _tokensieve(
        self, ctx_ids: list[int], rest: list[int], method: str, ratio: float, kept: int, sample: dict[str, Any],
        want_selection: bool,
    ) -> dict[str, Any]:  # fmt: skip
        ts, torch = self.ts, self.torch
        spec = "full" if method == "full" else METHODS[method][0]
        reserve = len(rest) + sample["max_new_tokens"] + 1
        press = ts.compress(self.model, spec, None if method == "full" else ts.Budget.tokens(kept), reserve=reserve)
        t0 = time.perf_counter()
        ctx = press.prefill(torch.tensor([ctx_ids]))
        prefill_s = time.perf_counter() - t0
        selection = None
        if want_selection and method != "full":
            selection = [
                [sorted(layer.store.positions[0, h, : layer.store.n].tolist()) for h in range(self.kv_heads)]
                for layer in ctx.cache.layers
            ]
        kv_bytes = int(ctx.cache.kv_bytes())
        entries = int(ctx.cache.stored_entries())
        t1 = time.perf_counter()
        if rest:
            press.extend(ctx, torch.tensor([rest]))
        question_s = time.perf_counter() - t1
        gen = press.decode(ctx, sample["max_new_tokens"], eos_token_ids=sample["eos"])
        return {
            "output_ids": gen.tokens[0],
            "kv_bytes": kv_bytes,
            "stored_entries": entries,
            "prefill_s": prefill_s,
            "question_s": question_s,
            "decode_s": gen.decode_seconds,
            "decode_tokens": len(gen.tokens[0]),
            "selection": selection,
        }

    # kvpress -------------------------------------------------------------------------------------------------------
    def _press(self, method: str, ratio: float) -> Any:
        _, cls, kwargs = METHODS[method]
        return getattr(self.kvpress, cls)(compression_ratio=ratio, **kwargs)

    def _kvpress(
        self, ctx_ids: list[int], rest: list[int], method: str, ratio: float, kept: int, sample: dict[str, Any],
        want_selection: bool,
    ) -> dict[str, Any]:  # fmt: skip
        from contextlib import nullcontext

        from transformers import DynamicCache

        torch, model = self.torch, self.model
        press = None if method == "full" else self._press(method, ratio)
        picked: dict[int, list[list[int]]] = {}
        if press is not None and want_selection:
            original = press.score

            def score(module: Any, *a: Any, **kw: Any) -> Any:  # record which entries compress() keeps
                s = original(module, *a, **kw)
                k_len = s.shape[-1]
                n_kept = self.kvpress.utils.compute_n_kept(k_len, press.compression_ratio)
                idx = s.topk(n_kept, dim=-1).indices[0]  # the same call as ScorerPress.compress
                picked[int(module.layer_idx)] = [sorted(row.tolist()) for row in idx]
                return s

            press.score = score  # type: ignore[method-assign]
        cache = DynamicCache()
        ids = torch.tensor([ctx_ids])
        t0 = time.perf_counter()
        with press(model) if press is not None else nullcontext():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        prefill_s = time.perf_counter() - t0
        n_layers = len(cache.layers)
        entries = sum(int(cache.layers[i].keys.shape[-2]) * int(cache.layers[i].keys.shape[1]) for i in range(n_layers))
        kv_bytes = sum(
            cache.layers[i].keys.numel() * cache.layers[i].keys.element_size()
            + cache.layers[i].values.numel() * cache.layers[i].values.element_size()
            for i in range(n_layers)
        )
        # as kvpress's pipeline: later tokens keep their true positions; the cache has fewer entries
        n = len(ctx_ids)
        logits = out.logits[0, -1]
        t1 = time.perf_counter()
        if rest:
            pos = torch.arange(n, n + len(rest))[None]
            out = model(input_ids=torch.tensor([rest]), past_key_values=cache, position_ids=pos, use_cache=True)
            logits = out.logits[0, -1]
            n += len(rest)
        question_s = time.perf_counter() - t1
        tokens: list[int] = []
        t2 = time.perf_counter()
        for step in range(sample["max_new_tokens"]):
            nxt = int(logits.argmax())
            if nxt in sample["eos"]:
                break
            tokens.append(nxt)
            if step == sample["max_new_tokens"] - 1:
                break
            out = model(
                input_ids=torch.tensor([[nxt]]), past_key_values=cache, position_ids=torch.tensor([[n]]), use_cache=True
            )
            logits = out.logits[0, -1]
            n += 1
        selection = [picked[i] for i in range(n_layers)] if picked else None
        return {
            "output_ids": tokens,
            "kv_bytes": int(kv_bytes),
            "stored_entries": int(entries),
            "prefill_s": prefill_s,
            "question_s": question_s,
            "decode_s": time.perf_counter() - t2,
            "decode_tokens": len(tokens),
            "selection": selection,
        }


def cmd_run(args: argparse.Namespace) -> None:
    samples = json.loads(Path(args.samples).read_text())
    if args.limit:
        samples = samples[: args.limit]
    methods = parse_list(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    ratios = [float(r) for r in parse_list(args.ratios)]
    modes = parse_list(args.modes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {row_key(json.loads(line)) for line in out.read_text().splitlines() if line.strip()}
    runner = Runner(args.lib, args.threads)
    plan = []
    for i, s in enumerate(samples):
        plan.append((s, "full", 0.0, "agnostic", False))
        for m in methods:
            for r in ratios:
                for mode in modes:
                    plan.append((s, m, r, mode, i < args.selection_samples))
    todo = [p for p in plan if (p[0]["id"], p[1], p[2], p[3]) not in done]
    print(f"{args.lib}: {len(plan)} runs, {len(plan) - len(todo)} stored, {len(todo)} to run", flush=True)
    t_start = time.time()
    with out.open("a") as f:
        for j, (s, m, r, mode, sel) in enumerate(todo):
            res = runner.run(s, m, r, mode, sel)
            res.update(
                sample=s["id"], task=s["task"], method=m, budget=r, mode=mode, lib=args.lib, version=runner.version,
                transformers=runner.transformers_version, threads=args.threads,
            )  # fmt: skip
            f.write(json.dumps(res) + "\n")
            f.flush()
            if (j + 1) % 20 == 0:
                el = time.time() - t_start
                print(f"  {j + 1}/{len(todo)}  {el / (j + 1):.1f} s/run", flush=True)


# ------------------------------------------------------------------------------------------------------------- report
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def fmt_acc(scores: list[float]) -> str:
    n = len(scores)
    if n == 0:
        return "—"
    k = sum(scores)
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]"


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    if not ys:
        return float("nan")
    m = len(ys) // 2
    return ys[m] if len(ys) % 2 else (ys[m - 1] + ys[m]) / 2


def cmd_report(args: argparse.Namespace) -> None:
    import tokensieve as ts
    from tokensieve.data.tasks import get_task

    _, tok = ts.load_model("smollm2-135m")
    samples = {s["id"]: s for s in json.loads(Path(args.samples).read_text())}
    made: dict[str, Any] = {}

    def score(row: dict[str, Any]) -> float:
        sid = row["sample"]
        if sid not in made:
            s = samples[sid]
            made[sid] = get_task(s["task"]).make(tok, s["length"], s["depth"], s["seed"])
        text = tok.decode(row["output_ids"], skip_special_tokens=True)
        return float(get_task(samples[sid]["task"]).score(made[sid], text))

    rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for path in args.runs:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r["score"] = score(r)
                rows.setdefault(r["lib"], {})[row_key(r)] = r
    libs = ["tokensieve", "kvpress"]
    for lib in libs:
        if lib not in rows:
            sys.exit(f"no rows of {lib} in {args.runs}")
    cells = sorted({(k[1], k[2], k[3]) for k in rows["tokensieve"]} & {(k[1], k[2], k[3]) for k in rows["kvpress"]})
    order = ["full", *METHODS]
    cells.sort(key=lambda c: (order.index(c[0]) if c[0] in order else 99, c[1], c[2]))
    lines = []
    lines.append(
        "| method | budget (kvpress ratio) | mode | n | tokensieve accuracy | kvpress accuracy | same answer | "
        "selection Jaccard | identical rows | KV MiB ts / kvpress | prefill s ts / kvpress | decode s ts / kvpress |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for m, r, mode in cells:
        keys = sorted(k for k in rows["tokensieve"] if k[1:] == (m, r, mode) and k in rows["kvpress"])
        a = [rows["tokensieve"][k] for k in keys]
        b = [rows["kvpress"][k] for k in keys]
        same = sum(x["output_ids"] == y["output_ids"] for x, y in zip(a, b))
        jac: list[float] = []
        ident = 0
        total = 0
        for x, y in zip(a, b):
            if x.get("selection") and y.get("selection"):
                for lx, ly in zip(x["selection"], y["selection"]):
                    for hx, hy in zip(lx, ly):
                        sx, sy = set(hx), set(hy)
                        jac.append(len(sx & sy) / max(1, len(sx | sy)))
                        ident += sx == sy
                        total += 1
        budget = "100 %" if m == "full" else f"{1 - r:.0%} ({r:g})"
        lines.append(
            f"| {m} | {budget} | {mode} | {len(keys)} | {fmt_acc([x['score'] for x in a])} | "
            f"{fmt_acc([y['score'] for y in b])} | {same}/{len(keys)} | "
            + (f"{sum(jac) / len(jac):.3f} | {ident}/{total} | " if jac else "— | — | ")
            + f"{median([x['kv_bytes'] for x in a]) / 2**20:.1f} / {median([y['kv_bytes'] for y in b]) / 2**20:.1f} | "
            f"{median([x['prefill_s'] for x in a]):.2f} / {median([y['prefill_s'] for y in b]):.2f} | "
            f"{median([x['decode_s'] for x in a]):.2f} / {median([y['decode_s'] for y in b]):.2f} |"
        )
        summary.append(
            {
                "method": m, "kvpress_ratio": r, "mode": mode, "n": len(keys),
                "tokensieve_accuracy": sum(x["score"] for x in a) / max(1, len(a)),
                "kvpress_accuracy": sum(y["score"] for y in b) / max(1, len(b)),
                "same_answer": same, "jaccard": sum(jac) / len(jac) if jac else None,
                "identical_rows": ident, "rows": total,
            }
        )  # fmt: skip
    any_row = next(iter(rows["kvpress"].values()))
    ts_row = next(iter(rows["tokensieve"].values()))
    head = (
        f"tokensieve {ts_row['version']} (transformers {ts_row['transformers']}), kvpress {any_row['version']} "
        f"(transformers {any_row['transformers']}), {ts_row['threads']} thread(s) each; medians of the timings."
    )
    text = head + "\n\n" + "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("samples", help="generate the prompts (tokensieve's venv)")
    s.add_argument("--out", required=True)
    s.add_argument("--tasks", default="passkey,niah_single")
    s.add_argument("--length", type=int, default=1024)
    s.add_argument("--depths", default="0.25,0.5,0.75")
    s.add_argument("--seeds", default="0-3")
    r = sub.add_parser("run", help="run one library over the samples (its own venv)")
    r.add_argument("--lib", choices=["tokensieve", "kvpress"], required=True)
    r.add_argument("--samples", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--methods", default=",".join(METHODS))
    r.add_argument("--ratios", default="0.75", help="kvpress compression ratios (1 − tokensieve's budget)")
    r.add_argument("--modes", default="agnostic,aware")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--limit", type=int, default=0, help="only the first N samples (0: all)")
    r.add_argument("--selection-samples", type=int, default=6, help="record kept positions for the first N samples")
    q = sub.add_parser("report", help="score and compare (tokensieve's venv)")
    q.add_argument("--samples", required=True)
    q.add_argument("--runs", nargs="+", required=True)
    q.add_argument("--out", default="")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"samples": cmd_samples, "run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
