"""``tokensieve report STORE``: one report of a results store, whichever tools filled it.

Sections, each present when the store has the rows it needs:

* provenance — model(s), package version(s), threads, number of rows, and the commands that filled the store;
* accuracy and speed side by side — for every configuration (canonical label and chunk size) measured by both
  ``tokensieve eval`` and ``tokensieve bench``;
* accuracy (``eval`` rows), per mode: the full-cache baseline per task and length, accuracy against the KV kept
  (the Pareto view), needle accuracy by depth (× length), accuracy against prompt length, and a table of accuracy,
  fidelity (KL, top-1 agreement), answer log-likelihood, KV bytes and times;
* speed and memory (``bench`` rows): medians and ratios against the full cache, with two plots;
* visual-token pruning (rows of ``tokensieve train vlm-eval --store`` and ``tokensieve bench --vlm --store``): a VLM's
  accuracy per question type against the visual tokens kept, a table per visual spec, the paired sign test of each
  method against random selection, the kept-patch figure (``vlm-eval --overlays`` with ``--store``, or
  ``--overlays PNG``) and the VLM prefill speed. These rows stay out of the KV sections above;
* DAAM speech runs (``tokensieve train daam --store``, :mod:`tokensieve.results.daam`): test F1 per front block and
  the recorded importance-map figures.

A configuration prefilled in chunks (rows with a ``chunk`` size) is shown as its own row, its label suffixed
`` chunk=N`` (:func:`~tokensieve.results.stats.chunk_labelled`), never merged with the same spec in one pass.

Writes ``report.md`` and/or ``report.html``, the PNG plots, and ``summary.json`` (accuracy aggregates per task, mode,
configuration and length; speed medians per configuration, length and batch size). ``report.html`` is the interactive
page (:mod:`tokensieve.results.page`: one self-contained offline file with Plotly inlined — method picker, hover,
error bars, Pareto fronts, accuracy next to speed, the paired comparison, VLM and DAAM views — followed by the whole
static report); it needs the ``tokensieve[report]`` extra, the Markdown report does not.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .results.daam import MAPS_TOOL, RUN_TOOL, daam_sections
from .results.render import Block, render_markdown
from .results.sections import (
    accuracy_sections,
    joined_sections,
    machine,
    provenance,
    speed_sections,
    vlm_json,
    vlm_sections,
    vlm_speed_table,
)
from .results.stats import accuracy_json, chunk_labelled, speed
from .results.store import ResultStore, is_dit, is_kernel, is_visual

OVERLAYS_TOOL = "vlm-overlays"  # the runs of `tokensieve train vlm-eval --overlays PNG --store`


def write_report(
    store_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    formats: Sequence[str] = ("md",),
    title: str = "tokensieve report",
    model: str | None = None,
    tasks: Sequence[str] = (),
    methods: Sequence[str] = (),
    overlays: str | Path | None = None,
) -> list[Path]:
    """Write the report of a results store; returns the files written.

    ``model``, ``tasks``, ``methods``: only the rows of that model key, of those tasks (evaluation rows) and of those
    methods (the store's ``method`` column, e.g. ``snapkv`` or ``+quest``; the full cache is always kept, as the
    reference). A name the store does not have is an error that lists the ones it has. ``overlays``: the kept-patch
    figure of the VLM section (default: the newest one a ``vlm-eval --overlays --store`` run recorded, if the file is
    still there)."""
    bad = [f for f in formats if f not in ("md", "html")]
    if bad or not formats:
        raise ConfigError(f"Unknown report format(s) {bad or '(none)'}: use md, html or md,html.")
    if "html" in formats:
        from .results.page import plotly_js

        plotly_js()  # without the report extra: fail before any work, naming it
    store_p = Path(store_path).expanduser()
    out = Path(out_dir).expanduser() if out_dir else store_p.with_name(store_p.stem + "-report")
    where, params = ("model = ?", (model,)) if model else ("", ())
    with ResultStore(store_p, readonly=True) as store:
        eval_rows = chunk_labelled(store.rows("eval", where, params))  # chunked prefills: rows of their own
        bench_rows = store.rows("bench", where, params)
        runs = store.runs()
    eval_rows, bench_rows = _only([eval_rows, bench_rows], "task", tasks, "tasks")
    eval_rows, bench_rows = _only([eval_rows, bench_rows], "method", methods, "methods", keep=("full",))
    if not eval_rows and not bench_rows and not any(r["tool"] in (RUN_TOOL, MAPS_TOOL) for r in runs):
        raise ConfigError(f"The store {store_p} has no results" + (f" for model {model!r}." if model else "."))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create the report folder {out}: {exc.strerror or exc}.") from None
    vlm_eval = [r for r in eval_rows if is_visual(r)]  # a VLM's visual-token rows: their own section
    dit_bench = [r for r in bench_rows if is_dit(r)]  # diffusion transformers (`tokensieve bench --video`): their own
    bench_rows = [r for r in bench_rows if not is_dit(r)]
    vlm_bench = [r for r in bench_rows if is_visual(r)]
    eval_rows = [r for r in eval_rows if not is_visual(r)]
    bench_rows = [r for r in bench_rows if not is_visual(r)]
    kernel_rows = [r for r in bench_rows if is_kernel(r)]  # synthetic kernel paths (bench --kernels): their own table
    bench_rows = [r for r in bench_rows if not is_kernel(r)]
    bench_runs = [r for r in runs if r["tool"] == "bench" and r["info"]]
    info: dict[str, Any] = bench_runs[-1]["info"] if bench_runs else {}
    summary = speed(bench_rows, info) if bench_rows else []

    blocks: list[Block] = [Block("h1", title), *provenance(eval_rows, runs, store_p.name)]
    blocks += joined_sections(eval_rows, summary)
    if eval_rows:
        blocks += accuracy_sections(eval_rows, out)
    if bench_rows:
        blocks += speed_sections(summary, info, out, heading="Speed and memory (tokensieve bench)")
    figure = Path(overlays).expanduser() if overlays else _recorded_overlays(runs)
    if overlays and not (figure and figure.is_file()):
        raise ConfigError(f"No kept-patch figure at {overlays}: give the PNG `tokensieve train vlm-eval --overlays` "
                          "wrote.")  # fmt: skip
    blocks += vlm_sections(vlm_eval, vlm_bench, out, figure)
    if dit_bench:
        from .bench.video import video_sections

        blocks += video_sections(dit_bench)
    if kernel_rows:
        from .results.kernels import kernel_blocks, kernel_summary

        blocks += kernel_blocks(kernel_summary(kernel_rows))
    blocks += daam_sections(runs, out)

    written: list[Path] = []
    if "md" in formats:
        p = out / "report.md"
        p.write_text(render_markdown(blocks, out), encoding="utf-8")
        written.append(p)
    if "html" in formats:
        from .results.page import render_page
        from .results.page_data import page_data

        vlm_speed = vlm_speed_table(vlm_bench, vlm_eval) if vlm_bench else None
        data = page_data(title=title, store=store_p.name, eval_rows=eval_rows, summary=summary, bench_rows=bench_rows,
                         vlm_eval=vlm_eval, vlm_bench_table=vlm_speed, runs=runs,
                         machine=machine(info) if bench_rows else "", overlays_tool=OVERLAYS_TOOL)  # fmt: skip
        p = out / "report.html"
        p.write_text(render_page(data, blocks, title), encoding="utf-8")
        written.append(p)
    written += sorted({b.path for b in blocks if b.path is not None})
    aggregates = {"accuracy": accuracy_json(eval_rows), "speed": [_plain(r) for r in summary]}
    if vlm_eval:
        aggregates["vlm"] = [_plain(r) for r in vlm_json(vlm_eval)]
    (out / "summary.json").write_text(json.dumps(aggregates, indent=1, sort_keys=True) + "\n")
    written.append(out / "summary.json")
    return written


def _recorded_overlays(runs: list[dict[str, Any]]) -> Path | None:
    """The newest kept-patch figure a run recorded in the store whose file still exists."""
    for r in reversed(runs):
        path = r["info"].get("overlays") if r["tool"] == OVERLAYS_TOOL else None
        if path and Path(path).is_file():
            return Path(path)
    return None


def _only(
    groups: list[list[dict[str, Any]]], column: str, wanted: Sequence[str], what: str, keep: Sequence[str] = ()
) -> list[list[dict[str, Any]]]:
    """Each group's rows whose ``column`` is one of ``wanted`` or ``keep`` (a group without that column is kept
    whole; nothing wanted: everything); a wanted name no row has is an error that lists the names there are."""
    if not wanted:
        return groups
    have = sorted({str(r[column]) for rows in groups for r in rows if column in r})
    unknown = [w for w in wanted if w not in have]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ConfigError(f"The store has no {what} {names}; it has: {', '.join(have) or '(none)'}.")
    allowed = {*wanted, *keep}
    return [rows if rows and column not in rows[0] else [r for r in rows if r[column] in allowed] for rows in groups]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def cmd_report(args: argparse.Namespace) -> int:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    for p in write_report(args.store, args.out, formats=formats, title=args.title, model=args.model, tasks=tasks,
                          methods=methods, overlays=args.overlays):  # fmt: skip
        print(p)
    return 0


def add_commands(sub: Any) -> None:
    sp = sub.add_parser(
        "report",
        help="turn a results store into a Markdown/HTML report with PNG plots (accuracy and speed side by side)",
    )
    sp.add_argument("store", help="SQLite results store written by `tokensieve eval`, `tokensieve bench` and/or "
                                  "`tokensieve train vlm-eval`")  # fmt: skip
    sp.add_argument("--out", default=None, help="output folder (default: <store name>-report next to the store)")
    sp.add_argument("--format", default="md",
                    help="md, html or md,html (html: one interactive, self-contained offline page; needs "
                         "`pip install 'tokensieve[report]'`)")  # fmt: skip
    sp.add_argument("--title", default="tokensieve report")
    sp.add_argument("--model", default=None, help="only rows of this model key (default: all)")
    sp.add_argument("--tasks", default=None, help="only these evaluation tasks, comma-separated (default: all)")
    sp.add_argument("--methods", default=None,
                    help="only these methods, comma-separated, as in the store's method column (snapkv, +quest); the "
                         "full cache is always kept (default: all)")  # fmt: skip
    sp.add_argument("--overlays", default=None, metavar="PNG",
                    help="the kept-patch figure of the VLM section (default: the newest one `tokensieve train vlm-eval "
                         "--overlays PNG --store STORE` recorded)")  # fmt: skip
    sp.set_defaults(func=cmd_report)
