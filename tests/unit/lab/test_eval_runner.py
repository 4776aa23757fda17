"""The runner on the tiny random model: every cell measured and stored, budgets, resumption, early failures,
the CLI and the report."""

from __future__ import annotations

import io
import json
import math
import shutil
import sqlite3

import pytest

import tokensieve as ts
from tokensieve.cli import main
from tokensieve.data.tasks import TASKS
from tokensieve.data.testing import CharTokenizer
from tokensieve.eval.config import EvalConfig
from tokensieve.eval.runner import run_eval
from tokensieve.report import write_report
from tokensieve.results.stats import pareto_front
from tokensieve.results.store import ResultStore

from ..eval_grid import eval_rows, run_grid

TOK = CharTokenizer()
GRID = {
    "tasks": "passkey,ppl",
    "methods": "snapkv,streaming_llm",
    "budgets": "0.5",
    "lengths": "400",
    "depths": "0,1",
    "seeds": "0",
    "modes": "agnostic,aware",
    "text": "generated",
    "threads": "1",
}
N_CELLS = 2 * 2 * 3 + 1 * 1 * 3  # passkey: depths x modes x (full + 2 methods); ppl: agnostic only, no depth


def _run(tiny_model, store, **overrides):
    return run_grid(GRID, tiny_model, store, **overrides)


_rows = eval_rows


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory, tiny_model):
    store = tmp_path_factory.mktemp("eval") / "r.sqlite"
    summary = _run(tiny_model, store)
    assert (summary.total, summary.already, summary.ran) == (N_CELLS, 0, N_CELLS)
    return store


def test_every_cell_is_stored_with_its_configuration(filled_store):
    rows = _rows(filled_store)
    assert len(rows) == N_CELLS
    assert len({r["key"] for r in rows}) == N_CELLS
    for r in rows:
        cfg = json.loads(r["config"])
        assert cfg["task"] == r["task"]
        assert json.loads(r["spec"]) == cfg["spec"]
        assert r["label"] in ("full", "snapkv:0.5", "streaming_llm:0.5")
        assert r["method"] == r["label"].split(":")[0]
        assert cfg["mode"] == r["mode"]
        assert cfg["model"] == r["model"]
        assert r["version"] == ts.__version__
        assert r["prefill_s"] > 0
        assert r["kv_bytes"] > 0
        assert r["full_entries"] > 0
        assert r["threads"] >= 1
        assert r["score"] is not None


def test_full_cache_rows_are_the_reference(filled_store):
    for r in _rows(filled_store):
        if r["label"] != "full":
            continue
        assert r["kl"] == pytest.approx(0.0, abs=1e-4)
        assert r["top1"] == 1.0
        assert r["stored_entries"] == r["full_entries"]
        # tiny model: 3 layers x 2 KV heads x 8 dims x (K + V) x 4 bytes per prompt token
        assert r["kv_bytes"] == 3 * 2 * 8 * 2 * 4 * r["prompt_tokens"]


def test_budgets_mean_the_same_stored_entries_across_methods(filled_store):
    rows = [r for r in _rows(filled_store) if r["label"] != "full"]
    by_cell: dict[tuple, set[int]] = {}
    for r in rows:
        by_cell.setdefault((r["task"], r["depth"], r["mode"]), set()).add(r["stored_entries"])
        compressed = r["context_tokens"]
        uncompressed = r["prompt_tokens"] - compressed  # the question, appended after compression (agnostic)
        assert r["stored_entries"] == 3 * 2 * (round(0.5 * compressed) + uncompressed)
        assert r["kv_bytes"] < r["full_kv_bytes"]
    assert all(len(v) == 1 for v in by_cell.values())


def test_perplexity_rows(filled_store):
    rows = [r for r in _rows(filled_store) if r["task"] == "ppl"]
    assert {r["mode"] for r in rows} == {"agnostic"}
    assert len(rows) == 3
    for r in rows:
        assert r["metric"] == "perplexity"
        assert r["answer_tokens"] == 64
        assert r["output"] == ""
        assert r["score"] == pytest.approx(math.exp(-r["answer_logprob"] / 64), rel=1e-6)
        assert r["fidelity_tokens"] == 64


