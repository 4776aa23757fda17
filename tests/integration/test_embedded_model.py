"""Integration tests on the real embedded model (short prompts)."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.data.prompts import chat_ids
from tokensieve.data.tasks import get_task

pytestmark = pytest.mark.integration


def _answer(press, tok, ids, n=16):
    ctx = press.prefill(ids)
    gen = press.decode(ctx, n, eos_token_ids=[tok.eos_token_id])
    return tok.decode(gen.tokens[0], skip_special_tokens=True), ctx


def test_capital_of_france(real_model):
    model, tok = real_model
    text, ctx = _answer(ts.compress(model, "full"), tok, chat_ids(tok, "What is the capital of France?"))
    assert "Paris" in text
    # 30 layers x 3 KV heads x 64 dims x (K + V) x fp32, for every prompt and generated token but the last
    assert ctx.cache.kv_bytes() == 30 * 3 * 64 * 2 * 4 * (ctx.mask.shape[1])


def test_passkey_512_with_full_cache(real_model):
    model, tok = real_model
    task = get_task("passkey")
    sample = task.make(tok, 512, 0.5, seed=0)
    ids = torch.tensor([sample.ids(tok).full])
    assert abs(ids.shape[1] - 512) <= 8
    text, _ = _answer(ts.compress(model, "full"), tok, ids)
    assert task.score(sample, text) == 1.0, text


def test_transformers_generate_inside_compress_block(real_model):
    model, tok = real_model
    ids = chat_ids(tok, "What is the capital of France?")
    with ts.compress(model, "full"):
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    assert model.config._attn_implementation == "sdpa"
