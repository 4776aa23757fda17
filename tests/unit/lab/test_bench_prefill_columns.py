"""tokensieve bench's prefill columns: prefill attention time and FlexAttention compile time.

Rows record ``prefill_attn_s`` (wall time inside the prefill's attention calls, from the cache's
``CacheStats.prefill_attention_seconds``) and ``compile_s`` (the prefill's share of ``flex.STATS.compile_seconds``);
the store gains both columns by migration, and the reports show them.
"""

from __future__ import annotations

import shutil
import sqlite3

import pytest
import torch

from tokensieve.attention import flex
from tokensieve.bench.config import BenchConfig, bench_specs
from tokensieve.bench.runner import run_bench
from tokensieve.data.testing import CharTokenizer
from tokensieve.engine import compress
from tokensieve.results.stats import speed
from tokensieve.results.store import ResultStore


@pytest.fixture
def dense_flex():
    previous = flex.set_compile(False)  # the sparse kernel's dense fallback: nothing compiles
    yield
    flex.set_compile(previous)


def _bench(model, store, specs="full,ashape,snapkv:0.5", lengths=(128,)):
    cfg = BenchConfig(specs=bench_specs(specs), lengths=lengths, decode_tokens=2, repetitions=2, threads=1)
    return run_bench(cfg, store=store, model_and_tokenizer=(model, CharTokenizer()), bandwidth=1e10, command="c")


def test_the_cache_times_prefill_attention_apart_from_decoding(tiny_model):
    press = compress(tiny_model, "full")
    ctx = press.prefill(torch.randint(3, 90, (1, 96)))
    stats = ctx.cache.stats
    assert 0 < stats.prefill_attention_seconds <= ctx.prefill_seconds
    assert stats.decode_attention_calls == 0
    before = stats.prefill_attention_seconds
    press.decode(ctx, 3)
    assert stats.decode_attention_calls > 0
    assert stats.prefill_attention_seconds == before  # single-token steps are decode attention, not prefill


def test_bench_rows_carry_prefill_attention_and_compile_seconds(tiny_model, tmp_path, dense_flex):
    store = ResultStore(tmp_path / "b.sqlite")
    rows, info = _bench(tiny_model, store)
    assert len(rows) == 3 * 2
    for r in rows:
        assert r.prefill_attn_s is not None
        assert 0 < r.prefill_attn_s <= r.prefill_s
        assert r.compile_s == 0.0  # nothing compiles with the dense fallback
    assert info["warmup_compile_s"] == 0.0
    assert store.runs("bench")[-1]["info"]["warmup_compile_s"] == 0.0  # recorded with the run, for reports
    stored = store.rows("bench")
    assert {r["label"] for r in stored} == {"full", "ashape", "snapkv:0.5"}
    assert all(0 < r["prefill_attn_s"] <= r["prefill_s"] and r["compile_s"] == 0.0 for r in stored)
    by = {r["label"]: r for r in speed(stored, info)}
    assert by["full"]["ttft_speedup"] == pytest.approx(1.0)
    assert 0 < by["ashape"]["prefill_attn_share"] <= 1
    store.close()


def test_a_compile_inside_the_timed_prefill_is_counted(tiny_model, monkeypatch, dense_flex):
    import tokensieve.methods.kv._sparse_prefill as sp

    real = sp.block_sparse_attention
    calls = {"n": 0}

    def compiling(*args, **kwargs):  # stands in for a call that compiles a graph: counted as 0.25 s of compiling
        calls["n"] += 1
        flex.STATS.compile_seconds += 0.25
        return real(*args, **kwargs)

    monkeypatch.setattr(sp, "block_sparse_attention", compiling)
    rows, info = _bench(tiny_model, None, specs="full,ashape[block=16,sink=16,local=32]")
    assert calls["n"] > 0
    assert info["warmup_compile_s"] > 0  # the warm-up prefilled the sparse configuration too
    for r in rows:
        assert r.compile_s == (0.0 if r.label == "full" else pytest.approx(0.25 * len(tiny_model.model.layers)))
    rows[0].compile_s = 9.0  # a one-off compile in one repetition: the summary shows the largest, not the median
    by = {r["label"]: r for r in speed([vars(r) for r in rows], info)}
    assert by[rows[0].label]["compile_s"] == 9.0


def test_a_store_written_before_the_prefill_columns_migrates(tiny_model, tmp_path, dense_flex):
    path = tmp_path / "old.sqlite"
    with ResultStore(path) as store:
        _bench(tiny_model, store, specs="full,snapkv:0.5")
    conn = sqlite3.connect(path)  # what an older tokensieve wrote: no prefill_attn_s / compile_s
    conn.execute("ALTER TABLE bench DROP COLUMN prefill_attn_s")
    conn.execute("ALTER TABLE bench DROP COLUMN compile_s")
    conn.commit()
    conn.close()
    ro_copy = tmp_path / "ro.sqlite"
    shutil.copy(path, ro_copy)
    with ResultStore(ro_copy, readonly=True) as ro:  # read as it is: the new columns are None
        old = ro.rows("bench")
        assert {r["prefill_attn_s"] for r in old} == {None}
        assert {r["compile_s"] for r in old} == {None}
        summary = speed(old, ro.runs("bench")[-1]["info"])
        assert all(r["prefill_attn_s"] != r["prefill_attn_s"] for r in summary)  # NaN: shown as —
    with ResultStore(path) as store:  # opened for writing: the columns are added, the old keys still resume
        conn = sqlite3.connect(path)
        assert {"prefill_attn_s", "compile_s"} <= {r[1] for r in conn.execute("PRAGMA table_info(bench)")}
        conn.close()
        again, _ = _bench(tiny_model, store, specs="full,snapkv:0.5")
        assert again == []
        more, _ = _bench(tiny_model, store, specs="full,snapkv:0.5", lengths=(96,))
        assert len(more) == 4
        assert all(r.prefill_attn_s for r in more)
        rows = store.rows("bench")
    assert sum(r["prefill_attn_s"] is None for r in rows) == 4
