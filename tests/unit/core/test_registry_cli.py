from __future__ import annotations

import dataclasses

import pytest
import torch

import tokensieve as ts
from tokensieve.cli import main
from tokensieve.registry import get_method_class, list_methods, method_names


def test_unknown_method_suggests_and_lists():
    with pytest.raises(ts.UnknownNameError) as err:
        ts.create_method("fulll")
    msg = str(err.value)
    assert "Did you mean 'full'" in msg
    assert "Valid methods:" in msg


def test_every_method_cites_a_paper_and_declares_capabilities():
    infos = list_methods()
    assert [i.name for i in infos] == method_names(None)
    assert {i.family for i in infos} == {"kv", "visual", "dit"}
    for info in infos:
        cls = get_method_class(info.name)
        assert cls.paper
        assert cls.__doc__
        assert info.capabilities
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_unknown_parameter_is_reported():
    with pytest.raises(ts.ConfigError, match=r"no parameter 'window'"):
        ts.create_method("full", window="3")


def test_cli_methods_reads_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in method_names(None):
        assert f"\n{name}  " in "\n" + out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "hi", "--method", "nope"], "Unknown method 'nope'"),
        (["generate", "hi", "--budget", "1.5"], "(0, 1]"),
        (["generate", "hi", "--budget", "0"], ">= 1"),
        (["generate", "   "], "empty"),
        (["generate", "hi", "--model", "not-a-model"], "Unknown model"),
        (["generate", "hi", "--model", "./missing/dir"], "No model directory"),
        (["generate", "hi", "--param", "oops"], "key=value"),
        (["generate", "hi", "--spec", "snapkv[window=8:0.5"], "expected ']' or ','"),
        (["generate", "hi", "--spec", "snapkv"], "no budget"),
        (["generate", "hi", "--spec", "+snapkv:0.5"], "does not act during decode"),
        (["generate", "hi", "--spec", "snapkv:0.5", "--method", "h2o"], "drop --method"),
        (["generate", "hi", "--method", "quest", "--budget", "0.2", "--param", "pages=3"], "no parameter 'pages'"),
        (["demo", "--methods", "snapkv,+quest[page=8"], "expected ']' or ','"),
        (["demo", "--budget", "2.5"], "(0, 1]"),
    ],
)
def test_cli_bad_input_fails_early_with_a_message(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err


def test_generate_builds_one_spec_from_either_form():
    from tokensieve.cli import build_parser, generate_spec

    def spec(*argv: str) -> str:
        return generate_spec(build_parser().parse_args(["generate", "hi", *argv])).label

    assert spec() == "full"
    assert spec("--method", "full", "--budget", "0.5") == "full"  # the full cache ignores a budget
    assert spec("--method", "snapkv", "--budget", "0.25", "--param", "window=64") == "snapkv[window=64]:0.25"
    assert spec("--method", "quest", "--budget", "0.125", "--param", "page=32") == "+quest[page=32]:0.125"
    assert spec("--spec", "snapkv:0.25+quest:0.125") == "snapkv:0.25+quest:0.125"


def test_generate_runs_a_decode_method_from_the_spec(tmp_path, tiny_model, capsys):
    save_tiny(tmp_path / "m", tiny_model)
    prompt = " ".join(f"t{3 + i % 90}" for i in range(80))
    argv = ["generate", prompt, "--model", str(tmp_path / "m"), "--max-new-tokens", "4", "--threads", "1"]
    assert main([*argv, "--spec", "snapkv:0.5+quest[page=8]:0.5"]) == 0
    assert "[snapkv:0.5+quest[page=8]:0.5] prompt" in capsys.readouterr().err


def test_demo_takes_specs(tiny_model, monkeypatch):
    import io

    import tokensieve.demo as demo
    from tokensieve.data.testing import CharTokenizer

    monkeypatch.setattr(demo, "load_model", lambda name: (tiny_model, CharTokenizer()))
    out = io.StringIO()
    rows = demo.run_demo(model_name="tiny", methods=["snapkv", "+quest[page=8]", "streaming_llm:0.25+h2o:64"],
                         budget="0.5", length=300, depth=0.5, seed=0, out=out)  # fmt: skip
    assert [(r.method, r.budget) for r in rows] == [
        ("full", "100%"), ("snapkv", "50%"), ("+quest[page=8]", "50%"), ("streaming_llm+h2o", "25% + 64 tok"),
    ]  # fmt: skip
    assert rows[1].kept < 0.6  # half of the context (and the 24 decoded tokens) kept
    assert rows[2].kept == 1.0  # sparse decoding keeps the whole cache
    assert "+quest[page=8]" in out.getvalue()


def test_missing_embedded_model_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSIEVE_HOME", str(tmp_path))
    with pytest.raises(ts.ModelNotFoundError, match="tokensieve pull"):
        ts.load_model("smollm2-135m")


def test_local_directory_without_config(tmp_path):
    with pytest.raises(ts.ModelNotFoundError, match=r"config\.json"):
        ts.load_model(str(tmp_path))


def save_tiny(tmp_path, tiny_model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(97)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0", eos_token="t2").save_pretrained(
        tmp_path
    )


def test_local_directory_model_loads(tmp_path, tiny_model):
    save_tiny(tmp_path, tiny_model)
    model, tok = ts.load_model(str(tmp_path))
    assert model.config.num_hidden_layers == tiny_model.config.num_hidden_layers
    assert tok("t5 t6")["input_ids"] == [5, 6]


def test_cli_profile_writes_a_loadable_profile(tmp_path, tiny_model, capsys):
    from tokensieve.adapters.models import model_shape
    from tokensieve.adapters.profiles import Profile

    save_tiny(tmp_path / "m", tiny_model)
    out = tmp_path / "rh.json"
    argv = ["profile", "retrieval-heads", "--model", str(tmp_path / "m"), "--n-random", "20", "--repeats", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    import json

    prof = Profile(**json.loads(out.read_text()))
    prof.check_shape(model_shape(tiny_model))
    assert prof.settings["n_random"] == 20
    assert len(prof.data["echo"]) == tiny_model.config.num_hidden_layers
    assert prof.data["count"] >= 1


def test_methods_doc_is_generated_from_the_registry(capsys):
    from pathlib import Path

    assert main(["methods", "--markdown"]) == 0
    doc = Path(__file__).resolve().parents[3] / "docs" / "METHODS.md"
    assert doc.read_text() == capsys.readouterr().out, "run: tokensieve methods --markdown > docs/METHODS.md"


def test_a_model_is_identified_by_its_content_not_its_path(tmp_path, tiny_model):
    from tests.conftest import make_tiny_model
    from tokensieve.adapters.models import model_key

    save_tiny(tmp_path / "a" / "model", tiny_model)
    save_tiny(tmp_path / "b" / "model", tiny_model)
    save_tiny(tmp_path / "c" / "model", make_tiny_model(seed=1))
    keys = [model_key(ts.load_model(str(tmp_path / d / "model"))[0]) for d in "abc"]
    assert keys[0] == keys[1]  # the same weights from two paths: one key, one set of profiles
    assert keys[2] != keys[0]  # other weights at a path of the same name: another key
    assert keys[0].startswith("model-")


def test_parameters_that_make_no_sense_are_refused(tiny_model):
    from tokensieve.methods.kv.snapkv import SnapKV

    with pytest.raises(ts.ConfigError, match=r"window=3\.7"):
        ts.compress(tiny_model, SnapKV(window=3.7), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ts.ConfigError, match="sink must be"):
        ts.compress(tiny_model, "streaming_llm[sink=-1]:0.5")
    press = ts.compress(tiny_model, "streaming_llm[sink=30]:0.25")
    with pytest.warns(ts.TokensieveWarning, match="protected tokens is dropped"):
        press.prefill(torch.randint(3, 97, (1, 40)))
