"""``tokensieve report``: turn a results store into a Markdown and/or self-contained HTML report with PNG plots.

Contents:

* provenance — model(s), package version(s), threads, number of rows, and the commands that filled the store;
* the full-cache baseline per task and length;
* accuracy against the KV kept (stored entries relative to the full cache, the Pareto view), one panel per task;
* the needle heatmap (depth × length) per method and budget, averaged over the tasks that place a needle;
* accuracy against prompt length per task;
* a table of accuracy, fidelity (KL, top-1 agreement), answer log-likelihood, KV bytes and time per task, method and
  budget, with the full cache alongside.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .store import ResultStore

Row = dict[str, Any]
GroupKey = tuple[Any, ...]


# ----------------------------------------------------------------------------------------------------- statistics
def _vals(rows: Iterable[Row], col: str) -> list[float]:
    return [float(r[col]) for r in rows if r.get(col) is not None and not math.isnan(float(r[col]))]


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def median(xs: Sequence[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def sem(xs: Sequence[float]) -> float:
    """Standard error of the mean (NaN below two values)."""
    if len(xs) < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def kept(r: Row) -> float:
    """Stored KV entries relative to the full cache of the same prompt."""
    full = r.get("full_entries") or 0
    return float(r["stored_entries"]) / float(full) if full else math.nan


def group(rows: Iterable[Row], key: Callable[[Row], GroupKey]) -> dict[GroupKey, list[Row]]:
    out: dict[GroupKey, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)


def budget_order(label: str) -> tuple[int, float]:
    """Sort budgets: ratios ascending, then token counts ascending; the full cache last."""
    if label == "100%":
        return (2, 0.0)
    if label.endswith("%"):
        return (0, float(label[:-1]))
    m = re.match(r"([\d.]+)", label)
    return (1 if "tok" in label else 0, float(m.group(1)) if m else 0.0)


@dataclass(frozen=True)
class Summary:
    """Aggregates of one (task, mode, method, budget[, length]) group."""

    n: int
    score: float
    score_sem: float
    kl: float
    top1: float
    answer_logprob: float
    kv_mb: float
    kept: float
    prefill_s: float
    compress_s: float
    decode_s: float


def summarize(rows: list[Row]) -> Summary:
    return Summary(
        n=len(rows),
        score=mean(_vals(rows, "score")),
        score_sem=sem(_vals(rows, "score")),
        kl=mean(_vals(rows, "kl")),
        top1=mean(_vals(rows, "top1")),
        answer_logprob=mean(_vals(rows, "answer_logprob")),
        kv_mb=mean(_vals(rows, "kv_bytes")) / 2**20,
        kept=mean([k for k in (kept(r) for r in rows) if not math.isnan(k)]),
        prefill_s=median(_vals(rows, "prefill_s")),
        compress_s=median(_vals(rows, "compress_s")),
        decode_s=median(_vals(rows, "decode_s")),
    )


# ------------------------------------------------------------------------------------------------------ documents
@dataclass
class Block:
    kind: str  # "h1", "h2", "p", "table", "image", "code"
    text: str = ""
    header: Sequence[str] = ()
    body: Sequence[Sequence[str]] = ()
    path: Path | None = None


def _fmt(x: float, digits: int = 2, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.0%}" if pct else f"{x:.{digits}f}"


def _score_fmt(metric: str, x: float, err: float = math.nan) -> str:
    if math.isnan(x):
        return "—"
    if metric == "perplexity":
        return f"{x:.2f}"
    return f"{x:.2f}" + (f" ± {err:.2f}" if not math.isnan(err) else "")


def render_markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "code":
            lines += ["```bash", b.text, "```", ""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(b.header) + " |")
            lines.append("|" + "|".join("---" for _ in b.header) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b.body]
            lines.append("")
        elif b.kind == "image" and b.path is not None:
            lines += [f"![{b.text}]({b.path.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


def render_html(blocks: list[Block], title: str) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:0.8em;overflow-x:auto}</style></head><body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            text = html.escape(b.text)
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
            text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
            parts.append(f"<p>{text}</p>")
        elif b.kind == "code":
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.body)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b.kind == "image" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f"<p><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """Points not dominated by another with less (or equal) KV kept and a better (or equal) score, by x."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return front


