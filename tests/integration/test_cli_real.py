"""The command line with the real embedded model: whole characters when streaming, the context checked
before any work."""

from __future__ import annotations

import pytest

from tokensieve.cli import main
from tokensieve.data.prompts import TextStream

pytestmark = pytest.mark.integration

TEXT = "Emoji 🙂👍🏽, 中文字符 and naïve café ✓"


def test_the_embedded_tokenizer_streams_whole_characters(real_model):
    _, tok = real_model
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    naive = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(t.endswith("\ufffd") for t in naive)  # some tokens end inside a character: the case to handle
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_generate_refuses_max_new_tokens_beyond_the_context_before_any_work(real_model, capsys, monkeypatch):
    import tokensieve.engine.compressor as compressor

    monkeypatch.setattr(compressor.Compressor, "prefill", lambda *a, **k: pytest.fail("prefilled"))
    assert main(["generate", "Hi!", "--max-new-tokens", str(10**9), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens asks for 1000000000 more" in err
    assert "the model's context of 8192" in err
