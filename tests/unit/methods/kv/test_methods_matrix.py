"""Every registered method on the tiny model: budgets, batching, positions, 100 % = full, bytes."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.adapters.models import model_shape
from tokensieve.cache.decode import BoundedCacheMethod
from tokensieve.core.capabilities import Phase
from tokensieve.core.method import PrefillMethod
from tokensieve.data.prompts import left_pad
from tokensieve.registry import get_method_class, method_names

COMPRESSING = [
    m
    for m in method_names()
    if get_method_class(m).capabilities.apply.value != "none"
    and Phase.PREFILL in get_method_class(m).capabilities.phases
]
DECODING = [
    m
    for m in method_names()
    if m != "full"
    and Phase.DECODE in get_method_class(m).capabilities.phases
    and not get_method_class(m).capabilities.own_prefill_scores  # retention: tests/unit/methods/kv/test_retention.py
]
# the learned methods (SP-KV's write gate, the global retention gates) also act at every decode step
DECODES_ITSELF = [m for m in COMPRESSING if get_method_class(m).capabilities.decodes_itself]
L_LAYERS, H_KV, D = 3, 2, 8


def press_for(model, name, budget, profiles, **kw):
    """A Compressor with the tiny model's synthetic profiles for whichever of its methods needs one."""
    kinds = {get_method_class(m).capabilities.profile for m in (name, kw.get("decode")) if m is not None}
    given = [profiles[k] for k in sorted(kinds - {None})]
    return ts.compress(model, name, budget, profile=given or None, **kw)


