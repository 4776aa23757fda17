"""The benchmark runner on the tiny model: configurations, medians, ratios, the store, the report."""

from __future__ import annotations

import json

import pytest
import torch

from tokensieve import ConfigError
from tokensieve.bench.config import BenchConfig, bench_specs
from tokensieve.bench.runner import run_bench
from tokensieve.data.testing import CharTokenizer
from tokensieve.results.render import text_table
from tokensieve.results.sections import SPEED_COLUMNS, speed_cells
from tokensieve.results.stats import speed
from tokensieve.results.store import ResultStore
from tokensieve.spec import Spec


def test_configurations_are_specs():
    specs = bench_specs("snapkv:0.5+quest:64,+h2o:128,snapkv[window=64;kernel=5]:0.25".replace(";", ","))
    assert [s.label for s in specs] == ["snapkv:0.5+quest:64", "+h2o:128", "snapkv[kernel=5,window=64]:0.25"]
    assert [s.label for s in bench_specs("snapkv,+quest[page=32]", ["0.1", 0.25])] == [
        "snapkv:0.1", "snapkv:0.25", "+quest[page=32]:0.1", "+quest[page=32]:0.25",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="gives no budget"):
        bench_specs("snapkv")
    with pytest.raises(ConfigError, match="does not act during decode"):
        bench_specs("+snapkv:0.5")
    with pytest.raises(ConfigError, match="Unknown method"):
        bench_specs("nope:0.5")
    with pytest.raises(ConfigError, match="no parameter"):
        bench_specs("+quest[pages=32]:0.1")
    with pytest.raises(ConfigError, match="expected ']' or ','"):
        bench_specs("snapkv[window=64;kernel=5]:0.25")  # the old ';' separator is gone
    cfg = BenchConfig(specs=(Spec.parse("snapkv:0.5"),))
    assert cfg.specs[0].is_full  # the full cache is always measured, first


def _by_label(summary):
    return {(r["label"], r["batch"]): r for r in summary}


def test_bench_runs_resumes_and_reports(tiny_model, tmp_path):
    cfg = BenchConfig(
        specs=bench_specs("full,snapkv:0.5,+quest[group=max]:16"),
        lengths=(64,),
        batch_sizes=(1, 2),
        decode_tokens=4,
        repetitions=2,
        threads=1,
    )
    store = ResultStore(tmp_path / "b.sqlite")
    rows, _ = run_bench(cfg, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10,
                        command="tokensieve bench ...")  # fmt: skip
    assert len(rows) == 3 * 2 * 2
    again, _ = run_bench(cfg, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10)
    assert again == []  # resumed: nothing measured twice
    stored = store.rows("bench")
    runs = store.runs("bench")
    assert len(stored) == 12
    assert len(runs) == 1
    assert runs[0]["info"]["bandwidth"] == 1e10
    assert runs[0]["todo"] == 12
    assert {r["run_id"] for r in stored} == {runs[0]["id"]}
    summary = speed(stored, runs[0]["info"])
    by = _by_label(summary)
    assert by[("full", 1)]["speedup"] == pytest.approx(1.0)
    snap = by[("snapkv:0.5", 2)]
    # 2 warm-up and 4 measured decode steps append 6 tokens to every cache
    assert snap["kv_ratio"] == pytest.approx((32 + 6) / (64 + 6), rel=1e-6)
    quest = by[("+quest[group=max]:16", 1)]
    assert (quest["prefill"], quest["decode"], quest["decode_budget"]) == ("full", "quest[group=max]", "16")
    assert quest["kv_ratio"] == pytest.approx(1.0)  # sparse decoding keeps the whole cache
    assert quest["bytes_read"] < by[("full", 1)]["bytes_read"]  # but reads less of it
    # 3 layers x 2 KV heads x (K + V of 8 floats) per entry; the 4 measured steps read 67 … 70 entries
    assert by[("full", 1)]["bytes_read"] == 3 * 2 * 64 * 68.5
    assert "+quest[group=max]:16" in text_table([h for h, _, _ in SPEED_COLUMNS], [speed_cells(r) for r in summary])
    # the key is the spec's key of the workload: a rerun with another decode length measures anew
    longer = BenchConfig(specs=cfg.specs, lengths=(64,), batch_sizes=(1,), decode_tokens=5, repetitions=1, threads=1)
    more, _ = run_bench(longer, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10)
    assert len(more) == 3


