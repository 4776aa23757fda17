"""The benchmark runner on the tiny model: configurations, medians, ratios, the store, the report."""

from __future__ import annotations

import pytest
import torch

from tokensieve import ConfigError
from tokensieve.bench.config import BenchConfig, MethodSpec
from tokensieve.bench.report import text_table, write_markdown
from tokensieve.bench.runner import run_bench, summarize
from tokensieve.bench.store import BenchStore
from tokensieve.eval.testing import CharTokenizer


def test_spec_parsing_and_errors():
    s = MethodSpec.parse("snapkv:0.5+quest:64")
    assert (s.prefill, s.budget, s.decode, s.decode_budget) == ("snapkv", "0.5", "quest", "64")
    assert s.label == "snapkv:0.5+quest:64"
    assert MethodSpec.parse("+h2o:128").prefill == "full"
    assert MethodSpec.parse("full").is_baseline
    with pytest.raises(ConfigError, match="budget"):
        MethodSpec.parse("snapkv")
    with pytest.raises(ConfigError, match="does not act during decode"):
        MethodSpec.parse("+snapkv:0.5")
    with pytest.raises(ConfigError, match="Unknown method"):
        MethodSpec.parse("nope:0.5")
    cfg = BenchConfig(specs=(MethodSpec.parse("snapkv:0.5"),))
    assert cfg.specs[0].is_baseline  # the full cache is always measured


def test_bench_runs_resumes_and_reports(tiny_model, tmp_path):
    cfg = BenchConfig(
        specs=(MethodSpec.parse("full"), MethodSpec.parse("snapkv:0.5"), MethodSpec.parse("+quest:16")),
        lengths=(64,),
        batch_sizes=(1, 2),
        decode_tokens=4,
        repetitions=2,
        threads=1,
    )
    store = BenchStore(tmp_path / "b.sqlite")
    rows, _ = run_bench(cfg, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10)
    assert len(rows) == 3 * 2 * 2
    again, _ = run_bench(cfg, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10)
    assert again == []  # resumed: nothing measured twice
    stored, stored_info = store.bench_rows()
    assert len(stored) == 12
    assert stored_info["bandwidth"] == 1e10
    summary = summarize(stored, stored_info)
    by = {(r["label"], r["batch"]): r for r in summary}
    assert by[("full", 1)]["speedup"] == pytest.approx(1.0)
    snap = by[("snapkv:0.5", 2)]
    # 2 warm-up and 4 measured decode steps append 6 tokens to every cache
    assert snap["kv_ratio"] == pytest.approx((32 + 6) / (64 + 6), rel=1e-6)
    quest = by[("full+quest:16", 1)]
    assert quest["kv_ratio"] == pytest.approx(1.0)  # sparse decoding keeps the whole cache
    assert quest["bytes_read"] < by[("full", 1)]["bytes_read"]  # but reads less of it
    # 3 layers x 2 KV heads x (K + V of 8 floats) per entry; the 4 measured steps read 67 … 70 entries
    assert by[("full", 1)]["bytes_read"] == 3 * 2 * 64 * 68.5
    assert "full+quest:16" in text_table(summary)
    md = write_markdown(summary, stored_info, tmp_path / "rep", "tokensieve bench ...")
    assert (tmp_path / "rep" / "bench_attention.png").is_file()
    assert "ideal speed-up" in md.read_text()


def test_spec_parameters():
    s = MethodSpec.parse("snapkv[window=64;kernel=7]:0.25+quest[page=32]:0.125")
    assert s.prefill_params == (("window", "64"), ("kernel", "7"))
    assert s.decode_params == (("page", "32"),)
    assert s.label == "snapkv[window=64;kernel=7]:0.25+quest[page=32]:0.125"
    with pytest.raises(ConfigError, match="no parameter"):
        MethodSpec.parse("+quest[pages=32]:0.1")


def test_report_command_includes_the_benchmark(tiny_model, tmp_path):
    from tokensieve.eval.report import write_report

    cfg = BenchConfig(specs=(MethodSpec.parse("+quest:16"),), lengths=(48,), decode_tokens=3, repetitions=1, threads=1)
    store = BenchStore(tmp_path / "s.sqlite")
    run_bench(cfg, store=store, model_and_tokenizer=(tiny_model, CharTokenizer()), bandwidth=1e10)
    store.close()
    paths = write_report(tmp_path / "s.sqlite", tmp_path / "rep", formats=("md", "html"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Speed and memory" in md
    assert "full+quest:16" in md
    assert any(p.name == "bench_speed_memory.png" for p in paths)


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

    args = build_parser().parse_args(["bench", "--methods", "full,+quest[page=32]:0.125", "--store", "b.sqlite"])
    assert _command(args) == (
        "tokensieve bench --methods 'full,+quest[page=32]:0.125' --lengths 2048 --batch-sizes 1 "
        "--decode-tokens 32 --reps 3 --threads 2 --store b.sqlite"
    )
