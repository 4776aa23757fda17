"""``tokensieve eval --ray``: a grid measured on a local Ray cluster (2 CPUs, 2 actors) stores the same rows as a
local run; resuming skips the stored cells and recomputes a stored reference; without Ray, a one-line error."""

from __future__ import annotations

import io
import sys

import pytest

from tests.conftest import make_tiny_model
from tests.unit.lab.test_cli_lab import byte_level_tokenizer
from tokensieve.errors import ConfigError
from tokensieve.eval.config import EvalConfig
from tokensieve.eval.runner import run_eval
from tokensieve.results.store import ResultStore

GRID = {
    "tasks": "passkey,ppl",
    "methods": "snapkv,streaming_llm",
    "budgets": "0.5",
    "lengths": "400",
    "depths": "0,1",
    "seeds": "0",
    "modes": "agnostic",
    "text": "generated",
    "threads": "1",
}
N_CELLS = 2 * 3 + 1 * 3  # passkey: 2 depths x (full + 2 methods); ppl: no depth
VOLATILE = {"created", "run_id", "prefill_s", "compress_s", "decode_s", "cell_s"}  # timings and bookkeeping


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("raymodel") / "tiny"
    make_tiny_model(vocab_size=256).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'tokensieve[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _run(model_dir, store, ray=None, **overrides):
    cfg = EvalConfig.from_mapping({**GRID, "model": model_dir, "store": str(store), **overrides})
    return run_eval(cfg, progress=False, out=io.StringIO(), ray=ray)


def _rows(store):
    with ResultStore(store, readonly=True) as s:
        return {r["key"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in s.rows("eval")}


@pytest.fixture(scope="module")
def local_rows(model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("local") / "r.sqlite"
    summary = _run(model_dir, store)
    assert summary.ran == N_CELLS
    return _rows(store)


def test_ray_run_resumes_and_stores_the_same_rows_as_a_local_run(ray_cluster, model_dir, local_rows, tmp_path):
    """Two runs on 2 actors (the cluster's start-up dominates, so one test): a partial grid (full cache and snapkv),
    then the whole grid, whose streaming_llm cells need each sample's reference, stored by the first run and so
    recomputed on the actor. The store then holds exactly the local run's rows."""
    from tokensieve.eval.ray_backend import RayOptions

    store = tmp_path / "ray.sqlite"
    first = _run(model_dir, store, ray=RayOptions(workers=2), methods="snapkv")
    assert (first.already, first.ran) == (0, 2 * N_CELLS // 3)
    second = _run(model_dir, store, ray=RayOptions(workers=2))
    assert (second.total, second.already, second.ran, second.stored) == (N_CELLS, first.ran, N_CELLS // 3, N_CELLS)
    rows = _rows(store)
    assert rows == local_rows
    assert all(r["kl"] is not None and r["score"] is not None for r in rows.values())
    with ResultStore(store, readonly=True) as s:
        assert len(s.runs("eval")) == 2  # the driver recorded each run; no actor wrote to the store
    third = _run(model_dir, store, ray=RayOptions(workers=2))
    assert (third.already, third.ran) == (N_CELLS, 0)


def test_without_ray_the_error_names_the_extra(model_dir, tmp_path, monkeypatch):
    from tokensieve.eval.ray_backend import RayOptions

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'tokensieve\[ray\]'"):
        _run(model_dir, tmp_path / "r.sqlite", ray=RayOptions())


def test_cli_without_ray_prints_one_line(model_dir, tmp_path, monkeypatch, capsys):
    from tokensieve.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["eval", "--model", model_dir, "--store", str(tmp_path / "r.sqlite"), "--tasks", "passkey",
                 "--lengths", "400", "--text", "generated", "--threads", "1", "--ray", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0
    assert "pip install 'tokensieve[ray]'" in err
    assert "Traceback" not in err
