"""The data of the interactive report page (:mod:`.page`): every aggregate the page draws is computed here, in Python,
from the store's rows, and shipped as compact JSON; the browser only filters and draws. A store of 6,000 accuracy rows
becomes a few hundred points (one per task, mode and configuration) and, for the paired comparison, one string of
0/1 outcomes per configuration and task — so the page stays fast however many rows the store holds.

Every configuration (a canonical label; a chunked prefill is its own label, :func:`~.stats.chunk_labelled`) has a
*family* the page filters by (:func:`family`): ``KV prefill`` (eviction or merging while prefilling), ``decode``
(decode-time methods: ``+quest``), ``sparse prefill`` (prefill attention that reads a subset and stores the whole
cache: ``ashape``), ``learned`` (methods whose profile holds trained weights: ``spkv``, ``retention``), ``visual``
(visual-token pruning in a VLM), and ``reference`` for the full cache / the unpruned model.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .daam import daam_maps, daam_runs
from .render import Block
from .stats import (
    FULL,
    Row,
    accuracy,
    chunk_labelled,
    group,
    kv_kept,
    mean,
    ordered_labels,
    values,
    visual_kept,
    wilson,
)
from .store import is_visual

FAMILIES = ("KV prefill", "decode", "sparse prefill", "learned", "visual")
REFERENCE = "reference"
# Methods whose profile holds trained weights (docs/LEARNED.md, docs/SPKV.md): the "learned" family.
LEARNED_PROFILES = frozenset({"spkv", "retention", "kvzap"})
QUESTION_TYPES = ("attribute", "existence", "counting", "spatial", "reading")  # the order of data/scenes.py


def _r(x: Any, digits: int = 4) -> float | None:
    """A number rounded to ``digits`` significant digits for the page; None for a missing or non-finite one."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _spec(row: Mapping[str, Any]) -> dict[str, Any]:
    spec = row.get("spec")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return {}
    return spec if isinstance(spec, dict) else {}


def family(row: Mapping[str, Any]) -> str:
    """The family of a stored row's configuration (module docstring), from its resolved spec and the registry's
    capability declaration of its method."""
    if row.get("label") == FULL or str(row.get("label", "")).startswith(FULL + " "):
        return REFERENCE
    if is_visual(row):
        return "visual"
    spec = _spec(row)
    prefill = str((spec.get("method") or {}).get("name", ""))
    decode = (spec.get("decode") or {}).get("name")
    if prefill == FULL and not decode:
        return REFERENCE
    from ..core.capabilities import Apply
    from ..errors import TokensieveError
    from ..registry import get_method_class

    try:
        cls = get_method_class(prefill if prefill != FULL else str(decode))
    except TokensieveError:  # a method this version does not know: shown, as an eviction method
        return "KV prefill"
    if cls.capabilities.profile in LEARNED_PROFILES:
        return "learned"
    if prefill == FULL:
        return "decode"
    if cls.capabilities.apply is Apply.NONE:
        return "sparse prefill"
    return "KV prefill"