def prompts(seed=0, lengths=(48, 30, 41)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", [m for m in COMPRESSING if m != "spkv"])  # spkv: threshold, no fixed budget
@torch.inference_mode()
def test_budget_is_exact_and_decoding_runs(name, tiny_model, tiny_profiles):
    rows = prompts()
    ids, mask = left_pad(rows, 0)
    press = press_for(tiny_model, name, 0.25, tiny_profiles, reserve=4)
    ctx = press.prefill(ids, mask)
    lengths = ctx.cache.lengths()  # (L, B, H)
    for b, r in enumerate(rows):
        budget = ts.Budget.ratio(0.25).tokens_for(len(r))
        assert int(lengths[:, b].sum()) == L_LAYERS * H_KV * budget, name  # same stored entries for every method
    assert torch.isfinite(ctx.logits).all()
    gen = press.decode(ctx, 3)
    assert gen.steps == 2
    assert int(ctx.cache.lengths()[:, 0].sum()) == L_LAYERS * H_KV * (ts.Budget.ratio(0.25).tokens_for(48) + 2)
    assert ctx.cache.seq_length() == ids.shape[1] + 2  # logical length: every token seen


@pytest.mark.parametrize("name", COMPRESSING)
@torch.inference_mode()
def test_full_budget_reproduces_full_cache(name, tiny_model, tiny_profiles):
    ids = torch.tensor([prompts()[0]])
    full = ts.compress(tiny_model, "full")
    ref = full.prefill(ids)
    ref_logits = ref.logits.clone()
    ref_gen = full.decode(ref, 4)
    press = press_for(tiny_model, name, 1.0, tiny_profiles)
    ctx = press.prefill(ids)
    torch.testing.assert_close(ctx.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert press.decode(ctx, 4).tokens == ref_gen.tokens
    torch.testing.assert_close(ctx.logits, ref.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", COMPRESSING)
@torch.inference_mode()
def test_batch_equals_single(name, tiny_model, tiny_profiles):
    rows = prompts(seed=1)
    ids, mask = left_pad(rows, 0)
    press = press_for(tiny_model, name, 0.4, tiny_profiles)
    ctx = press.prefill(ids, mask)
    first = ctx.logits.clone()
    lengths = ctx.cache.lengths()
    gen = press.decode(ctx, 3)
    for b, r in enumerate(rows):
        single = press.prefill(torch.tensor([r]))
        torch.testing.assert_close(first[b], single.logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(lengths[:, b], single.cache.lengths()[:, 0])
        assert gen.tokens[b] == press.decode(single, 3).tokens[0]


@pytest.mark.parametrize("name", COMPRESSING)
@torch.inference_mode()
def test_gqa_rows_are_kv_heads_and_bytes_are_exact(name, tiny_model, tiny_profiles):
    ids = torch.tensor([prompts()[0]])
    ctx = press_for(tiny_model, name, 0.5, tiny_profiles).prefill(ids)
    cache = ctx.cache
    assert cache.lengths().shape == (L_LAYERS, 1, H_KV)  # per KV head, never expanded to the 6 query heads
    stored = 0
    for store in cache.stores():
        for h in range(H_KV):
            k, v, _ = store.row(0, h)
            stored += k.numel() * k.element_size() + v.numel() * v.element_size()
    assert cache.kv_bytes() == stored == cache.stored_entries() * 2 * D * 4


@pytest.mark.parametrize("name", [m for m in COMPRESSING if m not in ("razor", "ems")])
@torch.inference_mode()
def test_kept_tokens_keep_their_true_positions(name, tiny_model, tiny_profiles):
    rows = prompts(seed=2, lengths=(40, 25))
    ids, mask = left_pad(rows, 0)
    ctx = press_for(tiny_model, name, 0.3, tiny_profiles).prefill(ids, mask)
    for store in ctx.cache.stores():
        for b, r in enumerate(rows):
            for h in range(H_KV):
                _, _, pos = store.row(b, h)
                assert pos.min() >= 0  # padding never kept
                assert pos.max() < len(r)
                assert torch.all(pos[1:] > pos[:-1])
    # the next token's position is its true position in its own sequence
    assert ctx.next_positions().tolist() == [40, 25]


@torch.inference_mode()
def test_query_agnostic_appends_question_uncompressed(tiny_model):
    context, question = prompts(seed=3, lengths=(60, 9))
    press = ts.compress(tiny_model, "snapkv", 0.25, window=4)
    ctx = press.prefill(torch.tensor([context]))
    b = ts.Budget.ratio(0.25).tokens_for(60)
    assert ctx.cache.stored_entries() == L_LAYERS * H_KV * b
    fork = ctx.fork()
    press.extend(fork, torch.tensor([question]))
    assert fork.cache.stored_entries() == L_LAYERS * H_KV * (b + 9)
    assert ctx.cache.stored_entries() == L_LAYERS * H_KV * b  # the original is untouched
    aware = press.prefill(torch.tensor([context + question]))
    assert aware.cache.stored_entries() == L_LAYERS * H_KV * ts.Budget.ratio(0.25).tokens_for(69)


def test_absolute_budget_larger_than_prompt_fails_before_work(tiny_model):
    press = ts.compress(tiny_model, "snapkv", 100)
    with pytest.raises(ts.ConfigError, match="larger than the prompt"):
        press.prefill(torch.tensor([prompts()[1]]))


@pytest.mark.parametrize("name", ["razor", "compresskv", "fasa_prefill", "+fasa:0.5"])
def test_missing_profile_is_a_clear_error(name, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSIEVE_HOME", str(tmp_path))
    with pytest.raises(ts.CapabilityError, match="tokensieve profile"):
        ts.compress(tiny_model, name, 0.5)


def test_profile_of_another_shape_is_rejected(tiny_model, tiny_profiles):
    from tests.conftest import make_tiny_model, synthetic_profiles

    other = synthetic_profiles(make_tiny_model(num_hidden_layers=2))
    with pytest.raises(ts.ConfigError, match="another shape"):
        ts.compress(tiny_model, "razor", 0.5, profile=other["retrieval-heads"])


@pytest.mark.parametrize("name", DECODING)
@torch.inference_mode()
def test_decode_methods_batch_equals_single_and_padding_is_safe(name, tiny_model, tiny_profiles):
    rows = prompts(seed=4, lengths=(40, 40))
    press = press_for(tiny_model, "full", 1.0, tiny_profiles, decode=name, decode_budget=24)
    ctx = press.prefill(torch.tensor(rows))
    gen = press.decode(ctx, 6)
    for b, r in enumerate(rows):
        assert gen.tokens[b] == press.decode(press.prefill(torch.tensor([r])), 6).tokens[0]
    padded = prompts(seed=5, lengths=(40, 13, 30))
    ids, mask = left_pad(padded, 0)
    if name == "recompress":  # re-compresses the whole batch at once: uneven batches are refused up front
        with pytest.raises(ts.CapabilityError, match="one at a time"):
            press.prefill(ids, mask)
        return
    ctx = press.prefill(ids, mask)
    press.decode(ctx, 6)
    assert torch.isfinite(ctx.logits).all()
    assert ctx.next_positions().tolist() == [45, 18, 35]


@pytest.mark.parametrize("name", DECODES_ITSELF)
@torch.inference_mode()
def test_methods_that_decode_themselves_batch_equals_single_while_decoding(name, tiny_model, tiny_profiles):
    assert {"spkv", "retention"} <= set(DECODES_ITSELF)
    rows = prompts(seed=4, lengths=(40, 23, 31))
    ids, mask = left_pad(rows, 0)
    press = press_for(tiny_model, name, 0.4, tiny_profiles)
    assert press.decode_method is press.method  # no '+decode' needed
    ctx = press.prefill(ids, mask)
    gen = press.decode(ctx, 6)
    lengths = ctx.cache.lengths()
    for b, r in enumerate(rows):
        single = press.prefill(torch.tensor([r]))
        assert gen.tokens[b] == press.decode(single, 6).tokens[0]
        assert torch.equal(lengths[:, b], single.cache.lengths()[:, 0])  # the same entries kept while decoding
    assert ctx.next_positions().tolist() == [len(r) + 5 for r in rows]


@torch.inference_mode()
def test_checkpoint_rollback_reuses_a_compressed_context(tiny_model):
    context, q1, q2 = prompts(seed=6, lengths=(60, 7, 9))
    press = ts.compress(tiny_model, "snapkv", 0.25, window=4)
    ctx = press.prefill(torch.tensor([context]))
    stored = ctx.cache.stored_entries()
    mark = ctx.checkpoint()
    answers = []
    for q in (q1, q2, q1):
        press.extend(ctx, torch.tensor([q]))
        answers.append(press.decode(ctx, 4).tokens[0])
        ctx.rollback(mark)
        assert ctx.cache.stored_entries() == stored
        assert ctx.cache.seq_length() == 60
    fresh = press.prefill(torch.tensor([context]))
    press.extend(fresh, torch.tensor([q2]))
    assert answers[1] == press.decode(fresh, 4).tokens[0]
    assert answers[0] == answers[2]
    bounded = ts.compress(tiny_model, "full", decode="streaming_llm", decode_budget=20)
    ctx = bounded.prefill(torch.tensor([context]))
    mark = ctx.checkpoint()
    bounded.decode(ctx, 3)
    with pytest.raises(ts.ConfigError, match="evicted"):
        ctx.rollback(mark)


@pytest.mark.parametrize("decode", DECODING)
@torch.inference_mode()
def test_every_prefill_and_decode_pair_runs_or_is_refused_when_built(decode, tiny_model, tiny_profiles):
    """No pairing fails half-way: either the Compressor refuses it when built, or prefill and decode run."""
    ids, mask = left_pad(prompts(4, lengths=(48, 48, 48) if decode == "recompress" else (48, 30, 41)), 0)
    prefill_methods = [m for m in method_names() if Phase.PREFILL in get_method_class(m).capabilities.phases]
    ran = refused = 0
    shape = model_shape(tiny_model)
    for prefill in prefill_methods:
        if get_method_class(prefill)().refusal(shape) is not None:  # hip's 3 dense layers of the 3-layer model
            with pytest.raises(ts.CapabilityError, match="no layer would be sparse"):
                press_for(tiny_model, prefill, 0.5, tiny_profiles, decode=decode, decode_budget=16)
            refused += 1
            continue
        adaptive = get_method_class(prefill).capabilities.head_adaptive
        if adaptive and not get_method_class(decode).capabilities.head_adaptive:  # spkv decodes ragged rows
            with pytest.raises(ts.CapabilityError, match="head-adaptive"):
                press_for(tiny_model, prefill, 0.5, tiny_profiles, decode=decode, decode_budget=16)
            refused += 1
            continue
        passes = getattr(get_method_class(prefill), "prefill_passes", PrefillMethod.prefill_passes)
        if passes is not PrefillMethod.prefill_passes:  # kvzip: refused when built
            with pytest.raises(ts.CapabilityError, match="auxiliary passes"):
                press_for(tiny_model, prefill, 0.5, tiny_profiles, decode=decode, decode_budget=16)
            refused += 1
            continue
        press = press_for(tiny_model, prefill, 0.5, tiny_profiles, decode=decode, decode_budget=16)
        ctx = press.prefill(ids, mask)
        gen = press.decode(ctx, 4)
        assert [len(t) for t in gen.tokens] == [4, 4, 4], (prefill, decode)
        ran += 1
    assert ran == len(prefill_methods) - refused
    assert ran > refused


@pytest.mark.parametrize("budget", [0.3, 12])
@pytest.mark.parametrize("name", DECODING)
@torch.inference_mode()
def test_decode_method_batch_equals_single(name, budget, tiny_model, tiny_profiles):
    """Left padding is never selected nor counted: each row of a padded batch decodes as it would alone."""
    rows = prompts(seed=5, lengths=(70, 33, 52))
    ids, mask = left_pad(rows, 0)
    params = {"page": 4, "min_pages": 2, "dense_layers": 1} if name == "quest" else {}
    params = {"n_init": 2, "n_local": 4} if name == "tokenselect" else params
    press = press_for(
        tiny_model, "full", 1.0, tiny_profiles, decode=name, decode_budget=budget, decode_params=params or None
    )
    bounded = issubclass(get_method_class(name), BoundedCacheMethod)
    if name == "recompress" or (bounded and isinstance(budget, float)):  # one cache size for the whole batch
        with pytest.raises(ts.CapabilityError, match="one at a time"):
            press.prefill(ids, mask)
        return
    gen = press.decode(press.prefill(ids, mask), 8)
    for b, r in enumerate(rows):
        single = press.decode(press.prefill(torch.tensor([r])), 8)
        assert gen.tokens[b] == single.tokens[0], (name, b)
