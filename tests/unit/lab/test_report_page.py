"""The interactive report without a browser: method families from the registry, the page's data (compact, complete,
the paired outcomes equal to stats.paired), the self-contained page, the report extra, and the rows the page draws
that other tools record — DAAM runs and importance maps, per-configuration kept-patch images."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tokensieve.errors import ConfigError
from tokensieve.report import write_report
from tokensieve.results.daam import MAPS_TOOL, RUN_TOOL, record_runs
from tokensieve.results.page_data import family, page_data, to_json
from tokensieve.results.stats import FULL, chunk_labelled, paired
from tokensieve.results.store import ResultStore, is_visual, spec_columns, visual_columns
from tokensieve.spec import Spec

from ..report_store import SCREEN_METHODS, VLM_SPECS, build_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("page") / "screen.sqlite")


@pytest.fixture(scope="module")
def data(store: Path) -> dict[str, Any]:
    with ResultStore(store, readonly=True) as s:
        rows, runs = chunk_labelled(s.rows("eval")), s.runs()
    kv = [r for r in rows if not is_visual(r)]
    return page_data(title="t", store=store.name, eval_rows=kv, summary=[], bench_rows=[],
                     vlm_eval=[r for r in rows if is_visual(r)], vlm_bench_table=None, runs=runs)  # fmt: skip


def test_families_come_from_the_registry() -> None:
    def kv(text: str) -> str:
        return family({**spec_columns(Spec.parse(text)), "label": Spec.parse(text).label})

    assert kv("snapkv:0.25") == kv("adakv:0.1") == kv("snapkv:0.25+quest:0.1") == "KV prefill"
    assert kv("+quest:0.1") == kv("+tidaldecode:0.1") == "decode"
    assert kv("ashape") == kv("flexprefill") == "sparse prefill"
    assert kv("spkv:0.25") == kv("retention[allocation=uniform]:0.25") == "learned"
    assert kv("full") == "reference"
    assert family({**visual_columns("todre:0.11")}) == "visual"
    assert family({**visual_columns("full")}) == "reference"
    assert family({"label": "full chunk=256", "spec": "{}"}) == "reference"  # a chunked full cache
    unknown = {"label": "newkv:0.1", "spec": json.dumps({"method": {"name": "newkv"}})}
    assert family(unknown) == "KV prefill"  # a method this version does not know is still shown


def test_the_page_data_is_compact_and_complete(data: dict[str, Any]) -> None:
    text = to_json(data)
    assert len(text) < 120_000  # 5,904 + 540 rows → a few hundred points and one 0/1 string per configuration
    panels = [(p["task"], p["mode"]) for p in data["kv"]]
    assert panels == [(t, m) for m in ("agnostic", "aware") for t in ("niah_multikey", "niah_single")]
    assert all(len(p["points"]) == 27 * 3 + 1 for p in data["kv"])
    assert all(p[1] == 18 for panel in data["kv"] for p in panel["points"])  # n samples per point
    methods = {m["name"]: m["family"] for m in data["methods"]}
    assert {m for m, f in methods.items() if f == "decode"} == {m for m in SCREEN_METHODS if m.startswith("+")}
    assert {m for m, f in methods.items() if f == "learned"} == {"spkv", "retention"}
    assert {m for m, f in methods.items() if f == "visual"} == {"todre", "vis:random", "pool", "divprune"}
    groups = [g["name"] for g in data["paired"]["groups"]]
    assert groups[:4] == ["niah_multikey · agnostic", "niah_multikey · aware", "niah_single · agnostic",
                          "niah_single · aware"]  # fmt: skip
    assert len(groups) == 4 + 5  # and one per question type of the VLM
    (vlm,) = data["vlm"]
    assert vlm["types"][0] == "all questions"
    assert (vlm["questions"], vlm["scenes"]) == (60, 12)
    assert sorted(data["vlm_tiles"]) == sorted(VLM_SPECS)  # every configuration's kept patches
    assert all(u.startswith("data:image/png;base64,") for u in data["vlm_tiles"].values())
    assert len(data["daam"]["runs"]) == 18
    assert [m["task"] for m in data["daam"]["maps"]] == ["a", "b"]


def test_the_paired_outcomes_are_those_of_stats_paired(store: Path, data: dict[str, Any]) -> None:
    with ResultStore(store, readonly=True) as s:
        rows = [r for r in s.rows("eval") if not is_visual(r)]
    index = {c["label"]: i for i, c in enumerate(data["configs"]) if c["kind"] == "kv"}
    outs = {c: dict(e) for c, e in data["paired"]["entries"]}

    def counts(a: str, b: str) -> tuple[int, int, int]:
        n = only_a = only_b = 0
        for g, sa in outs[index[a]].items():
            sb = outs[index[b]][g]
            for x, y in zip(sa, sb):
                if "." not in (x, y):
                    n += 1
                    only_a += x == "1" and y == "0"
                    only_b += x == "0" and y == "1"
        return n, only_a, only_b

    def item(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["task"], r["mode"], r["task_options"], r["length"], r["depth"], r["seed"])

    for a, b in (("snapkv:0.1", FULL), ("+quest:0.5", "kvzip:0.25")):
        want = paired([r for r in rows if r["label"] == a], [r for r in rows if r["label"] == b], item)
        assert counts(a, b) == (want.n, want.only_a, want.only_b)


def test_the_page_is_one_self_contained_file(store: Path, tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    (page,) = [p for p in write_report(store, tmp_path, formats=["html"]) if p.suffix == ".html"]
    html = page.read_text()
    from tokensieve.results.page import plotly_js

    js = plotly_js()
    assert js in html  # the library itself, inlined (its own code names map-tile servers we never use)
    ours = html.replace(js, "")
    assert "<script src" not in ours
    assert "<link" not in ours  # no stylesheet, font or icon fetched
    assert not re.search(r"""(src|href)=["']https?:""", ours)
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)[1])
    assert data["counts"] == {"eval": 5904, "bench": 24, "vlm_eval": 540, "vlm_bench": 9}
    assert len(data["speed"]["rows"]) == 8
    assert "<details><summary>Accuracy and speed, side by side</summary>" in html  # the static report follows
    assert html.count("src='data:image/png;base64,") == len(list(tmp_path.glob("*.png")))