def test_report_shows_accuracy_and_speed_side_by_side(tiny_model, tmp_path):
    import io

    from tokensieve.eval.config import EvalConfig
    from tokensieve.eval.runner import run_eval
    from tokensieve.report import write_report

    path = tmp_path / "s.sqlite"
    grid = {"tasks": "passkey", "methods": "+quest:16,snapkv", "budgets": "0.5", "lengths": "300", "depths": "0.5",
            "modes": "aware", "text": "generated", "threads": "1", "store": str(path)}  # fmt: skip
    run_eval(EvalConfig.from_mapping(grid), model=tiny_model, tokenizer=CharTokenizer(), progress=False,
             out=io.StringIO())  # fmt: skip
    cfg = BenchConfig(specs=bench_specs("+quest:16,streaming_llm:0.5"), lengths=(48,), decode_tokens=3,
                      repetitions=1, threads=1)  # fmt: skip
    with ResultStore(path) as store:
        run_bench(cfg, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10)
    paths = write_report(path, tmp_path / "rep", formats=("md", "html"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Accuracy and speed, side by side" in md
    joined = md[md.index("## Accuracy and speed, side by side") : md.index("## Full-cache baseline")]
    header = ("| configuration | TTFT s | TTFT × | prefill attn s | decode tok/s | speed-up | attn × | KV MB | KV × | "
              "peak RSS MB decode | accuracy | KL |")  # fmt: skip
    assert header in joined
    assert "| full |" in joined
    assert "| +quest:16 |" in joined
    assert "snapkv:0.5" not in joined
    assert "streaming_llm:0.5" not in joined
    assert "Speed and memory" in md
    assert "| streaming_llm:0.5 | 48 |" in md
    assert any(p.name == "bench_speed_memory.png" for p in paths)
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert {r["label"] for r in summary["speed"]} == {"full", "+quest:16", "streaming_llm:0.5"}


def test_bench_only_store_reports(tiny_model, tmp_path):
    from tokensieve.report import write_report

    cfg = BenchConfig(specs=bench_specs("+quest:16"), lengths=(48,), decode_tokens=3, repetitions=1, threads=1)
    with ResultStore(tmp_path / "s.sqlite") as store:
        run_bench(cfg, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10, command="c")
    write_report(tmp_path / "s.sqlite", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Speed and memory" in md
    assert "+quest:16" in md
    assert "side by side" not in md


def test_peak_rss_sees_memory_held_inside_the_block():
    from tokensieve.bench.machine import PeakRSS

    with PeakRSS() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert mem.added >= 60 * 2**20
    with PeakRSS() as quiet:
        pass
    assert quiet.added < 60 * 2**20  # the peak was reset on entry


def test_bench_records_the_command_from_its_arguments():
    from tokensieve.bench.cli import _command
    from tokensieve.cli import build_parser
    from tokensieve.results.threads import default_threads

    argv = ["bench", "--methods", "full,+quest[page=32,min_pages=2]:0.125", "--store", "b.sqlite"]
    args = build_parser().parse_args(argv)
    assert _command(args) == (
        "tokensieve bench --methods 'full,+quest[page=32,min_pages=2]:0.125' --lengths 2048 --batch-sizes 1 "
        f"--decode-tokens 32 --reps 3 --threads {default_threads()} --store b.sqlite"
    )  # the one default of every command
    args = build_parser().parse_args(["bench", "--methods", "snapkv", "--budgets", "0.1,0.25"])
    assert "--methods snapkv --budgets 0.1,0.25 --lengths" in _command(args)
