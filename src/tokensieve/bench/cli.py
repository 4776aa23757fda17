"""`tokensieve bench`: prefill, TTFT, decode speed, attention cost, KV bytes and peak memory against the full cache."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import DEFAULT_METHODS


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"Expected comma-separated integers, got {text!r}.") from None


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (recorded in the store, shown in the report)."""
    from ..adapters.models import DEFAULT_MODEL
    from ..results.threads import resolve_threads

    parts = ["tokensieve", "bench", "--methods", args.methods]
    if args.budgets:
        parts += ["--budgets", args.budgets]
    reps = args.reps if args.reps is not None else 3
    parts += ["--lengths", args.lengths or "2048"]
    parts += ["--batch-sizes", args.batch_sizes or "1", "--decode-tokens", str(args.decode_tokens), "--reps", str(reps)]
    parts += ["--threads", str(resolve_threads(args.threads))]
    if getattr(args, "chunk", None) is not None:
        parts += ["--chunk", str(args.chunk)]
    for flag in ("model", "store", "report"):
        value = getattr(args, flag)
        if value is not None and not (flag == "model" and value == DEFAULT_MODEL):
            parts += [f"--{flag}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _report_dir(report: str | None) -> Path | None:
    """The folder of ``--report``, created now (before the benchmark) so that a bad path fails before any work."""
    if not report:
        return None
    out = Path(report).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--report {report} is a file: it names the folder for bench.md and the plots. Give a folder, e.g. "
            "--report docs/bench."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"Cannot create the report folder {out}: {exc.strerror or exc}. Choose another --report."
        ) from None
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "kernels", False):  # attention kernels at real geometry (tokensieve.bench.kernels)
        for other in ("vlm", "video"):
            if getattr(args, other, None):
                raise ConfigError(f"--kernels and --{other} are two different benchmarks: give one.")
        from .kernels import cmd_bench_kernels

        return cmd_bench_kernels(args)
    for flag in ("dtypes", "json", "prefill_lengths", "paths"):
        if getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} belongs to --kernels (tokensieve bench --kernels).")
    args.lengths = args.lengths or "2048"
    args.batch_sizes = args.batch_sizes or "1"
    args.reps = args.reps if args.reps is not None else 3
    if getattr(args, "video", None):  # video diffusion transformers (tokensieve.bench.video)
        from .video import cmd_bench_video

        return cmd_bench_video(args)
    for flag in ("video_model", "latent", "video_layers", "frames", "guidance"):
        if getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} belongs to --video (tokensieve bench --video).")
    if getattr(args, "vlm", None):  # VLM prefill with visual-token pruning (tokensieve.bench.vlm)
        from .vlm import cmd_bench_vlm

        return cmd_bench_vlm(args)
    from dataclasses import asdict

    from tqdm import tqdm

    from ..adapters.models import load_model
    from ..core.budget import Budget
    from ..results.render import Block, render_markdown, text_table
    from ..results.sections import SPEED_COLUMNS, speed_cells, speed_sections
    from ..results.stats import speed
    from ..results.store import ResultStore
    from ..results.threads import resolve_threads
    from .config import BenchConfig, bench_specs
    from .runner import run_bench

    report_dir = _report_dir(args.report)  # a report that cannot be written fails now, not after the benchmark
    budgets = [Budget.parse(b.strip()) for b in (args.budgets or "").split(",") if b.strip()]
    cfg = BenchConfig(
        specs=bench_specs(args.methods, budgets),  # bad specs fail before loading anything
        lengths=_ints(args.lengths),
        batch_sizes=_ints(args.batch_sizes),
        decode_tokens=args.decode_tokens,
        repetitions=args.reps,
        threads=resolve_threads(args.threads),
        model=args.model,
        chunk=args.chunk,
    )
    store = ResultStore(args.store) if args.store else None
    model, tok = load_model(args.model)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if limit and max(cfg.lengths) + cfg.decode_tokens > limit:
        raise ConfigError(f"A context of {max(cfg.lengths)} + {cfg.decode_tokens} tokens exceeds the model's {limit}.")
    total = len(cfg.lengths) * len(cfg.batch_sizes) * cfg.repetitions * len(cfg.specs)
    bar = tqdm(total=total, desc="bench", unit="cell", file=sys.stderr)

    def progress(done: int, _total: int, label: str) -> None:
        bar.n = done
        bar.set_postfix_str(label)
        bar.refresh()

    command = _command(args)
    rows, info = run_bench(cfg, store=store, progress=progress, model_and_tokenizer=(model, tok), command=command)
    bar.close()
    if store is not None:
        all_rows: list[dict[str, Any]] = store.rows("bench", "model = ?", (info["model"],))
        runs = [r for r in store.runs("bench") if r["info"] and r["model"] == info["model"]]
        info = runs[-1]["info"] if runs else info
        store.close()
    else:
        all_rows = [asdict(r) for r in rows]
    labels = {s.label for s in cfg.specs}
    wanted = [  # this run's configurations: labels, lengths, batch sizes and chunk size (None: one pass)
        r for r in all_rows
        if r["label"] in labels and r["length"] in cfg.lengths and r["batch"] in cfg.batch_sizes
        and r.get("chunk", cfg.chunk) == cfg.chunk
    ]  # fmt: skip
    summary = speed(wanted, info)
    print(text_table([h for h, _, _ in SPEED_COLUMNS], [speed_cells(r) for r in summary]))
    if report_dir is not None:
        out = report_dir
        blocks = [Block("h1", "Benchmark"), Block("p", "Produced by:"), Block("code", command)]
        blocks += speed_sections(summary, info, out)
        path = out / "bench.md"
        path.write_text(render_markdown(blocks, out), encoding="utf-8")
        print(f"report: {path}", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    from ..adapters.models import DEFAULT_MODEL
    from ..results.threads import add_threads_argument

    sp = sub.add_parser(
        "bench",
        help="speed and memory against the full cache: prefill, TTFT, decode tok/s, attention, KV bytes, peak RSS",
        description=(
            "Each configuration is a spec, prefill[:budget][+decode[:budget]], e.g. snapkv:0.125, +quest:0.125 "
            "(full prefill, Quest while decoding), snapkv:0.5+quest[page=32]:0.125 (docs/CONCEPTS.md). The full "
            "cache is always measured. With --store, rows go to the same results store as `tokensieve eval` and "
            "`tokensieve report` shows accuracy and speed side by side for the configurations measured by both."
        ),
    )
    sp.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated specs (default: {DEFAULT_METHODS})")
    sp.add_argument("--budgets", default=None, help="budgets for the specs that give none (comma-separated)")
    sp.add_argument("--lengths", default=None,
                    help="context lengths in tokens, comma-separated (default 2048; --kernels: 8192,32768, 8k/32k "
                         "accepted)")  # fmt: skip
    sp.add_argument("--batch-sizes", default=None, help="batch sizes, comma-separated (default 1; --kernels: 1,4)")
    sp.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per measurement")
    sp.add_argument("--reps", type=int, default=None,
                    help="interleaved repetitions, medians reported (default 3; --kernels: 10)")  # fmt: skip
    add_threads_argument(sp)
    sp.add_argument("--model", default=DEFAULT_MODEL)
    sp.add_argument("--store", default=None, help="SQLite results store (shared with `tokensieve eval`); resumable")
    sp.add_argument("--report", default=None, help="folder for bench.md and PNG plots")
    sp.add_argument(
        "--chunk",
        type=int,
        default=None,
        metavar="N",
        help="chunked prefill: every configuration (the full cache too) prefills in chunks of N tokens, its cache "
        "re-compressed after each (docs/PREFILL.md); refused for methods that cannot score a chunk. With --store "
        "the rows record the chunk size and are reported apart from one-pass rows (label + ' chunk=N')",
    )
    sp.add_argument(
        "--vlm",
        nargs="?",
        const="vit-l-336",
        default=None,
        metavar="TOWER",
        help=(
            "VLM prefill instead: a LLaVA model with a random vision tower of this shape (vit-l-336, the default: "
            "speed-only, random vision weights; vit-b-336; embedded) on the embedded SmolLM2-135M; --methods are "
            "visual specs (default fastv,pool,vis:random), --budgets default 0.11,0.22,0.33; --report writes "
            "vlm_bench.json and vlm_bench.md; --store writes one bench row per configuration and repetition, "
            "labelled as `tokensieve train vlm-eval --store` labels them"
        ),
    )
    sp.add_argument(
        "--video",
        nargs="?",
        const="embedded",
        default=None,
        choices=("embedded", "wan2.1-1.3b"),
        help=(
            "video diffusion transformers instead (docs/DIT.md): DiT methods against the dense model on the embedded "
            "video DiT (default; PSNR, SSIM and the quality gate against the dense clip of the same seed) or at "
            "Wan2.1-1.3B geometry with random weights (speed only); --methods are DiT specs (default "
            "svg,svg2,radial,vmoba,psa,adaspa,ras), --budgets the densities of those that take one (default 0.25,0.5)"
        ),
    )
    sp.add_argument("--steps", type=int, default=20, help="--video: denoising steps per generation (default 20)")
    sp.add_argument("--clips", type=int, default=4, help="--video embedded: test prompts and seeds (default 4)")
    sp.add_argument(
        "--frames",
        type=int,
        default=None,
        help="--video embedded: frames per clip (default: the model's 8, 2,048 tokens; each frame adds 256 tokens)",
    )
    sp.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="--video embedded: classifier-free guidance scale of the sampler (default 1: none; doubles the calls)",
    )
    sp.add_argument(
        "--video-model",
        default=None,
        help="--video embedded: a folder written by `train video-dit`; --video wan2.1-1.3b: a diffusers Wan "
        "transformer folder (its own weights instead of random ones)",
    )
    sp.add_argument("--latent", default=None, help="--video wan2.1-1.3b: latent F,H,W (default 8,32,32: 2,048 tokens)")
    sp.add_argument("--video-layers", type=int, default=None, help="--video wan2.1-1.3b: fewer than its 30 layers")
    kg = sp.add_argument_group(
        "attention kernels (--kernels)",
        "Synthetic tensors at Llama-3.1-8B's attention geometry (32 query / 8 KV heads, head dim 128), one layer: "
        "dense decode attention, SnapKV's compacted cache, the ragged head-adaptive store, Quest per query head and "
        "per KV head (budget 1/8; PyTorch and fused C++ kernels), a streaming read of the same bytes (the bandwidth "
        "bound), and sparse prefill (block-sparse FlexAttention, 1/8 of the blocks) against dense causal attention. "
        "Uses --lengths, --batch-sizes, --reps, --threads (default 1), --store (rows in table bench, model "
        "synthetic:llama-3.1-8b-attention) and --report (a dated page kernels-DATE.md). docs/KERNELS.md.",
    )
    kg.add_argument("--kernels", action="store_true", help="measure attention kernels instead of a model")
    kg.add_argument("--dtypes", default=None, help="float32,bfloat16 (default: both)")
    kg.add_argument("--json", default=None, metavar="FILE", help="write the medians, one row per path and shape")
    kg.add_argument("--prefill-lengths", default=None,
                    help="prefill lengths, batch 1 (default 32768; 'none' to skip prefill)")  # fmt: skip
    kg.add_argument("--prefill-reps", type=int, default=3, help="prefill repetitions (default 3)")
    kg.add_argument("--paths", default=None,
                    help="only these paths: dense,snapkv,ragged,quest-head,quest-kv,stream,prefill-dense,"
                         "prefill-sparse")  # fmt: skip
    kg.add_argument("--compiled", action="store_true",
                    help="also Quest per KV head compiled by Inductor and as FlexAttention block-sparse decode "
                         "(compiles per shape: minutes)")  # fmt: skip
    sp.set_defaults(func=cmd_bench)
