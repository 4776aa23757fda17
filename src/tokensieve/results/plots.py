"""Plots (matplotlib, PNG) of stored rows: accuracy against KV kept, needle heatmaps, accuracy against length, the
attention speed-up and decode speed against stored KV, a VLM's accuracy against the visual tokens kept. Each function
writes one file and returns whether it drew anything."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import FULL, Row, accuracy, group, mean, ordered_labels, pareto_front, values

MB = 2**20


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _legend(fig: Any, axes: Any) -> None:
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)


# ----------------------------------------------------------------------------------------------------- accuracy
def pareto(rows: list[Row], mode: str, path: Path) -> bool:
    """Score against KV kept, one panel per task, one line per method over its budgets."""
    tasks = sorted({r["task"] for r in rows})
    if not any(r["label"] != FULL for r in rows):
        return False
    plt = _pyplot()
    nr, nc = _grid(len(tasks))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.4 * nr), squeeze=False)
    methods = sorted({r["method"] for r in rows if r["label"] != FULL})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    markers = "osD^vP*Xh<>p"
    for ax, task in zip(axes.flat, tasks):
        trows = [r for r in rows if r["task"] == task]
        metric = trows[0]["metric"]
        pts: list[tuple[float, float]] = []
        for m in methods:
            by_label = group((r for r in trows if r["method"] == m and r["label"] != FULL), lambda r: (r["label"],))
            accs = sorted((accuracy(v) for v in by_label.values()), key=lambda a: a.kept)
            accs = [a for a in accs if not math.isnan(a.kept) and not math.isnan(a.score)]
            xy = [(a.kept, a.score) for a in accs]
            if xy:
                mk = markers[methods.index(m) % len(markers)]
                ax.plot([p[0] for p in xy], [p[1] for p in xy], f"{mk}-", color=colors[m], label=m, ms=4, lw=1.2)
                if metric != "perplexity" and all(not math.isnan(a.score_lo) for a in accs):  # 95 % intervals
                    ax.errorbar([a.kept for a in accs], [a.score for a in accs],
                                yerr=[[max(0.0, a.score - a.score_lo) for a in accs],
                                      [max(0.0, a.score_hi - a.score) for a in accs]],
                                fmt="none", ecolor=colors[m], elinewidth=0.7, capsize=2, alpha=0.6)  # fmt: skip
                pts += xy
        full = accuracy([r for r in trows if r["label"] == FULL])
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
    _legend(fig, axes)
    fig.suptitle(f"Accuracy vs KV kept ({mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


def heatmaps(rows: list[Row], mode: str, label: str, path: Path) -> bool:
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
        grid = [[mean(values(cells.get((d, L), []), "score")) for L in lengths] for d in depths]
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


def depth_matrix(rows: list[Row], labels: list[str], mode: str, path: Path) -> bool:
    """One length only: a configuration × needle-depth heatmap of the needle tasks' mean accuracy."""
    rows = [r for r in rows if r.get("depth") is not None and r["metric"] == "accuracy"]
    if not rows or not labels:
        return False
    depths = sorted({float(r["depth"]) for r in rows})
    cells = group(rows, lambda r: (r["label"], float(r["depth"])))
    grid = [[mean(values(cells.get((lab, d), []), "score")) for d in depths] for lab in labels]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(depths), 1.0 + 0.24 * len(labels)), layout="constrained")
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
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