class Configs:
    """The configurations the page knows, each once: an index per (kind, label), where kind is ``kv`` or ``vlm``."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.items: list[dict[str, Any]] = []
        self.methods: dict[tuple[str, str], int] = {}
        self.method_items: list[dict[str, Any]] = []

    def add(self, row: Mapping[str, Any], kind: str) -> int:
        key = (kind, str(row["label"]))
        if key not in self.index:
            fam = family(row)
            mkey = (kind, str(row["method"]))
            if mkey not in self.methods:
                self.methods[mkey] = len(self.method_items)
                self.method_items.append({"name": mkey[1], "family": fam, "kind": kind})
            self.index[key] = len(self.items)
            self.items.append({"label": key[1], "method": self.methods[mkey], "family": fam, "kind": kind,
                               "budget": str(row.get("budget", ""))})  # fmt: skip
        return self.index[key]


# ----------------------------------------------------------------------------------------------------- accuracy
def kv_panels(rows: list[Row], cfgs: Configs) -> list[dict[str, Any]]:
    """One panel per (mode, task): per configuration ``[config, n, score, lo, hi, KL, KV MB, KV kept, top-1]`` —
    the aggregates of :func:`~.stats.accuracy` (95 % interval: Wilson for 0/1 scores)."""
    panels = []
    by = group(rows, lambda r: (r["mode"], r["task"], r["label"]))
    for mode, task in sorted({(k[0], k[1]) for k in by}):
        trows = [r for k, rs in by.items() if k[:2] == (mode, task) for r in rs]
        metric = str(trows[0]["metric"])
        points = []
        for label in ordered_labels(trows):
            lrows = by[(mode, task, label)]
            a = accuracy(lrows)
            points.append([cfgs.add(lrows[0], "kv"), a.n, _r(a.score), _r(a.score_lo), _r(a.score_hi), _r(a.kl),
                           _r(a.kv_mb), _r(a.kept), _r(a.top1)])  # fmt: skip
        panels.append({"task": task, "mode": mode, "metric": metric, "higher": metric != "perplexity",
                       "points": points})  # fmt: skip
    return panels


# -------------------------------------------------------------------------------------------------------- speed
def speed_data(summary: list[Row], bench_rows: list[Row], eval_rows: list[Row], cfgs: Configs) -> dict[str, Any]:
    """The benchmark's medians per configuration and (length, batch) setting, ratios against the full cache, and the
    accuracy of the same labels per mode (mean over the accuracy tasks, as in the Markdown side-by-side table)."""
    if not summary:
        return {}
    first = {r["label"]: r for r in chunk_labelled(bench_rows)}
    settings = sorted({(int(r["length"]), int(r["batch"])) for r in summary})
    rows = []
    for r in summary:
        raw = first.get(r["label"], r)
        cfg = cfgs.add({**raw, "label": r["label"], "method": r["method"], "budget": r["budget"]}, "kv")
        rows.append([settings.index((int(r["length"]), int(r["batch"]))), cfg, _r(r.get("ttft_s")),
                     _r(r.get("ttft_speedup")), _r(r.get("tok_s")), _r(r.get("speedup")), _r(r.get("ideal_speedup")),
                     _r((r.get("kv_bytes") or 0) / 2**20), _r(r.get("kv_ratio")), _r(r.get("attn_ratio")),
                     _r(r.get("prefill_attn_s")), r.get("reps")])  # fmt: skip
    labels = {r["label"] for r in summary}
    acc_rows = [r for r in eval_rows if r["label"] in labels and r["metric"] == "accuracy"]
    modes = sorted({r["mode"] for r in acc_rows})
    acc = []
    for (label, mode), rs in sorted(group(acc_rows, lambda r: (r["label"], r["mode"])).items()):
        a = accuracy(rs)
        kl = mean(values([r for r in eval_rows if r["label"] == label and r["mode"] == mode], "kl"))
        acc.append([cfgs.add(rs[0], "kv"), modes.index(mode), _r(a.score), _r(a.score_lo), _r(a.score_hi), a.n,
                    _r(kl)])  # fmt: skip
    tasks = sorted({r["task"] for r in acc_rows})
    return {"settings": settings, "rows": rows, "modes": modes, "tasks": tasks, "accuracy": acc}


# ---------------------------------------------------------------------------------------------------- paired
def _outcomes(rows: list[Row], item: Any, cfgs: Configs, kind: str) -> tuple[int, dict[int, str]]:
    """Per configuration, a string over the group's items: ``1`` right, ``0`` wrong (score ≥ 0.5, as
    :func:`~.stats.paired`), ``.`` not answered; an item answered twice counts once (its first row)."""
    items = sorted({item(r) for r in rows}, key=lambda k: json.dumps(k, sort_keys=True, default=str))
    pos = {k: i for i, k in enumerate(items)}
    out: dict[int, list[str]] = {}
    for r in rows:
        s = out.setdefault(cfgs.add(r, kind), ["."] * len(items))
        i = pos[item(r)]
        if s[i] == ".":
            s[i] = "1" if float(r["score"]) >= 0.5 else "0"
    return len(items), {c: "".join(s) for c, s in out.items()}


def paired_data(kv_rows: list[Row], vlm_rows: list[Row], cfgs: Configs) -> dict[str, Any]:
    """The samples each configuration answered right or wrong, per group of comparable samples — (task, mode) of the
    evaluation rows (0/1 metrics only), (split, question type) of a VLM's — for the page's paired comparison (the
    exact sign test on the shared samples, computed in the browser as :func:`~.stats.sign_test` does)."""
    groups: list[dict[str, Any]] = []
    entries: dict[int, list[list[Any]]] = {}

    def add(name: str, kind: str, rows: list[Row], item: Any) -> None:
        n, outs = _outcomes(rows, item, cfgs, kind)
        for c, s in outs.items():
            entries.setdefault(c, []).append([len(groups), s])
        groups.append({"name": name, "kind": kind, "n": n})

    scored = [r for r in kv_rows if r.get("score") is not None and r["metric"] != "perplexity"]
    several = len({r["model"] for r in scored}) > 1
    for (model, task, mode), rows in sorted(group(scored, lambda r: (r["model"], r["task"], r["mode"])).items()):
        name = f"{task} · {mode}" + (f" · {model}" if several else "")
        add(name, "kv", rows, lambda r: (r["task"], r.get("task_options"), r["length"], r.get("depth"), r["seed"]))
    vscored = [r for r in vlm_rows if r.get("score") is not None]
    for (model, split, qtype), rows in sorted(group(vscored, lambda r: (r["model"], _split(r), _qtype(r))).items()):
        add(f"{model} · {split} · {qtype}", "vlm", rows, lambda r: (r["task"], r.get("task_options")))
    return {"groups": groups, "entries": [[c, e] for c, e in sorted(entries.items())]}


# ------------------------------------------------------------------------------------------------------- VLM
def _qtype(row: Row) -> str:
    return str(row["task"]).split("/", 1)[-1]


def _split(row: Row) -> str:
    try:
        return str(json.loads(row.get("task_options") or "{}").get("split", "?"))
    except (ValueError, AttributeError):
        return "?"


def vlm_data(rows: list[Row], cfgs: Configs) -> list[dict[str, Any]]:
    """Per (model, split): per configuration and question type (``all`` first), ``[config, type, n, right, lo, hi,
    visual kept, KV kept]`` with 95 % Wilson intervals."""
    out = []
    for (model, split), mrows in sorted(group(rows, lambda r: (r["model"], _split(r))).items()):
        have = {_qtype(r) for r in mrows}
        types = [t for t in QUESTION_TYPES if t in have] + sorted(have - set(QUESTION_TYPES))
        points = []
        by_label = group(mrows, lambda r: (r["label"],))
        for label in ordered_labels(mrows):
            lrows = by_label[(label,)]
            cfg = cfgs.add(lrows[0], "vlm")
            for t, sub in [(0, lrows)] + [(i + 1, [r for r in lrows if _qtype(r) == q]) for i, q in enumerate(types)]:
                xs = values(sub, "score")
                if not xs:
                    continue
                k = sum(1 for x in xs if x >= 0.5)
                lo, hi = wilson(k, len(xs))
                vk = [x for x in (visual_kept(r) for r in sub) if not math.isnan(x)]
                kk = [x for x in (kv_kept(r) for r in sub) if not math.isnan(x)]
                points.append([cfg, t, len(xs), k, _r(lo), _r(hi), _r(mean(vk)) if vk else None,
                               _r(mean(kk)) if kk else None])  # fmt: skip
        out.append({"model": model, "split": split, "types": ["all questions", *types], "points": points,
                    "questions": len({(r["task"], r.get("task_options")) for r in mrows}),
                    "scenes": len({r.get("seed") for r in mrows})})  # fmt: skip
    return out


def data_uri(path: Path) -> str | None:
    """A PNG file as a ``data:`` URI (None when the file is gone)."""
    try:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return None


def overlay_tiles(runs: Iterable[Mapping[str, Any]], tool: str) -> dict[str, str]:
    """The per-configuration kept-patch images (``{label: data URI}``) of the newest ``vlm-eval --overlays --store``
    run that recorded any whose files still exist (the whole figure is in the page's static part)."""
    tiles: dict[str, str] = {}
    for r in runs:
        if r["tool"] != tool:
            continue
        uris = {str(label): data_uri(Path(p)) for label, p in (r["info"].get("tiles") or {}).items()}
        found = {label: u for label, u in uris.items() if u is not None}
        if found:
            tiles = found
    return tiles


def table_data(block: Block | None) -> dict[str, Any] | None:
    return None if block is None else {"header": list(block.header), "body": [list(r) for r in block.body]}


# ------------------------------------------------------------------------------------------------------ DAAM
def daam_data(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The recorded DAAM runs (test and validation scores per run) and the newest importance map per task."""
    rows = daam_runs(runs)
    maps, _ = daam_maps(runs)
    if not rows and not maps:
        return {}
    keep = ("task", "network", "front", "seed", "f1", "acc", "val_f1", "run", "epochs")
    return {
        "runs": [{k: (_r(r[k]) if k in ("f1", "acc", "val_f1") else r[k]) for k in keep} for r in rows],
        "maps": [
            {
                "task": m.get("task"),
                "run": m.get("run"),
                "classes": list(m.get("classes", [])),
                "bands": [[_r(x, 3) for x in row] for row in m.get("bands", [])],
            }
            for m in maps
        ],
    }


# ------------------------------------------------------------------------------------------------------ the page
def page_data(
    *,
    title: str,
    store: str,
    eval_rows: list[Row],
    summary: list[Row],
    bench_rows: list[Row],
    vlm_eval: list[Row],
    vlm_bench_table: Block | None,
    runs: list[dict[str, Any]],
    machine: str = "",
    overlays_tool: str = "vlm-overlays",
) -> dict[str, Any]:
    """Everything the page shows, JSON-ready (see the module docstring)."""
    cfgs = Configs()
    kv = kv_panels(eval_rows, cfgs)
    speed = speed_data(summary, bench_rows, eval_rows, cfgs)
    vlm = vlm_data(vlm_eval, cfgs)
    paired = paired_data(eval_rows, vlm_eval, cfgs)
    models = sorted({str(r["model"]) for r in [*eval_rows, *vlm_eval]})
    versions = sorted({str(r["version"]) for r in [*eval_rows, *vlm_eval] if r.get("version")})
    commands = list(dict.fromkeys(str(r["command"]) for r in runs if r.get("command")))
    return {
        "title": title,
        "store": store,
        "counts": {
            "eval": len(eval_rows),
            "bench": len(bench_rows),
            "vlm_eval": len(vlm_eval),
            "vlm_bench": len(vlm_bench_table.body) if vlm_bench_table is not None else 0,
        },
        "models": models,
        "versions": versions,
        "commands": commands,
        "machine": machine,
        "families": list(FAMILIES),
        "methods": cfgs.method_items,
        "configs": cfgs.items,
        "kv": kv,
        "speed": speed,
        "paired": paired,
        "vlm": vlm,
        "vlm_tiles": overlay_tiles(runs, overlays_tool),
        "vlm_bench": table_data(vlm_bench_table),
        "daam": daam_data(runs),
    }


def to_json(data: Mapping[str, Any]) -> str:
    """Compact JSON safe inside a ``<script>`` element (no ``</script>`` or ``<!--`` can close or open anything)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("\u2028", "\\u2028")


__all__ = ["FAMILIES", "Configs", "family", "page_data", "paired_data", "to_json"]