def plot_pareto(rows: list[Row], mode: str, path: Path) -> bool:
    """Score against KV kept, one panel per task, one line per method over its budgets."""
    tasks = sorted({r["task"] for r in rows})
    if not any(r["method_label"] != "full" for r in rows):
        return False
    plt = _pyplot()
    nr, nc = _grid(len(tasks))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.4 * nr), squeeze=False)
    methods = sorted({r["method_label"] for r in rows if r["method_label"] != "full"})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    markers = "osD^vP*Xh<>p"
    for ax, task in zip(axes.flat, tasks):
        trows = [r for r in rows if r["task"] == task]
        metric = trows[0]["metric"]
        pts: list[tuple[float, float]] = []
        for m in methods:
            by_budget = group((r for r in trows if r["method_label"] == m), lambda r: (r["budget"],))
            xy = sorted((summarize(v).kept, summarize(v).score) for v in by_budget.values())
            xy = [p for p in xy if not math.isnan(p[0]) and not math.isnan(p[1])]
            if xy:
                mk = markers[methods.index(m) % len(markers)]
                ax.plot([p[0] for p in xy], [p[1] for p in xy], f"{mk}-", color=colors[m], label=m, ms=4, lw=1.2)
                pts += xy
        full = summarize([r for r in trows if r["method_label"] == "full"])
        if not math.isnan(full.score):
            ax.plot([1.0], [full.score], "k*", ms=11, label="full cache")
            pts.append((1.0, full.score))
        front = pareto_front(pts, metric != "perplexity")
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6", ls="--", lw=1,
                    label="Pareto front")  # fmt: skip
        ax.set_title(task)
        ax.set_xlabel("KV kept (entries / full cache)")
        ax.set_ylabel("perplexity (lower is better)" if metric == "perplexity" else "accuracy")
        ax.set_xlim(0, 1.05)
        if metric != "perplexity":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    fig.suptitle(f"Accuracy vs KV kept ({mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_heatmaps(rows: list[Row], mode: str, label: str, path: Path) -> bool:
    """Depth × length score, one panel per task that places a needle (plus their mean)."""
    rows = [r for r in rows if r.get("depth") is not None and r["metric"] == "accuracy"]
    if not rows:
        return False
    tasks = sorted({r["task"] for r in rows})
    panels = ([("mean of needle tasks", rows)] if len(tasks) > 1 else []) + [
        (t, [r for r in rows if r["task"] == t]) for t in tasks
    ]
    plt = _pyplot()
    nr, nc = _grid(len(panels))
    fig, axes = plt.subplots(nr, nc, figsize=(3.4 * nc + 1.0, 3.0 * nr + 0.6), squeeze=False, layout="constrained")
    im = None
    for i_ax, (ax, (name, prow)) in enumerate(zip(axes.flat, panels)):
        depths = sorted({float(r["depth"]) for r in prow})
        lengths = sorted({int(r["length"]) for r in prow})
        cells = group(prow, lambda r: (float(r["depth"]), int(r["length"])))
        grid = [[mean(_vals(cells.get((d, L), []), "score")) for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(name, fontsize=10)
        if i_ax // nc == nr - 1 or i_ax + nc >= len(panels):
            ax.set_xlabel("prompt length (tokens)")
        if i_ax % nc == 0:
            ax.set_ylabel("needle depth")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label="accuracy")
    fig.suptitle(f"Needle accuracy, {label} ({mode})")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_depth_matrix(rows: list[Row], series: list[tuple[str, str]], mode: str, path: Path) -> bool:
    """One length only: a (method @ budget) × needle-depth heatmap of the needle tasks' mean accuracy."""
    rows = [r for r in rows if r.get("depth") is not None and r["metric"] == "accuracy"]
    if not rows or not series:
        return False
    depths = sorted({float(r["depth"]) for r in rows})
    cells = group(rows, lambda r: (r["method_label"], r["budget"], float(r["depth"])))
    grid = [[mean(_vals(cells.get((m, b, d), []), "score")) for d in depths] for m, b in series]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(depths), 1.0 + 0.24 * len(series)), layout="constrained")
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(series)), [f"{m} @ {b}" for m, b in series], fontsize=7)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("needle depth")
    length = sorted({int(r["length"]) for r in rows})[0]
    tasks = ", ".join(sorted({r["task"] for r in rows}))
    ax.set_title(f"Needle accuracy at {length} tokens ({mode}; mean of {tasks})", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.6, label="accuracy")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_lengths(rows: list[Row], mode: str, path: Path) -> bool:
    """Score against prompt length, one panel per task, one line per method@budget."""
    tasks = sorted({r["task"] for r in rows})
    if len({r["length"] for r in rows}) < 2:
        return False
    plt = _pyplot()
    nr, nc = _grid(len(tasks))
    fig, axes = plt.subplots(nr, nc, figsize=(4.0 * nc, 3.2 * nr), squeeze=False)
    series = sorted({(r["method_label"], r["budget"]) for r in rows}, key=lambda s: (s[0] != "full", s[0],
                                                                                    budget_order(s[1])))  # fmt: skip
    colors = {s: plt.get_cmap("tab20")(i % 20) for i, s in enumerate(series)}
    for ax, task in zip(axes.flat, tasks):
        trows = [r for r in rows if r["task"] == task]
        for s in series:
            srows = [r for r in trows if (r["method_label"], r["budget"]) == s]
            by_len = group(srows, lambda r: (int(r["length"]),))
            xs = sorted(k[0] for k in by_len)
            if not xs:
                continue
            ys = [mean(_vals(by_len[(x,)], "score")) for x in xs]
            full = s[0] == "full"
            ax.plot(xs, ys, "*-" if full else "o-", label=f"{s[0]} @ {s[1]}", color="k" if full else colors[s],
                    ms=6 if full else 4)  # fmt: skip
        lengths = sorted({int(r["length"]) for r in trows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_title(task)
        ax.set_xlabel("prompt length (tokens)")
        metric = trows[0]["metric"]
        ax.set_ylabel("perplexity" if metric == "perplexity" else "accuracy")
        if metric != "perplexity":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    fig.suptitle(f"Accuracy vs prompt length ({mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------ tables
def baseline_table(rows: list[Row]) -> Block:
    """Full-cache score per task (rows) and length (columns): mean ± standard error (n)."""
    full = [r for r in rows if r["method_label"] == "full"]
    lengths = sorted({int(r["length"]) for r in full})
    header = ["task", "metric", *[f"{L} tok" for L in lengths], "samples"]
    body = []
    for task in sorted({r["task"] for r in full}):
        trows = [r for r in full if r["task"] == task]
        metric = trows[0]["metric"]
        cells = []
        for L in lengths:
            s = _vals([r for r in trows if int(r["length"]) == L], "score")
            cells.append(_score_fmt(metric, mean(s), sem(s)) if s else "—")
        n = group(trows, lambda r: (int(r["length"]),))
        body.append([task, metric, *cells, "/".join(str(len(n.get((L,), []))) for L in lengths)])
    return Block("table", header=header, body=body)


def summary_table(rows: list[Row]) -> Block:
    header = ["task", "method", "budget", "n", "score", "KL (nats)", "top-1", "answer log-lik", "KV MB", "KV kept",
              "prefill s", "compress s", "decode s"]  # fmt: skip
    body = []
    groups = group(rows, lambda r: (r["task"], r["method_label"], r["budget"]))
    for (task, m, b), grows in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "full", kv[0][1], budget_order(kv[0][2]))
    ):
        s = summarize(grows)
        body.append([task, m, b, str(s.n), _score_fmt(grows[0]["metric"], s.score, s.score_sem), _fmt(s.kl, 3),
                     _fmt(s.top1), _fmt(s.answer_logprob), _fmt(s.kv_mb, 1), _fmt(s.kept, pct=True),
                     _fmt(s.prefill_s), _fmt(s.compress_s, 3), _fmt(s.decode_s)])  # fmt: skip
    return Block("table", header=header, body=body)


# ------------------------------------------------------------------------------------------------------ report
def load_rows(store: ResultStore, model: str | None = None, *, required: bool = True) -> list[Row]:
    rows = store.rows("model = ?", (model,)) if model else store.rows()
    if not rows and required:
        raise ConfigError(f"The store {store.path} has no results" + (f" for model {model!r}." if model else "."))
    return rows


def build_report(rows: list[Row], runs: list[Row], out: Path, title: str, store_name: str) -> list[Block]:
    out.mkdir(parents=True, exist_ok=True)
    blocks: list[Block] = [Block("h1", title)]
    models = sorted({r["model"] for r in rows})
    versions = sorted({r["version"] for r in rows})
    threads = sorted({int(r["threads"]) for r in rows if r.get("threads")})
    first = min(r["created"] for r in rows)
    day = time.strftime("%Y-%m-%d", time.gmtime(first))
    compute = sum(_vals(rows, "cell_s"))
    blocks.append(
        Block(
            "p",
            f"{len(rows)} measurements from `{store_name}`; model {', '.join(models)}; tokensieve "
            f"{', '.join(versions)}; {', '.join(map(str, threads)) or '?'} CPU thread(s); measured from {day}, "
            f"{compute / 60:.0f} min of measuring in total. Accuracy is the share of expected answers found "
            "(perplexity for the ppl task); KL and top-1 compare each cell's next-token distributions with the full "
            "cache's over a teacher-forced continuation (the full cache's own answer); KV kept = stored entries / "
            "full-cache entries of the same prompt; times are medians and come from a shared machine.",
        )
    )
    commands = list(dict.fromkeys(r["command"] for r in runs if r.get("command")))
    if commands:
        blocks += [Block("p", "Produced by:"), Block("code", "\n".join(commands))]
    modes = sorted({r["mode"] for r in rows})
    for mode in modes:
        mrows = [r for r in rows if r["mode"] == mode]
        suffix = f" — {mode}" if len(modes) > 1 else f" ({mode})"
        blocks += [Block("h2", "Full-cache baseline" + suffix), baseline_table(mrows)]
        path = out / f"pareto_{mode}.png"
        if plot_pareto(mrows, mode, path):
            blocks += [Block("h2", "Accuracy vs KV budget" + suffix), Block("image", "accuracy vs KV kept", path=path)]
        needle_rows = [r for r in mrows if r.get("depth") is not None]
        if needle_rows:
            series = sorted({(r["method_label"], r["budget"]) for r in needle_rows},
                            key=lambda s: (s[0] != "full", s[0], budget_order(s[1])))  # fmt: skip
            if len({r["length"] for r in needle_rows}) == 1:  # one length: one matrix instead of a column per series
                p = out / f"needles_{mode}.png"
                if plot_depth_matrix(needle_rows, series, mode, p):
                    blocks.append(Block("h2", "Needle accuracy by depth" + suffix))
                    blocks.append(Block("image", "needle depths", path=p))
                series = []
            else:
                blocks.append(Block("h2", "Needle heatmaps, depth × length" + suffix))
            for m, b in series:
                label = f"{m} @ {b}"
                srows = [r for r in needle_rows if (r["method_label"], r["budget"]) == (m, b)]
                p = out / f"heatmap_{mode}_{_slug(m)}_{_slug(b)}.png"
                if plot_heatmaps(srows, mode, label, p):
                    blocks.append(Block("image", f"needle heatmap {label}", path=p))
        path = out / f"lengths_{mode}.png"
        if plot_lengths(mrows, mode, path):
            blocks += [
                Block("h2", "Accuracy vs prompt length" + suffix),
                Block("image", "accuracy vs length", path=path),
            ]
        blocks += [
            Block("h2", "Accuracy, fidelity and cost" + suffix),
            Block("p", "Means over lengths, depths and seeds (score ± standard error); times are medians."),
            summary_table(mrows),
        ]
    return blocks


def bench_blocks(rows: list[Row], info: dict[str, Any], out: Path) -> list[Block]:
    """The speed and memory section, from the `tokensieve bench` rows of the store."""
    from ..bench.report import COLUMNS, describe, plots, row_cells
    from ..bench.runner import summarize

    summary = summarize(rows, info)
    blocks = [
        Block("h2", "Speed and memory (tokensieve bench)"),
        Block("p", describe(info)),
        Block("table", header=[h for h, _, _ in COLUMNS], body=[row_cells(r) for r in summary]),
    ]
    blocks += [Block("image", p.stem, path=p) for p in plots(summary, out)]
    return blocks


def write_report(
    store_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    formats: Sequence[str] = ("md",),
    title: str = "tokensieve evaluation report",
    model: str | None = None,
) -> list[Path]:
    """Write ``report.md`` and/or ``report.html`` (with PNG plots) for a results store; returns the files written."""
    bad = [f for f in formats if f not in ("md", "html")]
    if bad or not formats:
        raise ConfigError(f"Unknown report format(s) {bad or '(none)'}: use md, html or md,html.")
    store_p = Path(store_path).expanduser()
    out = Path(out_dir).expanduser() if out_dir else store_p.with_name(store_p.stem + "-report")
    from ..bench.store import read_bench_rows

    with ResultStore(store_p, readonly=True) as store:
        bench_rows, bench_info = read_bench_rows(store)
        if model:
            bench_rows = [r for r in bench_rows if r["model"] == model]
        rows = load_rows(store, model, required=not bench_rows)  # a benchmark-only store has no results rows
        runs = store.runs()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create the report folder {out}: {exc.strerror or exc}.") from None
    blocks = build_report(rows, runs, out, title, store_p.name) if rows else [Block("h1", title)]
    if bench_rows:
        blocks += bench_blocks(bench_rows, bench_info, out)
    written: list[Path] = []
    if "md" in formats:
        p = out / "report.md"
        p.write_text(render_markdown(blocks, out), encoding="utf-8")
        written.append(p)
    if "html" in formats:
        p = out / "report.html"
        p.write_text(render_html(blocks, title), encoding="utf-8")
        written.append(p)
    written += sorted({b.path for b in blocks if b.path is not None})
    (out / "summary.json").write_text(json.dumps(_summary_json(rows) if rows else [], indent=1, sort_keys=True) + "\n")
    written.append(out / "summary.json")
    return written


def _summary_json(rows: list[Row]) -> list[dict[str, Any]]:
    """Machine-readable aggregates per (task, mode, method, budget, length)."""
    out = []
    keyf: Callable[[Row], GroupKey] = lambda r: (r["task"], r["mode"], r["method_label"], r["budget"],  # noqa: E731
                                                  int(r["length"]))  # fmt: skip
    for key, grows in sorted(group(rows, keyf).items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        s = summarize(grows)
        out.append(
            {
                "task": key[0], "mode": key[1], "method": key[2], "budget": key[3], "length": key[4],
                **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.__dict__.items()},
            }
        )  # fmt: skip
    return out