def lengths(rows: list[Row], mode: str, path: Path) -> bool:
    """Score against prompt length, one panel per task, one line per configuration."""
    tasks = sorted({r["task"] for r in rows})
    if len({r["length"] for r in rows}) < 2:
        return False
    plt = _pyplot()
    nr, nc = _grid(len(tasks))
    fig, axes = plt.subplots(nr, nc, figsize=(4.0 * nc, 3.2 * nr), squeeze=False)
    series = ordered_labels(rows)
    colors = {s: plt.get_cmap("tab20")(i % 20) for i, s in enumerate(series)}
    for ax, task in zip(axes.flat, tasks):
        trows = [r for r in rows if r["task"] == task]
        for s in series:
            by_len = group((r for r in trows if r["label"] == s), lambda r: (int(r["length"]),))
            xs = sorted(k[0] for k in by_len)
            if not xs:
                continue
            ys = [mean(values(by_len[(x,)], "score")) for x in xs]
            full = s == FULL
            ax.plot(xs, ys, "*-" if full else "o-", label=s, color="k" if full else colors[s], ms=6 if full else 4)
        lens = sorted({int(r["length"]) for r in trows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, [str(L) for L in lens])
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
    _legend(fig, axes)
    fig.suptitle(f"Accuracy vs prompt length ({mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------------------- speed
def speed(summary: list[Row], out_dir: Path) -> list[Path]:
    """Two PNGs: the attention speed-up per decode step against the full cache, and decode speed against KV bytes.

    One panel per (context length, batch size); each configuration keeps its colour across panels and plots.
    """
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    lens = sorted({r["length"] for r in summary})
    batches = sorted({r["batch"] for r in summary})
    labels = sorted({r["label"] for r in summary}, key=lambda s: (s != FULL, s))
    index = {(r["label"], r["length"], r["batch"]): r for r in summary}
    cmap = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    colour = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}

    def panels(width: float, height: float) -> tuple[Any, Any]:
        fig, axes = plt.subplots(
            len(batches), len(lens), figsize=(width * len(lens), height * len(batches)), squeeze=False
        )
        return fig, axes

    fig, axes = panels(4.6, 0.28 * len(labels) + 1.2)
    for bi, batch in enumerate(batches):
        for li, length in enumerate(lens):
            ax = axes[bi][li]
            shown = [(label, index[(label, length, batch)]) for label in labels if (label, length, batch) in index]
            ys = list(range(len(shown)))[::-1]
            ratios = [float(r.get("attn_ratio") or 0.0) for _, r in shown]
            ratios = [x if math.isfinite(x) else 0.0 for x in ratios]
            ax.barh(ys, ratios, color=[colour[label] for label, _ in shown])
            for y, ratio in zip(ys, ratios):
                ax.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=7)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_yticks(ys)
            ax.set_yticklabels([label for label, _ in shown] if li == 0 else [], fontsize=7)
            ax.set_xlim(0, max([*ratios, 1.0]) * 1.25)
            ax.set_title(f"{length} tokens, batch {batch}", fontsize=9)
            if bi == len(batches) - 1:
                ax.set_xlabel("attention speed-up per decode step (full = 1)", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Decode attention cost against the full cache, same run")
    fig.tight_layout()
    p = out_dir / "bench_attention.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)

    fig, axes = panels(4.0, 3.4)
    for bi, batch in enumerate(batches):
        for li, length in enumerate(lens):
            ax = axes[bi][li]
            for label in labels:
                r = index.get((label, length, batch))
                if r is not None:
                    ax.scatter(
                        r["kv_bytes"] / MB,
                        r["tok_s"],
                        color=colour[label],
                        label=label,
                        marker="*" if label == FULL else "o",
                        s=90 if label == FULL else 30,
                    )
            ax.set_xlabel("stored KV MB", fontsize=8)
            ax.set_ylabel("decode tokens/s", fontsize=8)
            ax.set_title(f"{length} tokens, batch {batch}", fontsize=9)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=7)
    fig.suptitle("Decode speed against stored KV bytes")
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(names) + 3) // 4), 1, 1))
    p = out_dir / "bench_speed_memory.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    return made


