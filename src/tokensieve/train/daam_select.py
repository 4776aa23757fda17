"""``tokensieve train daam-select``: a frame selector trained for dropping, on the DAAM speech transformer, against
every frame, evenly spaced, random, DAAM-importance and loudest frames — on held-out voices, paired by seed, with the
encoder time measured in the same run (docs/DAAM.md, "A frame selector trained for dropping").

Per seed, two runs of the same transformer (front block ``daam+time``, so that the DAAM importance exists on both):

* **plain** — the grid's run (``tokensieve train daam``), trained on every frame; reused when the output folder
  already holds it;
* **selector** — the same network plus a :class:`~tokensieve.nn.FrameScorer`, trained for dropping
  (:func:`tokensieve.train.daam.selector_step`): the encoder learns to classify from subsets of frames, the scorer
  a density over the frames from which the kept ones are drawn.

Every selection runs as a deployment would (:class:`Pipeline`): front block → choose k frames → encoder on the k
frames; its forward time on a 200-clip batch includes the front block and the choosing (the scorer for the learned
selection). The F1 of each (model, selection, fraction) has a 95 % t-interval over seeds; paired differences
(same seed) have a 95 % t-interval, a two-sided paired t-test and the count of seeds won.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.speech import CorpusConfig, load_or_build
from ..errors import ConfigError
from .daam import DaamRun, Data, choose_frames, done_runs, load_run, prepare, run_grid, score
from .daam_stats import fmt, paired, t_interval

TARGET_FRACTION = 0.25  #: the fraction the frame-selection target is stated at
TARGET_GAP = 0.05  #: … within this much F1 of every frame


def selector_pairs(
    task: str, seeds: Sequence[int], epochs: int, *, feedforward: int = 512, time_heads: int = 0,
    modules: str = "official",
) -> list[tuple[DaamRun, DaamRun]]:  # fmt: skip
    """(plain, selector) runs per seed: the DAAM transformer with a time-axis layer, without and with a selector."""
    pairs = []
    for s in seeds:
        plain = DaamRun(task=task, network="transformer", attention="daam", time_axis=True, seed=s, epochs=epochs,
                        feedforward=feedforward, time_heads=time_heads, modules=modules)  # fmt: skip
        pairs.append((plain, replace(plain, selector="density")))
    return pairs


class Pipeline(nn.Module):
    """Front block → ``how`` chooses round(fraction · frames) frames → encoder on them → logits; ``how="all"``
    passes every frame. ``"random"`` draws from a generator seeded with ``seed`` (one stream across batches)."""

    def __init__(self, model: nn.Module, how: str, fraction: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.how = how
        self.fraction = fraction
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, ws = self.model.front(x, return_weights=True)  # type: ignore[operator]
        if self.how == "all":
            return self.model.encode(h)  # type: ignore[operator]
        k = max(1, round(self.fraction * x.shape[2]))
        keep = choose_frames(self.model, x, h, ws, k, self.how, self.gen)
        return self.model.encode(h, keep)  # type: ignore[operator]


def _hows(selector: bool) -> tuple[str, ...]:
    return ("learned", "uniform", "random", "importance", "energy") if selector else (
        "uniform", "random", "importance", "energy")  # fmt: skip


@torch.no_grad()
def time_pipelines(pipes: Sequence[Pipeline], x: torch.Tensor, repeats: int) -> list[float]:
    """Median milliseconds of one forward of x per pipeline, the pipelines interleaved (one pass of each per round,
    after one warm-up round), so that a slow phase of a shared machine falls on all of them alike."""
    times: list[list[float]] = [[] for _ in pipes]
    for p in pipes:
        p.eval()
    for r in range(repeats + 1):
        for i, p in enumerate(pipes):
            t0 = time.perf_counter()
            p(x)
            if r:
                times[i].append(time.perf_counter() - t0)
    return [1000 * float(np.median(t)) for t in times]


def evaluate_seed(
    models: dict[str, nn.Module], data: Data, fractions: Sequence[float], *, seed: int, repeats: int = 5,
    timing_rows: int = 200,
) -> list[dict[str, Any]]:  # fmt: skip
    """Test F1 / accuracy and forward time of every (model, selection, fraction): ``models`` maps "plain" and
    "selector" to trained models of one seed."""
    configs: list[tuple[str, str, float]] = []
    for kind, model in models.items():
        configs.append((kind, "all", 1.0))
        configs += [(kind, how, f) for f in fractions for how in _hows(getattr(model, "scorer", None) is not None)]
    rows = []
    for kind, how, f in configs:
        s = score(Pipeline(models[kind], how, f, seed), data.test, data.n_classes)
        rows.append({"seed": seed, "model": kind, "how": how, "fraction": f, "f1": s["f1"], "acc": s["acc"]})
    x = torch.from_numpy(data.test.x[:timing_rows])
    ms = time_pipelines([Pipeline(models[k], how, f, seed) for k, how, f in configs], x, repeats)
    for row, m in zip(rows, ms):
        row["ms"] = m
    return rows


def run_selection(
    out: Path, task: str, seeds: Sequence[int], epochs: int, fractions: Sequence[float], *,
    feedforward: int = 512, time_heads: int = 0, modules: str = "official", corpus_cfg: CorpusConfig | None = None,
    repeats: int = 5, progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train (or find in ``out``) the plain and selector runs of every seed, then evaluate each seed's pair."""
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ConfigError(f"--keep takes fractions in (0, 1), got {list(fractions)}")
    if repeats < 1:
        raise ConfigError("--repeats must be ≥ 1")
    pairs = selector_pairs(task, seeds, epochs, feedforward=feedforward, time_heads=time_heads, modules=modules)
    run_grid([r for pair in pairs for r in pair], out, corpus_cfg, progress=progress)
    done = done_runs(out)
    data = prepare(load_or_build(task, corpus_cfg, progress=progress))
    rows: list[dict[str, Any]] = []
    for plain, sel in pairs:
        models = {"plain": load_run(out, done[plain.name()], data), "selector": load_run(out, done[sel.name()], data)}
        seed_rows = evaluate_seed(models, data, fractions, seed=plain.seed, repeats=repeats)
        for r in seed_rows:
            r["run"] = plain.name() if r["model"] == "plain" else sel.name()
        rows += seed_rows
        if progress:
            best = {(r["model"], r["how"], r["fraction"]): r["f1"] for r in seed_rows}
            f = min(fractions)
            print(f"seed {plain.seed}: all {best['plain', 'all', 1.0]:.3f} | at {f:.0%}: learned "
                  f"{best['selector', 'learned', f]:.3f}, uniform {best['selector', 'uniform', f]:.3f} "
                  f"(plain model: uniform {best['plain', 'uniform', f]:.3f})", flush=True)  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------------------ stats


