"""A recorded prefill replayed into a method's cache gives exactly what a plain prefill gives — for every registered
method that allows it, alone or followed by a decode method; the others are refused with the reason; an evaluation
with the shared prefill stores the same results as one without."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.adapters.models import model_shape
from tokensieve.data.prompts import left_pad
from tokensieve.engine import Compressor
from tokensieve.eval.runner import SharedPrefill
from tokensieve.registry import get_method_class, method_names

from ..eval_grid import eval_rows, run_grid
from ..methods.kv.test_methods_matrix import COMPRESSING, DECODING, press_for, prompts

SPECS = [(m, None) for m in COMPRESSING] + [("full", d) for d in DECODING] + [("snapkv", "quest")]
REPLAYABLE = [(m, d) for m, d in SPECS if get_method_class(m).capabilities.forward_change is None]


def _press(model, name, profiles, decode=None, **kw):
    # a token budget: bounded decode caches keep one size for the whole (ragged) batch
    if decode is None:  # a method that keeps every prompt token takes no budget
        return press_for(model, name, 0.25 if get_method_class(name)().compresses else None, profiles, **kw)
    return press_for(model, name, 20, profiles, decode=decode, decode_budget=20, **kw)


def _refusal(model, name, profiles, decode=None):
    return _press(model, name, profiles, decode).replay_refusal()


def _snapshot(rec):
    return [(r.q.clone(), r.k.clone(), r.v.clone()) for r in rec.layers]


@pytest.mark.parametrize(("name", "decode"), REPLAYABLE, ids=[f"{m}+{d}" if d else m for m, d in REPLAYABLE])
@torch.inference_mode()
def test_replay_equals_prefill(name, decode, tiny_model, tiny_profiles):
    # left padding for prefill methods; decode methods such as recompress refuse ragged batches
    ids, mask = left_pad(prompts(seed=3, lengths=(48, 37) if decode is None else (48, 48)), 0)
    press = _press(tiny_model, name, tiny_profiles, decode, reserve=8)
    assert press.replay_refusal() is None
    rec = ts.compress(tiny_model, "full").record_prefill(ids, mask)
    before = _snapshot(rec)
    plain = press.prefill(ids, mask)
    again = _press(tiny_model, name, tiny_profiles, decode, reserve=8).prefill(ids, mask, replay=rec)
    assert torch.equal(plain.logits, again.logits)
    assert torch.equal(plain.cache.lengths(), again.cache.lengths())
    assert plain.cache.kv_bytes() == again.cache.kv_bytes()
    # what was kept is the same: the same logits for a continuation, then the same decode (methods act on each step)
    nxt = torch.tensor([[5, 9, 11], [7, 7, 3]])
    a = press.extend(plain, nxt, return_logits=True)
    b = press.extend(again, nxt, return_logits=True)
    assert a is not None
    assert b is not None
    assert torch.equal(a, b)
    assert press.decode(plain, 4).tokens == press.decode(again, 4).tokens
    # the recording is left as it was, for the next method to replay
    for (q, k, v), r in zip(before, rec.layers, strict=True):
        assert torch.equal(q, r.q)
        assert torch.equal(k, r.k)
        assert torch.equal(v, r.v)


@torch.inference_mode()
def test_methods_that_change_the_forward_pass_are_refused(tiny_model, tiny_profiles):
    shape = model_shape(tiny_model)
    runnable = [m for m in method_names() if get_method_class(m)().refusal(shape) is None]  # hip: 3 dense of 3 layers
    refused = {m: _refusal(tiny_model, m, tiny_profiles) for m in runnable}
    refused = {m: why for m, why in refused.items() if why is not None}
    # sparse prefill attention and DapQ's pseudo-query suffix change what the model computes over the prompt
    assert {"flexprefill", "minference", "dapq"} <= set(refused), refused
    assert "own prefill attention" in refused["flexprefill"]
    assert "auxiliary tokens" in refused["dapq"]
    assert all(why.endswith(f"'{m}' {get_method_class(m).capabilities.forward_change}.") for m, why in refused.items())
    assert len(REPLAYABLE) >= 30  # everything else replays, alone or after a full prefill with a decode method
    ids = torch.tensor([prompts()[0]])
    rec = ts.compress(tiny_model, "full").record_prefill(ids)
    with pytest.raises(ts.CapabilityError, match="cannot replay a recorded prefill: 'dapq' adds auxiliary tokens"):
        press_for(tiny_model, "dapq", 0.25, tiny_profiles).prefill(ids, replay=rec)


@torch.inference_mode()
def test_a_recording_replays_only_its_own_prompt_in_one_pass(tiny_model):
    ids = torch.tensor([prompts()[0]])
    rec = ts.compress(tiny_model, "full").record_prefill(ids)
    assert all(r.hidden is not None for r in rec.layers)  # the hidden states the layers read ride along (KVzap)
    assert rec.nbytes == sum(t.numel() * 4 for r in rec.layers for t in (r.q, r.k, r.v, r.hidden))
    with pytest.raises(ts.ConfigError, match="another prompt"):
        ts.compress(tiny_model, "snapkv", 0.5).prefill(ids[:, 1:], replay=rec)
    other = ids.clone()
    other[0, 3] += 1
    with pytest.raises(ts.ConfigError, match="another prompt"):
        ts.compress(tiny_model, "snapkv", 0.5).prefill(other, replay=rec)
    chunked = ts.compress(tiny_model, "snapkv", 0.5, chunk=16)
    assert "the prefill runs in chunks" in (chunked.replay_refusal() or "")
    with pytest.raises(ts.CapabilityError, match="in chunks"):
        chunked.prefill(ids, replay=rec)


@torch.inference_mode()
def test_shared_prefill_records_once_per_prompt_and_respects_its_memory_bound(tiny_model, tiny_profiles):
    ids = prompts()[0]
    shared = SharedPrefill()
    for name in ("snapkv", "tova", "knorm"):
        assert shared.get(press_for(tiny_model, name, 0.25, tiny_profiles), "s0", ids) is not None
    assert shared.get(press_for(tiny_model, "dapq", 0.25, tiny_profiles), "s0", ids) is None  # prefills itself
    assert (shared.recorded, shared.replayed) == (1, 3)
    shared.get(press_for(tiny_model, "snapkv", 0.25, tiny_profiles), "s1", ids[:40])  # the next sample
    assert shared.recorded == 2
    assert len(shared.records) == 1
    tight = SharedPrefill(max_bytes=1000)  # too small for any recording: every cell prefills itself
    assert tight.get(press_for(tiny_model, "snapkv", 0.25, tiny_profiles), "s0", ids) is None
    assert tight.recorded == 0


GRID = {
    "tasks": "passkey",
    "methods": "snapkv,kvzip,dapq,tova,+quest,snapkv+h2o",
    "budgets": "0.25",
    "lengths": "250",
    "depths": "0.25,0.75",
    "seeds": "0",
    "modes": "agnostic,aware",
    "text": "generated",
    "threads": "1",
}
SAME = ("key", "score", "output", "kl", "kl_max", "top1", "answer_logprob", "kv_bytes", "stored_entries")


def test_an_evaluation_stores_the_same_results_with_and_without_the_shared_prefill(tiny_model, tmp_path, monkeypatch):
    recorded = []
    record = Compressor.record_prefill

    def spy(self, ids, *args, **kw):
        recorded.append(ids.shape[1])
        return record(self, ids, *args, **kw)

    monkeypatch.setattr(Compressor, "record_prefill", spy)
    shared, alone = tmp_path / "shared.sqlite", tmp_path / "alone.sqlite"
    run_grid(GRID, tiny_model, shared)
    assert len(recorded) == 2 * 2  # one forward pass per prompt: each sample's context and its whole prompt
    run_grid(GRID, tiny_model, alone, shared_prefill="false")
    assert len(recorded) == 4
    a = {r["key"]: r for r in eval_rows(shared)}
    b = {r["key"]: r for r in eval_rows(alone)}
    assert set(a) == set(b)
    assert len(a) == 2 * 2 * 7
    for k in a:
        assert {c: a[k][c] for c in SAME} == {c: b[k][c] for c in SAME}
