"""DAAM speech runs in the results store, so that one report shows them next to the KV and VLM rows.

A DAAM run is a training run (``tokensieve train daam``, docs/DAAM.md), not a measurement of a configuration on a
sample, so it is kept in the store's ``runs`` table, which already holds one row per invocation with a JSON ``info``:

* tool ``daam`` — one row per finished training run; ``info`` is the run's record, exactly the line of
  ``results.jsonl`` (``run``, ``config``, ``parameters``, ``best_epoch``, ``val`` and ``test`` scores, ``corpus``…).
  ``tokensieve train daam --store FILE`` records each run as it finishes, and ``tokensieve train daam-report --out DIR
  --store FILE`` records the finished runs of a grid folder (nothing is trained). A run already recorded (same run
  name and corpus key) is not recorded twice.
* tool ``daam-maps`` — one row per ``tokensieve train daam-figures --store FILE``: per task, the run drawn and its
  importance map — the mean weight of each mel band per class over the test split (classes × mel bands, the data of
  ``daam_task_<t>_bands.png``) — and the paths of the PNG figures drawn.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .render import Block
from .stats import mean
from .store import ResultStore

RUN_TOOL = "daam"
MAPS_TOOL = "daam-maps"
#: labels of recorded selector values that differ from the value: "learned" is the earlier top-k keep score
SELECTOR_LABELS = {"learned": "top-k"}


def front_label(config: Mapping[str, Any]) -> str:
    """A run's front block as docs/DAAM.md names it: ``daam``, ``daam+time``, ``daam+time (1 time head)``, ``mha``;
    then a transformer pooling other than its modules' default (``, mean pooling``), a frame selector trained with
    the run (`` + density selector``), and ``[v1]`` for a run of the earlier networks (a config without
    ``modules``), so that the old and the corrected runs never share a row."""
    th = int(config.get("time_heads", 0) or 0)
    heads = f" ({th} time head{'s' if th > 1 else ''})" if th else ""
    label = str(config.get("attention", "?")) + ("+time" if config.get("time_axis") else "") + heads
    modules = str(config.get("modules", "v1"))
    pool = str(config.get("pool", "") or "")
    if config.get("network") == "transformer" and pool and pool != ("last" if modules == "official" else "mean"):
        label += f", {pool} pooling"
    if config.get("selector"):
        label += f" + {SELECTOR_LABELS.get(config['selector'], config['selector'])} selector"
    return label if modules == "official" else f"{label} [{modules}]"


def record_runs(store: ResultStore, records: Iterable[Mapping[str, Any]], *, command: str, version: str) -> int:
    """Record finished DAAM runs (``results.jsonl`` records) not yet in the store; returns how many were added."""
    have = {(r["info"].get("run"), r["info"].get("corpus")) for r in store.runs(RUN_TOOL)}
    added = 0
    for rec in records:
        if (rec.get("run"), rec.get("corpus")) in have:
            continue
        config = dict(rec.get("config", {}))
        model = f"daam-{config.get('network', '?')}"
        threads = int(rec.get("threads") or 1)
        store.start_run(tool=RUN_TOOL, command=command, config=config, model=model, version=version, threads=threads,
                        cells=1, todo=0, info=dict(rec))  # fmt: skip
        have.add((rec.get("run"), rec.get("corpus")))
        added += 1
    return added


def record_maps(
    store: ResultStore, maps: Sequence[Mapping[str, Any]], figures: Sequence[Path], *, command: str, version: str
) -> int:
    """Record the importance maps ``tokensieve train daam-figures`` computed (``{"task", "run", "classes",
    "bands"}`` each) and the figures it drew; returns the run id."""
    return store.start_run(
        tool=MAPS_TOOL, command=command, config={"tasks": [m["task"] for m in maps]}, model="daam", version=version,
        threads=1, cells=0, todo=0,
        info={"maps": [dict(m) for m in maps], "figures": [str(Path(p).expanduser().resolve()) for p in figures]},
    )  # fmt: skip


def daam_runs(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The recorded DAAM runs, one dict each: task, network, front block, seed, epochs, parameters, test and
    validation F1 macro and accuracy, seconds, run name."""
    out = []
    for r in runs:
        if r["tool"] != RUN_TOOL:
            continue
        info = r["info"]
        c = info.get("config", {})
        test, val = info.get("test", {}), info.get("val", {})
        out.append({"run": info.get("run", "?"), "task": str(c.get("task", "?")), "network": str(c.get("network", "?")),
                    "front": front_label(c), "seed": c.get("seed"), "epochs": c.get("epochs"),
                    "parameters": info.get("parameters"), "front_parameters": info.get("front_parameters"),
                    "f1": test.get("f1"), "acc": test.get("acc"), "val_f1": val.get("f1"),
                    "seconds": info.get("seconds")})  # fmt: skip
    return out


def daam_maps(runs: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Path]]:
    """The newest importance map recorded per task, and the figures of the newest ``daam-figures`` run whose files
    still exist."""
    maps: dict[str, dict[str, Any]] = {}
    figures: list[Path] = []
    for r in runs:
        if r["tool"] != MAPS_TOOL:
            continue
        for m in r["info"].get("maps", []):
            maps[str(m.get("task"))] = dict(m)
        found = [Path(p) for p in r["info"].get("figures", []) if Path(p).is_file()]
        if found:
            figures = found
    return [maps[t] for t in sorted(maps)], figures


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = mean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def groups(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, Any], list[Mapping[str, Any]]]:
    """Runs per (task, network, front block, epochs): the seeds of one setting."""
    out: dict[tuple[str, str, str, Any], list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["task"], r["network"], r["front"], r["epochs"]), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: tuple(str(k) for k in kv[0])))


def daam_table(rows: list[dict[str, Any]]) -> Block:
    """One row per (task, network, front block): seeds, test F1 macro and accuracy, validation F1 (mean ± std)."""
    body = []
    for (task, net, front, epochs), rs in groups(rows).items():
        cells = []
        for col in ("f1", "acc", "val_f1"):
            xs = [float(r[col]) for r in rs if r.get(col) is not None]
            m, s = mean_std(xs)
            cells.append(f"{m:.3f} ± {s:.3f}" if xs else "—")
        params = rs[0].get("parameters")
        body.append([task.upper(), net, front, str(epochs), f"{params:,}" if params else "—", str(len(rs)), *cells])
    header = ["task", "network", "front block", "epochs", "parameters", "seeds", "test F1 macro", "test accuracy",
              "val F1 macro"]  # fmt: skip
    return Block("table", header=header, body=body)


def daam_sections(runs: list[dict[str, Any]], out: Path) -> list[Block]:
    """The DAAM section of the Markdown report: the table of recorded runs and the recorded figures (copied into
    ``out``)."""
    rows = daam_runs(runs)
    _, figures = daam_maps(runs)
    if not rows and not figures:
        return []
    blocks = [Block("h2", "DAAM speech runs (tokensieve train daam)")]
    if rows:
        note = (
            f"{len(rows)} training runs recorded in the store (`tokensieve train daam --store`, or `daam-report "
            "--store` for a grid folder); mean ± standard deviation over seeds; test F1 macro per recording (task A) "
            "or per clip (task B), docs/DAAM.md."
        )
        blocks += [Block("p", note), daam_table(rows)]
    for p in figures:
        dst = out / (p.name if p.name.startswith("daam") else f"daam_{p.name}")
        if p.resolve() != dst.resolve():
            shutil.copyfile(p, dst)
        blocks.append(Block("image", p.stem, path=dst))
    return blocks