def _by(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, float], dict[int, dict[str, Any]]]:
    out: dict[tuple[str, str, float], dict[int, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["model"], r["how"], float(r["fraction"])), {})[int(r["seed"])] = r
    return out


def selection_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per (model, fraction, selection) — seeds, test F1 macro (mean ± 95 % t half-width over seeds),
    accuracy, forward ms (median over seeds) and the speed-up over every frame of the same model."""
    groups = _by(rows)
    lines = [
        "| model | frames kept | selection | seeds | test F1 macro (95 % CI) | test accuracy | forward ms (200 clips) "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"all": 0, "learned": 1, "uniform": 2, "random": 3, "importance": 4, "energy": 5}
    for kind, how, f in sorted(groups, key=lambda k: (k[0], -k[2], order.get(k[1], 9))):
        rs = groups[kind, how, f]
        f1 = t_interval([r["f1"] for r in rs.values()])
        acc = float(np.mean([r["acc"] for r in rs.values()]))
        ms = float(np.median([r["ms"] for r in rs.values()]))
        full = groups.get((kind, "all", 1.0), {})
        speed = [full[s]["ms"] / r["ms"] for s, r in rs.items() if s in full and r["ms"] > 0]
        lines.append(f"| {kind} | {f:.0%} | {how} | {len(rs)} | {fmt(*f1)} | {acc:.3f} | {ms:.0f} | "
                     f"{float(np.median(speed)):.2f}× |")  # fmt: skip
    return "\n".join(lines)


def comparisons(fractions: Sequence[float]) -> list[tuple[str, tuple[str, str, float], tuple[str, str, float]]]:
    """The paired comparisons reported, per fraction: (title, a, b) for a − b."""
    out = []
    for f in sorted(fractions):
        learned = ("selector", "learned", f)
        out += [
            (f"{f:.0%}: learned − uniform (selector model)", learned, ("selector", "uniform", f)),
            (f"{f:.0%}: learned − all frames (plain model)", learned, ("plain", "all", 1.0)),
            (f"{f:.0%}: learned − all frames (selector model)", learned, ("selector", "all", 1.0)),
            (f"{f:.0%}: learned − uniform (plain model)", learned, ("plain", "uniform", f)),
            (f"{f:.0%}: learned − random (selector model)", learned, ("selector", "random", f)),
            (f"{f:.0%}: learned − DAAM importance (selector model)", learned, ("selector", "importance", f)),
            (f"{f:.0%}: learned − energy (selector model)", learned, ("selector", "energy", f)),
            (f"{f:.0%}: uniform − all frames (plain model)", ("plain", "uniform", f), ("plain", "all", 1.0)),
        ]
    return out


def paired_table(rows: Sequence[dict[str, Any]], fractions: Sequence[float]) -> tuple[str, dict[str, dict[str, float]]]:
    """Markdown of :func:`comparisons` (Δ F1 mean ± 95 % t half-width, paired t-test p, seeds won / lost) and the
    numbers by title."""
    groups = _by(rows)
    lines = ["| comparison (paired by seed) | Δ test F1 (95 % CI) | p (paired t) | seeds higher / lower |",
             "|---|---|---|---|"]  # fmt: skip
    found: dict[str, dict[str, float]] = {}
    for title, a, b in comparisons(fractions):
        ga, gb = groups.get(a, {}), groups.get(b, {})
        seeds = sorted(set(ga) & set(gb))
        if not seeds:
            continue
        c = paired([ga[s]["f1"] for s in seeds], [gb[s]["f1"] for s in seeds])
        found[title] = c
        p = "—" if math.isnan(c["p"]) else f"{c['p']:.3f}"
        lines.append(f"| {title} | {fmt(c['diff'], c['half'])} | {p} | {c['wins']} / {c['losses']} |")
    return "\n".join(lines), found


def verdict(found: dict[str, dict[str, float]], fraction: float = TARGET_FRACTION) -> list[str]:
    """The frame-selection target at ``fraction``: within :data:`TARGET_GAP` F1 of every frame (plain model) and
    ahead of evenly spaced frames (paired, p < 0.05), each said as met or not with its numbers."""
    out = []
    gap = found.get(f"{fraction:.0%}: learned − all frames (plain model)")
    ahead = found.get(f"{fraction:.0%}: learned − uniform (selector model)")
    ahead_plain = found.get(f"{fraction:.0%}: learned − uniform (plain model)")
    if gap is not None:
        ok = gap["diff"] >= -TARGET_GAP
        lo, hi = gap["diff"] - gap["half"], gap["diff"] + gap["half"]
        out.append(f"within {TARGET_GAP} F1 of every frame at {fraction:.0%}: {'met' if ok else 'NOT met'} "
                   f"(Δ {gap['diff']:+.3f}, 95 % CI {lo:+.3f} … {hi:+.3f})")  # fmt: skip
    for c, what in ((ahead, "the same model's"), (ahead_plain, "the plain model's")):
        if c is not None:
            ok = c["diff"] > 0 and c["p"] < 0.05
            state = "met" if ok else "NOT met"
            out.append(f"ahead of {what} evenly spaced frames at {fraction:.0%}: {state} (Δ {c['diff']:+.3f} ± "
                       f"{c['half']:.3f}, p {c['p']:.3f}, higher in {c['wins']} of {c['n']} seeds)")  # fmt: skip
    return out


def report(rows: Sequence[dict[str, Any]], fractions: Sequence[float]) -> str:
    """The selection table, the paired comparisons and the verdict on the target, as Markdown."""
    table, found = paired_table(rows, fractions)
    lines = [selection_table(rows), "", table]
    if TARGET_FRACTION in [round(f, 6) for f in fractions]:
        lines += ["", *[f"- {v}" for v in verdict(found)]]
    return "\n".join(lines)


def write_json(path: Path, rows: Sequence[dict[str, Any]], fractions: Sequence[float], meta: dict[str, Any]) -> None:
    _, found = paired_table(rows, fractions)
    path.write_text(json.dumps({"meta": meta, "rows": list(rows), "paired": found}, indent=2) + "\n")
