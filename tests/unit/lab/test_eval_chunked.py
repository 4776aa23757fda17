"""Chunked prefill as a recorded dimension of the measuring tools: ``tokensieve eval --chunk``, the store's ``chunk``
column (and its migration), keys that stay put for one-pass cells, reports that keep chunked rows apart, and
``bench --chunk --store``."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sqlite3

import pytest

from tokensieve.bench.config import BenchConfig, bench_specs
from tokensieve.bench.runner import row_key, run_bench
from tokensieve.cli import main
from tokensieve.data.testing import CharTokenizer
from tokensieve.errors import CapabilityError, ConfigError
from tokensieve.eval.config import EvalConfig, expand
from tokensieve.eval.runner import run_eval
from tokensieve.report import write_report
from tokensieve.results.render import fmt
from tokensieve.results.stats import chunk_labelled, speed
from tokensieve.results.store import ResultStore

from ..eval_grid import eval_rows, run_grid

TOK = CharTokenizer()
CHUNK = 16
GRID = {
    "tasks": "passkey",
    "methods": "snapkv[window=8],streaming_llm",
    "budgets": "0.5",
    "lengths": "300",
    "depths": "0.5",
    "seeds": "0,1",
    "modes": "agnostic,aware",
    "text": "generated",
    "threads": "1",
}
N_CELLS = 2 * 2 * 3  # seeds x modes x (full + 2 methods)


def _run(tiny_model, store, **overrides):
    return run_grid(GRID, tiny_model, store, **overrides)


_rows = eval_rows


@pytest.fixture(scope="module")
def both_store(tmp_path_factory, tiny_model):
    """One store with the grid in one pass, then the same grid with --chunk."""
    store = tmp_path_factory.mktemp("chunk") / "r.sqlite"
    one = _run(tiny_model, store)
    assert (one.total, one.ran) == (N_CELLS, N_CELLS)
    chunked = _run(tiny_model, store, chunk=str(CHUNK))
    # the full-cache reference stays one pass: its cells are the one-pass run's, only the methods run again
    assert (chunked.total, chunked.already, chunked.ran) == (N_CELLS, 4, N_CELLS - 4)
    return store


# ------------------------------------------------------------------------------------------------- keys
def test_one_pass_keys_are_those_computed_before_chunk_existed():
    cfg = EvalConfig.from_mapping({"tasks": "passkey", "methods": "snapkv", "budgets": "0.25", "lengths": "512",
                                   "depths": "0.5", "seeds": "0", "modes": "aware", "text": "generated"})  # fmt: skip
    keys = {c.spec.label: c.key("m") for c in expand(cfg)[0]}
    # computed with the code of commit 8e0ce5f (before eval had a chunk), for this very grid
    assert keys == {"full": "e909c2e4337d8ca35ee8cf73099ce506", "snapkv:0.25": "d2fb94b40b77eeab07a8bf7024a9a410"}
    bench = BenchConfig(specs=bench_specs("snapkv:0.125"), lengths=(64,), threads=1)
    assert row_key(bench.specs[-1], model="m", length=64, batch=1, rep=0, cfg=bench) == (
        "82488c7de5baff4fa1f904b6fecb6149"
    )
    chunked = {c.spec.label: c.key("m") for c in expand(dataclasses.replace(cfg, chunk=256))[0]}
    assert chunked["full"] == keys["full"]  # the reference is one pass in a chunked grid too
    assert chunked["snapkv:0.25"] != keys["snapkv:0.25"]
    cell = next(c for c in expand(dataclasses.replace(cfg, chunk=256))[0] if not c.spec.is_full)
    assert cell.config("m")["chunk"] == 256
    assert "chunk" not in next(c for c in expand(cfg)[0] if not c.spec.is_full).config("m")


# ------------------------------------------------------------------------------------------------- eval
def test_eval_chunk_rows_carry_their_chunk(both_store):
    rows = _rows(both_store)
    assert len(rows) == N_CELLS + N_CELLS - 4
    for r in rows:
        config = json.loads(r["config"])
        if r["label"] == "full":
            assert r["chunk"] is None
        assert config.get("chunk") == r["chunk"]
    chunked = [r for r in rows if r["chunk"] is not None]
    assert {r["chunk"] for r in chunked} == {CHUNK}
    assert {r["label"] for r in chunked} == {"snapkv[window=8]:0.5", "streaming_llm:0.5"}
    one = {(r["label"], r["seed"], r["mode"]): r for r in rows if r["chunk"] is None and r["label"] != "full"}
    for r in chunked:  # the same budget kept after the last chunk as after one pass
        assert r["stored_entries"] == one[(r["label"], r["seed"], r["mode"])]["stored_entries"]
        assert r["full_entries"] == one[(r["label"], r["seed"], r["mode"])]["full_entries"]


def test_rerun_of_a_chunked_grid_resumes(tiny_model, tmp_path, both_store):
    store = tmp_path / "r.sqlite"
    shutil.copy(both_store, store)
    assert _run(tiny_model, store, chunk=str(CHUNK)).ran == 0
    assert _run(tiny_model, store).ran == 0
    other = _run(tiny_model, store, chunk="32", methods="streaming_llm", seeds="0")
    assert other.ran == 2  # another chunk size is another configuration


def test_a_store_written_before_the_chunk_column_opens_and_resumes(tiny_model, tmp_path, both_store):
    store = tmp_path / "old.sqlite"
    shutil.copy(both_store, store)
    conn = sqlite3.connect(store)  # make it what an older tokensieve wrote: one-pass rows, no chunk column
    conn.execute("DELETE FROM eval WHERE chunk IS NOT NULL")
    conn.execute("ALTER TABLE eval DROP COLUMN chunk")
    conn.execute("ALTER TABLE bench DROP COLUMN chunk")
    conn.commit()
    conn.close()
    with ResultStore(store, readonly=True) as ro:  # a report reads it as it is: chunk None
        assert {r["chunk"] for r in ro.rows("eval")} == {None}
    again = _run(tiny_model, store)  # opening it for writing adds the column; its one-pass cells are found
    assert (again.already, again.ran) == (N_CELLS, 0)
    conn = sqlite3.connect(store)
    for table in ("eval", "bench"):
        assert "chunk" in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    conn.close()
    assert _run(tiny_model, store, chunk=str(CHUNK), seeds="0").ran == 4
    assert {r["chunk"] for r in _rows(store)} == {None, CHUNK}


def test_methods_that_cannot_chunk_are_refused_before_the_grid_is_built():
    with pytest.raises(CapabilityError, match=r"'kvzip'.*chunk by chunk: "):
        EvalConfig.from_mapping({**GRID, "methods": "snapkv,kvzip", "chunk": "64"})
    with pytest.raises(CapabilityError, match=r"'adakv'.*different counts"):
        EvalConfig.from_mapping({**GRID, "methods": "adakv", "chunk": 64})
    with pytest.raises(CapabilityError, match=r"'h2o'.*whole prompt's queries"):
        EvalConfig.from_mapping({**GRID, "methods": "+h2o:0.25", "chunk": 64})
    with pytest.raises(ConfigError, match="chunk"):
        EvalConfig.from_mapping({**GRID, "chunk": "1"})
    with pytest.raises(CapabilityError, match="kvzip"):
        BenchConfig(specs=bench_specs("kvzip:0.25"), threads=1, chunk=64)
    assert EvalConfig.from_mapping({**GRID, "chunk": "none"}).chunk is None


def test_methods_all_with_chunk_drops_those_that_cannot_with_their_reason(tiny_model, tmp_path):
    cfg = EvalConfig.from_mapping({**GRID, "methods": "all", "seeds": "0", "modes": "aware", "chunk": "64",
                                   "store": str(tmp_path / "a.sqlite")})  # fmt: skip
    out = io.StringIO()
    run_eval(cfg, model=tiny_model, tokenizer=TOK, progress=False, out=out, dry_run=True)
    assert "note: kvzip" in out.getvalue()
    assert "chunk by chunk" in out.getvalue()


def test_cli_refuses_a_method_that_cannot_chunk_without_a_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tokensieve.eval.runner.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["eval", "--methods", "snapkv,kvzip", "--chunk", "256", "--store", "r.sqlite"]) == 2
    err = capsys.readouterr().err
    assert "'kvzip'" in err
    assert "chunk by chunk" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r.sqlite").exists()  # refused before the store was created
    assert main(["bench", "--methods", "ems:0.25", "--chunk", "256", "--store", "b.sqlite"]) == 2
    err = capsys.readouterr().err
    assert "'ems:0.25' cannot compress a prompt chunk by chunk: it merges" in err
    assert "Traceback" not in err
    assert not (tmp_path / "b.sqlite").exists()


def test_cli_records_the_chunk_in_the_command():
    from tokensieve.cli import build_parser
    from tokensieve.eval.cli import _command

    args = build_parser().parse_args(["eval", "--methods", "snapkv", "--chunk", "256", "--store", "r.sqlite"])
    assert _command(args) == "tokensieve eval --store r.sqlite --methods snapkv --chunk 256"


# ----------------------------------------------------------------------------------------------- report
def test_report_shows_chunked_and_one_pass_rows_apart(both_store, tmp_path):
    out = tmp_path / "rep"
    write_report(both_store, out)
    md = (out / "report.md").read_text()
    for mode in ("agnostic", "aware"):
        table = md[md.index(f"## Accuracy, fidelity and cost — {mode}") :]
        table = table[: table.index("## ", 3)] if "## " in table[3:] else table
        assert "| passkey | snapkv[window=8]:0.5 | 50% | 2 |" in table
        assert f"| passkey | snapkv[window=8]:0.5 chunk={CHUNK} | 50% | 2 |" in table
        assert f"| passkey | streaming_llm:0.5 chunk={CHUNK} | 50% | 2 |" in table
        assert f"| passkey | full chunk={CHUNK}" not in table
    summary = json.loads((out / "summary.json").read_text())
    acc = {(s["label"], s["mode"]): s for s in summary["accuracy"]}
    assert acc[(f"streaming_llm:0.5 chunk={CHUNK}", "aware")]["chunk"] == CHUNK
    assert acc[("streaming_llm:0.5", "aware")]["chunk"] is None
    assert acc[("streaming_llm:0.5", "aware")]["n"] == 2  # not merged: 2 samples each


def test_chunk_labelled_is_idempotent_and_leaves_one_pass_rows():
    rows = [{"label": "snapkv:0.25", "method": "snapkv", "chunk": 256}, {"label": "snapkv:0.25", "method": "snapkv"}]
    once = chunk_labelled(rows)
    assert [r["label"] for r in once] == ["snapkv:0.25 chunk=256", "snapkv:0.25"]
    assert [r["method"] for r in once] == ["snapkv chunk=256", "snapkv"]
    assert [r["spec_label"] for r in once] == ["snapkv:0.25", "snapkv:0.25"]
    assert chunk_labelled(once) == once
    assert rows[0]["label"] == "snapkv:0.25"  # copies


# ------------------------------------------------------------------------------------------------ bench
def test_bench_chunk_with_store_joins_eval_chunk_to_chunk(tiny_model, tmp_path, both_store):
    path = tmp_path / "s.sqlite"
    shutil.copy(both_store, path)
    kw = {"specs": bench_specs("snapkv[window=8]:0.5"), "lengths": (48,), "decode_tokens": 3, "repetitions": 1,
          "threads": 1}  # fmt: skip
    with ResultStore(path) as store:
        run_bench(BenchConfig(**kw), store=store, model_and_tokenizer=(tiny_model, TOK), bandwidth=1e10)
        run_bench(BenchConfig(**kw, chunk=CHUNK), store=store, model_and_tokenizer=(tiny_model, TOK), bandwidth=1e10)
        rows = store.rows("bench")
        info = store.runs("bench")[-1]["info"]
    assert sorted((r["label"], r["chunk"] or 0) for r in rows) == [
        ("full", 0), ("full", CHUNK), ("snapkv[window=8]:0.5", 0), ("snapkv[window=8]:0.5", CHUNK)
    ]  # fmt: skip
    summary = {r["label"]: r for r in speed(rows, info)}
    snap = "snapkv[window=8]:0.5"
    assert set(summary) == {"full", f"full chunk={CHUNK}", snap, f"{snap} chunk={CHUNK}"}
    chunked = summary[f"snapkv[window=8]:0.5 chunk={CHUNK}"]
    # ratios against the full cache prefilled alike (in chunks)
    assert chunked["kv_ratio"] == pytest.approx(chunked["kv_bytes"] / summary[f"full chunk={CHUNK}"]["kv_bytes"])
    write_report(path, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    joined = md[md.index("## Accuracy and speed, side by side") : md.index("## Full-cache baseline")]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in joined.splitlines() if line.startswith("| ")}
    assert {"full", "snapkv[window=8]:0.5", f"snapkv[window=8]:0.5 chunk={CHUNK}"} <= set(lines)
    assert f"full chunk={CHUNK}" not in lines  # the eval's full cache is one pass: no chunked accuracy to join
    evals = _rows(both_store)
    for label, chunk in (("snapkv[window=8]:0.5", None), (f"snapkv[window=8]:0.5 chunk={CHUNK}", CHUNK)):
        acc = [r["score"] for r in evals if r["label"] == "snapkv[window=8]:0.5" and r["chunk"] == chunk
               and r["mode"] == "aware"]  # fmt: skip
        cells = [c.strip() for c in lines[label].strip("|").split("|")]
        assert cells[11] == fmt(sum(acc) / len(acc))  # accuracy (aware) of the rows of this chunk size
    assert "Speed and memory" in md
    assert f"| snapkv[window=8]:0.5 chunk={CHUNK} | 48 |" in md


def test_wilson_interval_holds_its_proportion_at_the_extremes(tmp_path):
    from tokensieve.results.plots import pareto
    from tokensieve.results.stats import wilson

    for n in range(1, 60):  # at n = 11, 22 … (0 right) and 6, 21 … (all right) rounding used to cross p
        assert wilson(0, n)[0] == 0.0
        assert wilson(n, n)[1] == 1.0
    rows = [{"task": "passkey", "metric": "accuracy", "label": lab, "method": lab.split(":")[0], "score": s,
             "stored_entries": e, "full_entries": 100} for lab, s, e in [("full", 1.0, 100), ("snapkv:0.25", 0.0, 25)]
            for _ in range(11)]  # fmt: skip
    assert pareto(rows, "aware", tmp_path / "p.png")  # used to fail: a negative error bar at accuracy 0 of 11