def test_rerun_resumes_without_redoing_cells(tiny_model, tmp_path, filled_store):
    store = tmp_path / "r.sqlite"
    shutil.copy(filled_store, store)
    before = {r["key"]: r for r in _rows(store)}
    again = _run(tiny_model, store)
    assert (again.already, again.ran) == (N_CELLS, 0)
    # Lose one whole sample (its full-cache reference included) and two compressed cells of another sample.
    victim = next(r for r in before.values() if r["task"] == "passkey" and r["depth"] == 0.0 and r["mode"] == "aware")
    other = [r for r in before.values() if r["task"] == "passkey" and r["depth"] == 1.0 and r["label"] != "full"]
    gone = {k for k, r in before.items() if r["task"] == "passkey" and r["depth"] == 0.0}
    gone |= {r["key"] for r in other[:2]}
    conn = sqlite3.connect(store)
    conn.executemany("DELETE FROM eval WHERE key = ?", [(k,) for k in gone])
    conn.commit()
    conn.close()
    resumed = _run(tiny_model, store)
    assert resumed.ran == len(gone)
    assert resumed.already == N_CELLS - len(gone)
    after = {r["key"]: r for r in _rows(store)}
    assert set(after) == set(before)
    for k, r in after.items():
        if k not in gone:
            assert r["created"] == before[k]["created"]  # untouched
        else:
            assert r["created"] > before[k]["created"]
            # the reference recomputed after the restart is the same, so fidelity is too
            assert r["kl"] == pytest.approx(before[k]["kl"], rel=1e-3, abs=1e-9)
            assert r["top1"] == before[k]["top1"]
            assert r["score"] == before[k]["score"]
            assert r["output"] == before[k]["output"]
    assert victim["key"] in gone


def test_decode_time_methods_run_after_a_full_or_compressed_prefill(tiny_model, tmp_path):
    store = tmp_path / "r.sqlite"
    summary = _run(tiny_model, store, tasks="passkey", methods="quest,snapkv+quest,+h2o[recent_ratio=0.25]:100",
                   depths="0.5", modes="agnostic")  # fmt: skip
    assert summary.ran == 4
    rows = {r["label"]: r for r in _rows(store)}
    assert set(rows) == {"full", "+quest:0.5", "snapkv:0.5+quest:0.5", "+h2o[recent_ratio=0.25]:100"}
    quest, combo, full = rows["+quest:0.5"], rows["snapkv:0.5+quest:0.5"], rows["full"]
    assert (quest["method"], quest["budget"]) == ("+quest", "50%")
    assert json.loads(quest["config"])["spec"]["decode"]["name"] == "quest"
    assert rows["+h2o[recent_ratio=0.25]:100"]["budget"] == "100 tok"  # a spec's own budget, not the grid's
    assert quest["kv_bytes"] == full["kv_bytes"]  # sparse decoding keeps the whole cache, it reads a subset
    assert combo["stored_entries"] < full["stored_entries"]  # SnapKV compressed the prompt
    for r in (quest, combo):
        assert r["fidelity_tokens"] == full["fidelity_tokens"]
        assert r["kl"] >= 0.0
        assert 0.0 <= r["top1"] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"lengths": "600"}, ts.PromptError, "above what"),
        ({"budgets": "1000"}, ts.ConfigError, "larger than the prompt"),
        ({"lengths": "40"}, ts.ConfigError, "too short"),
        ({"tasks": "qa", "text": "no/such/file.txt"}, ts.ConfigError, "Unknown text source"),
    ],
)
def test_bad_input_stops_before_any_cell(tiny_model, tmp_path, overrides, error, match):
    store = tmp_path / "r.sqlite"
    measured: list[dict] = []
    cfg = EvalConfig.from_mapping({**GRID, "store": str(store), **overrides})
    with pytest.raises(error, match=match):
        run_eval(cfg, model=tiny_model, tokenizer=TOK, progress=False, out=io.StringIO(), on_cell=measured.append)
    assert measured == []
    if store.exists():
        assert ResultStore(store, readonly=True).count("eval") == 0


def test_unwritable_store_fails_before_work(tiny_model, tmp_path):
    (tmp_path / "f").write_text("a file, not a folder")
    with pytest.raises(ts.ConfigError, match="writable"):
        _run(tiny_model, tmp_path / "f" / "r.sqlite")