# --------------------------------------------------------------------------------------------- video DiT methods
def video_tradeoff(summary: Sequence[Row], path: Path, title: str) -> bool:
    """``tokensieve bench --video``: per configuration, the attention speed-up of its sparse calls against their FLOPs
    ideal (the diagonal is the ideal, the dashed line 0.8 of it) and, when fidelity was measured, PSNR against the
    dense clip over the whole-run attention speed-up. One colour per configuration in both panels."""
    rows = [r for r in summary if r["label"] != FULL and math.isfinite(float(r.get("sparse_speedup") or "nan"))]
    if not rows:
        return False
    plt = _pyplot()
    fidelity = [r for r in rows if r.get("psnr") is not None]
    fig, axes = plt.subplots(1, 2 if fidelity else 1, figsize=(11 if fidelity else 5.6, 4.4), squeeze=False)
    cmap = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    colour = {r["label"]: cmap(i % cmap.N) for i, r in enumerate(rows)}
    ax = axes[0][0]
    top = max([1.0 / max(float(r["sparse_density"]), 1e-9) for r in rows] + [float(r["sparse_speedup"]) for r in rows])
    line = [0.0, top * 1.1]
    ax.plot(line, line, color="black", lw=0.8, label="FLOPs ideal")
    ax.plot(line, [0.8 * x for x in line], color="black", lw=0.8, ls="--", label="0.8 of ideal")
    ax.axhline(1.0, color="grey", lw=0.6)
    for r in rows:
        ideal = 1.0 / max(float(r["sparse_density"]), 1e-9)
        ax.scatter(ideal, float(r["sparse_speedup"]), color=colour[r["label"]], s=36, label=r["label"])
    ax.set_xlabel("FLOPs ideal of a sparse call (1 / density)", fontsize=8)
    ax.set_ylabel("attention speed-up per sparse call (dense = 1)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("speed against the FLOPs ideal", fontsize=9)
    if fidelity:
        ax = axes[0][1]
        for r in fidelity:
            psnr = float(r["psnr"])
            ax.scatter(float(r["attn_speedup"]), min(psnr, 60.0), color=colour[r["label"]], s=36,
                       marker="^" if psnr > 60 else "o")  # fmt: skip
        ax.axhline(25.0, color="black", lw=0.8, ls="--")
        ax.axvline(1.0, color="grey", lw=0.6)
        ax.set_xlabel("attention speed-up, whole run (dense = 1)", fontsize=8)
        ax.set_ylabel("PSNR against the dense clip, dB (▲: ≥ 60)", fontsize=8)
        ax.set_title("fidelity against speed (dashed: 25 dB)", fontsize=9)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ visual-token methods
DODGE = 0.015  # the largest horizontal offset of a method's points (fraction of visual tokens kept)


def vlm_accuracy(rows: list[Row], path: Path, title: str, types: Sequence[str] = ()) -> bool:
    """A VLM's accuracy against the fraction of visual tokens kept (to the language model's last layer): one panel
    for all questions and one per question type (``types`` first, in their order), one line per method over its
    budgets with 95 % Wilson intervals, the full model as the reference (a star and a dotted line). Methods at the
    same budget are drawn up to ±0.015 apart on x (:data:`DODGE`), so their intervals do not hide each other."""
    from .stats import visual_kept, wilson

    if not any(r["label"] != FULL for r in rows):
        return False

    def qtype(r: Row) -> str:
        return str(r["task"]).split("/", 1)[-1]

    have = {qtype(r) for r in rows}
    order = [t for t in types if t in have] + sorted(have - set(types))
    panels = [("all questions", rows)] + [(t, [r for r in rows if qtype(r) == t]) for t in order]
    plt = _pyplot()
    nr, nc = _grid(len(panels), 3)
    fig, axes = plt.subplots(nr, nc, figsize=(4.0 * nc, 3.3 * nr), squeeze=False)
    methods = sorted({r["method"] for r in rows if r["label"] != FULL})
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    markers = "osD^vP*Xh<>p"
    dodge = {m: DODGE * (2 * i / (len(methods) - 1) - 1) if len(methods) > 1 else 0.0 for i, m in enumerate(methods)}

    def point(rs: list[Row]) -> tuple[float, float, float, float]:
        xs = [x for x in (visual_kept(r) for r in rs) if not math.isnan(x)]
        k, n = sum(values(rs, "score")), len(values(rs, "score"))
        lo, hi = wilson(k, n)
        return (mean(xs) if xs else math.nan), (k / n if n else math.nan), lo, hi

    for ax, (name, prow) in zip(axes.flat, panels):
        for i, m in enumerate(methods):
            by_label = group((r for r in prow if r["method"] == m and r["label"] != FULL), lambda r: (r["label"],))
            pts = sorted((point(v) for v in by_label.values()), key=lambda p: p[0])
            pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
            if pts:
                ax.errorbar([p[0] + dodge[m] for p in pts], [p[1] for p in pts],
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                            fmt=f"{markers[i % len(markers)]}-", color=colors[m], label=m, ms=4, lw=1.2,
                            elinewidth=0.7, capsize=2)  # fmt: skip
        full = [r for r in prow if r["label"] == FULL]
        if full:
            x, y, lo, hi = point(full)
            ax.axhline(y, color="k", ls=":", lw=1)
            ax.errorbar([1.0 if math.isnan(x) else x], [y], yerr=[[y - lo], [hi - y]], fmt="k*", ms=10, capsize=2,
                        label="full model")  # fmt: skip
        ax.set_title(f"{name} ({len(prow)} answers)", fontsize=9)
        ax.set_xlabel("visual tokens kept (to the last layer / the image's)", fontsize=8)
        ax.set_ylabel("accuracy (exact match)", fontsize=8)
        ax.set_xlim(-0.02, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    _legend(fig, axes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True
