"""A synthetic results store for the report tests, shaped like the methods screen (docs/eval/screen36: 27 methods × 3
budgets and the full cache, 2 tasks × 2 modes × 18 samples = 5,904 accuracy rows) plus benchmark rows, a VLM's
evaluation and benchmark rows, kept-patch images and DAAM runs — about 6,600 rows in all. The numbers are made up
(seeded); the rows have every column the real tools write, and are written with the store's own schema."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from tokensieve.results.daam import record_maps, record_runs
from tokensieve.results.store import ResultStore, columns, spec_columns, visual_columns, visual_key
from tokensieve.spec import Spec

# the methods of the screen's last commands (docs/eval/screen36/report.md)
SCREEN_METHODS = (
    "adakv", "chunkkv", "compresskv", "criticalkv", "dapq", "ems", "expected_attention", "+fasa", "fasa_prefill", "h2o",
    "keydiff", "knorm", "kvzip", "lagkv", "pyramidkv", "+quest", "random", "razor", "+recompress", "retention",
    "simlayerkv", "snapkv", "spkv", "streaming_llm", "+tidaldecode", "+tokenselect", "tova",
)  # fmt: skip
BUDGETS = (0.1, 0.25, 0.5)
TASKS = ("niah_multikey", "niah_single")
MODES = ("agnostic", "aware")
DEPTHS = (0.25, 0.5, 0.75)
SEEDS = range(6)
BENCH_LABELS = ("full", "snapkv:0.1", "snapkv:0.25", "snapkv:0.5", "+quest:0.1", "+quest:0.25", "tova:0.25",
                "streaming_llm:0.25")  # fmt: skip
VLM_SPECS = ("full", "todre:0.11", "todre:0.25", "vis:random:0.11", "vis:random:0.25", "pool:0.11", "pool:0.25",
             "divprune:0.11", "divprune:0.25")  # fmt: skip
QTYPES = ("attribute", "existence", "counting", "spatial", "reading")
VLM_SCENES = 12
MODEL = "smollm2-135m"
VLM_MODEL = "small-vlm"
FULL_ENTRIES = 1024 * 30 * 3  # tokens × layers × KV heads
ENTRY_BYTES = 2 * 64 * 4


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _insert(path: Path, table: str, rows: list[dict[str, Any]]) -> None:
    names = columns(table)
    sql = f"INSERT INTO {table}({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"

    def cell(v: Any) -> Any:
        return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v

    with sqlite3.connect(path) as conn:
        conn.executemany(sql, [[cell(r.get(c)) for c in names] for r in rows])


def kv_rows(rng: random.Random, run_id: int) -> list[dict[str, Any]]:
    labels = ["full"] + [f"{m}:{b}" for m in SCREEN_METHODS for b in BUDGETS]
    strength = {m: rng.uniform(0.2, 1.0) for m in SCREEN_METHODS}
    rows = []
    now = time.time()
    for label in labels:
        spec = Spec.parse(label)
        cols = spec_columns(spec)
        method = cols["method"]
        decode_only = method.startswith("+")
        budget = 1.0 if spec.is_full else float(cols["budget_value"])
        kept = 1.0 if spec.is_full or decode_only else budget
        for task in TASKS:
            base = 0.95 if task == "niah_single" else 0.62
            for mode in MODES:
                for depth in DEPTHS:
                    for seed in SEEDS:
                        s = 1.0 if spec.is_full else strength[method] ** (0.5 / (budget + 0.05))
                        right = rng.random() < base * s * (1.0 if mode == "aware" or spec.is_full else 0.85)
                        workload = {"task": task, "task_options": {}, "length": 1024, "depth": depth, "seed": seed,
                                    "mode": mode, "model": MODEL}  # fmt: skip
                        rows.append({
                            "key": spec.key(**workload), **cols, "model": MODEL, "version": "0.1.0",
                            "created": now + len(rows) * 1e-3, "run_id": run_id, "threads": 1,
                            "config": {"spec": cols["spec"], **workload}, "task": task, "task_options": "{}",
                            "length": 1024, "depth": depth, "seed": seed, "mode": mode, "metric": "accuracy",
                            "score": 1.0 if right else 0.0, "output": "x", "answers": ["x"], "prompt_tokens": 1024,
                            "context_tokens": 1000,
                            "kl": 0.0 if spec.is_full else round(rng.uniform(0, 1.2) * (1 - s), 4),
                            "kl_max": None, "top1": 1.0 if spec.is_full else round(rng.uniform(0.6, 1.0), 3),
                            "fidelity_tokens": 16, "answer_logprob": -rng.uniform(0.5, 9), "answer_tokens": 4,
                            "prefill_s": rng.uniform(3, 7), "compress_s": 0.01, "decode_s": 0.8, "decode_tokens": 8,
                            "cell_s": 5.0, "kv_bytes": int(FULL_ENTRIES * kept) * ENTRY_BYTES,
                            "stored_entries": int(FULL_ENTRIES * kept), "full_kv_bytes": FULL_ENTRIES * ENTRY_BYTES,
                            "full_entries": FULL_ENTRIES,
                        })  # fmt: skip
    return rows


def bench_rows(rng: random.Random, run_id: int) -> list[dict[str, Any]]:
    rows = []
    for label in BENCH_LABELS:
        spec = Spec.parse(label)
        cols = spec_columns(spec)
        decode_only = cols["method"].startswith("+")
        kept = 1.0 if spec.is_full or decode_only else float(cols["budget_value"])
        read = kept if not decode_only else float(cols["budget_value"])
        for rep in range(3):
            rows.append({
                "key": _key("bench", label, rep), **cols, "model": MODEL, "version": "0.1.0", "created": time.time(),
                "run_id": run_id, "threads": 1, "prefill": spec.prefill.label,
                "decode": None if spec.decode is None else spec.decode.name, "decode_budget": None, "length": 2048,
                "batch": 1, "rep": rep, "prefill_s": rng.uniform(6, 7), "compress_s": 0.0 if spec.is_full else 0.05,
                "ttft_s": rng.uniform(6, 7.5), "decode_s": 1.0, "steps": 32, "tok_s": 30 / (0.6 + 0.4 * read),
                "attn_ms": 40 * read, "bytes_read": 90e6 * read, "kv_bytes": int(90e6 * kept), "alloc_bytes": int(90e6),
                "meta_bytes": 0, "stored_entries": int(FULL_ENTRIES * 2 * kept), "prefill_peak_rss": int(1.2e9),
                "decode_peak_rss": int(1.1e9), "prefill_attn_s": 2.0, "compile_s": 0.0,
            })  # fmt: skip
    return rows


def vlm_rows(rng: random.Random, run_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    evals, bench = [], []
    for spec in VLM_SPECS:
        cols = visual_columns(spec)
        frac = 1.0 if spec == "full" else float(cols["budget_value"])
        skill = {"full": 0.8, "todre": 0.7, "vis:random": 0.5, "pool": 0.55, "divprune": 0.65}[cols["method"]]
        for scene in range(VLM_SCENES):
            for t in QTYPES:
                q = f"{t} question {scene}"
                options = {"split": "test", "scene": scene, "scene_seed": 1000 + scene, "question": q}
                right = rng.random() < skill * (0.5 + 0.5 * frac**0.3)
                kept = round(144 * frac)
                evals.append({
                    "key": visual_key(spec, tool="vlm-eval", model=VLM_MODEL, question=q, scene=scene), **cols,
                    "model": VLM_MODEL, "version": "0.1.0", "created": time.time(), "run_id": run_id, "threads": 1,
                    "config": {"spec": cols["spec"]}, "task": f"scenes/{t}", "task_options": options, "length": 180,
                    "depth": None, "seed": scene, "mode": "aware", "metric": "exact_match",
                    "score": 1.0 if right else 0.0, "output": "a", "answers": ["a"], "prompt_tokens": 180,
                    "context_tokens": kept, "kv_bytes": (36 + kept) * 4096, "stored_entries": (36 + kept) * 30,
                    "full_kv_bytes": 180 * 4096, "full_entries": 180 * 30, "decode_tokens": 2, "cell_s": 0.5,
                    "extra": {"image_tokens": 144, "visual_tokens": {"llm": kept}, "batch": 5},
                })  # fmt: skip
        for rep in range(2):
            bench.append({
                "key": visual_key(spec, tool="bench-vlm", rep=rep), **cols, "model": "smollm2-135m+tiny-random",
                "version": "0.1.0", "created": time.time(), "run_id": run_id, "threads": 1, "prefill": cols["label"],
                "length": 180, "batch": 1, "rep": rep, "prefill_s": 0.3 * (0.4 + frac), "compress_s": 0.002,
                "ttft_s": 0.32 * (0.4 + frac), "kv_bytes": int((36 + 144 * frac) * 4096),
                "stored_entries": int((36 + 144 * frac) * 30), "prefill_peak_rss": int(9e8),
                "extra": {"image_tokens": 144, "kept_tokens": round(144 * frac), "visual_tokens": round(144 * frac),
                          "ttft_cpu_s": 0.3 * (0.4 + frac), "vision_s": 0.1, "lm_prefill_s": 0.2 * frac,
                          "vision_flops": 1e9, "lm_flops": 4e9 * (0.3 + frac)},
            })  # fmt: skip
    return evals, bench


def _png(path: Path, shade: float, size: tuple[int, int] = (48, 160)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (int(255 * shade), 120, 200)).save(path)
    return path


def daam_records(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for task, fronts in (("a", ("daam", "mha", "none")), ("b", ("daam", "mha", "none"))):
        for front in fronts:
            for seed in range(3):
                config = {"task": task, "network": "cnnlstm", "attention": front, "time_axis": False, "seed": seed,
                          "epochs": 12, "batch": 20, "feedforward": 2048, "time_heads": 0,
                          "modules": "official"}  # fmt: skip
                f1 = {"daam": 0.8, "mha": 0.74, "none": 0.7}[front] + rng.uniform(-0.04, 0.04)
                out.append({"run": f"{task}-cnnlstm-{front}-s{seed}-e12", "config": config, "parameters": 280257,
                            "front_parameters": 192, "best_epoch": 9, "val": {"f1": f1 + 0.02, "acc": f1},
                            "test": {"f1": f1, "acc": f1 + 0.01}, "seconds": 60.0, "threads": 1,
                            "corpus": f"speech-{task}-0"})  # fmt: skip
    return out


def build_store(path: Path, *, kv: bool = True, vlm: bool = True, daam: bool = True) -> Path:
    """Write the synthetic store at ``path`` (see the module docstring); kept-patch images go next to it."""
    from tokensieve.train.overlays import tile_path
    from tokensieve.train.vlm_store import record_overlays

    rng = random.Random(0)
    with ResultStore(path) as store:
        run = store.start_run(tool="eval", command="tokensieve eval --store screen.sqlite --methods ...", config={},
                              model=MODEL, version="0.1.0", threads=1, cells=5904, todo=5904)  # fmt: skip
        info = {
            "cores": 2,
            "cpu": "synthetic",
            "threads": 1,
            "torch": "2.13.0",
            "memory_gib": 24,
            "bandwidth": 1e10,
            "model": MODEL,
            "weights_bytes": 540e6,
            "decode_tokens": 32,
            "repetitions": 3,
            "version": "0.1.0",
        }
        bench_run = store.start_run(tool="bench", command="tokensieve bench --store screen.sqlite ...", config={},
                                    model=MODEL, version="0.1.0", threads=1, cells=24, todo=24, info=info)  # fmt: skip
        vlm_run = store.start_run(tool="vlm-eval", command="tokensieve train vlm-eval --store screen.sqlite ...",
                                  config={}, model=VLM_MODEL, version="0.1.0", threads=1, cells=1, todo=1)  # fmt: skip
        if vlm:
            figure = _png(path.parent / "kept_patches.png", 0.5, (400, 200))
            for i, spec in enumerate(VLM_SPECS):
                _png(tile_path(figure, spec), i / len(VLM_SPECS))
            record_overlays(store, figure, specs=list(VLM_SPECS), model_key=VLM_MODEL, n_scenes=3, split="test",
                            command="tokensieve train vlm-eval --overlays kept_patches.png ...", threads=1)  # fmt: skip
        if daam:
            record_runs(store, daam_records(rng), command="tokensieve train daam-report --out runs/daam",
                        version="0.1.0")  # fmt: skip
            maps = [{"task": t, "run": f"{t}-cnnlstm-daam-s0-e12", "classes": list(c),
                     "bands": [[round(rng.random(), 4) for _ in range(40)] for _ in c]}
                    for t, c in (("a", ("unmarked", "marked")), ("b", ("w0", "w1", "w2", "w3")))]  # fmt: skip
            record_maps(store, maps, [_png(path.parent / "daam_task_a_bands.png", 0.3)], command="daam-figures",
                        version="0.1.0")  # fmt: skip
    if kv:
        _insert(path, "eval", kv_rows(rng, run))
        _insert(path, "bench", bench_rows(rng, bench_run))
    if vlm:
        evals, bench = vlm_rows(rng, vlm_run)
        _insert(path, "eval", evals)
        _insert(path, "bench", bench)
    return path
