"""``tokensieve eval``: run a grid into a results store (``tokensieve report`` turns the store into a report)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

GRID_FLAGS = (
    "tasks", "methods", "budgets", "lengths", "depths", "seeds", "modes", "haystack", "text", "chunk", "store",
)  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data.tasks import TASKS
    from .config import EvalConfig
    from .runner import run_eval

    if args.list_tasks:
        for name, task in TASKS.items():
            extra = []
            if not task.uses_depth:
                extra.append("no depth")
            if task.needs_text:
                extra.append("real text")
            if task.modes != ("agnostic", "aware"):
                extra.append("/".join(task.modes) + " only")
            if task.metric != "accuracy":
                extra.append(task.metric)
            print(f"{name:16s} {task.description}" + (f"  [{', '.join(extra)}]" if extra else ""))
        return 0
    overrides: dict[str, Any] = {k: getattr(args, k) for k in GRID_FLAGS if getattr(args, k) is not None}
    if args.model is not None:
        overrides["model"] = args.model
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.no_fidelity:
        overrides["fidelity"] = False
    if args.no_shared_prefill:
        overrides["shared_prefill"] = False
    cfg = EvalConfig.from_file(args.config, overrides) if args.config else EvalConfig.from_mapping(overrides)
    command = _command(args)
    quiet = args.quiet or args.no_progress
    ray = None
    if args.ray is not None:
        from .ray_backend import RayOptions

        ray = RayOptions(address=args.ray or None, workers=args.ray_workers)
    summary = run_eval(cfg, progress=not quiet, command=command, dry_run=args.dry_run, ray=ray)
    if args.dry_run:
        return 0
    others = summary.stored - summary.already - summary.ran
    print(
        f"{summary.ran} cells measured in {summary.seconds:.0f} s"
        + (f" ({others} by another run on this store at the same time)" if others > 0 else "")
        + f"; {summary.stored}/{summary.total} cells of the grid are in {summary.store}. "
        f"Report: tokensieve report {summary.store}",
        file=sys.stderr,
    )
    if not quiet:
        print(results_table(summary))
    return 0


def results_table(summary: Any) -> str:
    """The grid's results as a terminal table (every cell of the grid in the store, this run's and earlier)."""
    from ..results.render import text_table
    from ..results.sections import summary_table
    from ..results.stats import chunk_labelled
    from ..results.store import ResultStore

    wanted = set(summary.keys)
    with ResultStore(summary.store, readonly=True) as store:
        rows = chunk_labelled(r for r in store.rows("eval") if r["key"] in wanted)
    if not rows:
        return "(no results yet)"
    table = summary_table(rows)
    return text_table(table.header, table.body)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (recorded in the store, shown in reports)."""
    parts = ["tokensieve", "eval"] + ([args.config] if args.config else [])
    for flag in ("store", "threads", "model", *GRID_FLAGS):
        value = getattr(args, flag)
        if value is not None and f"--{flag}" not in parts:
            parts += [f"--{flag}", str(value)]
    if args.no_fidelity:
        parts.append("--no-fidelity")
    if args.no_shared_prefill:
        parts.append("--no-shared-prefill")
    return " ".join(shlex.quote(p) for p in parts)


def add_commands(sub: Any) -> None:
    """Add ``eval`` to the CLI's sub-commands."""
    from ..results.threads import add_threads_argument, whole_number

    sp = sub.add_parser(
        "eval",
        help="measure methods x budgets x lengths x depths x tasks x seeds x modes into a SQLite store (resumable)",
        description=(
            "Measure what each method keeps (accuracy, KL and top-1 agreement with the full cache, answer "
            "log-likelihood) and what it costs (KV bytes, prefill/compress/decode seconds) over a grid. The grid comes "
            "from a TOML/JSON file and/or the flags below (flags win). The full-cache baseline is always measured. "
            "Rerunning the same command resumes: finished cells are skipped."
        ),
    )
    sp.add_argument("config", nargs="?", help="grid file (.toml or .json); see docs/EVALUATION.md")
    sp.add_argument("--tasks", help="comma-separated tasks (see --list-tasks)")
    sp.add_argument(
        "--methods",
        help="comma-separated specs, e.g. snapkv,snapkv[window=64],+quest[page=32]:0.125 (see docs/CONCEPTS.md); "
        "a spec without a budget is measured at each of --budgets; all = every registered method",
    )
    sp.add_argument(
        "--budgets", help="comma-separated budgets for the specs that give none: ratios (0.1, 25%%) or tokens (256)"
    )
    sp.add_argument("--lengths", help="comma-separated prompt lengths in model tokens (512,1k,2k)")
    sp.add_argument("--depths", help="comma-separated needle depths in [0, 1]")
    sp.add_argument("--seeds", help="comma-separated seeds or a range (0-4)")
    sp.add_argument(
        "--modes", help="agnostic (compress the context before the question), aware, or both (= agnostic,aware)"
    )
    sp.add_argument("--haystack", help="filler between needles: repeat (fixed sentences) or text (real text)")
    sp.add_argument("--text", help="real text: kjv, python-doc, stdlib, generated, or a path to a UTF-8 text file")
    sp.add_argument("--chunk", metavar="N",
                    help="chunked prefill: every configuration but the full-cache reference prefills in chunks of N "
                    "tokens, its cache re-compressed after each (docs/PREFILL.md); a method that cannot score a "
                    "chunk is refused. Stored and reported as its own configuration (label + ' chunk=N')")  # fmt: skip
    sp.add_argument("--store", help="SQLite results store (default runs/eval.sqlite)")
    sp.add_argument("--model", default=None, help="embedded model name, local HF directory or hub id")
    add_threads_argument(sp)
    sp.add_argument("--no-fidelity", action="store_true", help="skip KL / top-1 agreement (faster)")
    sp.add_argument("--no-shared-prefill", action="store_true",
                    help="prefill every cell itself instead of replaying each prompt's recorded prefill (same results, "
                         "slower; see docs/EVALUATION.md)")  # fmt: skip
    sp.add_argument("--no-progress", action="store_true", help="no progress bar (and no results table)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar, no results table at the end")
    sp.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="measure the cells on Ray actors (one model each); this process writes the store. ADDRESS: "
                    "a Ray cluster (auto, host:6379, ray://host:10001); none: this machine's cluster or a new local "
                    "one (docs/SCALING.md)")  # fmt: skip
    sp.add_argument("--ray-workers", type=whole_number(1), default=None, metavar="N",
                    help="Ray actors to start (default: the cluster's CPUs / --threads)")  # fmt: skip
    sp.add_argument("--dry-run", action="store_true", help="validate everything, print the plan, measure nothing")
    sp.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    sp.set_defaults(func=cmd_eval)