def test_json_in_the_page_cannot_end_its_script() -> None:
    nasty = {"label": "</script><script>alert(1)</script><!--", "x": "a & b"}
    text = to_json(nasty)
    assert "</" not in text
    assert "<!--" not in text
    assert json.loads(text) == nasty


def test_html_needs_the_report_extra_and_markdown_does_not(tmp_path: Path, monkeypatch: Any) -> None:
    store = build_store(tmp_path / "vlm.sqlite", kv=False, daam=False)  # a small store: VLM rows
    monkeypatch.setitem(sys.modules, "plotly", None)  # as if `tokensieve[report]` were not installed
    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'tokensieve[report]'")):
        write_report(store, tmp_path / "html", formats=["md", "html"])
    assert not (tmp_path / "html").exists()  # refused before anything was written
    written = write_report(store, tmp_path / "md", formats=["md"])
    assert (tmp_path / "md" / "report.md") in written
    assert "## Visual-token pruning (VLM)" in (tmp_path / "md" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------------- DAAM
def _record(run: str, task: str, front: str, seed: int, f1: float, modules: str | None = "official") -> dict[str, Any]:
    config = {"task": task, "network": "cnnlstm", "attention": front, "time_axis": False, "seed": seed, "epochs": 3}
    if modules is not None:  # a run recorded with the earlier modules has no modules
        config["modules"] = modules
    return {"run": run, "config": config, "parameters": 7, "front_parameters": 0, "best_epoch": 2,
            "val": {"f1": 0.5, "acc": 0.5}, "test": {"f1": f1, "acc": f1}, "seconds": 1, "corpus": "c"}  # fmt: skip


def test_daam_runs_are_recorded_once_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokensieve.cli import main

    grid = tmp_path / "daam"
    grid.mkdir()
    with open(grid / "results.jsonl", "w") as f:
        for seed, f1 in ((0, 0.6), (1, 0.8)):
            f.write(json.dumps(_record(f"b-cnnlstm-none-s{seed}", "b", "none", seed, f1)) + "\n")
    store = tmp_path / "all.sqlite"
    assert main(["train", "daam-report", "--out", str(grid), "--store", str(store)]) == 0
    assert "2 DAAM runs recorded" in capsys.readouterr().out
    assert main(["train", "daam-report", "--out", str(grid), "--store", str(store)]) == 0
    assert "0 DAAM runs recorded" in capsys.readouterr().out  # each run once
    with ResultStore(store) as s:
        (first, _) = s.runs(RUN_TOOL)
        assert first["info"]["test"]["f1"] == 0.6
        assert first["command"] == f"tokensieve train daam-report --out {grid}"
        assert record_runs(s, [_record("a-x", "a", "daam", 0, 0.7)], command="c", version="v") == 1
        assert record_runs(s, [_record("a-old", "a", "daam", 0, 0.5, modules=None)], command="c", version="v") == 1
    write_report(store, tmp_path / "rep")  # a store of DAAM runs alone is a report
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## DAAM speech runs (tokensieve train daam)" in md
    assert "| B | cnnlstm | none | 3 | 7 | 2 | 0.700 ± 0.141 | 0.700 ± 0.141 | 0.500 ± 0.000 |" in md
    assert "| A | cnnlstm | daam | 3 | 7 | 1 | 0.700 ± 0.000 |" in md
    assert "| A | cnnlstm | daam [v1] | 3 | 7 | 1 | 0.500 ± 0.000 |" in md  # the v1 run in a row of its own


def test_daam_figures_record_the_importance_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from tokensieve.cli import main
    from tokensieve.train import daam

    from .test_daam_train import _tiny_corpus

    torch.set_num_threads(1)
    monkeypatch.setattr(daam, "load_or_build", lambda task, cfg=None, progress=False: _tiny_corpus(task))
    run = daam.DaamRun(task="b", network="transformer", attention="daam", time_axis=True, epochs=1, batch=8,
                       feedforward=32)  # fmt: skip
    daam.run_grid([run], tmp_path / "runs", progress=False)
    store = tmp_path / "s.sqlite"
    argv = ["train", "daam-figures", "--out", str(tmp_path / "runs"), "--figdir", str(tmp_path / "figs"), "--store",
            str(store)]  # fmt: skip
    assert main(argv) == 0
    with ResultStore(store, readonly=True) as s:
        (rec,) = s.runs(MAPS_TOOL)
    (m,) = rec["info"]["maps"]
    assert (m["task"], m["run"], m["classes"]) == ("b", run.name(), ["w0", "w1", "w2"])
    assert len(m["bands"]) == 3
    assert all(len(row) == 12 for row in m["bands"])  # classes × mel bands of the tiny corpus
    assert {Path(p).name for p in rec["info"]["figures"]} >= {"daam_task_b_examples.png", "daam_task_b_bands.png"}
    write_report(store, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![daam_task_b_bands](daam_task_b_bands.png)" in md


# ------------------------------------------------------------------------------------------- kept-patch images
def test_the_kept_patch_figure_writes_one_image_per_configuration(tmp_path: Path) -> None:
    from tokensieve.adapters import vlm as V
    from tokensieve.adapters.models import embedded_dir, is_pulled
    from tokensieve.train.overlays import overlay_figure, tile_path
    from tokensieve.train.vlm_store import record_overlays

    from .test_vlm import SMALL

    if not is_pulled():
        pytest.skip("needs the embedded text model's tokenizer and weights (`tokensieve pull`)")
    torch.manual_seed(0)
    model, processor = V.build_vlm(SMALL, text_dir=embedded_dir())
    specs = ["full", "pool:0.25"]
    figure = overlay_figure(model.eval(), processor, specs, tmp_path / "kept.png", n_scenes=2)
    from PIL import Image

    size = Image.open(tile_path(figure, "full")).size
    side = SMALL.image_size
    assert size == (side, 2 * side + 4)  # the two scenes, one above the other
    full, pooled = (Image.open(tile_path(figure, s)).convert("L") for s in specs)
    assert np.asarray(pooled).sum() < np.asarray(full).sum()  # the pruned patches are drawn darker
    with ResultStore(tmp_path / "s.sqlite") as store:
        record_overlays(store, figure, specs=specs, model_key="m", n_scenes=2, split="test", command="c", threads=1)
        (run,) = store.runs("vlm-overlays")
    assert run["info"]["tiles"] == {"full": str(tile_path(figure, "full").resolve()),
                                    "pool:0.25": str(tile_path(figure, "pool:0.25").resolve())}  # fmt: skip
