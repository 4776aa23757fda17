"""The evaluation runner on the real embedded model: SIGKILL mid-grid and restart; the two modes on the full cache."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tokensieve.eval.config import EvalConfig
from tokensieve.eval.runner import run_eval
from tokensieve.results.store import ResultStore

pytestmark = pytest.mark.integration


def _rows(store) -> dict[str, float]:
    if not store.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
        try:
            return dict(conn.execute("SELECT key, created FROM eval").fetchall())
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the table is not created yet
        return {}


def test_sigkill_mid_grid_then_restart_finishes_without_redoing_cells(tmp_path, real_model):
    store = tmp_path / "r.sqlite"
    argv = [
        sys.executable, "-m", "tokensieve.cli", "eval", "--tasks", "passkey", "--methods", "streaming_llm",
        "--budgets", "0.5", "--lengths", "256", "--depths", "0,0.5,1", "--seeds", "0", "--store", str(store),
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    total = 3 * 2
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while len(_rows(store)) < 2:
            if proc.poll() is not None:
                pytest.fail(f"the runner exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                pytest.fail("the runner measured fewer than 2 cells in 240 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = _rows(store)
    assert 2 <= len(before) < total, "the run finished before it could be killed"

    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} already in" in done.stderr
    after = _rows(store)
    assert len(after) == total
    for key, created in before.items():
        assert after[key] == created  # finished cells were neither redone nor lost
    with ResultStore(store, readonly=True) as s:
        runs = s.runs()
    assert [r["todo"] for r in runs] == [total, total - len(before)]


def test_full_cache_is_the_same_in_both_modes_and_answers(tmp_path, real_model):
    model, tok = real_model
    cfg = EvalConfig.from_mapping(
        {
            "tasks": "niah_single",
            "methods": "snapkv",
            "budgets": "0.5",
            "lengths": "384",
            "depths": "0.5",
            "modes": "agnostic,aware",
            "store": str(tmp_path / "r.sqlite"),
            "threads": "1",
        }
    )
    summary = run_eval(cfg, model=model, tokenizer=tok, progress=False, out=io.StringIO())
    assert summary.ran == 4
    with ResultStore(tmp_path / "r.sqlite", readonly=True) as s:
        rows = {(r["method"], r["mode"]): r for r in s.rows("eval")}
    full_a, full_q = rows[("full", "agnostic")], rows[("full", "aware")]
    assert full_a["score"] == 1.0
    assert full_q["score"] == 1.0
    assert full_q["kl"] < 1e-3
    assert full_q["top1"] == 1.0
    assert full_a["answer_logprob"] > -2.0
    snap = rows[("snapkv", "aware")]
    assert snap["stored_entries"] < full_q["stored_entries"]
    assert 0.0 <= snap["top1"] <= 1.0
    assert snap["kl"] >= 0.0
