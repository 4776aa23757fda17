"""Command-line argument cases that used to end in a raw traceback, in silence or after minutes of work: each is now a
one-line error (status 2) before any work, or works. Tiny random models and small stores only."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from tests.unit.core.test_registry_cli import save_tiny
from tokensieve.cli import main
from tokensieve.data.testing import CharTokenizer
from tokensieve.results.store import ResultStore, spec_columns
from tokensieve.spec import Spec


def _refused(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokensieve: error:" in err, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def _no_model(monkeypatch):
    """Loading a model fails the test: the command must refuse its arguments before that."""
    import tokensieve.adapters.models as models

    def boom(*a, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", boom)


# ------------------------------------------------------------------------------------------------ train
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--hidden", "-1"], "--hidden"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
        (["--threads", "0"], "--threads"),
        (["--temperature", "nan"], "--temperature"),
        (["--collect-minutes", "inf"], "--collect-minutes"),
    ],
)
def test_train_spkv_checks_its_arguments_before_collecting(args, needle, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    _refused(["train", "spkv", "--out", str(tmp_path / "run"), *args], capsys, needle)
    assert not list((tmp_path / "run").rglob("*.pt"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--hidden-size", "0"], "--hidden-size"),
        (["--hidden-size", "100", "--num-heads", "3"], "multiple of --num-heads"),
        (["--num-layers", "0"], "--num-layers"),
        (["--text-layers", "31"], "--text-layers"),
        (["--text-hidden", "-4"], "--text-hidden"),
        (["--text-hidden", "100", "--text-heads", "3"], "--text-heads"),
        (["--lora-rank", "-1"], "--lora-rank"),
        (["--lr-lora", "nan"], "--lr-lora"),
        (["--vision-lr", "-1"], "--vision-lr"),
        (["--minutes", "0"], "--minutes"),
        (["--threads", "0"], "--threads"),
        (["--vision-batch", "0"], "--vision-batch"),
    ],
)
def test_train_vlm_checks_its_arguments_before_building(args, needle, tmp_path, capsys):
    _refused(["train", "vlm", "--out", str(tmp_path / "run"), *args], capsys, needle)
    assert not (tmp_path / "run").exists()


def test_train_commands_check_that_their_output_folder_can_be_written(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for argv in (["train", "spkv", "--out", str(blocker / "run")],
                 ["train", "retention", "--out", str(blocker / "run")],
                 ["train", "daam", "--out", str(blocker / "run")],
                 ["train", "daam-select", "--out", str(blocker / "run")],
                 ["train", "daam-figures", "--figdir", str(blocker / "figs")]):  # fmt: skip
        _refused(argv, capsys, "Cannot write to --")
    _refused(["train", "retention", "--out", str(tmp_path / "r"), "--bias-init", "nan"], capsys, "--bias-init")


def test_a_refused_run_leaves_no_settings_that_block_the_corrected_one(tmp_path):
    from tokensieve.errors import ConfigError
    from tokensieve.train.spkv import SPKVTrainConfig, SPKVTrainer

    out = tmp_path / "run"
    SPKVTrainer(SPKVTrainConfig(out=str(out), sequences=10_000), progress=False)  # refused later, at collection
    SPKVTrainer(SPKVTrainConfig(out=str(out), sequences=8), progress=False)  # nothing collected: settings may change
    assert json.loads((out / "config.json").read_text())["sequences"] == 8
    (out / "collect").mkdir()
    (out / "collect" / "0000.pt").write_bytes(b"")  # a shard: the run has started
    with pytest.raises(ConfigError, match="other settings"):
        SPKVTrainer(SPKVTrainConfig(out=str(out), sequences=9), progress=False)


def test_train_daam_refuses_seeds_that_select_nothing(tmp_path, capsys):
    for seeds in ("5-2", "", "-1", "a-b"):
        _refused(["train", "daam", "--seeds", seeds, "--out", str(tmp_path / "d")], capsys, "--seeds")
    _refused(["train", "daam", "--feedforward", "0", "--networks", "transformer", "--out", str(tmp_path / "d")],
             capsys, "--feedforward")  # fmt: skip
    _refused(["train", "daam", "--pool", "mean", "--networks", "cnnlstm", "--out", str(tmp_path / "d")], capsys,
             "--pool")  # fmt: skip
    for args, needle in ((["--keep", "1.0"], "--keep"), (["--keep", "x"], "--keep"), (["--repeats", "0"], "--repeats"),
                         (["--seeds", "5-2"], "--seeds"), (["--feedforward", "0"], "--feedforward")):  # fmt: skip
        _refused(["train", "daam-select", "--out", str(tmp_path / "s"), *args], capsys, needle)
    assert not (tmp_path / "s").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------ stores
def _store(path: Path, rows: int = 300) -> Path:
    with ResultStore(path) as st:
        for i in range(rows):
            spec = Spec.parse(f"snapkv:{(i % 9 + 1) / 10}")
            st.add("eval", {**spec_columns(spec), "key": f"k{i}", "model": "m", "version": "v", "created": time.time(),
                            "config": "{}", "task": "passkey", "length": 100 + i, "seed": i, "mode": "aware",
                            "metric": "accuracy", "score": 1.0, "output": "x" * 300})  # fmt: skip
    return path


def _damage(good: Path, bad: Path) -> Path:
    shutil.copy(good, bad)
    with bad.open("r+b") as f:
        f.seek(4096 * 6)
        f.write(b"\xff" * 4096 * 3)  # overwrite b-tree pages in the middle
    return bad


def test_a_damaged_store_is_refused_by_report_eval_and_bench(tmp_path, capsys, monkeypatch):
    bad = _damage(_store(tmp_path / "good.sqlite"), tmp_path / "bad.sqlite")
    _refused(["report", str(bad), "--out", str(tmp_path / "rep")], capsys, "damaged")
    _no_model(monkeypatch)
    _refused(["eval", "--dry-run", "--store", str(bad), "--tasks", "passkey"], capsys, "damaged")
    _refused(["bench", "--store", str(bad), "--lengths", "64", "--reps", "1"], capsys, "damaged")


def test_a_store_in_a_read_only_place_can_be_reported(tmp_path, capsys, monkeypatch):
    good = _store(tmp_path / "s.sqlite", rows=20)
    real = sqlite3.connect

    def read_only_folder(target, *args, **kwargs):  # what a reader meets in a folder it may not write (no -shm)
        if isinstance(target, str) and target.startswith("file:") and "immutable=1" not in target:
            raise sqlite3.OperationalError("unable to open database file")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_folder)
    assert main(["report", str(good), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()


# ------------------------------------------------------------------------------------------------ bench / eval
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny(path, tiny_model)
    return path


def test_bench_refuses_a_configuration_before_measuring_any(tiny_dir, tmp_path, capsys, monkeypatch):
    import tokensieve.bench.runner as runner

    def boom(*a, **kw):
        raise AssertionError("a cell was measured before every configuration was checked")

    monkeypatch.setattr(runner, "measure_bandwidth", boom)
    monkeypatch.setattr(runner, "_warm_up", boom)
    store = tmp_path / "b.sqlite"
    for methods, needle in (("full,adakv:0.25+h2o:0.25", "head-adaptive"),
                            ("full,+quest[dense_layers=5]:0.5", "no layer would be sparse"),
                            ("full,snapkv:400", "larger than the prompt")):  # fmt: skip
        _refused(["bench", "--model", str(tiny_dir), "--methods", methods, "--lengths", "64", "--reps", "1",
                  "--threads", "1", "--store", str(store)], capsys, needle)  # fmt: skip
    with ResultStore(store, readonly=True) as st:
        assert st.count("bench") == 0
        assert st.runs() == []


def test_eval_prints_its_plan_before_generating_samples(tiny_model, tmp_path, capsys, monkeypatch):
    import tokensieve.eval.runner as runner
    from tokensieve.errors import ConfigError

    monkeypatch.setattr(runner, "load_model", lambda name: (tiny_model, CharTokenizer()))

    def stop(*a, **kw):
        raise ConfigError("stopped while generating samples")

    monkeypatch.setattr(runner, "_prepare", stop)
    argv = ["eval", "--tasks", "passkey", "--methods", "snapkv", "--budgets", "0.5", "--lengths", "300",
            "--seeds", "0-99999", "--modes", "aware", "--threads", "1", "--store", str(tmp_path / "e.sqlite"),
            "--dry-run"]  # fmt: skip
    err = _refused(argv, capsys, "stopped while generating samples")
    assert "200000 cells" in err  # the plan came first
