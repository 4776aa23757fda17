"""The results store, the grid config and its cells, and the fidelity metrics."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch

import tokensieve as ts
from tokensieve.eval.config import EvalConfig, expand
from tokensieve.eval.metrics import fidelity, kl_divergence, log_probs, perplexity, token_logprobs, top1_agreement
from tokensieve.results.store import ResultStore, spec_columns
from tokensieve.spec import Spec


# ------------------------------------------------------------------------------------------------------ store
def _row(key: str, **extra: object) -> dict[str, object]:
    row: dict[str, object] = {
        "key": key, **spec_columns(Spec()), "config": "{}", "model": "m", "version": ts.__version__, "created": 1.0,
        "task": "passkey", "length": 512, "seed": 0, "mode": "agnostic", "metric": "accuracy", "score": 1.0,
    }  # fmt: skip
    row.update(extra)
    return row


def _bench_row(key: str, **extra: object) -> dict[str, object]:
    row: dict[str, object] = {
        "key": key, **spec_columns(Spec.parse("+quest:0.125")), "model": "m", "version": ts.__version__,
        "created": 2.0, "prefill": "full", "decode": "quest", "decode_budget": "0.125", "length": 64, "batch": 1,
        "rep": 0, "tok_s": 10.0,
    }  # fmt: skip
    row.update(extra)
    return row


def test_store_inserts_reads_and_never_overwrites(tmp_path):
    path = tmp_path / "sub" / "r.sqlite"
    with ResultStore(path) as store:
        run = store.start_run(tool="bench", command="c", config={}, model="m", version="v", threads=1, cells=1,
                              todo=1, info={"bandwidth": 1.0})  # fmt: skip
        store.add("eval", _row("a", kl=0.5, answers=["x", "y"], depth=None, top1=math.nan))
        store.add("eval", _row("b", score=0.0))
        store.add("bench", _bench_row("a", run_id=run))  # the same key in the other table is another row
        assert store.keys("eval") == {"a", "b"}
        assert store.has("bench", "a")
        assert not store.has("bench", "b")
        assert store.add("eval", _row("a", score=0.0)) is False  # already stored: the first row stays
        with pytest.raises(ValueError, match="unknown eval columns"):
            store.add("eval", _row("c", bogus=1))
        with pytest.raises(ValueError, match="unknown results table"):
            store.add("nope", _row("c"))
    with ResultStore(path, readonly=True) as ro:
        rows = {r["key"]: r for r in ro.rows("eval")}
        assert rows["a"]["score"] == 1.0
        assert rows["a"]["kl"] == 0.5
        assert json.loads(rows["a"]["answers"]) == ["x", "y"]
        assert rows["a"]["depth"] is None
        assert rows["a"]["top1"] is None
        assert rows["a"]["label"] == "full"
        assert rows["a"]["budget"] == "100%"
        assert ro.count("eval") == 2
        bench = ro.rows("bench")
        assert [(r["label"], r["method"], r["budget"]) for r in bench] == [("+quest:0.125", "+quest", "0.125")]
        assert ro.runs("bench")[0]["info"] == {"bandwidth": 1.0}
        assert ro.runs("eval") == []


def test_an_old_store_is_refused(tmp_path):
    old = tmp_path / "old.sqlite"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema', '1')")
    conn.execute("CREATE TABLE results (key TEXT PRIMARY KEY)")
    conn.commit()
    conn.close()
    for readonly in (False, True):
        with pytest.raises(ts.ConfigError, match="schema 2"):
            ResultStore(old, readonly=readonly)


def test_store_bad_paths_fail_with_a_message(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(ts.ConfigError, match="Choose a writable path"):
        ResultStore(blocker / "r.sqlite")
    with pytest.raises(ts.ConfigError, match="is a directory"):
        ResultStore(tmp_path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ts.ConfigError, match="results store"):
        ResultStore(junk)
    with pytest.raises(ts.ConfigError, match="No results store"):
        ResultStore(tmp_path / "missing.sqlite", readonly=True)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ts.ConfigError, match="not a tokensieve results store"):
        ResultStore(other, readonly=True)


# ------------------------------------------------------------------------------------------------------ config
def test_config_parses_cli_strings():
    cfg = EvalConfig.from_mapping(
        {
            "tasks": "passkey, niah_single",
            "methods": "snapkv[window=8],h2o,+quest[page=8]:64",
            "budgets": "0.1,25%,256",
            "lengths": "512,1k",
            "depths": "0,0.5,100%",
            "seeds": "0-2",
            "modes": "agnostic,aware",
            "store": "x.sqlite",
        }
    )
    assert cfg.tasks == ("passkey", "niah_single")
    assert cfg.methods == tuple(Spec.parse(s) for s in ("snapkv[window=8]", "h2o", "+quest[page=8]:64"))
    assert [str(b) for b in cfg.budgets] == ["10%", "25%", "256 tok"]
    assert cfg.lengths == (512, 1024)
    assert cfg.depths == (0.0, 0.5, 1.0)
    assert cfg.seeds == (0, 1, 2)
    assert [m.label for m in cfg.method_list()] == ["full", "snapkv[window=8]", "h2o", "+quest[page=8]:64"]
    # a spec without a budget takes each of the grid's; one with a budget keeps its own
    assert [s.label for s in cfg.specs()] == [
        "full", "snapkv[window=8]:0.1", "snapkv[window=8]:0.25", "snapkv[window=8]:256", "h2o:0.1", "h2o:0.25",
        "h2o:256", "+quest[page=8]:64",
    ]  # fmt: skip


def test_modes_both_means_every_mode():
    assert EvalConfig.from_mapping({"modes": "both"}).modes == ("agnostic", "aware")
    assert EvalConfig.from_mapping({"modes": "aware,both"}).modes == ("aware", "agnostic")


def test_all_methods_come_from_the_registry():
    cfg = EvalConfig.from_mapping({"methods": "all"})
    assert cfg.all_methods
    names = [m.decode.name if m.decode is not None else m.method.name for m in cfg.method_list()]
    assert names == ["full", *[n for n in ts.method_names() if n != "full"]]
    assert "+quest" in [m.label for m in cfg.method_list()]  # decode-only methods run after a full prefill


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"tasks": "passkey,nope"}, "Unknown task 'nope'"),
        ({"methods": "snapkvv"}, "Unknown method 'snapkvv'"),
        ({"methods": "snapkv[nosuch=1]"}, "no parameter 'nosuch'"),
        ({"methods": "snapkv[window]"}, "expected '=' after 'window'"),
        ({"methods": "snapkv:window=32"}, "Cannot read budget 'window'"),  # the old grammar is gone
        ({"methods": ["snapkv", 3]}, "specs such as"),
        ({"budgets": "1.5"}, r"\(0, 1\]"),
        ({"lengths": "12.5"}, "whole numbers"),
        ({"lengths": "abc"}, "whole numbers"),
        ({"depths": "1.5"}, r"\[0.0, 1.0\]"),
        ({"modes": "sideways"}, "Unknown mode"),
        ({"haystack": "noise"}, "haystack"),
        ({"taks": "passkey"}, "Unknown config key"),
        ({"tasks": ""}, "empty"),
    ],
)
def test_config_rejects_bad_input(data, match):
    with pytest.raises(ts.ConfigError, match=match):
        EvalConfig.from_mapping(data)


def test_config_files(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text(
        'tasks = ["passkey"]\nmethods = ["h2o", "snapkv[window=8, kernel=3]", "+quest[page=8]:0.5"]\n'
        'budgets = [0.25, 64]\nlengths = [300]\nmodes = ["aware"]\n'
    )
    cfg = EvalConfig.from_file(toml, {"lengths": "400"})
    assert cfg.lengths == (400,)  # overrides win
    assert cfg.methods[1] == Spec.parse("snapkv[kernel=3,window=8]")
    assert [s.label for s in cfg.specs()][-1] == "+quest[page=8]:0.5"
    assert [str(b) for b in cfg.budgets] == ["25%", "64 tok"]
    js = tmp_path / "grid.json"
    js.write_text(json.dumps({"tasks": ["qa"], "text": "generated"}))
    assert EvalConfig.from_file(js).tasks == ("qa",)
    bad = tmp_path / "bad.toml"
    bad.write_text("tasks = [passkey")
    with pytest.raises(ts.ConfigError, match="not valid TOML"):
        EvalConfig.from_file(bad)
    badj = tmp_path / "bad.json"
    badj.write_text("{tasks: 1}")
    with pytest.raises(ts.ConfigError, match="not valid JSON"):
        EvalConfig.from_file(badj)
    with pytest.raises(ts.ConfigError, match="does not exist"):
        EvalConfig.from_file(tmp_path / "none.toml")
    yml = tmp_path / "grid.yaml"
    yml.write_text("tasks: [passkey]")
    with pytest.raises(ts.ConfigError, match=r"\.toml or \.json"):
        EvalConfig.from_file(yml)


def test_grid_expansion_and_cell_keys():
    cfg = EvalConfig.from_mapping(
        {
            "tasks": "passkey,ppl,cwe",
            "methods": "snapkv,full",
            "budgets": "0.25,0.5",
            "lengths": "512",
            "depths": "0,1",
            "seeds": "0",
            "modes": "agnostic,aware",
            "text": "generated",
        }
    )
    cells, notes = expand(cfg)
    # passkey: 2 depths x 2 modes x (full + 2 budgets); ppl: agnostic only, no depth; cwe: no depth, 2 modes
    assert len(cells) == 2 * 2 * 3 + 1 * 3 + 2 * 3
    assert any("ppl" in n and "agnostic" in n for n in notes)
    first = cells[0]
    assert first.spec == Spec()
    by_task = {}
    for c in cells:
        by_task.setdefault(c.task.name, []).append(c)
    assert {c.depth for c in by_task["cwe"]} == {None}
    assert {c.mode for c in by_task["ppl"]} == {"agnostic"}
    keys = [c.key("m") for c in cells]
    assert len(set(keys)) == len(keys)
    assert keys == [c.key("m") for c in expand(cfg)[0]]  # stable
    assert first.key("m") != first.key("other-model")
    conf = first.config("m")
    assert conf["spec"]["method"] == {"name": "full", "params": {}}
    assert conf["spec"]["budget"] is None
    snap = next(c for c in cells if c.spec.method.name == "snapkv")
    assert "window" in snap.config("m")["spec"]["method"]["params"]  # defaults are part of the key
    assert first.key("m") == first.spec.key(**first.workload("m"))  # the one key rule


# ------------------------------------------------------------------------------------------------------ metrics
def test_fidelity_metrics():
    a = log_probs(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]))
    assert torch.allclose(kl_divergence(a, a), torch.zeros(2), atol=1e-7)
    b = log_probs(torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]]))
    p = a[0].exp()
    expected = float((p * (a[0] - math.log(1 / 3))).sum())
    kl = kl_divergence(a, b)
    assert kl[0].item() == pytest.approx(expected, rel=1e-5)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-6)
    c = log_probs(torch.tensor([[0.0, 5.0, 0.0], [0.0, 3.0, 0.0]]))
    assert top1_agreement(a, c).tolist() == [0.0, 1.0]
    f = fidelity(a, c)
    assert f.top1 == 0.5
    assert f.n == 2
    assert f.kl_max >= f.kl > 0
    lp = token_logprobs(a, torch.tensor([0, 1]))
    assert lp.tolist() == pytest.approx([a[0, 0].item(), a[1, 1].item()])
    assert perplexity(-2 * math.log(4), 2) == pytest.approx(4.0)
    assert math.isnan(fidelity(a[:0], a[:0]).kl)