def test_dry_run_measures_nothing(tiny_model, tmp_path):
    store = tmp_path / "r.sqlite"
    cfg = EvalConfig.from_mapping({**GRID, "store": str(store)})
    out = io.StringIO()
    s = run_eval(cfg, model=tiny_model, tokenizer=TOK, progress=False, out=out, dry_run=True)
    assert (s.total, s.ran) == (N_CELLS, 0)
    assert f"{N_CELLS} cells" in out.getvalue()
    assert "ppl runs in the agnostic mode only" in out.getvalue()
    assert ResultStore(store, readonly=True).count("eval") == 0


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--tasks", "nope"], "Unknown task 'nope'"),
        (["eval", "--methods", "snapkvv"], "Unknown method 'snapkvv'"),
        (["eval", "--methods", "snapkv[window=8"], "expected ']' or ','"),
        (["eval", "--methods", "full+snapkv"], "does not act during decode"),
        (["eval", "--budgets", "2.0"], "(0, 1]"),
        (["eval", "--modes", "sideways"], "Unknown mode"),
        (["eval", "missing-grid.toml"], "does not exist"),
        (["report", "missing.sqlite"], "No results store"),
    ],
)
def test_cli_bad_input(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_cli_records_a_reproducible_command():
    from tokensieve.cli import build_parser
    from tokensieve.eval.cli import _command

    args = build_parser().parse_args(["eval", "--tasks", "passkey", "--budgets", "0.1,25%", "--store", "r.sqlite"])
    assert _command(args) == "tokensieve eval --store r.sqlite --tasks passkey --budgets 0.1,25%"
    args = build_parser().parse_args(["eval", "--tasks", "passkey", "--store", "r.sqlite", "--no-shared-prefill"])
    assert _command(args) == "tokensieve eval --store r.sqlite --tasks passkey --no-shared-prefill"


def test_the_shared_prefill_can_be_turned_off_in_a_grid_file(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('tasks = ["passkey"]\nshared_prefill = false\n')
    assert EvalConfig.from_file(grid).shared_prefill is False
    assert EvalConfig.from_mapping({"tasks": "passkey"}).shared_prefill is True
    with pytest.raises(ts.ConfigError, match="true or false"):
        EvalConfig.from_mapping({"tasks": "passkey", "shared_prefill": "maybe"})


def test_cli_lists_tasks(capsys):
    assert main(["eval", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        assert name in out


# ------------------------------------------------------------------------------------------------------ report
def test_report_draws_depth_by_length_heatmaps_over_several_lengths(tiny_model, tmp_path):
    store = tmp_path / "lengths.sqlite"
    _run(tiny_model, store, tasks="passkey", methods="snapkv", lengths="300,400", depths="0.5", modes="aware")
    out = tmp_path / "rep"
    assert main(["report", str(store), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Needle heatmaps, depth × length" in md
    heatmaps = sorted(p.name for p in out.glob("heatmap_*.png"))
    assert heatmaps == ["heatmap_aware_full.png", "heatmap_aware_snapkv_0.5.png"]


def test_report_of_some_tasks_and_methods(filled_store, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(filled_store), "--out", str(out), "--tasks", "passkey", "--methods", "snapkv"]) == 0
    acc = json.loads((out / "summary.json").read_text())["accuracy"]
    assert {a["task"] for a in acc} == {"passkey"}
    assert {a["method"] for a in acc} == {"full", "snapkv"}  # the full cache stays, as the reference
    assert main(["report", str(filled_store), "--out", str(out), "--methods", "snapkv,h2o"]) == 2
    assert "no methods 'h2o'; it has: full, snapkv, streaming_llm" in capsys.readouterr().err
    assert main(["report", str(filled_store), "--out", str(out), "--tasks", "qa"]) == 2
    assert "no tasks 'qa'; it has: passkey, ppl" in capsys.readouterr().err


def test_report_markdown_html_and_plots(filled_store, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(filled_store), "--out", str(out), "--format", "md,html"]) == 0
    md = (out / "report.md").read_text()
    assert "## Full-cache baseline" in md
    assert "## Accuracy vs KV budget" in md
    assert "## Needle accuracy by depth" in md  # one prompt length: a method × depth matrix
    assert "| task | configuration | budget | n | score | KL (nats) | top-1 |" in md
    assert "| passkey | snapkv:0.5 | 50% |" in md
    assert "Accuracy and speed, side by side" not in md  # no benchmark rows in this store
    images = [line[line.index("(") + 1 : -1] for line in md.splitlines() if line.startswith("![")]
    assert any(i.startswith("pareto_") for i in images)
    assert any(i.startswith("needles_") for i in images)
    for i in images:
        assert (out / i).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(images)  # every figure, in the page's static part
    assert "<table>" in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["speed"] == []
    full = [s for s in summary["accuracy"] if s["label"] == "full" and s["task"] == "ppl"]
    assert len(full) == 1
    assert full[0]["kept"] == 1.0
    assert full[0]["n"] == 1
    with pytest.raises(ts.ConfigError, match="format"):
        write_report(filled_store, out, formats=["pdf"])


def test_pareto_front():
    pts = [(0.1, 0.2), (0.25, 0.1), (0.25, 0.6), (0.5, 0.5), (1.0, 0.9)]
    assert pareto_front(pts) == [(0.1, 0.2), (0.25, 0.6), (1.0, 0.9)]
    assert pareto_front([(0.1, 30.0), (0.5, 20.0), (0.7, 25.0)], higher_is_better=False) == [(0.1, 30.0), (0.5, 20.0)]
