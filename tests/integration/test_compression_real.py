"""Compression on the real embedded model: memory really shrinks, and the answers survive where they should."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.data.tasks import get_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def passkey_512(real_model):
    _, tok = real_model
    task = get_task("passkey")
    sample = task.make(tok, 512, 0.5, seed=1)
    return task, sample, sample.ids(tok)


def _answer(press, tok, ctx):
    gen = press.decode(ctx, 12, eos_token_ids=[tok.eos_token_id])
    return tok.decode(gen.tokens[0], skip_special_tokens=True)


@pytest.mark.parametrize(("method", "budget"), [("razor", 0.25), ("compresskv", 0.5), ("knorm", 0.75)])
def test_shipped_profiles_and_methods_answer_the_passkey(real_model, passkey_512, method, budget):
    model, tok = real_model
    task, sample, ids = passkey_512
    press = ts.compress(model, method, budget)
    ctx = press.prefill(torch.tensor([ids.full]))
    full_bytes = 30 * 3 * 2 * 64 * 4 * len(ids.full)
    assert ctx.cache.kv_bytes() == pytest.approx(budget * full_bytes, rel=0.01)
    text = _answer(press, tok, ctx)
    assert task.score(sample, text) == 1.0, text


def test_query_agnostic_context_reuse(real_model, passkey_512):
    """Compress the context once, then answer from forks of it: the cache is really smaller and reused."""
    model, tok = real_model
    task, sample, ids = passkey_512
    press = ts.compress(model, "razor", 0.75)
    ctx = press.prefill(torch.tensor([ids.context]))
    stored = ctx.cache.stored_entries()
    assert stored == 30 * 3 * ts.Budget.ratio(0.75).tokens_for(len(ids.context))
    answers = []
    for _ in range(2):
        fork = ctx.fork()
        press.extend(fork, torch.tensor([ids.question]))
        answers.append(_answer(press, tok, fork))
    assert answers[0] == answers[1]
    assert task.score(sample, answers[0]) == 1.0, answers[0]
    assert ctx.cache.stored_entries() == stored


def test_dapq_runs_on_the_real_model(real_model, passkey_512):
    model, _ = real_model
    _, _, ids = passkey_512
    press = ts.compress(model, "dapq", 1.0)
    ctx = press.prefill(torch.tensor([ids.full]))
    full = ts.compress(model, "full").prefill(torch.tensor([ids.full]))
    torch.testing.assert_close(ctx.logits, full.logits, atol=1e-3, rtol=1e-3)
    assert ctx.cache.seq_length() == len(ids.full)  # pseudo queries are not part of the sequence
