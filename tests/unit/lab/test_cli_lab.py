"""The command line and the lab on a user's mistakes: checks before any work, one-line errors instead of
tracebacks, nonsense refused, warnings, streaming on whole characters, short-context profiling, progress and the
summary at the end. Tiny random models only."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tokensieve as ts
from tests.conftest import make_tiny_model
from tests.unit.core.test_registry_cli import save_tiny
from tokensieve.cli import build_parser, main
from tokensieve.data.testing import CharTokenizer

PROMPT = " ".join(f"t{3 + i % 90}" for i in range(80))  # 90 tokens of the tiny word-level tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny(path, tiny_model)  # context: 512 positions
    return path


def _no_work(monkeypatch):
    """Make any compression run fail the test: the CLI must stop before it."""
    import tokensieve.engine.compressor as compressor

    def boom(*a, **kw):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(compressor.Compressor, "prefill", boom)
    monkeypatch.setattr(compressor.Compressor, "__init__", boom)


def _exits(argv, capsys) -> str:
    """argv is refused by argparse (status 2, a usage line, no traceback); returns stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------- 8. context, before work
def test_generate_checks_max_new_tokens_against_the_context_before_any_work(tiny_dir, capsys, monkeypatch):
    _no_work(monkeypatch)
    argv = ["generate", PROMPT, "--model", str(tiny_dir), "--threads", "1", "--max-new-tokens", str(10**12)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens" in err
    assert "context of 512" in err
    assert "The prompt has 90 tokens" in err
    assert "Use --max-new-tokens 422 or less" in err  # 512 - 90
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_demo_checks_its_length_against_the_context_before_building_the_prompt(tiny_model, monkeypatch):
    import tokensieve.demo as demo

    monkeypatch.setattr(demo, "load_model", lambda name: (tiny_model, CharTokenizer()))
    monkeypatch.setattr(demo, "get_task", lambda name: pytest.fail("the prompt was built"))
    with pytest.raises(ts.PromptError, match=r"context of 512 tokens: use --length 488 or less"):
        demo.run_demo(model_name="tiny", methods=["snapkv"], budget="0.5", length=10**9, depth=0.5, seed=0,
                      out=io.StringIO())  # fmt: skip


# --------------------------------------------------------------------------------- 10. no tracebacks, one line
@pytest.mark.parametrize("command", [["generate", "hi"], ["demo"], ["eval"], ["bench"], ["profile", "fasa"]])
@pytest.mark.parametrize("threads", ["-1", "0", "two"])
def test_threads_must_be_a_positive_whole_number(command, threads, capsys):
    err = _exits([*command, "--threads", threads], capsys)
    assert "argument --threads: expected a whole number of threads >= 1" in err
    assert "Traceback" not in err


def test_threads_have_one_default_documented_in_one_place():
    from tokensieve.bench.config import BenchConfig
    from tokensieve.results.threads import HELP, default_threads, resolve_threads
    from tokensieve.spec import Spec

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("generate", "demo", "eval", "bench", "profile"):
        action = next(a for a in subs[name]._actions if a.dest == "threads")
        assert (action.default, action.help) == (None, HELP), name
    assert resolve_threads(None) == default_threads() == min(len(os.sched_getaffinity(0)), 8)
    assert BenchConfig(specs=(Spec(),)).threads == default_threads()  # bench no longer defaults to 2
    with pytest.raises(ts.ConfigError, match=">= 1"):
        resolve_threads(0)


def test_methods_json_into_a_closed_pipe_exits_quietly():
    """`tokensieve methods --json | head -1`: the reader goes away; no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tokensieve.cli import main; sys.exit(main())", "methods", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # before the first write: every write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 0
    assert "Traceback" not in err, err
    assert "BrokenPipe" not in err


def test_bench_report_at_a_file_is_refused_before_the_benchmark(tmp_path, capsys, monkeypatch):
    import tokensieve.adapters.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the benchmark started"))
    report = tmp_path / "bench.md"
    report.write_text("an earlier report")
    assert main(["bench", "--report", str(report), "--lengths", "64", "--reps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--report" in err
    assert "is a file" in err
    assert "Traceback" not in err
    assert report.read_text() == "an earlier report"


def _broken(kind: str, good: Path, tmp: Path) -> Path:
    import shutil

    d = tmp / kind
    shutil.copytree(good, d)
    if kind == "truncated-weights":
        f = d / "model.safetensors"
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif kind == "no-tokenizer":
        for f in d.iterdir():
            if "token" in f.name:
                f.unlink()
    elif kind == "empty-config":
        (d / "config.json").write_text("")
    elif kind == "config-without-type":
        (d / "config.json").write_text("{}")
    elif kind == "unknown-architecture":
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="nosuchmodel", architectures=["NoSuchForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "kind",
    [
        "truncated-weights",
        "no-tokenizer",
        "empty-config",
        "config-without-type",
        "unknown-architecture",
    ],
)
def test_a_broken_model_folder_is_a_one_line_error(kind, tiny_dir, tmp_path, capsys):
    folder = _broken(kind, tiny_dir, tmp_path)
    for argv in (["generate", "hi", "--max-new-tokens", "2"], ["profile", "retrieval-heads"]):
        assert main([*argv, "--model", str(folder), "--threads", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tokensieve: error: ")
        assert str(folder) in err
        assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ 11. nonsense refused
def test_demo_depth_outside_0_1_is_refused(capsys, tiny_model, monkeypatch):
    err = _exits(["demo", "--depth", "2"], capsys)
    assert "argument --depth: expected a depth in [0, 1]" in err
    import tokensieve.demo as demo

    monkeypatch.setattr(demo, "load_model", lambda name: pytest.fail("loaded a model"))
    with pytest.raises(ts.ConfigError, match=r"depth must be in \[0, 1\]"):
        demo.run_demo(model_name="tiny", methods=["snapkv"], budget="0.5", length=300, depth=2.0, seed=0)


def test_a_seed_range_that_ends_before_it_starts_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--seeds", "5-2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'seeds': the range '5-2' ends before it starts; write 2-5." in err
    from tokensieve.eval.config import EvalConfig

    assert EvalConfig.from_mapping({"seeds": "2-5"}).seeds == (2, 3, 4, 5)


@pytest.mark.parametrize("value", ["0", "-5", "1"])
def test_profile_n_random_below_2_is_refused_and_the_profile_kept(value, tmp_path, capsys):
    out = tmp_path / "rh.json"
    out.write_text('{"a": "good profile"}')
    err = _exits(["profile", "retrieval-heads", "--n-random", value, "--out", str(out)], capsys)
    assert "argument --n-random: expected a whole number >= 2" in err
    assert out.read_text() == '{"a": "good profile"}'


def test_a_tiny_budget_is_named_with_the_share_it_keeps(tiny_dir, capsys):
    argv = ["generate", PROMPT, "--model", str(tiny_dir), "--threads", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--method", "snapkv", "--budget", "1"]) == 0
    err = capsys.readouterr().err
    assert (
        "tokensieve: warning: snapkv:1: the prefill budget keeps 1 of the 90 prompt tokens per layer and KV head "
        "(1.1%) (a budget of 1 is a token count; a share of the prompt is written 0.25 or 25%)."
    ) in err
    assert main([*argv, "--method", "snapkv", "--budget", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_budget_notes():
    from tokensieve.demo import budget_notes
    from tokensieve.spec import Spec

    assert budget_notes(Spec.parse("snapkv:0.1"), 1024) == []  # the demo's default: 102 tokens
    assert budget_notes(Spec.parse("full"), 1024) == []
    (note,) = budget_notes(Spec.parse("snapkv:0.01"), 1000)
    assert "keeps 10 of the 1000 prompt tokens" in note
    assert "(1.0%)" in note
    assert "token count" not in note
    (note,) = budget_notes(Spec.parse("+quest:4"), 500)
    assert note.startswith("+quest:4: the decode method budget keeps 4 of the 500")
    assert budget_notes(Spec.parse("snapkv:8"), 8) == []  # keeps the whole prompt


# ------------------------------------------------------------------------------------ 12. whole characters
def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE with no merges: one token per UTF-8 byte (an emoji is 4 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="Ā", pad_token="Ā")  # byte 0


TEXT = "Héllo 🙂 中文, ok 👍🏽!"


def test_text_stream_releases_whole_characters():
    from tokensieve.data.prompts import TextStream

    tok = byte_level_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT)  # multi-byte characters span several tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == TEXT
    assert not any("\ufffd" in p for p in pieces)
    cut = TextStream(tok)  # generation stopped inside a character: the rest is released at the end
    assert "".join(cut.push(i) for i in ids[:8]) == "Héllo "
    assert cut.flush() == "\ufffd"


def test_generate_streams_emoji_and_cjk(tmp_path, capsys, monkeypatch):
    import tokensieve.engine.compressor as compressor

    tok = byte_level_tokenizer()
    path = tmp_path / "bytes"
    make_tiny_model(vocab_size=256).save_pretrained(path)
    tok.save_pretrained(path)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]

    def decode(self, ctx, max_new_tokens, *, eos_token_ids=(), on_token=None):
        for t in ids:
            on_token(0, t)
        return compressor.Generation([list(ids)], len(ids), 0.1, [True])

    monkeypatch.setattr(compressor.Compressor, "decode", decode)
    assert main(["generate", "hello there", "--model", str(path), "--threads", "1", "--max-new-tokens", "64"]) == 0
    assert capsys.readouterr().out == TEXT + "\n"


# -------------------------------------------------------------------------------- 14. short-context profiling
def test_retrieval_heads_profile_fits_a_512_token_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "rh.json"
    argv = ["profile", "retrieval-heads", "--model", str(tiny_dir), "--threads", "1", "--out", str(out)]
    assert main(argv) == 0  # the paper's 1000 x 4 random tokens do not fit 512 positions: shrunk to fit
    settings = json.loads(out.read_text())["settings"]
    assert (settings["n_random"], settings["repeats"], settings["tokens"]) == (127, 4, 509)
    assert main([*argv, "--calibration-tokens", "101"]) == 0
    assert json.loads(out.read_text())["settings"]["tokens"] == 101
    assert main([*argv, "--n-random", "1000"]) == 2
    err = capsys.readouterr().err
    assert "1 + --n-random 1000 x --repeats 4 = 4001 tokens, beyond the model's context of 512 tokens" in err
    assert "prompt" not in err  # no prompt the user never gave
    assert main([*argv, "--calibration-tokens", "1000"]) == 2
    assert "--calibration-tokens 1000 exceeds the model's context of 512" in capsys.readouterr().err


def test_compresskv_and_fasa_calibrations_shrink_to_the_context(tiny_dir, monkeypatch, capsys):
    import tokensieve.profiling.frequency_chunks as fc
    import tokensieve.profiling.semantic_heads as sh

    seen: dict[str, dict] = {}

    def record(kind):
        def fake(model, tok, **kw):
            seen[kind] = kw
            raise ts.ConfigError("stop here")

        return fake

    monkeypatch.setattr(sh, "profile_compresskv", record("compresskv"))
    monkeypatch.setattr(fc, "profile_frequency_chunks", record("fasa"))
    base = ["--model", str(tiny_dir), "--threads", "1"]
    assert main(["profile", "compresskv", *base]) == 2
    assert seen["compresskv"]["lengths"] == [480]
    assert seen["compresskv"]["text_tokens"] == 512
    assert main(["profile", "compresskv", *base, "--calibration-tokens", "300"]) == 2
    assert seen["compresskv"]["lengths"] == [268]
    assert seen["compresskv"]["text_tokens"] == 300
    assert main(["profile", "fasa", *base]) == 2
    assert seen["fasa"]["prompt_tokens"] == 480
    assert seen["fasa"]["steps"] == 32
    capsys.readouterr()
    assert main(["profile", "compresskv", *base, "--lengths", "512"]) == 2
    err = capsys.readouterr().err
    assert "--lengths 512: a passkey prompt plus up to 32 answer tokens must fit the model's context" in err
    assert "use lengths <= 480" in err


def test_a_failed_compresskv_calibration_says_what_failed_and_what_to_do(tiny_dir, tmp_path, capsys, monkeypatch):
    import torch

    import tokensieve.profiling.semantic_heads as sh

    monkeypatch.setattr(sh, "semantic_retrieval_heads", lambda model, tok, shape, *a, **k: (
        torch.zeros(shape.num_layers, shape.num_q_heads), 0))  # fmt: skip
    out = tmp_path / "ckv.json"
    argv = ["profile", "compresskv", "--model", str(tiny_dir), "--threads", "1", "--samples", "2", "--out", str(out)]
    assert main([*argv, "--lengths", "200,300"]) == 2
    err = capsys.readouterr().err
    assert "CompressKV's calibration failed: the model retrieved the passkey in none of its 4 trials" in err
    assert "--lengths" in err
    assert "--samples" in err
    assert "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------- 15. progress, summary
def test_profile_shows_progress_unless_told_not_to(tiny_dir, tmp_path, capsys):
    argv = ["profile", "retrieval-heads", "--model", str(tiny_dir), "--threads", "1", "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "retrieval-heads: 100%" in err
    assert "3/3 [" in err  # one step per layer, on stderr
    assert main([*argv, "--no-progress"]) == 0
    assert "3/3 [" not in capsys.readouterr().err


def test_demo_shows_progress_unless_told_not_to(tiny_model, monkeypatch, capsys):
    import tokensieve.demo as demo

    monkeypatch.setattr(demo, "load_model", lambda name: (tiny_model, CharTokenizer()))
    argv = ["demo", "--methods", "snapkv,streaming_llm", "--budget", "0.5", "--length", "300", "--threads", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "/3 [" in captured.err  # full cache + 2 methods, on stderr
    assert "streaming_llm:0.5]" in captured.err  # the method being measured
    assert "snapkv" in captured.out
    assert "3/3" not in captured.out
    assert main([*argv, "--no-progress"]) == 0
    assert "/3 [" not in capsys.readouterr().err


def test_eval_prints_a_results_table_at_the_end(tiny_model, tmp_path, monkeypatch, capsys):
    import tokensieve.eval.runner as runner

    monkeypatch.setattr(runner, "load_model", lambda name: (tiny_model, CharTokenizer()))
    store = tmp_path / "r.sqlite"
    argv = ["eval", "--tasks", "passkey", "--methods", "snapkv", "--budgets", "0.5,0.25", "--lengths", "300",
            "--seeds", "0-1", "--modes", "aware", "--threads", "1", "--store", str(store)]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "mode", "method", "budget", "n", "metric", "value", "±", "stderr", "95",
                                "%", "CI", "KL", "KV", "kept"]  # fmt: skip
    body = [line.split() for line in lines[1:]]
    # accuracy is right/wrong per sample: its interval is Wilson's (2 of 2 right → 0.34–1.00)
    assert all(r[8] == "0.34–1.00" or r[6] != "1.000" for r in body)
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in body] == [
        ("passkey", "aware", "full", "100%", "2", "accuracy"),
        ("passkey", "aware", "snapkv", "25%", "2", "accuracy"),
        ("passkey", "aware", "snapkv", "50%", "2", "accuracy"),
    ]
    assert body[0][-1] == "100%"  # the full cache keeps everything
    assert main([*argv, "--quiet"]) == 0  # resumed: nothing to run, and no table
    assert capsys.readouterr().out == ""
